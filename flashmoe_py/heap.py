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


def heap_bytes_for(config, world_size: int, max_tokens_per_rank: int, transport: str = "p2p") -> int:
    """Heap bytes one fused layer needs (config: MoEConfig; transport: "p2p" or "nvshmem")."""
    from .backends.flash import Geometry
    geo = Geometry.for_config(config, world_size, max_tokens_per_rank)
    return heap_bytes(geo.symmetric_buffers(config.torch_dtype, transport))


class SymmetricHeap:
    """Named buffers on the NVSHMEM symmetric heap of runtime `rt` (collective operations)."""

    def __init__(self, rt):
        self.rt = rt
        self.tensors: dict[str, torch.Tensor] = {}
        self._peers: dict[str, torch.Tensor] = {}
        self.bytes = 0  # heap bytes held (granule-rounded, without NVSHMEM's reserve)

    def allocate(self, buffers: dict) -> None:
        """buffers: {name: (shape, dtype)}. Every rank allocates the same names in the same (sorted)
        order, as NVSHMEM requires; the shapes are checked to agree first. Raises RuntimeError with
        the needed and the free bytes, on every rank, when the heap cannot hold them."""
        import nvshmem.core as nv
        self.rt.check_consistent(symmetric_buffers={n: [list(s), str(d)] for n, (s, d) in buffers.items()})
        for name in buffers:
            if name in self.tensors:
                raise ValueError(f"symmetric buffer {name!r} is already allocated")
        need = heap_bytes(buffers) - RESERVE
        free = self.rt.heap_capacity - RESERVE - self.rt.heap_used()
        if need > free:
            raise RuntimeError(
                f"the symmetric heap cannot hold this layer's buffers: they need {format_bytes(need)} "
                f"({need} bytes), {format_bytes(max(free, 0))} is free of NVSHMEM_SYMMETRIC_SIZE="
                f"{format_bytes(self.rt.heap_capacity)}; size it with flashmoe_py.init(layers=[(config, "
                f"max_tokens_per_rank), ...]) or lower max_tokens_per_rank")
        self.rt.heaps.append(self)
        for name in sorted(buffers):
            shape, dtype = buffers[name]
            try:
                self.tensors[name] = nv.tensor(shape, dtype=dtype)
            except Exception as e:  # nvshmem4py raises its own error types
                self.free()
                raise RuntimeError(
                    f"could not allocate symmetric buffer {name!r} {tuple(shape)} {dtype}: {e}. The "
                    f"buffers need {format_bytes(need)} of NVSHMEM_SYMMETRIC_SIZE="
                    f"{format_bytes(self.rt.heap_capacity)}") from e
            self.bytes += heap_bytes({name: buffers[name]}) - RESERVE

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
        """Free every buffer (collective, reverse allocation order); idempotent. After a fused
        kernel timed out (rt.failed) nothing collective is safe: the buffers are kept, unused,
        until the process exits."""
        if self in self.rt.heaps:
            self.rt.heaps.remove(self)
        self.bytes = 0
        if not self.tensors or self.rt.failed is not None:
            return
        self._peers.clear()
        import nvshmem.core as nv
        self.rt.barrier()  # no peer may still be writing into them
        for name in sorted(self.tensors, reverse=True):
            nv.free_tensor(self.tensors.pop(name))
