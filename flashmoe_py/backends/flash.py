"""backend="flash": launcher for the persistent fused kernel (kernels/fused_moe.py).

Per forward: the router and the routing plan (kernels/router.py, kernels/plan.py; no host
synchronisation), then one kernel launch that dispatches, runs the expert FFN and combines (and,
for backward="saved", keeps GEMM1's outputs: backends/saved.py).
Buffers live on the NVSHMEM symmetric heap and are reached through peer addresses (transport
"p2p") or NVSHMEM's device API ("nvshmem"). The router, the row copy and the fused kernel find x
and the output through two address words (kernels/addresses.py), written before each forward's
kernels: a forward replayed from the layer's CUDA graph then reads the caller's x where it is and
writes a new output, instead of copying x into the graph's tensor and the output out of it (two
copies of T x H elements a call)."""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref

import torch
import torch.distributed as dist

from .. import runtime
from ..config import EXPERT_WEIGHTS
from ..heap import SymmetricHeap
from ..kernels.launch_config import choose_launch, launch_variants, partial_slots
from ..kernels.layout import EPOCH_LAST, Geometry, describe_timeout
from ..kernels.plan import RoutingPlan, build_plan, plan_stats
from ..kernels.addresses import aligned_rows, write_addresses
from ..kernels.fused_moe import Saved, compile_fused, launch_fused, zeroed_out
from ..kernels.router import router_launch_tokens
from ..kernels.transport import nvshmem_device_library
from ..kernels.workspace import Workspace
from ..routing import Routing, kernel_routes
from .saved import SavedForward
from .torch_ep import EXPLICIT, check_graphs_agree, peers_refused

log = logging.getLogger("flashmoe_py")
# The layer's weights the fused kernel reads (those a config has); the router's go to route().
FUSED_WEIGHTS = ("w_in", "w_out", "bias_in", "bias_out", "shared_w_in", "shared_w_out", "shared_gate_weight")


def kernel_experts(layer) -> dict[str, torch.Tensor]:
    """The layer's weights the fused kernel reads, by FUSED_WEIGHTS name (those the config has)."""
    return {name: getattr(layer, name) for name in FUSED_WEIGHTS if getattr(layer, name) is not None}


def _check_graphs_agree(layer, in_graph: int, error: Exception | None, tokens: int) -> list[int]:
    """Every rank in grad mode says what its backward of this forward runs (in_graph: 0 none, else
    a torch_ep.GRAPH_KINDS key), whether it rejects it, and how many tokens it runs (0 where
    rejected). Where a rank rejects it, every rank raises before any launches (that rank its
    error, the others PeerInputError): the others' training forwards would complete and their
    collective backwards then wait for it until the process group's timeout. Else raise on all
    of them if their backwards differ. -> every rank's tokens."""
    mine = torch.tensor([int(in_graph), int(error is not None), tokens], device=layer.device)
    flags = torch.empty(layer.world_size * 3, dtype=mine.dtype, device=layer.device)  # flat: gloo's too
    dist.all_gather_into_tensor(flags, mine, group=layer.process_group)
    rows = flags.view(layer.world_size, 3).tolist()
    if error is not None:
        raise error
    bad = [rank for rank, (_, rejected, _) in enumerate(rows) if rejected]
    if bad:
        raise peers_refused(bad, layer.rank)
    check_graphs_agree([recording for recording, _, _ in rows])
    return [n for _, _, n in rows]


def sms_limited_by_mps(env=None) -> bool:
    """Whether CUDA MPS gives this process only part of the GPU's SMs (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE
    below 100), so not every persistent program of the fused kernel is resident at once: then its
    launches keep all tiles on the task queue (launch_config.choose_launch, resident=False)."""
    value = (os.environ if env is None else env).get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    try:
        return value is not None and float(value) < 100
    except ValueError:
        return False


class FusedKernelError(RuntimeError):
    """A bounded wait in the fused kernel timed out; the layer is unusable afterwards."""


def routing_plan(r: Routing, positions: torch.Tensor, geo: Geometry, send_order: torch.Tensor,
                 comb_expect: torch.Tensor) -> tuple[RoutingPlan, torch.Tensor]:
    """r: this rank's routing (routing.route); positions: [E] int64 (placement); send_order:
    geo.send_order(this rank), on r's device; comb_expect: [W, L, MAXC] int64, to which the rows
    this rank will get back in each chunk are added. Three small kernels; no host
    synchronisation. Under torch.use_deterministic_algorithms each expert's rows come in slot
    order, so backward="saved" sums them the same way every run (kernels/plan.py). -> (the plan,
    stats [E + 1] int64, plan_stats')."""
    return build_plan(r.experts, r.kept, r.weights, positions, send_order, comb_expect,
                      local_experts=geo.local_experts, chunk=geo.chunk, maxc=geo.max_chunks,
                      deterministic=torch.are_deterministic_algorithms_enabled())


GRAPHED_TENSORS = (*FUSED_WEIGHTS, "router_weight", "router_bias", "e_score_correction_bias", "expert_positions")


def weight_addresses(layer) -> tuple[int, ...] | None:
    """Where the tensors a captured forward reads live: the fused kernel's weights, the router's
    (and the correction bias), the expert positions. A graph replays these addresses; weights
    replaced rather than updated in place (load_state_dict(assign=True), to_empty,
    torch.func.functional_call) live elsewhere. None where a weight is computed at each forward
    (torch.nn.utils.parametrize): no graph can hold it. Read from the module's own dicts
    (~3 us, against ~17 through its attributes)."""
    params, buffers = layer._parameters, layer._buffers
    addresses = []
    for name in GRAPHED_TENSORS:
        t = params[name] if name in params else buffers.get(name, _COMPUTED)
        if t is _COMPUTED:
            return None
        addresses.append(0 if t is None else t.data_ptr())
    return tuple(addresses)


_COMPUTED = object()


def graphs_to_drop(keys: list[tuple], max_graphs: int, max_saving: int) -> list[tuple]:
    """keys: the kept graphs' keys (FlashBackend._run's), least recently used first -> those to
    drop, so that at most max_saving are training forwards' (keys of three fields: they hold
    what the forward saves) and at most max_graphs are left in all."""
    saving = [k for k in keys if len(k) == 3]
    drop = saving[:max(0, len(saving) - max_saving)]
    rest = [k for k in keys if k not in drop]
    return drop + rest[:max(0, len(rest) - max_graphs)]


class CapturedForward:
    """One forward captured in a CUDA graph: its static input (None when addressed) and _launch's
    outputs, which every replay overwrites (an addressed one: all but out, None there); the
    SavedForward last
    lent out of them (a weak reference, dead once its backward has run: explicit_backward
    releases it there) and the stream of that replay, on which autograd runs that backward. io:
    the backend's address words, which the graph's kernels read x and out through; captured
    `addressed`, each replay writes them; otherwise (the router in torch's ops, which read the
    static input) the graph writes them, each replay copying x in and the output out. zero_out:
    a replay's new output starts zeroed (fused_moe.zeroed_out)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_x: torch.Tensor | None, outputs: tuple,
                 io: torch.Tensor, addressed: bool, zero_out: bool):
        self.graph, self.static_x, self.outputs = graph, static_x, outputs
        self.io, self.addressed, self.zero_out = io, addressed, zero_out
        self.lent: weakref.ref | None = None
        self.lent_on: torch.cuda.Stream | None = None

    def replay(self, x: torch.Tensor, current: torch.cuda.Stream) -> tuple:
        """Replay on `current` (the caller's current stream) for x -> (out, stats, SavedForward
        or None): out and stats the caller's own (addressed: x read where it is, or from
        aligned_rows' copy, and out a new tensor the graph writes;
        otherwise x copied in and both copied out), the SavedForward
        a new one over the graph's buffers. The one lent before keeps copies if still alive (its
        backward has not run); on another stream than its own, this replay first waits for that
        stream (where its backward read the buffers), and that stream, where its backward will
        run, waits for the copies, whose memory is kept for it (record_stream)."""
        elsewhere = self.lent_on is not None and self.lent_on != current
        if elsewhere:
            current.wait_stream(self.lent_on)
        held = self.lent and self.lent()
        if held is not None:
            held.keep_copies()
            if elsewhere:
                self.lent_on.wait_stream(current)
                held.record_stream(self.lent_on)
        if self.addressed:
            x = aligned_rows(x)
            out = torch.zeros_like(x) if self.zero_out else torch.empty_like(x)
            write_addresses(self.io, x, out)
        else:
            self.static_x.copy_(x)
        self.graph.replay()
        static_out, stats, saved = self.outputs
        if saved is not None:
            saved = dataclasses.replace(saved)
            self.lent = weakref.ref(saved)
            self.lent_on = current
        return out if self.addressed else static_out.clone(), stats.clone(), saved


class FlashBackend:
    """Owns one layer's workspace (symmetric buffers, local scratch, epoch) and launches the fused kernel.

    Collective at construction (symmetric allocation). Needs flashmoe_py.init() with NVSHMEM first.
    options: the layer's FusedOptions; its launch_override fixes launch settings (tuning)."""

    name = "flash"
    contiguous_weights = True  # the kernel reads rows of contiguous memory (TMA boxes)

    MAX_GRAPHS = 8
    # A training forward is replayed from a graph while what it saves takes at most this many
    # bytes. One H200, qwen3 at 4,096 tokens (100 MiB saved): launched instead, the forward added
    # ~0.4-0.9 ms of host time to a step whose host time then reached its GPU time
    # (bench/NOTES.md items 60, 61). Such a graph keeps those bytes while it is kept (a training
    # step's saved activations of this layer need them anyway), so at most MAX_SAVING_GRAPHS of
    # the MAX_GRAPHS are training forwards' (the least recently used dropped first).
    GRAPHED_SAVE_BYTES = 512 << 20
    MAX_SAVING_GRAPHS = 2
    MAX_SEEN = 1024  # keys remembered for a capture at their second call
    # Forwards between restarts of the workspace's call numbers (restart_epochs): as many as its
    # flags can number (layout.EPOCH_LAST; a check lowers it on an instance to exercise a restart).
    EPOCH_RESTART = EPOCH_LAST.value

    def __init__(self, layer, options):
        self.rt = rt = runtime.require_fused()
        cfg = layer.config
        self.layer = weakref.proxy(layer)  # the layer owns the backend: no cycle to keep it alive
        self.options = options
        self.geo = geo = Geometry.for_config(cfg, layer.world_size, options.require_max_tokens(),
                                             partial_slots(options.launch_override))
        if options.transport == "nvshmem":
            nvshmem_device_library()  # fail here, not at the first forward, if it is missing
        self.heap = SymmetricHeap(rt, owner=self)  # its buffers go back to the heap once this is gone
        self.ws = Workspace.allocate(geo, cfg.torch_dtype, options.transport, layer.device, self.heap)
        self.send_order = geo.send_order(layer.rank, layer.device)
        self.status_host = torch.zeros_like(self.ws.scratch.status, device="cpu").pin_memory()
        self.status_ready = torch.cuda.Event()
        self.device_index = layer.device.index  # an int: torch.cuda.current_stream's cheapest argument
        self.programs = torch.cuda.get_device_properties(layer.device).multi_processor_count
        self.resident = not sms_limited_by_mps()
        self.failed: str | None = None
        # bench/kernel_profile.py: an int64 [geo.trace_rows(tokens, programs), TRACE_COLS] tensor here
        # makes each launch record its tasks' timestamps into it (kernels/fused_moe.py).
        self.trace: torch.Tensor | None = None
        # the addresses of the x and out each forward's kernels read and write (kernels/addresses.py)
        self.io = torch.zeros(2, dtype=torch.int64, device=layer.device)
        self.graphs: dict[tuple, CapturedForward] = {}  # by _run's key
        self.seen: set[tuple] = set()
        # (weight_addresses, torch's deterministic setting) when the kept graphs were captured
        self.graphed: tuple = ()
        self.last_stream: torch.cuda.Stream | None = None  # where the last forward was queued
        self.forwards = 0  # launched or replayed since the call numbers (re)started (_before_forward)
        if layer.world_size > 1:  # a rank that fails here tells its peers, which would wait in the barrier
            runtime.on_every_rank(self.compile_variants, lambda rank, text: RuntimeError(
                f"rank {rank} could not compile the fused kernel (or run the router and plan kernels) when the layer "
                f"was built: {text}"),
                layer.process_group)
        rt.barrier()  # zeroed flags everywhere before any peer can signal into them

    def compile_variants(self) -> None:
        """Compile and load every fused kernel variant this rank's forwards can launch (each
        launch_variants tile set; with backward="saved", each also as a training forward saves),
        without launching it. At world > 1 the layer does this when built: a rank that met a new
        variant at a forward would compile it (3.5-9 s on an H100's host with Triton's cache
        empty, bench/NOTES.md item 84) while its peers' kernels already wait for it, under
        timeout_s. The router and plan kernels (one variant each at any token count, but the
        router's own at each token count router_launch_tokens names, one for a training
        forward's saved logits, and each as a forward routes, x through an address word, and as a
        backward or load_balancing_loss routes again, x itself) are run here on tokens of zeros at
        those counts, which compiles them; the scratch expected-row counts they add to, and the
        address word they read, are their own (a forward in flight keeps the layer's)."""
        layer, geo, cfg = self.layer, self.geo, self.layer.config
        expect = torch.zeros_like(self.ws.scratch.comb_expect)  # these runs' own expected rows
        words = torch.zeros_like(self.io)
        with torch.no_grad():  # as a forward routes (the kernel is not taken where autograd records)
            for tokens in router_launch_tokens(geo.max_tokens):
                zeros = torch.zeros(tokens, geo.hidden, dtype=cfg.torch_dtype, device=layer.device)
                write_addresses(words, zeros, zeros)
                builds = [None, words] if kernel_routes(zeros, layer.router_weight, layer.router_bias) else [None]
                for at in builds:
                    for keep_logits in (False, True):
                        routing_plan(layer.route(zeros, keep_logits=keep_logits, x_at=at), layer.expert_positions,
                                     geo, self.send_order, expect)
        x = torch.empty(0, geo.hidden, dtype=cfg.torch_dtype, device=layer.device)
        plan, _ = routing_plan(layer.route(x), layer.expert_positions, geo, self.send_order,
                               self.ws.scratch.comb_expect)  # no tokens: adds nothing
        experts = kernel_experts(layer)
        saves = [None]
        if self.options.backward_for(self.name) == "saved":
            pre = torch.empty(0, cfg.ffn_in_size, dtype=x.dtype, device=x.device)
            shared_pre = torch.empty(0, cfg.shared_ffn_in_size, dtype=x.dtype, device=x.device)
            saves.append(Saved(pre, shared_pre if cfg.shared_experts else pre))
        launches = launch_variants(geo, x.dtype, self.programs, self.options.launch_override, self.resident)
        log.info("rank %d: compiling the fused kernel's %d variants before any forward (seconds each unless "
                 "Triton's cache has them)", layer.rank, len(launches) * len(saves))
        for launch in launches:
            for saved in saves:
                compile_fused(x, torch.empty_like(x), experts, plan, self.ws, launch, config=cfg, rank=layer.rank,
                              timeout_s=self.options.timeout_s, saved=saved, io=words)

    def __reduce_ex__(self, protocol):
        """copy.deepcopy and pickle (torch.save of the layer or its model) are refused: a copy would
        hold plain tensors in place of the symmetric buffers, its kernel storing into the
        original's on the peers, and a new heap allocation is collective (every rank at once)."""
        raise TypeError("a MoELayer with backend='flash' cannot be copied or pickled (copy.deepcopy, torch.save of "
                        "the module): its buffers are symmetric, allocated by every rank together. Build another "
                        "MoELayer (or patch another model) on every rank and load_state_dict(layer.state_dict()) "
                        "into it; save state_dicts (fm.sharded_state_dict, fm.hf_state_dict)")

    def forward(self, x: torch.Tensor, error: Exception | None, in_graph: int | None = None):
        """x: [T, H] -> (out [T, H], stats). A rank whose forward is refused (error) under no_grad
        at world > 1 serves its peers first (_serve_peers); then it raises. in_graph:
        what this rank's backward of it runs (0 or False: none recorded; else a
        torch_ep.GRAPH_KINDS key; None: grad mode off); at world > 1 the ranks in grad mode
        compare it first (one small all-gather and a host synchronisation), since the backward is
        collective, and all raise, none launching, where one rejects its forward (a rank under
        no_grad beside one recording is not seen: the recording rank's backward then waits for it
        until the process group's timeout).

        With cuda_graphs, the second forward at a token count captures the whole forward (routing
        plan and kernel) in a CUDA graph, and later ones replay it: the launch overhead of the
        plan's small ops is paid once. Graphs are kept for the MAX_GRAPHS latest token counts."""
        stream = self._before_forward()
        layer = self.layer
        if in_graph is not None and layer.world_size > 1:
            _check_graphs_agree(layer, in_graph, error, 0 if error else x.shape[0])
        if error is not None:
            if layer.world_size > 1:
                self._serve_peers(error, stream)
            raise error
        # A graph's static tensors made under inference_mode cannot be written outside it (a
        # training forward after an inference_mode one): one graph per token count and mode.
        out, stats, _ = self._run(x, (x.shape[0], torch.is_inference_mode_enabled()), stream)
        return out, plan_stats(stats)

    def _serve_peers(self, error: Exception, stream: torch.cuda.Stream | None) -> None:
        """A rank whose forward is refused where its peers were not told (under no_grad) still
        runs the kernel with no tokens of its own, so the rows its peers send to its experts are
        computed and their forwards complete. Not where an expert weight that computes them is
        what is wrong (another shape, dtype or device; one the config lacks is read by nothing),
        nor where that launch is refused: its peers' kernels then end at timeout_s
        (FusedKernelError there), and the layer is marked failed here, naming why: its kernel's
        epoch now trails theirs. The caller raises `error` after."""
        layer = self.layer
        problem = layer._weights_problem(EXPERT_WEIGHTS)
        if problem is None:
            try:
                self._launch(torch.empty(0, self.geo.hidden, dtype=layer.config.torch_dtype, device=layer.device),
                             stream)
                return
            except Exception as e:  # noqa: BLE001 (any refusal: the peers are left waiting all the same)
                problem = e
        self.failed = self.rt.failed = (
            f"rank {layer.rank}: its forward was refused ({error}) and it could not compute its peers' rows "
            f"({type(problem).__name__}: {problem}), so their kernels wait until timeout_s: the layer is unusable, "
            "build it again")
        log.error("%s", self.failed)

    def forward_saving(self, x: torch.Tensor):
        """A training forward of backward="saved" (every rank runs one): x [T, H] -> (out, stats,
        SavedForward); the kernel writes GEMM1's outputs before the activation as it goes, room
        made for every row the ranks' token counts allow. Replayed from a CUDA graph as forward()
        is while those outputs take at most GRAPHED_SAVE_BYTES (larger ones are launched, into new
        tensors): the SavedForward then holds the graph's own buffers, lent until the graph's next
        replay, which first copies them out if that SavedForward is still alive (its backward has
        not run yet: several forwards before their backwards; CapturedForward). A forward then its
        backward, step after step, copies nothing."""
        stream = self._before_forward()
        layer, geo, cfg = self.layer, self.geo, self.layer.config
        T = x.shape[0]
        tokens = _check_graphs_agree(layer, EXPLICIT, None, T) if layer.world_size > 1 else [T]
        saving = ((sum(tokens) * min(cfg.top_k, geo.local_experts), cfg.ffn_in_size),
                  (T, cfg.shared_ffn_in_size) if cfg.shared_experts else None)
        logits_bytes = T * cfg.num_experts * torch.float32.itemsize
        size = sum(a * b for a, b in filter(None, saving)) * x.element_size() + logits_bytes
        out, stats, saved = self._run(x, (T, False, saving) if size <= self.GRAPHED_SAVE_BYTES else None, stream,
                                      saving)
        return out, plan_stats(stats), saved

    def _before_forward(self) -> torch.cuda.Stream | None:
        """Refuse a closed or failed layer; then queue this forward after the last one when they come
        on different streams: every launch shares the workspace (task counters, expected-row counts,
        status, symmetric buffers), so two at once would mix their rows. Not inside a capture (the
        caller's graph orders its own). -> the stream this forward runs on, None while capturing
        (what _run and _launch take: one lookup a forward, where each step looked it up again;
        with one stats copy, -12..-20% of a replayed call's host time, bench/NOTES.md item 84 c)."""
        self.raise_if_closed()
        capturing = torch.cuda.is_current_stream_capturing()
        if self.forwards == self.EPOCH_RESTART and not capturing:  # (before a failure seen here raises alone)
            self.restart_epochs()
        self.raise_if_failed(block=False)
        if capturing:
            return None
        self.forwards += 1
        stream = torch.cuda.current_stream(self.device_index)
        if self.last_stream is not None and self.last_stream != stream:
            stream.wait_stream(self.last_stream)
        self.last_stream = stream
        return stream

    def restart_epochs(self) -> None:
        """Every rank at once, between forwards: wait until no launch of any rank's is queued or
        running, raise FusedKernelError on every rank if any rank's last launch failed (one rank
        raising alone would leave the others in the barrier), zero the workspace's flags and
        counters and open call number 1 again (Workspace.restart_epochs), then let every rank go
        on. _before_forward calls it after EPOCH_RESTART forwards, at the same forward on every
        rank (each counts the forwards that reach the backend outside a capture: every rank takes
        part in each, its kernel launched or replayed, or all raise). A forward inside a CUDA
        graph the caller captures is not counted (nothing runs at the capture), nor are its
        replays: the kernel refuses a call past EPOCH_LAST (FusedKernelError) rather than let a
        flag wrap. Collective."""
        layer = self.layer
        log.info("rank %d: %d forwards: restarting the fused kernel's call numbers (every rank)", layer.rank,
                 self.forwards)
        runtime.on_every_rank(lambda: self.raise_if_failed(block=True), lambda rank, text: FusedKernelError(
            f"rank {rank}'s fused kernel failed before the layer's call numbers restarted: {text}"))
        self.rt.barrier()
        self.ws.restart_epochs()
        self.rt.barrier()
        self.forwards = 0

    def _run(self, x: torch.Tensor, key: tuple | None, stream: torch.cuda.Stream | None,
             saving: tuple | None = None):
        """The routing plan and kernel for x [T, H], replayed from the CUDA graph of `key`
        (captured at its second call; the first runs eagerly and compiles the kernel) unless key is
        None or graphs are off; every graph is dropped when the weights were replaced since they were
        captured (weight_addresses) or torch.use_deterministic_algorithms was switched (a graph
        keeps its plan's way of numbering rows, routing_plan's). saving: (pre's shape, shared_pre's
        or None) for backward="saved"; stream: _before_forward's. -> (out, stats [E + 1] int64
        (plan_stats'), SavedForward or None); when replayed, out is a new tensor the graph wrote
        (or, where torch's ops route, a copy of its own), stats a copy, and the SavedForward is
        lent (CapturedForward.replay). Graphs are kept for the
        latest keys (graphs_to_drop)."""
        if key is None or not self.options.cuda_graphs or stream is None:
            return self._launch(x, stream, saving=saving)
        layer = self.layer
        addresses = weight_addresses(layer)
        if (state := (addresses, torch.are_deterministic_algorithms_enabled())) != self.graphed:
            if self.graphs:  # they would read the old weights' memory (freed, or reused)
                log.info("rank %d: the layer's weights were replaced, or torch's deterministic setting switched: "
                         "dropping its CUDA graphs", layer.rank)
            self.graphs.clear()
            self.seen.clear()
            self.graphed = state
        if addresses is None:
            return self._launch(x, stream, saving=saving)
        if key not in self.graphs:
            if key not in self.seen:  # first time at this size: run eagerly (compiles the kernel)
                if len(self.seen) >= self.MAX_SEEN:  # many sizes (training's saved shapes follow every rank's)
                    self.seen.clear()
                self.seen.add(key)
                return self._launch(x, stream, saving=saving)
            log.info("rank %d: capturing the fused forward at %s (tokens, inference_mode[, saved shapes]) in a "
                     "CUDA graph", layer.rank, key)
            self.graphs[key] = self._capture(x, saving)
            for dropped in graphs_to_drop(list(self.graphs), self.MAX_GRAPHS, self.MAX_SAVING_GRAPHS):
                log.info("rank %d: dropping the CUDA graph of %s (more than %d kept, or %d of training "
                         "forwards)", layer.rank, dropped, self.MAX_GRAPHS, self.MAX_SAVING_GRAPHS)
                self.graphs.pop(dropped)
        self.graphs[key] = entry = self.graphs.pop(key)  # most recently used last
        out, stats, saved = entry.replay(x, stream)
        self.status_ready.record(stream)
        return out, stats, saved

    def _capture(self, x: torch.Tensor, saving: tuple | None) -> CapturedForward:
        """x's forward captured in a CUDA graph, addressed where the router kernel routes (every
        kernel then reads x and writes out through the address words: the tensor captured as x
        only lends its address, which they never read through, and is freed after the capture, so
        the graph keeps no [T, H] tensor where one on a static copy of x keeps two), else on a
        static copy of x."""
        layer = self.layer
        addressed = kernel_routes(x, layer.router_weight, layer.router_bias)
        static_x = torch.empty_like(x) if addressed else x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._launch(static_x, None, copy_status=True, saving=saving, addressed=addressed)
        if addressed:  # (its out is the stand-in x: the replays write new outputs)
            static_x, outputs = None, (None, *outputs[1:])
        return CapturedForward(graph, static_x, outputs, self.io, addressed,
                               zeroed_out(self._launch_for(x), layer.config))

    def _launch_for(self, x: torch.Tensor):
        """choose_launch's launch for x [T, H] on this backend's programs and override."""
        return choose_launch(self.geo, x.shape[0], x.dtype, self.programs, self.options.launch_override,
                             resident=self.resident)

    def _launch(self, x: torch.Tensor, stream: torch.cuda.Stream | None, copy_status: bool = False,
                saving: tuple | None = None, addressed: bool = False):
        """Routing plan + one kernel launch for x: [T, H] (T may be 0) on stream (None: inside a
        capture); saving: as _run's. -> (out, stats [E + 1] int64, SavedForward or None). The
        kernels read x and write out through the address words self.io, written here first
        (inside a capture, by the graph), except `addressed` (the layer's own capture: the
        replays write them, and out is x itself, standing in for the outputs they name).

        The launch is chosen (its override checked), the weights read and the saved rows' room
        allocated before the routing plan, which adds this call's rows to the counts later
        launches wait for: a launch refused after that would leave them waiting for rows that never
        come (until timeout_s), so the layer is marked failed then, naming the cause
        (FusedKernelError at its next forward; not inside a capture, where the plan is only
        recorded). At world > 1 the runtime is too (its peers' kernels wait for this rank's rows,
        so nothing collective is safe); at world 1 no kernel waits, and the layer's buffers are
        freed as any layer's (a launch setting whose kernel does not fit the GPU, in bench/tune.py,
        leaves the others' runs as they were)."""
        layer, geo, ws = self.layer, self.geo, self.ws
        launch = self._launch_for(x)
        experts = kernel_experts(layer)
        routed = kernel_routes(x, layer.router_weight, layer.router_bias)
        x = aligned_rows(x)  # (a view at an odd offset: a copy; the addressed capture's own x: itself)
        out = x if addressed else torch.zeros_like(x) if zeroed_out(launch, layer.config) else torch.empty_like(x)
        if not addressed:
            write_addresses(self.io, x, out)
        if saving is not None:  # (the largest allocation of the call: before the plan too)
            pre, shared_pre = (None if shape is None else torch.empty(shape, dtype=x.dtype, device=x.device)
                               for shape in saving)
        r = layer.route(x, keep_logits=saving is not None, x_at=self.io if routed else None)
        plan, stats = routing_plan(r, layer.expert_positions, geo, self.send_order, ws.scratch.comb_expect)
        saved = None if saving is None else SavedForward(
            r, plan.send_slot, plan.send_counts.view(layer.world_size, geo.local_experts), pre, shared_pre)
        try:
            launch_fused(x, out, experts, plan, ws, launch, config=layer.config, rank=layer.rank,
                         timeout_s=self.options.timeout_s, trace=self.trace, io=self.io,
                         saved=saved and Saved(saved.pre, saved.pre if saved.shared_pre is None else saved.shared_pre))
        except Exception as e:
            if stream is not None:  # in a capture the plan was only recorded: it added nothing
                self.failed = (
                    f"rank {layer.rank}: the fused kernel's launch was refused after its routing plan was made "
                    f"({type(e).__name__}: {e}); the expected row counts the next launches wait for no longer "
                    "match what will arrive: the layer is unusable, build it again")
                log.error("%s", self.failed)
                if layer.world_size > 1:  # the peers' kernels wait for this rank's rows: teardown stays local
                    self.rt.failed = self.failed
            raise
        if copy_status or stream is not None:
            self.status_host.copy_(ws.scratch.status, non_blocking=True)
        if stream is not None:
            self.status_ready.record(stream)
        return out, stats, saved

    def raise_if_closed(self) -> None:
        """Raise RuntimeError where the layer's symmetric buffers were freed: its kernel would write
        into memory the layer no longer holds."""
        if self.heap.freed:
            raise RuntimeError("this MoELayer's symmetric buffers were freed (flashmoe_py.finalize(), or its "
                               "backend's close()): build the layer again after flashmoe_py.init()")

    def raise_if_failed(self, block: bool) -> None:
        """Raise FusedKernelError if a launch recorded a timeout. block=False looks only at the
        status copied after the last eager launch, if it has landed; block=True waits for all
        queued work on the layer's GPU, every stream's (CUDA-graph replays included), and reads the
        status word itself."""
        if self.failed is None and not torch.cuda.is_current_stream_capturing():
            if block:
                torch.cuda.synchronize(self.layer.device)
                status = self.ws.scratch.status.tolist()
            elif self.status_ready.query():
                status = self.status_host.tolist()
            else:
                return
            self.failed = describe_timeout(status, self.layer.rank)
            if self.failed is not None:
                log.error("%s; the layer is unusable and teardown will not wait on peers", self.failed)
                self.rt.failed = self.failed  # teardown must not wait on peers now
        if self.failed is not None:
            raise FusedKernelError(self.failed)

    def close(self) -> None:
        """Free the symmetric buffers (collective); the layer cannot run afterwards."""
        self.graphs.clear()
        self.heap.free()
