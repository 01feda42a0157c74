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
import time

import torch
from one_rank import RankBuffers, draw_weights, kernel_weights, symmetric_copies

from flashmoe_py import ExpertPlacement, MoEConfig
from flashmoe_py.backends.flash import routing_plan
from flashmoe_py.kernels.fused_moe import compile_fused, launch_fused
from flashmoe_py.kernels.launch_config import choose_launch
from flashmoe_py.kernels.layout import Geometry, describe_timeout
from flashmoe_py.kernels.workspace import Workspace
from flashmoe_py.reference import routed_sum
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
        copies = symmetric_copies(self.geo, cfg.torch_dtype, device)
        self.ws = [Workspace.allocate(self.geo, cfg.torch_dtype, "p2p", device, RankBuffers(copies, r))
                   for r in range(world)]
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
        NaN-poisoned first -> {rel_err: the worst rank's, against reference() (inf
        where NaN), timeouts: each rank's describe_timeout, None where none, load_s: on a GPU the
        seconds each rank's compile_fused took (a variant new to the process: its compile, unless
        Triton's disk cache had it, and its module load)}. Every rank's routing
        and plan are queued before any rank's kernel, and on a GPU every rank's fused kernel
        variant is compiled and loaded before the first is launched (kernels/fused_moe.compile_fused:
        Triton specialises the rank, 0, 1 or other, and the tiles follow the token count), so no
        compile or module load happens while a fused kernel waits for its peers (a module load may
        itself wait for the kernels running on the GPU). In the interpreter a rank's
        kernel runs for seconds, so timeout_s is generous."""
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
        launches, load_s = [], []
        for r, (x, out, stream) in enumerate(zip(xs, outs, self.streams)):
            tiles = choose_launch(geo, x.shape[0], x.dtype, self.programs)
            if self.on_gpu:  # compiled and loaded before any rank's kernel waits: its module load would wait for them
                start = time.perf_counter()
                compile_fused(x, out, self.experts[r], plans[r], self.ws[r], tiles, config=cfg, rank=r,
                              timeout_s=timeout_s)
                load_s.append(time.perf_counter() - start)

            def launch(r=r, x=x, out=out, tiles=tiles):
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
            ref = self.reference(x, routed)
            err = float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
            worst = max(worst, float("inf") if err != err else err)
        return {"rel_err": worst, "timeouts": timeouts, "load_s": load_s}

    def reference(self, x: torch.Tensor, routed) -> torch.Tensor:
        """x [T, H] and its routing (routing.Routing) -> [T, H] fp32: reference_forward's sum with
        that routing (reference.routed_sum), the full layer's weights. The kernel's reference with
        its own router's choice: no near-tie between two routers to excuse."""
        extras = {n: self.full[n] for n in ("bias_in", "bias_out", "shared_w_in", "shared_w_out", "shared_gate_weight")
                  if n in self.full}
        return routed_sum(x.float(), routed.weights, routed.experts, routed.kept, self.full["w_in"], self.full["w_out"],
                          self.cfg, **extras)
