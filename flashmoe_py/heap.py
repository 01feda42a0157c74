"""The symmetric heap: named NVSHMEM buffers with the same shape on every rank, their peers'
addresses for kernels, and how many bytes they need.

    plan = heap_plan(config, world_size, max_tokens_per_rank)   # {name: BufferSpec}
    rt = flashmoe_py.init(heap_bytes=heap_bytes(plan))           # sizes NVSHMEM before it starts
    rt.heap.allocate(plan)                                       # collective
    x = rt.heap["recv_x"]; ptrs = rt.heap.peer_ptrs("recv_x")    # local view, [W] peer addresses

nvshmem4py is imported only inside the methods that allocate or free."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

ALIGN = 512            # NVSHMEM's allocator rounds every block up to 512 B (NVSHMEMI_MALLOC_ALIGNMENT)
GRANULE = 2 << 20      # CUDA VMM maps physical memory in 2 MiB granules at the least
RESERVE = 64 << 20     # NVSHMEM's own blocks on the heap (team sync arrays, collective scratch) + margin
DEFAULT_SYMMETRIC_SIZE = 1 << 30  # NVSHMEM's NVSHMEM_SYMMETRIC_SIZE when nobody sets it


@dataclass(frozen=True)
class BufferSpec:
    """One symmetric buffer: its shape and torch dtype (identical on every rank)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        if any(n < 0 for n in shape):
            raise ValueError(f"BufferSpec shape {shape} has a negative extent")
        object.__setattr__(self, "shape", shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class HeapSizeError(RuntimeError):
    """The symmetric heap is smaller than the buffers need; .needed and .allowed are in bytes."""

    def __init__(self, needed: int, allowed: int, source: str):
        self.needed, self.allowed = needed, allowed
        super().__init__(
            f"the symmetric heap needs {format_bytes(needed)} ({needed} bytes) but {source} allows "
            f"{format_bytes(allowed)} ({allowed} bytes); raise NVSHMEM_SYMMETRIC_SIZE (or unset it and "
            f"pass heap_bytes/layers to flashmoe_py.init) or lower max_tokens_per_rank")


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def parse_size(text: str, name: str = "NVSHMEM_SYMMETRIC_SIZE") -> int:
    """NVSHMEM's size syntax: a number with an optional k/m/g/t suffix (powers of 1024); characters
    after the suffix are ignored, as NVSHMEM does ("2GB" is 2 GiB)."""
    m = re.match(r"\s*(\d+\.?\d*|\.\d+)\s*([kmgtKMGT]?)", str(text))
    if not m:
        raise ValueError(f"{name}={text!r} is not a size: expected a number with an optional "
                         f"K/M/G/T suffix, e.g. 2G")
    scale = 1 << (10 * " KMGT".index(m.group(2).upper() or " "))
    return math.ceil(float(m.group(1)) * scale)


def heap_plan(config, world_size: int, max_tokens_per_rank: int) -> dict[str, BufferSpec]:
    """The fused kernel's symmetric buffers for one layer (config: MoEConfig). With W = world_size,
    L = local experts, H = hidden_size, and S = max_tokens_per_rank * min(top_k, L) + L * CHUNK rows
    (every token-slot one source can send one destination, plus one partly filled CHUNK per expert):

      recv_x          [W, S, H] config dtype  token rows received here, one region per source rank
      combine_y       [W, S, H] config dtype  expert outputs returned here, region per expert rank
      count_words     [2, W, L] int64         dispatch signal per (source, local expert):
                                              (epoch << 32) | rows, double-buffered by epoch parity
      chunk_flags     [W, L, MAXC] int32      epoch of each arrived CHUNK of rows
      combine_counts  [W, L, MAXC, NN] int64  combine signal: rows returned per chunk and n-tile

    Geometry (backends/flash.py) is the one definition the kernel uses; this names it for sizing."""
    from .backends.flash import Geometry
    if not isinstance(max_tokens_per_rank, int) or isinstance(max_tokens_per_rank, bool) \
            or max_tokens_per_rank < 1:
        raise ValueError(f"max_tokens_per_rank={max_tokens_per_rank!r} must be a positive int")
    geo = Geometry.for_config(config, world_size, max_tokens_per_rank)
    return {name: BufferSpec(shape, dtype)
            for name, (shape, dtype) in geo.symmetric_buffers(config.torch_dtype).items()}


def _spec(value) -> BufferSpec:
    return value if isinstance(value, BufferSpec) else BufferSpec(*value)


def _block_bytes(spec: BufferSpec) -> int:
    return -(-spec.nbytes // ALIGN) * ALIGN


def heap_bytes(*plans: dict) -> int:
    """NVSHMEM_SYMMETRIC_SIZE for all `plans` ({name: BufferSpec or (shape, dtype)}) allocated at
    once: every buffer rounded up to NVSHMEM's block alignment, plus RESERVE for NVSHMEM's own use,
    rounded up to a whole GRANULE."""
    total = RESERVE + sum(_block_bytes(_spec(s)) for plan in plans for s in plan.values())
    return -(-total // GRANULE) * GRANULE


def heap_bytes_for(config, world_size: int, max_tokens_per_rank: int) -> int:
    """Heap bytes one fused layer needs (config: MoEConfig)."""
    return heap_bytes(heap_plan(config, world_size, max_tokens_per_rank))


def symmetric_size_allowed() -> tuple[int, str]:
    """(bytes, where that limit comes from) for the NVSHMEM heap of this process."""
    user = os.environ.get("NVSHMEM_SYMMETRIC_SIZE")
    if user is None:
        return DEFAULT_SYMMETRIC_SIZE, "NVSHMEM's default NVSHMEM_SYMMETRIC_SIZE"
    return parse_size(user), f"NVSHMEM_SYMMETRIC_SIZE={user}"


class SymmetricHeap:
    """Named buffers on the NVSHMEM symmetric heap of runtime `rt` (allocate and free are
    collective: every rank calls them with the same plan, in the same order)."""

    def __init__(self, rt):
        self.rt = rt
        self.tensors: dict[str, torch.Tensor] = {}
        self.specs: dict[str, BufferSpec] = {}
        self._peers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Heap bytes this object's buffers occupy (block-aligned)."""
        return sum(_block_bytes(s) for s in self.specs.values())

    def allocate(self, plan: dict) -> None:
        """plan: {name: BufferSpec or (shape, dtype)}. Allocates every buffer, zeroed, in sorted name
        order (NVSHMEM pairs allocations by call order, so every rank must make the same calls; the
        plans are compared across ranks first). Raises HeapSizeError if the heap is too small."""
        import nvshmem.core as nv
        plan = {name: _spec(v) for name, v in plan.items()}
        taken = sorted(set(plan) & set(self.tensors))
        if taken:
            raise ValueError(f"symmetric buffers {taken} are already allocated in this heap")
        self.rt.check_consistent(symmetric_buffers={n: [list(s.shape), str(s.dtype)]
                                                    for n, s in sorted(plan.items())})
        done = []
        for name in sorted(plan):
            spec = plan[name]
            try:
                t = nv.tensor(spec.shape, dtype=spec.dtype)
                if t is None or t.data_ptr() == 0:
                    raise RuntimeError("nvshmem4py returned no tensor")
            except Exception as e:  # nvshmem4py raises its own types (NvshmemError, NvshmemInvalid)
                for n in reversed(done):  # every rank fails at the same buffer: still symmetric
                    nv.free_tensor(self.tensors.pop(n))
                    self.specs.pop(n)
                allowed, source = symmetric_size_allowed()
                in_use = sum(h.nbytes for h in self.rt.heaps if h is not self) + self.nbytes
                needed = heap_bytes(plan) + in_use
                raise HeapSizeError(needed, allowed, source) from e
            self.tensors[name], self.specs[name] = t, spec
            done.append(name)
        for name in done:
            self.tensors[name].zero_()  # signal words must start at 0 on every rank
        # ...and be zero everywhere before any rank may signal into a peer's copy.
        self.rt.barrier()
        if self not in self.rt.heaps:
            self.rt.heaps.append(self)

    def __getitem__(self, name: str) -> torch.Tensor:
        """This rank's copy of buffer `name` (a tensor of its BufferSpec's shape and dtype)."""
        if name not in self.tensors:
            raise KeyError(f"no symmetric buffer {name!r}; allocated: {sorted(self.tensors)}")
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def peer_ptrs(self, name: str) -> torch.Tensor:
        """[world_size] int64 on this rank's GPU: entry pe is the address of PE pe's copy of `name`
        mapped into this GPU (NVLink/PCIe peer access), for kernels to load and store through."""
        if name not in self._peers:
            import nvshmem.core as nv
            t = self[name]
            ptrs = []
            for pe in range(self.rt.world_size):
                if pe == self.rt.rank:
                    # Our own address. get_peer_tensor(t, own pe) would also return it, but it bumps
                    # the buffer's reference count in nvshmem4py, and free_tensor then never frees it.
                    ptrs.append(t.data_ptr())
                    continue
                try:
                    ptrs.append(nv.get_peer_tensor(t, pe).data_ptr())
                except Exception as e:
                    raise RuntimeError(f"rank {self.rt.rank} cannot map PE {pe}'s copy of {name!r}: "
                                       f"the GPUs are not peer-accessible (nvshmem_ptr is NULL)") from e
            self._peers[name] = torch.tensor(ptrs, dtype=torch.int64, device=t.device)
        return self._peers[name]

    def free(self) -> None:
        """Free every buffer (collective, reverse allocation order); idempotent."""
        if self.tensors:
            import nvshmem.core as nv
            self.rt.barrier()  # no peer may still be writing into them
            self._peers.clear()
            for name in sorted(self.tensors, reverse=True):
                nv.free_tensor(self.tensors.pop(name))
            self.specs.clear()
        if self in self.rt.heaps:
            self.rt.heaps.remove(self)

    def __repr__(self) -> str:
        return f"SymmetricHeap({sorted(self.specs)}, {format_bytes(self.nbytes)})"
