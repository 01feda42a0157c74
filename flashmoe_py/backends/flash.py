"""backend="flash": launcher for the persistent fused kernel (kernels/fused_moe.py).

Per forward: the router and the routing plan (kernels/router.py, kernels/plan.py; no host
synchronisation), then one kernel launch that dispatches, runs the expert FFN and combines.
Buffers live on the NVSHMEM symmetric heap and are reached through peer addresses (transport
"p2p") or NVSHMEM's device API ("nvshmem")."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton

from ..config import MoEConfig
from ..kernels.fused_moe import WAIT_CHUNK, WAIT_COMBINE, WAIT_COUNTS, WAIT_HIDDEN, launch_fused
from ..kernels.plan import build_plan
from ..kernels.transport import nvshmem_device_library
from ..routing import route

STATUS_WAITS = {WAIT_COUNTS.value: "count words (what each source sends)",
                WAIT_CHUNK.value: "a dispatched chunk to arrive",
                WAIT_HIDDEN.value: "a hidden tile from another program",
                WAIT_COMBINE.value: "expert outputs to come back"}


class FusedKernelError(RuntimeError):
    """A bounded wait in the fused kernel timed out; the layer is unusable afterwards."""


@dataclass(frozen=True)
class Geometry:
    """Tile sizes and buffer extents shared by the launcher, the heap plan and the kernel.

    S:    rows of one source's region at a destination: every slot it can send there
          (tokens * min(top_k, L)) plus one partly filled CHUNK per local expert.
    MAXC: CHUNKs one (source, expert) pair can fill (each token picks an expert once).
    CHUNK is the dispatch granularity (one arrival flag each); expert tiles of BM_MIN or more rows
    gather rows across chunks and sources."""

    world_size: int
    local_experts: int
    max_tokens: int
    hidden: int
    ffn: int
    top_k: int
    CHUNK: int = 64
    BM_MIN: int = 64
    BN: int = 128
    BF: int = 128
    BK: int = 64
    BT: int = 32

    @property
    def S(self) -> int:
        return self.max_tokens * min(self.top_k, self.local_experts) + self.local_experts * self.CHUNK

    @property
    def MAXC(self) -> int:
        return triton.cdiv(max(self.max_tokens, 1), self.CHUNK)

    @property
    def MAXQ(self) -> int:
        """Expert tiles a rank can have to run: every slot it can receive, plus one partial tile
        per local expert."""
        return triton.cdiv(self.world_size * self.max_tokens * min(self.top_k, self.local_experts),
                           self.BM_MIN) + self.local_experts

    @property
    def NF(self) -> int:
        return triton.cdiv(self.ffn, self.BF)

    @property
    def NN(self) -> int:
        return triton.cdiv(self.hidden, self.BN)

    def symmetric_buffers(self, dtype: torch.dtype,
                          transport: str = "p2p") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Buffers every rank must hold at the same symmetric address (flags and counters are
        uint64-sized: NVSHMEM signals them). Transport "nvshmem" puts from local symmetric
        memory, so it also stages the rows it sends (send_x, one row per token-slot)."""
        W, L, S, H = self.world_size, self.local_experts, self.S, self.hidden
        buffers = {"recv_x": ((W, S, H), dtype), "combine_y": ((W, S, H), dtype),
                   "count_words": ((2, W, L), torch.int64),
                   "chunk_flags": ((W, L, self.MAXC), torch.int64),
                   "combine_counts": ((W, L, self.MAXC, self.NN), torch.int64)}
        if transport == "nvshmem":
            buffers["send_x"] = ((self.max_tokens * self.top_k, H), dtype)
        return buffers

    def send_order(self, rank: int, device=None) -> torch.Tensor:
        """[W * L] int64: the (destination, expert slot) pairs, as destination * L + slot, in the
        order `rank` sends their chunks: slot by slot (the order destinations compute their experts
        in), and for each, to destinations rank, rank + 1, ... (mod W), so not every source sends to
        the same GPU at once."""
        W, L = self.world_size, self.local_experts
        dests = (rank + torch.arange(W, device=device)) % W
        return (dests * L + torch.arange(L, device=device)[:, None]).reshape(W * L)

    def trace_rows(self, tokens: int, programs: int) -> int:
        """Rows of a kernel trace of one forward with `tokens` tokens: one per program, one per task."""
        pairs = self.world_size * self.local_experts
        return (programs + 1 + triton.cdiv(tokens * self.top_k, self.CHUNK) + pairs
                + self.MAXQ * (self.NF + self.NN) + triton.cdiv(tokens, self.BT) * self.NN)

    @classmethod
    def for_config(cls, config: MoEConfig, world_size: int, max_tokens: int) -> Geometry:
        return cls(world_size, config.local_experts(world_size), max_tokens, config.hidden_size,
                   config.ffn_size, config.top_k)


@dataclass
class RoutingPlan:
    """Where each of this rank's token-slots goes (E = W*L pairs in (rank, slot) order, K = top_k):
    send_tok [T*K] int32, pos_start/send_counts/region_off [E] int32, chunk_pos/chunk_c [C] int32,
    slot_dest/slot_row/slot_flag [T, K] int32 (-1 for dropped slots), slot_w [T, K] fp32
    (kernels/plan.py)."""

    send_tok: torch.Tensor
    pos_start: torch.Tensor
    send_counts: torch.Tensor
    region_off: torch.Tensor
    chunk_pos: torch.Tensor
    chunk_c: torch.Tensor
    slot_dest: torch.Tensor
    slot_row: torch.Tensor
    slot_flag: torch.Tensor
    slot_w: torch.Tensor
    stats: dict


def routing_plan(x: torch.Tensor, router_weight: torch.Tensor, positions: torch.Tensor,
                 config: MoEConfig, geo: Geometry, send_order: torch.Tensor,
                 comb_expect: torch.Tensor) -> RoutingPlan:
    """x: [T, H]; positions: [E] int64 (placement); send_order: geo.send_order(this rank), on x's
    device; comb_expect: [W, L, MAXC] int64, to which the rows this rank will get back in each
    chunk are added. The router, then three small kernels; no host synchronisation."""
    r = route(x, router_weight, config)
    plan = build_plan(r.experts, r.kept, positions, send_order, comb_expect, local_experts=geo.local_experts,
                      chunk=geo.CHUNK, maxc=geo.MAXC)
    stats = {"expert_counts": plan.pop("expert_counts"), "dropped_slots": plan.pop("dropped_slots")}
    return RoutingPlan(**plan, slot_w=r.weights.float().contiguous(), stats=stats)


class FlashBackend:
    """Owns one layer's symmetric buffers, local scratch and epoch, and launches the fused kernel.

    Collective at construction (symmetric allocation). Needs flashmoe_py.init() with NVSHMEM first."""

    name = "flash"

    MAX_GRAPHS = 8

    def __init__(self, layer, options):
        from .. import runtime
        from ..heap import SymmetricHeap
        self.rt = rt = runtime.require_fused()
        cfg = layer.config
        self.layer = weakref.proxy(layer)  # the layer owns the backend: no cycle to keep it alive
        self.geo = geo = Geometry.for_config(cfg, layer.world_size, options.require_max_tokens())
        self.transport = transport = options.transport
        buffers = geo.symmetric_buffers(cfg.torch_dtype, transport)
        if transport == "nvshmem":
            nvshmem_device_library()  # fail here, not at the first forward, if it is missing
        self.heap = SymmetricHeap(rt)
        self.heap.allocate(buffers)
        self.sym = {name: self.heap[name] for name in buffers}
        for t in self.sym.values():
            t.zero_()
        # NVSHMEM's puts take this rank's addresses; only p2p maps the peers' buffers.
        self.peers = {name: (self.heap.peer_ptrs(name) if transport == "p2p" else
                             torch.full((geo.world_size,), t.data_ptr(), dtype=torch.int64, device=t.device))
                      for name, t in self.sym.items()}
        dev = layer.device
        self.h = torch.empty(geo.world_size, geo.S, cfg.ffn_size, dtype=cfg.torch_dtype, device=dev)
        self.h_flags = torch.zeros(geo.MAXQ, geo.NF, dtype=torch.int32, device=dev)
        self.comb_expect = torch.zeros(geo.world_size, geo.local_experts, geo.MAXC, dtype=torch.int64,
                                       device=dev)
        self.send_order = geo.send_order(layer.rank, dev)
        self.ctl = torch.tensor([1, 0, 0, 0], dtype=torch.int64, device=dev)
        self.status = torch.zeros(8, dtype=torch.int64, device=dev)
        self.status_host = torch.zeros(8, dtype=torch.int64).pin_memory()
        self.status_ready = torch.cuda.Event()
        self.programs = torch.cuda.get_device_properties(dev).multi_processor_count
        self.timeout_s = options.timeout_s
        self.failed: str | None = None
        # Launch overrides for tuning (keys of launch_fused: block_m, block_n, num_warps, stages, group,
        # dispatch_programs).
        self.tuning: dict = {}
        # bench/kernel_profile.py: an int64 [geo.trace_rows(tokens, programs), TRACE_COLS] tensor here
        # makes each launch record its tasks' timestamps into it (kernels/fused_moe.py).
        self.trace: torch.Tensor | None = None
        self.cuda_graphs = options.cuda_graphs
        self.graphs: dict[int, tuple] = {}  # tokens -> (graph, static x, static out, static stats)
        self.seen: set[int] = set()
        rt.barrier()  # zeroed flags everywhere before any peer can signal into them

    def forward(self, x: torch.Tensor, error: Exception | None):
        """x: [T, H] -> (out [T, H], stats). A rank whose input is rejected still runs the kernel
        with no tokens, so its peers' forwards complete; then it raises.

        With cuda_graphs, the second forward at a token count captures the whole forward (routing
        plan and kernel) in a CUDA graph, and later ones replay it: the launch overhead of the
        plan's small ops is paid once. Graphs are kept for the MAX_GRAPHS latest token counts."""
        self.raise_if_failed(block=False)
        layer, geo = self.layer, self.geo
        if error is not None:
            self._launch(torch.empty(0, geo.hidden, dtype=layer.config.torch_dtype, device=layer.device))
            raise error
        T = x.shape[0]
        if not self.cuda_graphs or torch.cuda.is_current_stream_capturing():
            return self._launch(x)
        if T not in self.graphs:
            if T not in self.seen:  # first time at this size: run eagerly (compiles the kernel)
                self.seen.add(T)
                return self._launch(x)
            self.graphs[T] = self._capture(x)
            if len(self.graphs) > self.MAX_GRAPHS:
                self.graphs.pop(next(iter(self.graphs)))
        self.graphs[T] = entry = self.graphs.pop(T)  # most recently used last
        graph, static_x, static_out, stats = entry
        static_x.copy_(x)
        graph.replay()
        self.status_ready.record()
        return static_out.clone(), {k: v.clone() for k, v in stats.items()}

    def _capture(self, x: torch.Tensor):
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, stats = self._launch(static_x, copy_status=True)
        return graph, static_x, static_out, stats

    def _launch(self, x: torch.Tensor, copy_status: bool = False):
        """Routing plan + one kernel launch for x: [T, H] (T may be 0). -> (out, stats)."""
        layer, geo = self.layer, self.geo
        plan = routing_plan(x, layer.router_weight, layer.expert_positions, layer.config, geo,
                            self.send_order, self.comb_expect)
        out = torch.empty_like(x)
        # Taller expert tiles, and twice as wide GEMM2 tiles, once an expert gets enough rows (on
        # average) to fill them: fewer re-reads of its weights and of h, more math per byte loaded.
        # fp32 keeps 64 x 128: its tiles would not fit shared memory.
        rows_per_expert = x.shape[0] * layer.config.top_k // geo.local_experts
        large = rows_per_expert >= 128 and x.dtype == torch.bfloat16
        # Then, for experts narrower than the hidden size (dispatch bytes weigh more against their
        # GEMMs), half the programs send the dispatch chunks while the rest compute the expert tiles
        # that have arrived. 2xH200, 4,096-16,384 tokens, 64 of 132 programs against all: qwen3
        # -5..-6%, deepseek -1..-3%, but mixtral (ffn 3.5x hidden) +2..+4%.
        overlap = large and layer.config.ffn_size < layer.config.hidden_size
        launch_fused(x, out, layer.w_in, layer.w_out, plan, self.sym, self.peers, self.h, self.h_flags,
                     self.comb_expect, self.ctl, self.status, geo=geo, activation=layer.config.activation,
                     rank=layer.rank, timeout_s=self.timeout_s, programs=self.programs,
                     transport=self.transport, trace=self.trace,
                     **{"block_m": 128 if large else 64, "block_n": 2 * geo.BN if large else geo.BN,
                        "dispatch_programs": self.programs // 2 if overlap else self.programs,
                        **self.tuning})
        capturing = torch.cuda.is_current_stream_capturing()
        if copy_status or not capturing:
            self.status_host.copy_(self.status, non_blocking=True)
        if not capturing:
            self.status_ready.record()
        return out, plan.stats

    def raise_if_failed(self, block: bool) -> None:
        """Raise FusedKernelError if a launch recorded a timeout. block=False looks only at the
        status copied after the last eager launch, if it has landed; block=True waits for all
        queued work (CUDA-graph replays included) and reads the status word itself."""
        if self.failed is None and not torch.cuda.is_current_stream_capturing():
            if block:
                torch.cuda.current_stream().synchronize()
                status = self.status.tolist()
            elif self.status_ready.query():
                status = self.status_host.tolist()
            else:
                return
            code, wait, pe, e, tile, epoch = status[:6]
            if code:
                self.failed = (f"fused MoE kernel on rank {self.layer.rank} timed out in call {epoch} "
                               f"waiting for {STATUS_WAITS.get(wait, wait)}"
                               + (f" from rank {pe}" if pe >= 0 else "")
                               + (f" (local expert {e}, tile {tile})" if e >= 0 else ""))
                self.rt.failed = self.failed  # teardown must not wait on peers now
        if self.failed is not None:
            raise FusedKernelError(self.failed)

    def close(self) -> None:
        """Free the symmetric buffers (collective); the layer cannot run afterwards."""
        self.graphs.clear()
        self.heap.free()
