"""The symmetric heap: named NVSHMEM buffers with the same shape on every rank, and their peers'
addresses for kernels."""

from __future__ import annotations

import math

import torch

ALIGN = 1 << 21          # NVSHMEM maps the heap in 2 MiB granules; count each buffer rounded up
RESERVE = 64 << 20       # NVSHMEM's own state and signal buffers on the heap


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def heap_bytes(buffers: dict) -> int:
    """Heap bytes for {name: (shape, dtype)}, each buffer rounded up to NVSHMEM's granule."""
    total = RESERVE
    for shape, dtype in buffers.values():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        total += -(-size // ALIGN) * ALIGN
    return total


def heap_bytes_for(config, world_size: int, max_tokens_per_rank: int) -> int:
    """Heap bytes one fused layer needs (config: MoEConfig)."""
    from .backends.flash import Geometry
    geo = Geometry.for_config(config, world_size, max_tokens_per_rank)
    return heap_bytes(geo.symmetric_buffers(config.torch_dtype))


class SymmetricHeap:
    """Named buffers on the NVSHMEM symmetric heap of runtime `rt` (collective operations)."""

    def __init__(self, rt):
        self.rt = rt
        self.tensors: dict[str, torch.Tensor] = {}
        self._peers: dict[str, torch.Tensor] = {}

    def allocate(self, buffers: dict) -> None:
        """buffers: {name: (shape, dtype)}. Every rank allocates the same names in the same (sorted)
        order, as NVSHMEM requires; the shapes are checked to agree first."""
        import nvshmem.core as nv
        self.rt.check_consistent(symmetric_buffers={n: [list(s), str(d)] for n, (s, d) in buffers.items()})
        for name in sorted(buffers):
            if name in self.tensors:
                raise ValueError(f"symmetric buffer {name!r} is already allocated")
            shape, dtype = buffers[name]
            try:
                self.tensors[name] = nv.tensor(shape, dtype=dtype)
            except Exception as e:  # nvshmem4py raises its own error types
                raise RuntimeError(
                    f"could not allocate symmetric buffer {name!r} {tuple(shape)} {dtype}: {e}. The "
                    f"buffers need {format_bytes(heap_bytes(buffers))}; NVSHMEM_SYMMETRIC_SIZE is "
                    f"{self._allowed()} (size it with flashmoe_py.init(layers=...))") from e
        self.rt.heaps.append(self)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise KeyError(f"no symmetric buffer {name!r}; allocated: {sorted(self.tensors)}")
        return self.tensors[name]

    def peer_ptrs(self, name: str) -> torch.Tensor:
        """[world_size] int64 on this rank's GPU: the address of PE p's copy of `name`, mapped
        into this GPU (NVLink peer access)."""
        if name not in self._peers:
            import nvshmem.core as nv
            t = self[name]
            # Own PE: the local address itself. nvshmem4py's get_peer_tensor on the own PE takes a
            # reference to the buffer that free_tensor does not drop.
            ptrs = [t.data_ptr() if pe == self.rt.rank else nv.get_peer_tensor(t, pe).data_ptr()
                    for pe in range(self.rt.world_size)]
            self._peers[name] = torch.tensor(ptrs, dtype=torch.int64, device=t.device)
        return self._peers[name]

    def free(self) -> None:
        """Free every buffer (collective, reverse allocation order); idempotent."""
        if not self.tensors:
            return
        import nvshmem.core as nv
        self.rt.barrier()  # no peer may still be writing into them
        self._peers.clear()
        for name in sorted(self.tensors, reverse=True):
            nv.free_tensor(self.tensors.pop(name))
        if self in self.rt.heaps:
            self.rt.heaps.remove(self)

    @staticmethod
    def _allowed() -> str:
        import os
        return os.environ.get("NVSHMEM_SYMMETRIC_SIZE", "the default (1 GiB)")
