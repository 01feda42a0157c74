"""Every rank of a `world`-rank fused layer in one process on one GPU: each rank's workspace holds
plain tensors, and its peer table names the other ranks' copies, as a symmetric heap's mapped
copies would (transport "p2p"). Each rank's kernel runs on its own stream with its share of the
SMs, so all of them are resident at once and exchange rows, counts and flags through the GPU's
memory: the multi-rank protocol at the current kernel without a multi-GPU machine. Not NVLink's
timing, and not the nvshmem transport. On the CPU (Triton's interpreter, one program a rank) each
rank's kernel runs in a thread of its own (interpreter_threads), so the ranks' waits are met there
too."""

from __future__ import annotations

import contextlib
import random
import threading

import torch
from one_rank import draw_weights, kernel_weights

from flashmoe_py import ExpertPlacement, MoEConfig
from flashmoe_py.backends.flash import routing_plan
from flashmoe_py.kernels.fused_moe import launch_fused
from flashmoe_py.kernels.launch_config import choose_launch
from flashmoe_py.kernels.layout import Geometry, describe_timeout
from flashmoe_py.kernels.workspace import Workspace
from flashmoe_py.reference import ffn
from flashmoe_py.routing import route


@contextlib.contextmanager
def interpreter_threads():
    """A block in which Triton interpreter launches may run in several threads at once. The
    interpreter patches triton.language for each launch (and each device function call) and
    restores it when the launch ends, so with launches in several threads the first to end would
    unpatch the others mid-kernel. Inside the block a restore does nothing; every patch is undone
    at its end, the latest first."""
    from triton.runtime import interpreter

    original, scopes, lock = interpreter._patch_lang, [], threading.Lock()

    class Kept:
        def restore(self):
            pass

    def patch(fn):
        with lock:
            scopes.append(original(fn))
        return Kept()

    interpreter._patch_lang = patch
    try:
        yield
    finally:
        interpreter._patch_lang = original
        for scope in reversed(scopes):
            scope.restore()


def _in_threads(launches: list) -> None:
    """Run each of `launches` (callables) in a thread of its own, inside interpreter_threads; raise
    the first error any of them raised."""
    errors = []

    def run(launch):
        try:
            launch()
        except Exception as e:  # re-raised below, in the caller's thread
            errors.append(e)

    with interpreter_threads():
        threads = [threading.Thread(target=run, args=(launch,)) for launch in launches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


class GroupBuffers:
    """The symmetric buffers of `world` ranks as plain tensors on one device: every rank's copy of
    each buffer, allocated together when the first rank asks for it; rank(r) is the allocator
    rank r's Workspace takes (workspace.Allocator)."""

    def __init__(self, device, world: int):
        self.device, self.world = device, world
        self.copies: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]

    def rank(self, r: int) -> RankBuffers:
        return RankBuffers(self, r)


class RankBuffers:
    """Rank r's view of a GroupBuffers: its own copies, and every rank's addresses."""

    def __init__(self, group: GroupBuffers, rank: int):
        self.group, self.rank = group, rank

    def allocate(self, buffers: dict) -> dict[str, torch.Tensor]:
        g = self.group
        for name, (shape, dtype) in buffers.items():
            if name not in g.copies[0]:
                for copies in g.copies:
                    copies[name] = torch.zeros(shape, dtype=dtype, device=g.device)
        return {name: g.copies[self.rank][name] for name in buffers}

    def peer_ptrs(self, name: str) -> torch.Tensor:
        return torch.tensor([copies[name].data_ptr() for copies in self.group.copies], dtype=torch.int64,
                            device=self.group.device)


def reference_with_routing(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, full: dict,
                           cfg: MoEConfig) -> torch.Tensor:
    """x [T, H]; experts, weights [T, k]: a routing's choice and its scaled weights -> [T, H] fp32:
    reference_forward's sum (expert biases, weight_on_input, shared experts and their gate, the
    full layer's weights in fp32) with that routing, dropless. The reference for the kernel with
    its own router's choice: no near-tie between two routers to excuse."""
    xc, out = x.float(), torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    f32 = {name: t.float() for name, t in full.items()}
    for e in range(cfg.num_experts):
        token, j = torch.nonzero(experts == e, as_tuple=True)
        if token.numel():
            w = weights[token, j].float()[:, None]
            biases = (f32["b_in"][e], f32["b_out"][e]) if cfg.expert_bias else (None, None)
            if cfg.weight_on_input:
                y = ffn(w * xc[token], f32["w_in"][e], f32["w_out"][e], cfg, *biases)
            else:
                y = w * ffn(xc[token], f32["w_in"][e], f32["w_out"][e], cfg, *biases)
            out.index_add_(0, token, y)
    if cfg.shared_experts:
        shared = ffn(xc, f32["shared_w_in"], f32["shared_w_out"], cfg)
        if cfg.shared_expert_gate:
            shared = torch.sigmoid(xc @ f32["shared_gate_weight"].t()) * shared
        out += shared
    return out


class Ranks:
    """`world` ranks of one layer (contiguous placement, full random weights), each with its
    workspace, experts and stream, sharing one GPU's SMs equally."""

    def __init__(self, cfg: MoEConfig, world: int, max_tokens: int, device: str = "cuda"):
        """device: a GPU, or "cpu" (the Triton interpreter: one program a rank, each rank's kernel in
        a thread of its own)."""
        if cfg.capacity_factor is not None:
            raise ValueError("Ranks checks dropless configs (its reference takes every slot)")
        self.cfg, self.world, self.device = cfg, world, device
        self.geo = Geometry.for_config(cfg, world, max_tokens)
        group = GroupBuffers(device, world)
        self.ws = [Workspace.allocate(self.geo, cfg.torch_dtype, "p2p", device, group.rank(r)) for r in range(world)]
        self.seed = random.randrange(2**31)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.full = draw_weights(cfg, self.gen, device)
        L = self.geo.local_experts
        self.experts = [kernel_weights(self.full, cfg, slice(r * L, (r + 1) * L)) for r in range(world)]
        self.positions = ExpertPlacement.contiguous(cfg.num_experts, world).positions(device)
        self.send_order = [self.geo.send_order(r, device) for r in range(world)]
        self.on_gpu = on_gpu = torch.device(device).type == "cuda"
        self.streams = [torch.cuda.Stream(device) if on_gpu else None for _ in range(world)]
        self.programs = torch.cuda.get_device_properties(device).multi_processor_count // world if on_gpu else 1
        self.synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)

    def call(self, tokens: list[int], timeout_s: float = 60.0) -> dict:
        """One forward on every rank at once, rank r on tokens[r] fresh random tokens, outputs
        NaN-poisoned first -> {rel_err: the worst rank's, against reference_with_routing (inf
        where NaN), timeouts: each rank's describe_timeout, None where none}. Every rank's routing
        and plan are queued before any rank's kernel, so no router or plan kernel is compiled while
        a fused kernel waits for its peers; a fused kernel variant new to a later rank (Triton
        specialises the rank: 0, 1, 2..; and the launch's tiles follow its token count) still is,
        so timeout_s spans a compile (seconds), not a real wait's microseconds."""
        cfg, geo = self.cfg, self.geo
        xs = [torch.randn(t, cfg.hidden_size, generator=self.gen).to(self.device, cfg.torch_dtype) for t in tokens]
        outs = [torch.full_like(x, float("nan")) for x in xs]
        biases = {n: self.full[n] for n in ("router_bias", "e_score_correction_bias") if n in self.full}
        self.synchronize()
        routes, plans = [], []
        for r, (x, stream) in enumerate(zip(xs, self.streams)):
            with torch.cuda.stream(stream):
                routes.append(route(x, self.full["router_weight"], cfg, **biases))
                plans.append(routing_plan(routes[r], self.positions, geo, self.send_order[r],
                                          self.ws[r].scratch.comb_expect)[0])
        launches = []
        for r, (x, out, stream) in enumerate(zip(xs, outs, self.streams)):
            def launch(r=r, x=x, out=out):
                tiles = choose_launch(geo, x.shape[0], x.dtype, self.programs)
                launch_fused(x, out, self.experts[r], plans[r], self.ws[r], tiles, config=cfg, rank=r,
                             timeout_s=timeout_s)
            launches.append((stream, launch))
        if self.on_gpu:  # each on its stream, one after another from here: they run at once there
            for stream, launch in launches:
                with torch.cuda.stream(stream):
                    launch()
        else:
            _in_threads([launch for _, launch in launches])
        self.synchronize()
        timeouts = [describe_timeout(ws.scratch.status.tolist(), r) for r, ws in enumerate(self.ws)]
        worst = 0.0
        for x, out, routed in zip(xs, outs, routes):
            if x.shape[0] == 0:
                continue
            ref = reference_with_routing(x, routed.experts, routed.weights, self.full, cfg)
            err = float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
            worst = max(worst, float("inf") if err != err else err)
        return {"rel_err": worst, "timeouts": timeouts}
