"""The symmetric heap: named NVSHMEM buffers with the same shape on every rank, and their peers'
addresses for kernels (how much each layer needs: kernels/layout.py)."""

from __future__ import annotations

import logging
import weakref

import torch
import torch.distributed as dist

from .kernels.layout import HEAP_RESERVE, format_bytes, heap_bytes

log = logging.getLogger("flashmoe_py")


class SymmetricHeap:
    """Named buffers on the NVSHMEM symmetric heap of runtime `rt` (collective operations); an
    allocator for kernels/workspace.Workspace. With an owner (a fused layer's backend, the only
    holder of the buffers), they go back to the heap once the owner is gone on every rank: at the
    next allocation, a collective (free_ownerless), or at the runtime's finalize()."""

    def __init__(self, rt, owner=None):
        self.rt = rt
        self.owner = None if owner is None else weakref.ref(owner)
        self.tensors: dict[str, torch.Tensor] = {}
        self._peers: dict[str, torch.Tensor] = {}
        self.bytes = 0  # heap bytes held (granule-rounded, without NVSHMEM's reserve)
        self.freed = False  # free() ran (the layer's close(), the owner gone, or the runtime's finalize())
        self.number = -1  # its place among the runtime's allocations (the same on every rank), once allocated

    def allocate(self, buffers: dict) -> dict[str, torch.Tensor]:
        """buffers: {name: (shape, dtype)} -> {name: this rank's copy, zeroed}. Every rank allocates
        the same names in the same (sorted) order, as NVSHMEM requires; the shapes are checked to
        agree first. Raises RuntimeError with the needed and the free bytes, on every rank, when the
        heap cannot hold them."""
        import nvshmem.core as nv
        self.rt.check_consistent(symmetric_buffers={n: [list(s), str(d)] for n, (s, d) in buffers.items()})
        for name in buffers:
            if name in self.tensors:
                raise ValueError(f"symmetric buffer {name!r} is already allocated")
        free_ownerless(self.rt)
        need = heap_bytes(buffers) - HEAP_RESERVE
        free = self.rt.heap_capacity - HEAP_RESERVE - self.rt.heap_used()
        if need > free:
            raise RuntimeError(
                f"the symmetric heap cannot hold this layer's buffers: they need {format_bytes(need)} "
                f"({need} bytes), {format_bytes(max(free, 0))} is free of NVSHMEM_SYMMETRIC_SIZE="
                f"{format_bytes(self.rt.heap_capacity)}; size it with flashmoe_py.init(layers=[(config, "
                f"max_tokens_per_rank), ...]) or lower max_tokens_per_rank")
        log.info("rank %d: %s of the symmetric heap for %s (%s free of %s)", self.rt.rank, format_bytes(need),
                 sorted(buffers), format_bytes(free), format_bytes(self.rt.heap_capacity))
        if self not in self.rt.heaps:
            self.number, self.rt.heaps_made = self.rt.heaps_made, self.rt.heaps_made + 1
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
            self.tensors[name].zero_()
            self.bytes += heap_bytes({name: buffers[name]}) - HEAP_RESERVE
        return {name: self.tensors[name] for name in buffers}

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
        self.bytes, self.freed = 0, True
        if not self.tensors:
            return
        if self.rt.failed is not None:
            log.warning("rank %d: keeping %d symmetric buffers until exit (a fused kernel failed: nothing "
                        "collective is safe)", self.rt.rank, len(self.tensors))
            return
        self._peers.clear()
        import nvshmem.core as nv
        self.rt.barrier()  # no peer may still be writing into them
        for name in sorted(self.tensors, reverse=True):
            nv.free_tensor(self.tensors.pop(name))


def free_ownerless(rt) -> None:
    """Free the heaps of runtime `rt` whose owner is gone on every rank, in allocation order
    (collective: every rank calls it, from an allocation). An owner gone on some ranks only (a
    reference cycle that one rank's garbage collector has not reached yet) keeps its heap until
    a later call finds it gone everywhere. Where a fused kernel failed on any rank (rt.failed)
    nothing is freed: free() would keep that rank's buffers, skipping the collective its peers
    enter, and the heap's count would drop below what NVSHMEM holds."""
    gone = [h.number for h in rt.heaps if h.owner is not None and h.owner() is None]
    failed = rt.failed is not None
    if rt.world_size > 1:
        everyone = [None] * rt.world_size
        dist.all_gather_object(everyone, (gone, failed))
        failed = any(f for _, f in everyone)
        gone = sorted(set.intersection(*(set(g) for g, _ in everyone)))
    if failed:
        return
    for heap in [h for h in rt.heaps if h.number in gone]:
        log.info("rank %d: freeing %s of the symmetric heap, its layer gone", rt.rank, format_bytes(heap.bytes))
        heap.free()
