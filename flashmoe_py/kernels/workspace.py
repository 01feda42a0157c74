"""Everything one fused layer holds between calls, allocated from its Geometry, and the bundles
the fused kernel takes (Triton passes NamedTuples of tensors, ints and constexprs as arguments).

    ws = Workspace.allocate(geo, torch.bfloat16, "p2p", device, heap)   # heap: SymmetricHeap
    ws = Workspace.allocate(geo, torch.float32, "p2p", "cpu", LocalBuffers("cpu", world))

The allocator makes the symmetric buffers and says where each rank's copy is: the NVSHMEM heap
(heap.SymmetricHeap), or LocalBuffers, plain tensors for rank 0 of a layer whose other ranks
never run (tests/one_rank.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from .layout import CTL_EPOCH, Geometry


class SymBuffer(NamedTuple):
    """A symmetric buffer as the kernel sees it: this rank's copy, and [W] int64 addresses of
    every rank's copy mapped here (transport "p2p"), or this rank's own address W times
    ("nvshmem", whose puts take local addresses)."""

    local: torch.Tensor
    peers: torch.Tensor


class Symmetric(NamedTuple):
    """The symmetric buffers (layout.Geometry.symmetric_buffers): recv_x, combine_y [W, S, H];
    count_words [2, W, L], chunk_flags [W, L, MAXC], combine_counts [W, L, MAXC, NN] int64;
    send_x: [T*K, H] staging of transport "nvshmem" (recv_x's local copy otherwise, unused)."""

    recv_x: SymBuffer
    combine_y: SymBuffer
    count_words: SymBuffer
    chunk_flags: SymBuffer
    combine_counts: SymBuffer
    send_x: torch.Tensor


class Scratch(NamedTuple):
    """This rank's own buffers (layout.Geometry.local_buffers), and the trace: [rows,
    layout.TRACE_COLS] int64 when tracing (the status words otherwise, unused)."""

    h: torch.Tensor
    h_flags: torch.Tensor
    comb_expect: torch.Tensor
    ctl: torch.Tensor
    status: torch.Tensor
    shared_h: torch.Tensor
    shared_scale: torch.Tensor
    shared_y: torch.Tensor
    shared_h_flags: torch.Tensor
    shared_y_flags: torch.Tensor
    out_partials: torch.Tensor
    out_tickets: torch.Tensor
    trace: torch.Tensor


class Allocator(Protocol):
    def allocate(self, buffers: dict) -> dict[str, torch.Tensor]:
        """{name: (shape, dtype)} -> {name: this rank's zeroed copy} (collective on a heap)."""

    def peer_ptrs(self, name: str) -> torch.Tensor:
        """[W] int64: the address of each rank's copy of `name`, as this GPU reaches it."""


class LocalBuffers:
    """Symmetric buffers as plain tensors on `device`, for rank 0 of a `world`-rank layer alone in
    one process: ranks 1.. are never-running peers, and each of them is given a scratch copy, so
    whatever rank 0 sends them lands somewhere harmless."""

    def __init__(self, device, world: int):
        self.device, self.world = device, world
        self.tensors: dict[str, torch.Tensor] = {}
        self.scratch: dict[str, torch.Tensor] = {}

    def allocate(self, buffers: dict) -> dict[str, torch.Tensor]:
        for name, (shape, dtype) in buffers.items():
            self.tensors[name] = torch.zeros(shape, dtype=dtype, device=self.device)
            self.scratch[name] = torch.zeros_like(self.tensors[name])
        return {name: self.tensors[name] for name in buffers}

    def peer_ptrs(self, name: str) -> torch.Tensor:
        ptrs = [self.tensors[name].data_ptr()] + [self.scratch[name].data_ptr()] * (self.world - 1)
        return torch.tensor(ptrs, dtype=torch.int64, device=self.device)


@dataclass
class Workspace:
    """One fused layer's buffers on one rank: symmetric (sym) and local (scratch), all zeroed;
    `allocator` owns the memory behind sym's peer addresses, so it lives as long as they do."""

    geo: Geometry
    transport: str
    sym: Symmetric
    scratch: Scratch
    allocator: Allocator

    @classmethod
    def allocate(cls, geo: Geometry, dtype: torch.dtype, transport: str, device,
                 allocator: Allocator) -> Workspace:
        buffers = geo.symmetric_buffers(dtype, transport)
        mine = allocator.allocate(buffers)

        def sym(name: str) -> SymBuffer:
            t = mine[name]
            if transport == "p2p":
                return SymBuffer(t, allocator.peer_ptrs(name))
            return SymBuffer(t, torch.full((geo.world_size,), t.data_ptr(), dtype=torch.int64, device=t.device))

        symmetric = Symmetric(*(sym(n) for n in ("recv_x", "combine_y", "count_words", "chunk_flags",
                                                 "combine_counts")),
                              send_x=mine["send_x"] if transport == "nvshmem" else mine["recv_x"])
        local = {name: torch.zeros(shape, dtype=dt, device=device)
                 for name, (shape, dt) in geo.local_buffers(dtype).items()}
        local["ctl"][CTL_EPOCH.value] = 1  # the first call's epoch
        return cls(geo, transport, symmetric, Scratch(**local, trace=local["status"]), allocator)

    def restart_epochs(self) -> None:
        """Zero every integer buffer but the status words (the words that carry a call number or
        count rows over calls: count words, chunk flags, combine counters; h, shared and split-tile
        flags, expected rows, task counters; the other buffers hold rows) and open epoch 1, as
        allocate leaves them. Only with no launch of this layer queued or running on any rank, and
        on every rank before any launches again (layout.EPOCH_LAST)."""
        words = [b.local for b in self.sym if isinstance(b, SymBuffer)]
        words += [t for name, t in self.scratch._asdict().items() if name not in ("status", "trace")]
        for t in words:
            if not t.is_floating_point():
                t.zero_()
        self.scratch.ctl[CTL_EPOCH.value] = 1

    def with_trace(self, trace: torch.Tensor | None) -> Scratch:
        """The scratch bundle for one launch, recording into `trace` when given."""
        return self.scratch if trace is None else self.scratch._replace(trace=trace)
