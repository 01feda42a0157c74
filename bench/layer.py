"""The MoE layer benchmark: torchrun over presets, token counts, routing skews and backends.

    torchrun --nproc-per-node N bench/layer.py [--preset P ...] [--tokens T ...] [--backends B ...]

On GPUs (NCCL) it measures the node's ceilings first, checks every backend against the reference,
then times each point (calls issued back to back, CUDA events around each, median over calls and
input sets, max over ranks). On a CPU-only machine it runs the `tiny` preset over gloo. Rank 0
prints a table and writes JSON rows."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flashmoe_py as fm  # noqa: E402
from flashmoe_py import PRESETS, MoEConfig, MoELayer, reference_forward  # noqa: E402
from flashmoe_py.backends.torch_ep import shared_experts  # noqa: E402
from flashmoe_py.config import EXPERT_WEIGHTS  # noqa: E402
from flashmoe_py.kernels.layout import heap_bytes_for  # noqa: E402
from flashmoe_py.options import BACKWARDS  # noqa: E402
from flashmoe_py.runtime import detect_launcher  # noqa: E402
import summary  # noqa: E402  (bench/, beside this file)
from energy import meter_for  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from grad_reference import lean_grad_errors  # noqa: E402  (tests/: the gradients' reference)

ROUTINGS = ("uniform", "zipf", "one_hot")
FLASH = {"flash": "p2p", "flash_nvshmem": "nvshmem"}  # benchmark backend -> fused-kernel transport
# every backend that builds a fused layer (so needs the heap), by transport; flash_shared_torch:
# the routed experts in the fused kernel, the shared experts after it in torch (SharedOutside)
FUSED_LAYERS = {**FLASH, "flash_shared_torch": "p2p"}
BACKENDS = ("torch", "symm_mem", "triton_kernels", *FUSED_LAYERS)
CHILD_TIMEOUT_S = 1800  # the symm_mem child's whole sweep
CHECK_TOKENS = 256  # tokens per rank compared against the float32 reference before and after timing


def checked_tokens(tokens: int) -> torch.Tensor:
    """The CHECK_TOKENS token indices a point compares, spread over all `tokens` to the last (the
    last tiles too)."""
    if tokens <= CHECK_TOKENS:
        return torch.arange(tokens)
    return torch.linspace(0, tokens - 1, CHECK_TOKENS).round().long().unique()


def reference_rows(x: torch.Tensor, picked: torch.Tensor, cfg: MoEConfig, weights: dict) -> torch.Tensor:
    """reference_forward's outputs of the tokens `picked` of x [T, H]: from those tokens alone,
    or with capacity (whose drops depend on every token's routing, and whose capacity on T) from
    all of them."""
    if cfg.capacity_factor is not None:
        return reference_forward(x, config=cfg, **weights)[picked]
    return reference_forward(x[picked], config=cfg, **weights)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="*", default=None, help=f"of {sorted(PRESETS)}; default: "
                   "the three model presets on GPUs, 'tiny' on the CPU; none (the flag alone) with "
                   "--custom or --random")
    p.add_argument("--custom", nargs=4, type=int, metavar=("HIDDEN", "FFN", "EXPERTS", "TOP_K"),
                   help="a custom shape, benchmarked beside the presets")
    p.add_argument("--random", type=int, default=0, metavar="N",
                   help="also N shapes drawn at random (random_shapes: hidden 2048-7168, expert FFN "
                        "512-14336, 8-256 experts, top-k 1-8, at most 16 GB of expert weights)")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="bfloat16 (GPU default) or float32 (CPU default)")
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help="tokens per rank (default 128 ... 16384 on GPUs, 64 256 on the CPU)")
    p.add_argument("--backends", nargs="+", default=["torch"], choices=BACKENDS,
                   help="flash: the fused kernel (p2p transport); flash_nvshmem: the same kernel over "
                        "NVSHMEM device-API puts; torch: NCCL all-to-all + grouped GEMM; symm_mem: "
                        "PyTorch's NVSHMEM all_to_all_vdev(_2d) + grouped GEMM (GPU only; run in "
                        "separate processes when a flash backend is benchmarked too); triton_kernels: "
                        "its matmul_ogs on the layer's experts and router (one GPU, swiglu; an optional "
                        "import, bench/triton_kernels_moe.py); flash_shared_torch: presets with shared "
                        "experts only, the fused kernel on the routed experts and the shared experts "
                        "after it in torch (what running them inside the kernel saves)")
    p.add_argument("--routing", nargs="+", default=["uniform"], choices=ROUTINGS)
    p.add_argument("--iters", type=int, default=None, help="timed iterations per input set")
    p.add_argument("--energy-seconds", type=float, default=0.0, metavar="S",
                   help="on GPUs with NVML, also each point's board energy a call (joules_per_call, "
                        "energy_loop_us), over about S seconds of the first input set's calls after its timing")
    p.add_argument("--input-sets", type=int, default=3)
    p.add_argument("--fwd-bwd", action="store_true",
                   help="also time forward + backward from a gradient dy of the output (rows with mode "
                        "'fwd+bwd', every gradient of a step at the timed size checked against the reference "
                        "before and after timing), on "
                        "the backends that have a backward")
    p.add_argument("--frozen-experts", action="store_true",
                   help="with --fwd-bwd, also time each step with the experts' weights (routed and shared) frozen, "
                        "as fine-tuning that trains the router and the rest of the model does (rows with 'frozen': "
                        "'experts'; no expert weight gradients, so a floor of twice the forward's terms)")
    p.add_argument("--backwards", nargs="+", default=None, choices=BACKWARDS,
                   help="the backwards of the fwd+bwd rows, one row each where the backend has it (flash: "
                        "saved, recompute); default: each backend's own")
    p.add_argument("--user-graph", action="store_true",
                   help="also time backend flash captured whole in a caller's CUDA graph (with --fwd-bwd, "
                        "the training step too)")
    p.add_argument("--out", default=None, help="JSON file (default bench/out/layer-<device>-w<world>.json, "
                   "git-ignored: results are committed under bench/results/ on purpose); the plot "
                   "goes beside it")
    p.add_argument("--rows-out", default=None, help=argparse.SUPPRESS)  # internal: the symm_mem child
    args = p.parse_args(argv)
    unknown = sorted(set(args.preset or ()) - set(PRESETS))
    if unknown:
        p.error(f"--preset {' '.join(unknown)}: not a preset; choose from {sorted(PRESETS)}")
    for flag, values, least in (("--tokens", args.tokens, 1), ("--iters", [args.iters], 1),
                                ("--input-sets", [args.input_sets], 1), ("--random", [args.random], 0),
                                ("--custom", args.custom, 1), ("--energy-seconds", [args.energy_seconds], 0)):
        bad = [v for v in values or () if v is not None and not v >= least]
        if bad:
            p.error(f"{flag} {bad[0]}: expected at least {least}")
    if args.custom:
        try:  # every rank would end in the config's traceback
            MoEConfig(*args.custom)
        except ValueError as e:
            p.error(f"--custom {' '.join(map(str, args.custom))}: {e}")
    if args.preset == [] and not (args.custom or args.random):
        p.error("--preset without a preset needs --custom or --random (the shapes to benchmark)")
    needs = [f for f, on in (("--frozen-experts", args.frozen_experts), ("--backwards", args.backwards)) if on]
    if needs and not args.fwd_bwd:
        p.error(f"{' and '.join(needs)} time training steps: add --fwd-bwd")
    if args.user_graph and not set(args.backends) & set(FLASH):
        p.error(f"--user-graph times backend flash in a caller's CUDA graph: add one of {sorted(FLASH)} to --backends")
    return args


def setup_distributed(heap_bytes: int | None) -> tuple[int, int, torch.device]:
    """torch.distributed through fm.init, whichever launcher started this process (torchrun,
    mpirun, or none: one rank on a free port): NCCL on GPUs, gloo on the CPU; with NVSHMEM too for
    the fused backend (heap_bytes given)."""
    rt = fm.init(nvshmem=heap_bytes is not None, heap_bytes=heap_bytes)
    if rt.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rt.info.local_world_size))
    return rt.rank, rt.world_size, rt.device


def steer_routing(layer: MoELayer, x: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """Bias the router along one direction u that every token shares, so the expert popularity
    follows `kind`: uniform (no bias), zipf (bias log 1/(i+1) for a shuffled rank i), one_hot
    (one expert wins every token's first choice). Modifies layer.router_weight; returns new x."""
    E, H = layer.config.num_experts, layer.config.hidden_size
    if kind == "uniform":
        return x
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(H, generator=g)
    u = (u / u.norm()).to(x.device)
    if kind == "zipf":
        bias = -torch.log(torch.randperm(E, generator=g).float() + 1.0) * 2.0
    else:
        bias = torch.zeros(E)
        bias[int(torch.randint(E, (1,), generator=g))] = 50.0
    c = 4.0  # every token's component along u
    xf = x.float()
    xf = xf - (xf @ u)[:, None] * u + c * u
    with torch.no_grad():
        w = layer.router_weight.float()
        w = w - (w @ u)[:, None] * u + (bias.to(x.device) / c)[:, None] * u
        layer.router_weight.copy_(w)
    return xf.to(x.dtype)


class Timer:
    """Per-call times in µs of calls issued back to back, as a model issues its layers: on GPUs,
    CUDA events recorded around each call on the stream, the host waiting only after the last
    call (so a backend's own host synchronisation counts, the host's launch of the next call
    does not, unless the GPU waits for it); on the CPU, perf_counter per call. host: every timed
    call's host time in µs (perf_counter around its issue): where it reaches the GPU's time, the
    GPU waits for the host and the calls run at the host's pace, unless the call itself waits for
    the GPU (then the two match whatever the bottleneck: a training forward at world > 1, which
    compares the ranks' token counts, and a backward's all-to-all split sizes or capacity drops)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host: list[float] = []

    def time(self, fn, iters: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        if dist.is_initialized():  # ranks start timing together (a single process: nothing to wait for)
            dist.barrier()
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iters)]
            for start, end in events:
                t0 = time.perf_counter()
                start.record()
                fn()
                end.record()
                self.host.append((time.perf_counter() - t0) * 1e6)
            torch.cuda.synchronize()
            return [start.elapsed_time(end) * 1e3 for start, end in events]
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        self.host += times
        return times


ENERGY_LOOPS = 3  # loops a point, their median taken (the counter refreshes coarsely: bench/energy.py)
ENERGY_KEYS = ("joules_per_call", "energy_loop_us")


def energy_row(fn, seconds: float, median_us: float, device) -> dict:
    """{"joules_per_call": one call's board energy in J, "energy_loop_us": one call's time in those
    loops}, each the median of ENERGY_LOOPS loops (the two medians may come from different loops) and
    the largest over ranks (one board's, not the node's sum); {} when seconds <= 0,
    or when any rank has no energy counter (then no rank calls fn). A loop is the same number of
    calls on every rank (fn may be collective), about seconds / ENERGY_LOOPS of them at median_us
    (already the largest over ranks) each. Under a power cap, joules ~ the cap times
    energy_loop_us: compare both, and energy_loop_us with median_us."""
    if seconds <= 0:
        return {}
    meter = meter_for(device)
    if max_over_ranks(0.0 if meter else 1.0, device) > 0:
        return {}
    calls = max(1, math.ceil(seconds / ENERGY_LOOPS / (median_us * 1e-6)))
    loops = [_energy_loop(meter, fn, calls) for _ in range(ENERGY_LOOPS)]
    if max_over_ranks(1.0 if any(j is None for j, _ in loops) else 0.0, device) > 0:
        return {}
    return {"joules_per_call": max_over_ranks(statistics.median(j for j, _ in loops), device),
            "energy_loop_us": max_over_ranks(statistics.median(us for _, us in loops), device)}


def _energy_loop(meter, fn, calls: int) -> tuple[float | None, float]:
    """`calls` calls of fn back to back -> (the board's energy a call in J, or None if the counter
    was not read; µs a call, host clock between synchronisations)."""
    torch.cuda.synchronize()
    mj, t0 = meter.millijoules(), time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    us = (time.perf_counter() - t0) * 1e6 / calls
    after = meter.millijoules()
    return (None if mj is None or after is None else (after - mj) / 1e3 / calls), us


def without_energy(row: dict) -> dict:
    """row less its energy keys (a row derived from it measures its own, or none)."""
    return {k: v for k, v in row.items() if k not in ENERGY_KEYS}


def max_over_ranks(value: float, device) -> float:
    """The largest of every rank's value. NaN (the error of a row nothing wrote) counts as inf: NCCL's
    MAX drops NaN, and gloo's keeps it or not by rank order."""
    t = torch.tensor([math.inf if math.isnan(value) else value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def measure_ceilings(device: torch.device, world: int) -> dict:
    """This node's bf16 GEMM rate, HBM copy and read bandwidths and all-to-all bandwidth per GPU, as
    achieved (cuBLAS, a copy, a sum, NCCL), not as specified: the floors below are at these rates.
    The read rate (a sum over 1 GiB, read once) can pass the copy's (1 GiB read and 1 GiB written):
    weights are only read."""
    if device.type != "cuda":
        return {}
    timer = Timer(device)
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm_us = statistics.median(timer.time(lambda: a @ b, 10, 3))
    src = torch.randn(1 << 29, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_us = statistics.median(timer.time(lambda: dst.copy_(src), 10, 3))
    read_us = statistics.median(timer.time(lambda: src.sum(dtype=torch.float32), 10, 3))
    a = b = src = dst = None  # 2.5 GiB back before the all-to-all buffers
    # The slowest rank's rates (max of negatives).
    out = {"bf16_tflops": -max_over_ranks(-2 * n**3 / gemm_us / 1e6, device),
           "hbm_gbps": -max_over_ranks(-2 * (1 << 30) / copy_us / 1e3, device),
           "hbm_read_gbps": -max_over_ranks(-(1 << 30) / read_us / 1e3, device)}
    if world > 1:
        per_rank = 256 << 20
        send = torch.randn(per_rank // 2, device=device, dtype=torch.bfloat16)
        recv = torch.empty_like(send)
        a2a_us = max_over_ranks(statistics.median(
            timer.time(lambda: dist.all_to_all_single(recv, send), 10, 3)), device)
        out["a2a_gbps"] = per_rank * (world - 1) / world / a2a_us / 1e3
    return out


def floor_us(cfg: MoEConfig, tokens: int, world: int, ceilings: dict, passes: int = 1,
             load: dict | None = None) -> float | None:
    """The physical floor per forward (µs): max of the compute, HBM and NVLink terms; per training
    step (passes 3): max(3 compute, 3 HBM, 2 NVLink), the backward's dgrad and wgrad GEMMs each
    the forward's and its weight traffic twice, and two all-to-alls more (dy to the experts, the
    rows' gradients back) where the forward has two; with the experts frozen (passes 2), dgrad
    only: max(2 compute, 2 HBM, 2 NVLink). load: the point's routing (routing_load); None:
    uniform routing's expectation."""
    terms = floor_terms(cfg, tokens, world, ceilings, load)
    if terms is None:
        return None
    compute, hbm, link = terms
    return max(passes * compute, passes * hbm, (2 if passes > 1 else 1) * link)


def floor_terms(cfg: MoEConfig, tokens: int, world: int, ceilings: dict,
                load: dict | None = None) -> tuple[float, float, float] | None:
    """A forward's compute, HBM and NVLink terms (µs) at this node's measured ceilings, or None
    without them, each the busiest rank's: a call ends when its slowest rank does. load: each
    rank's rows, touched experts and link rows under the point's routing (routing_load); None:
    uniform routing's expectation (uniform_load). The HBM term counts what must move at least: the
    weights of the experts some token picks, x read and out written, at the faster of the measured
    copy and read rates (hbm_read_gbps, where measured); not the gathered rows or the expert
    outputs, which an implementation need not pass through HBM. The link term counts what a token
    must cross at least: one copy of its row to each other rank that holds one of its experts, and
    one combined row back (the layer sends one per remote slot)."""
    if not ceilings:
        return None
    load = load or uniform_load(cfg, tokens, world)
    bytes_el = torch.tensor([], dtype=cfg.torch_dtype).element_size()
    H, F, Fin = cfg.hidden_size, cfg.ffn_size, cfg.ffn_in_size
    FS = cfg.shared_width  # shared experts: one FFN over every token
    FS_in = 2 * FS if cfg.gated else FS
    compute = max(2 * H * (rows * (Fin + F) + t * (FS_in + FS))
                  for rows, t in zip(load["rows"], load["tokens"])) / (ceilings["bf16_tflops"] * 1e6)
    # the weights of the experts some token picks, x and out
    hbm = max((touched * (Fin + F) + FS_in + FS) * H * bytes_el + t * H * bytes_el * 2
              for touched, t in zip(load["touched"], load["tokens"])
              ) / (max(ceilings["hbm_gbps"], ceilings.get("hbm_read_gbps", 0.0)) * 1e3)
    link = 0.0
    if world > 1:
        link = max(load["link_rows"]) * H * bytes_el / (ceilings["a2a_gbps"] * 1e3)
    return compute, hbm, link


def uniform_load(cfg: MoEConfig, tokens: int, world: int) -> dict:
    """routing_load's figures expected of uniform routing, every rank alike: tokens * top_k rows; of
    a rank's L experts, each missed by all W * slots slots with probability (1 - 1/E)^(W * slots);
    link rows out and back, one a token to each other rank holding one of its experts."""
    E, L, k = cfg.num_experts, cfg.num_experts // world, cfg.top_k
    slots = tokens * k
    return {"tokens": [tokens], "rows": [slots], "touched": [L * (1 - (1 - 1 / E) ** (world * slots))],
            "link_rows": [2 * tokens * remote_ranks(E, L, k, world) if world > 1 else 0.0]}


def routing_load(layer: MoELayer, x: torch.Tensor) -> dict:
    """What the layer's routing of this rank's x [T, H] asks of each rank, gathered from every rank
    (collective): tokens (T), rows (kept expert slots its experts receive), touched (its experts
    with a row), link_rows (rows it sends and receives over the links: one a token to each other rank
    holding one of the token's experts, and the combined row back; the links carry both ways at
    once, so this is a direction's). Lists indexed by rank."""
    W, E, L = layer.world_size, layer.config.num_experts, layer.local_experts
    with torch.no_grad():
        r = layer.route(x)
    kept = torch.ones_like(r.experts, dtype=torch.bool) if r.kept is None else r.kept  # capacity drops: no row
    owner = layer.expert_positions[r.experts] // L  # [T, k] the rank holding each slot's expert
    needs = torch.zeros(x.shape[0], W + 1, dtype=torch.bool, device=x.device)
    needs.scatter_(1, torch.where(kept, owner, W), True)  # dropped slots to a column left out
    needs[:, layer.rank] = False
    mine = torch.cat([torch.tensor([x.shape[0]], device=x.device), needs[:, :W].sum(0),  # tokens, copies to each
                      torch.bincount(r.experts[kept], minlength=E)])
    every = [torch.empty_like(mine) for _ in range(W)]
    if W > 1:
        dist.all_gather(every, mine)
    else:
        every = [mine]
    every = torch.stack(every).cpu()  # [W, 1 + W + E]
    copies, slots = every[:, 1:1 + W], every[:, 1 + W:].sum(0)  # copies[src, dst]; slots [E] over ranks
    rank_of = (layer.expert_positions.cpu() // L)  # [E]
    rows = torch.zeros(W, dtype=torch.int64).index_add_(0, rank_of, slots)
    touched = torch.zeros(W, dtype=torch.int64).index_add_(0, rank_of, (slots > 0).long())
    return {"tokens": every[:, 0].tolist(), "rows": rows.tolist(), "touched": touched.tolist(),
            "link_rows": (copies.sum(1) + copies.sum(0)).tolist()}


def mean_load(loads: list[dict]) -> dict:
    """routing_load's figures averaged over input sets, rank by rank: the routing of the calls a
    row's median is taken over (at 128 tokens deepseek_v3's sets touch 246-255 of its 256 experts,
    so the first set's alone could move the HBM floor by 2%)."""
    return {key: [sum(v) / len(loads) for v in zip(*(load[key] for load in loads))] for key in loads[0]}


def remote_ranks(E: int, L: int, k: int, world: int) -> float:
    """The other ranks a token's k distinct experts, drawn uniformly from E (L on each rank), land
    on, on average: each other rank is missed with probability C(E - L, k) / C(E, k)."""
    return (world - 1) * (1 - math.comb(E - L, k) / math.comb(E, k))


def git_commit() -> str:
    if os.environ.get("FLASHMOE_COMMIT"):  # set by the caller where the tree has no .git
        return os.environ["FLASHMOE_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_rows(path: str, rows: list) -> None:
    """{"meta": {device, commit, date}, "rows": rows} as JSON at path (GPU scripts' results)."""
    meta = {"device": torch.cuda.get_device_name(), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def rel_err(out: torch.Tensor, ref: torch.Tensor, part: int = 1 << 26) -> float:
    """||out - ref|| / ||ref|| (nan for 0 / 0, inf for x / 0) in fp32, over parts of at most `part`
    elements along dim 0: a weight gradient's fp32 copy whole (deepseek_v3's w_in: 28 GiB) need
    not fit."""
    n, row = ref.shape[0], math.prod(ref.shape[1:])
    rows = max(1, part // max(1, row))
    diff = norm = 0.0
    for a, b in zip(out.reshape(n, row).split(rows), ref.reshape(n, row).split(rows)):
        diff += float((a.float() - b.float()).square().sum())
        norm += float(b.float().square().sum())
    return (diff / norm) ** 0.5 if norm else (float("nan") if diff == 0 else float("inf"))


def bench_point(cfg, backend, routing, tokens, world, rank, device, args, seed, loads: dict):
    """One (config, backend, routing, tokens) point -> a JSON row (on every rank). loads: the
    points' routing loads by seed (one a case: its backends share inputs and steering)."""
    fused = backend in FLASH
    extra = {"max_tokens_per_rank": tokens, "transport": FLASH[backend]} if fused else {}
    layer = MoELayer(cfg, backend="flash" if fused else "torch", device=device, seed=seed, **extra)
    gen = torch.Generator().manual_seed(seed * 131 + rank)
    xs = [torch.randn(tokens, cfg.hidden_size, generator=gen).to(device, cfg.torch_dtype)
          for _ in range(args.input_sets)]
    xs = [steer_routing(layer, x, routing, seed) for x in xs]  # same steering on every rank
    # the peers and wrappers after the steering, which rewrites the router: some copy it when built
    forward, mode = layer, None
    try:
        if backend == "flash_shared_torch":
            forward = SharedOutside(layer, tokens)
        elif backend == "symm_mem":
            from symm_mem_ep import SymmMemEP
            forward = SymmMemEP(layer, tokens)
            mode = forward.mode
        elif backend == "triton_kernels":
            from triton_kernels_moe import TritonKernelsMoE
            forward = TritonKernelsMoE(layer)
            mode = forward.mode
    except ValueError as e:  # a peer without this config's features: no row for it
        print(f"backend {backend} skipped for {cfg}: {e}", file=sys.stderr)
        return []
    if seed not in loads:  # the floor's (add_derived); every rank meets the same points in turn
        loads[seed] = mean_load([routing_load(layer, x) for x in xs])
    load = loads[seed]
    picked = checked_tokens(tokens).to(device)
    with torch.inference_mode():
        try:
            out = forward(xs[0])[picked]
        except Exception as e:  # an optional peer that cannot run this point fails its row, not the sweep
            if backend != "triton_kernels":
                raise
            print(f"backend {backend} failed at {tokens} tokens: {e!r}", file=sys.stderr)
            out = torch.full_like(xs[0][picked], float("nan"))
        ref = reference_rows(xs[0], picked, cfg, layer.full_weight_dict())
        layer.synchronize()
    err = max_over_ranks(rel_err(out, ref), device)
    tol = 1e-2 if cfg.dtype == "bfloat16" else (1e-4 if device.type == "cuda" else 1e-5)
    row = {"config": cfg.to_dict(), "tokens_per_rank": tokens, "world": world, "backend": backend,
           "routing": routing, "load": load, "rel_err": err, "ok": err <= tol, **({"mode": mode} if mode else {})}
    row["median_us"] = row["host_us"] = None
    rows = [row]
    if row["ok"]:
        iters = args.iters or (20 if device.type == "cuda" else 5)
        times, timer = [], Timer(device)
        with torch.inference_mode():
            for x in xs:
                times += timer.time(lambda x=x: forward(x), iters, warmup=3)
            layer.synchronize()
            row["median_us"] = max_over_ranks(statistics.median(times), device)
            row["host_us"] = max_over_ranks(statistics.median(timer.host), device)
            row |= energy_row(lambda: forward(xs[0]), args.energy_seconds, row["median_us"], device)
            layer.synchronize()  # a failed wait in the energy loops raises here too
            # the timed calls were the warm ones (CUDA-graph replays, where a backend keeps graphs): checked too
            row["rel_err_timed"] = max_over_ranks(rel_err(forward(xs[0])[picked], ref), device)
            row["ok"] = row["rel_err_timed"] <= tol
        if fused and args.user_graph:  # replayed from the caller's own CUDA graph
            us, host_us, replayed = graph_median_us(layer, xs, iters, device)
            err_graph = max_over_ranks(rel_err(replayed[picked], ref), device)
            rows.append({**without_energy(row), "backend": "flash+graph", "median_us": us, "host_us": host_us,
                         "rel_err": err_graph, "rel_err_timed": err_graph, "ok": row["ok"] and err_graph <= tol})
        if args.fwd_bwd and forward is layer:
            for backward in args.backwards or [layer.options.backward_for(layer.backend.name)]:
                if not (fused and backward == "autograd"):  # the fused kernel has no ops to record
                    layer.options = dataclasses.replace(layer.options, backward=backward)
                    for frozen in (False, True) if args.frozen_experts else (False,):
                        rows += fwd_bwd_rows(row, layer, xs, iters, tol, device, args.energy_seconds,
                                             graph=fused and args.user_graph, frozen=frozen)
    if fused:
        layer.backend.close()
    elif backend == "flash_shared_torch":
        forward.routed.backend.close()
    return rows


def training_step(layer, x: torch.Tensor, dy: torch.Tensor):
    """-> a training step of layer on x [T, H] (requiring grad): the layer's and x's gradients
    cleared, then layer(x)'s backward from dy (no loss built around it: the layer's work alone)."""
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(dy)
    return step


def step_errors(layer: MoELayer, x: torch.Tensor, dy: torch.Tensor, device,
                tol: float) -> tuple[float, dict, dict | None, int]:
    """One training step of layer on a copy of x [T, H] (every token of the timed size) and dy,
    every gradient (x's and each parameter's, the experts' summed over ranks) against autograd
    through the reference taken one expert at a time (grad_reference.lean_grad_errors: float32
    for bf16 layers, float64 for float32 ones) -> (worst error, max over ranks; {gradient: this
    rank's error}; the same against the float32 reference, or None; tokens the layer's router
    chose otherwise than the reference's, summed over ranks). A float32 layer whose worst error
    against the float64 reference is over tol is compared with the float32 reference too, and
    the smaller worst error is returned: where float32 arithmetic itself is that far from
    float64 (a router gradient through a saturated softmax, routing steered one-hot), the
    float32 reference is, and a layer matching it computes right. Collective."""
    def errors(dtype: torch.dtype) -> tuple[dict, int]:
        report: dict = {}
        layer.zero_grad(set_to_none=True)  # a timed step's gradients would add to this one's
        errs = lean_grad_errors(layer, x.detach().clone().requires_grad_(True), dy, dtype, report)
        layer.zero_grad(set_to_none=True)
        return errs, report["tokens_routed_otherwise"]

    errs, mine = errors(torch.float32 if layer.config.dtype == "bfloat16" else torch.float64)
    routed_otherwise = torch.tensor([mine], device=device)
    if layer.world_size > 1:
        dist.all_reduce(routed_otherwise)
    worst = max_over_ranks(max(errs.values()), device)
    if layer.config.dtype == "float32" and worst > tol:  # (the same on every rank: a max over them)
        errs32, _ = errors(torch.float32)
        worst32 = max_over_ranks(max(errs32.values()), device)
        return min(worst, worst32), errs, errs32, int(routed_otherwise)
    return worst, errs, None, int(routed_otherwise)


def fwd_bwd_rows(row: dict, layer: MoELayer, xs: list, iters: int, tol: float, device,
                 energy_seconds: float = 0.0, graph: bool = False, frozen: bool = False) -> list[dict]:
    """row's point timed as forward + backward from dy, layer(x).backward(dy) (x and every parameter
    requiring grad; with frozen, every one but the experts' weights) with the layer's backward,
    after every gradient of a step on the first input set (all its tokens) is checked against
    autograd through the reference, and checked again on a step after the timing (rel_err_timed:
    the warm state the timed steps ran in) -> [a row with mode 'fwd+bwd' and its backward, and
    with graph the step captured in a CUDA graph (graph_fwd_bwd_row)], or [] where the backend
    has no backward."""
    with experts_frozen(layer, frozen):
        rows = _fwd_bwd_rows(row, layer, xs, iters, tol, device, energy_seconds, graph)
    return [r | {"frozen": "experts"} for r in rows] if frozen else rows


@contextlib.contextmanager
def experts_frozen(layer: MoELayer, frozen: bool):
    """Inside, with frozen, the layer's expert weights (routed and shared) need no gradient."""
    experts = [p for n, p in layer.named_parameters() if frozen and (n in EXPERT_WEIGHTS or n.startswith("shared_w_"))]
    for p in experts:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in experts:
            p.requires_grad_(True)


def _fwd_bwd_rows(row: dict, layer: MoELayer, xs: list, iters: int, tol: float, device,
                  energy_seconds: float, graph: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(7)
    dys = [torch.randn(x.shape, generator=gen).to(device, x.dtype) for x in xs]
    try:
        err, errs, errs32, routed_otherwise = step_errors(layer, xs[0], dys[0], device, tol)
    except NotImplementedError as e:
        print(f"fwd+bwd skipped for backend {row['backend']}: {e}", file=sys.stderr)
        return []
    forward_only = ("rel_err_timed", )  # the forward row's check after its timing, not this step's
    out = {**{k: v for k, v in without_energy(row).items() if k not in forward_only}, "mode": "fwd+bwd",
           "backward": layer.options.backward_for(layer.backend.name), "rel_err": err, "rel_errs": errs,
           **({"rel_errs_float32_reference": errs32} if errs32 else {}),
           "checked": "every gradient", "tokens_routed_otherwise": routed_otherwise, "ok": err <= tol,
           "median_us": None, "host_us": None}
    if out["ok"]:
        times, timer = [], Timer(device)
        for x, dy in zip(xs, dys):
            times += timer.time(training_step(layer, x.detach().requires_grad_(True), dy), iters, warmup=3)
        layer.synchronize()
        out["median_us"] = max_over_ranks(statistics.median(times), device)
        out["host_us"] = max_over_ranks(statistics.median(timer.host), device)
        out["step_peak_bytes"] = step_peak_bytes(layer, xs[0], dys[0], device)
        out |= energy_row(training_step(layer, xs[0].detach().requires_grad_(True), dys[0]), energy_seconds,
                          out["median_us"], device)
        layer.synchronize()
        out["rel_err_timed"] = step_errors(layer, xs[0], dys[0], device, tol)[0]
        out["ok"] = out["rel_err_timed"] <= tol
        if graph:
            return [out, *graph_fwd_bwd_row(out, layer, xs, dys, iters, tol, device)]
    return [out]


def step_peak_bytes(layer: MoELayer, x: torch.Tensor, dy: torch.Tensor, device) -> int | None:
    """-> the most GPU memory one training step on x [T, H] and dy allocated beyond what was
    allocated before it, the layer's gradients cleared first (what the step's activations, saved
    tensors and gradients cost), max over ranks; None off CUDA."""
    if device.type != "cuda":
        return None
    layer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    training_step(layer, x.detach().requires_grad_(True), dy)()
    torch.cuda.synchronize(device)
    return int(max_over_ranks(torch.cuda.max_memory_allocated(device) - before, device))


def graph_fwd_bwd_row(row: dict, layer: MoELayer, xs: list, dys: list, iters: int, tol: float,
                      device) -> list[dict]:
    """row's training step captured whole in the caller's CUDA graph on static x and dy (world 1,
    dropless, bf16: elsewhere the layer refuses the capture, backends/capture.py), its replay's
    gradients on the last input set (with --input-sets 1, the captured one) checked against the
    eager step's, then replays timed with each input set copied in -> [a row with backend
    'flash+graph', rel_err_vs_eager], or [] where the capture is refused."""
    check_x = xs[-1].detach().clone().requires_grad_(True)
    training_step(layer, check_x, dys[-1])()
    eager = [p.grad for p in layer.parameters() if p.grad is not None] + [check_x.grad]  # kept past zero_grad
    x, dy = xs[0].detach().clone().requires_grad_(True), dys[0].clone()
    try:
        captured = captured_graph(training_step(layer, x, dy), warmups=2)
    except RuntimeError as e:
        print(f"fwd+bwd in a CUDA graph skipped: {e}", file=sys.stderr)
        return []
    with torch.no_grad():
        x.copy_(xs[-1])
        dy.copy_(dys[-1])
    captured.replay()
    replayed = [p.grad for p in layer.parameters() if p.grad is not None] + [x.grad]
    err = max_over_ranks(max(rel_err(got, want) for got, want in zip(replayed, eager)), device)
    del eager, replayed
    out = {**without_energy(row), "backend": "flash+graph", "rel_err_vs_eager": err, "ok": row["ok"] and err <= tol}
    times, timer = [], Timer(device)
    for x_set, dy_set in zip(xs, dys):
        with torch.no_grad():
            x.copy_(x_set)
            dy.copy_(dy_set)
        times += timer.time(captured.replay, iters, warmup=3)
    layer.synchronize()
    out["median_us"] = max_over_ranks(statistics.median(times), device)
    out["host_us"] = max_over_ranks(statistics.median(timer.host), device)
    layer.zero_grad(set_to_none=True)  # the graph's gradient buffers go with it
    return [out]


class SharedOutside:
    """Backend flash_shared_torch: layer's routed experts through a fused layer of their own (the
    same weights, no shared experts), then its shared experts in torch on every row, added in
    fp32. layer: a backend-torch MoELayer with shared experts (it keeps the weights)."""

    def __init__(self, layer: MoELayer, tokens: int):
        cfg = layer.config
        if not cfg.shared_experts:
            raise ValueError("flash_shared_torch needs a config with shared experts")
        routed_cfg = cfg.replace(shared_experts=0, shared_ffn_size=None, shared_expert_gate=False)
        self.layer = layer
        self.routed = MoELayer(routed_cfg, backend="flash", device=layer.router_weight.device,
                               max_tokens_per_rank=tokens)
        self.routed.load_full_weights(**{k: v for k, v in layer.full_weight_dict().items()
                                         if not k.startswith("shared_")})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.routed(x).float() + shared_experts(x, self.layer)).to(x.dtype)


def random_shapes(n: int, seed: int, dtype: str) -> list[tuple[str, MoEConfig]]:
    """n swiglu shapes drawn at random (hidden 2048-7168 and expert FFN 512-14336 in steps of 256,
    8-256 experts, top-k 1-8 and at most the expert count), redrawn until the expert weights fit
    in 16 GB. -> [(name, config)], names random_<H>x<F>_e<E>k<k>."""
    gen = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    shapes = []
    while len(shapes) < n:
        h, f, e = 256 * draw(8, 28), 256 * draw(2, 56), draw(8, 256)
        k = min(draw(1, 8), e)
        if e * 3 * h * f * 2 > 16e9:
            continue
        shapes.append((f"random_{h}x{f}_e{e}k{k}", MoEConfig(h, f, e, k, dtype=dtype)))
    return shapes


def captured_graph(fn, warmups: int) -> torch.cuda.CUDAGraph:
    """fn() captured in a CUDA graph, as a caller would: after `warmups` calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_median_us(layer, xs, iters, device) -> tuple[float, float, torch.Tensor]:
    """Capture one forward on a static input, then time replays with each input set copied in ->
    (median µs, median host µs: Timer, a replay's output on xs[0], for its check)."""
    static = xs[0].clone()
    outputs = []
    with torch.inference_mode():
        graph = captured_graph(lambda: outputs.append(layer(static)), warmups=1)
        times, timer = [], Timer(device)
        for x in xs:
            static.copy_(x)
            times += timer.time(graph.replay, iters, warmup=3)
        static.copy_(xs[0])
        graph.replay()
        layer.synchronize()
    return (max_over_ranks(statistics.median(times), device),
            max_over_ranks(statistics.median(timer.host), device), outputs[-1].clone())


def main(argv=None):
    args = parse_args(argv)
    gpu = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    names = args.preset if args.preset is not None else (
        ["mixtral_8x7b", "qwen3_30b_a3b", "deepseek_v3"] if gpu else ["tiny"])
    configs = [(n, PRESETS[n].replace(dtype=dtype)) for n in names]
    if args.custom:
        h, f, e, k = args.custom
        configs.append(("custom", MoEConfig(h, f, e, k, dtype=dtype)))
    configs += random_shapes(args.random, args.random_seed, dtype)
    tokens_list = args.tokens or ([128, 512, 2048, 4096, 8192, 16384] if gpu else [64, 256])
    heap = None
    fused = [b for b in args.backends if b in FUSED_LAYERS]
    if fused and not gpu:
        raise SystemExit(f"backend {fused[0]} needs CUDA GPUs (on a CPU: --backends torch)")
    backends = list(args.backends)
    if "symm_mem" in backends and detect_launcher().world_size == 1:
        print("backend symm_mem skipped: torch's symmetric memory needs 2 or more ranks", file=sys.stderr)
        backends.remove("symm_mem")
    apart = []  # rows measured by the symm_mem child processes
    if fused and "symm_mem" in backends:  # two NVSHMEM owners cannot share a process
        apart = run_apart(args, "symm_mem")
        backends.remove("symm_mem")
    if fused:
        world = detect_launcher().world_size
        heap = max(heap_bytes_for(c, world, max(tokens_list), FUSED_LAYERS[b]) for _, c in configs for b in fused)
    if "triton_kernels" in backends:
        from triton_kernels_moe import available
        why = available() or (None if gpu and detect_launcher().world_size == 1 else "it runs on one GPU")
        if why:
            print(f"backend triton_kernels skipped: {why}", file=sys.stderr)
            backends.remove("triton_kernels")
    if "symm_mem" in backends:
        if not gpu:
            raise SystemExit("backend symm_mem needs CUDA GPUs")
        from symm_mem_ep import heap_bytes as symm_heap_bytes
        world = detect_launcher().world_size
        # Sized before PyTorch starts NVSHMEM (at its first allocation); twice the largest case,
        # as buffers of one case may still be held when the next one allocates.
        os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(
            2 * max(symm_heap_bytes(c, world, max(tokens_list)) for _, c in configs)))
    rank, world, device = setup_distributed(heap)
    ceilings = {} if args.rows_out else measure_ceilings(device, world)
    meta = {"device": torch.cuda.get_device_name(device) if gpu else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "torch": torch.__version__, "comm": dist.get_backend()}
    cases = [(n, c, r, t) for n, c in configs for r in args.routing for t in tokens_list]
    points = [(*case, b, 1000 + i) for i, case in enumerate(cases) for b in backends]  # seed per case
    progress = None
    if rank == 0:
        try:
            from tqdm import tqdm
            progress = tqdm(total=len(points), desc="sweep", file=sys.stderr)
        except ImportError:
            pass
    rows, loads = [], {}
    for name, cfg, routing, tokens, backend, seed in points:
        for row in bench_point(cfg, backend, routing, tokens, world, rank, device, args, seed, loads):
            row.update(preset=name, **meta)
            rows.append(row)
        if progress:
            progress.update()
        if gpu:  # whatever a finished point left in reference cycles goes before the next allocates
            # (a backend <-> layer cycle, broken since, once kept deepseek layers alive until OOM)
            gc.collect()
            torch.cuda.empty_cache()
    if progress:
        progress.close()
    if args.rows_out:
        if rank == 0:
            with open(args.rows_out, "w") as f:
                json.dump(rows, f)
        fm.finalize()
        return
    case_index = {(n, r, t): i for i, (n, _, r, t) in enumerate(cases)}
    backend_index = {b: i for i, b in enumerate(args.backends)}
    rows = sorted(rows + apart, key=lambda r: (case_index[r["preset"], r["routing"], r["tokens_per_rank"]],
                                               backend_index.get(r["backend"], len(backend_index))))
    for row in rows:
        add_derived(row, world, ceilings)
    if rank == 0:
        for row in rows:  # speed-up over each other backend at the same point (rows that passed their checks)
            same = [r for r in rows if r["median_us"] and r.get("ok")
                    and (r["preset"], r["routing"], r["tokens_per_rank"])
                    == (row["preset"], row["routing"], row["tokens_per_rank"])
                    and (r.get("mode") == "fwd+bwd") == (row.get("mode") == "fwd+bwd")]
            if row["median_us"]:
                row["speedup"] = {row_name(r): r["median_us"] / row["median_us"] for r in same}
        print_table(rows, ceilings, meta, world)
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                       f"layer-{'gpu' if gpu else 'cpu'}-w{world}.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        data = {"meta": {**meta, "world": world, "ceilings": ceilings}, "rows": rows}
        with open(out, "w") as f:  # first: the summary below may refuse the rows (two of a backend at a point)
            json.dump(data, f, indent=1)
        print(f"wrote {out}")
        asked = [b for b in args.backends if b in ("triton_kernels", "torch", "symm_mem")]
        peers = [b for b in asked if any(r["backend"] == b for r in rows)]
        if set(asked) - set(peers):
            print(f"no rows from {sorted(set(asked) - set(peers))}: the ratio below leaves them out")
        kinds = sorted({(r["backward"], r.get("frozen") == "experts") for r in rows if r.get("mode") == "fwd+bwd"})
        for training, frozen in [(None, False), *kinds]:
            what = f" (fwd+bwd, {training}{', experts frozen' if frozen else ''})" if training else ""
            try:
                got = (summary.outcomes(rows, "flash", peers, training, frozen) if "flash" in args.backends and peers
                       else {})
            except ValueError as e:  # rows the summary refuses (a backward asked for twice): said, not fatal
                print(f"no summary{what or ' of the forwards'}: {e}")
                continue
            if got.get("compared") or got.get("failed"):
                speedups = [q["speedup"] for q in got["compared"]]
                mean = f"geometric mean {summary.geomean(speedups):.3f}x over " if speedups else ""
                print(f"flash against the fastest of {peers}{what}: "
                      f"{mean}{len(speedups)} points, {sum(v < 1 for v in speedups)} below 1.0x; "
                      f"{len(got['failed'])} where flash failed, {len(got['incomplete'])} incomplete, "
                      f"{len(got['unpeered'])} with no peer's row in their preset (bench/summary.py lists them)")
        write_plot(data, os.path.splitext(out)[0] + ".png")
    fm.finalize()


def write_plot(data: dict, out: str) -> None:
    """The latency plot beside the JSON (bench/plot.py), where matplotlib is installed."""
    try:
        from plot import plot
    except ImportError as e:
        print(f"no plot ({e}); draw it later with: python bench/plot.py <the JSON>")
        return
    print(f"wrote {plot(data, out)}")


def add_derived(row: dict, world: int, ceilings: dict) -> None:
    """The floor, tokens/s and TFLOP/s of a timed row (fwd+bwd: floor_us's training step, and three
    times the forward's FLOPs, as the backward's dgrad and wgrad GEMMs each match the forward's).
    The floor is that of the point's own routing (row["load"], routing_load's mean over its input
    sets); a row without one has uniform routing's, or none where its routing is skewed (zipf,
    one_hot: qwen3 at 128 tokens under zipf touches 24 of 128 experts, and one rank may take most
    rows)."""
    cfg, tokens = MoEConfig.from_dict(row["config"]), row["tokens_per_rank"]
    # a backward: twice the forward's GEMMs, or once without the experts' weight gradients
    passes = 1 if row.get("mode") != "fwd+bwd" else 2 if row.get("frozen") == "experts" else 3
    load = row.get("load")
    known = load is not None or row.get("routing", "uniform") == "uniform"
    row["floor_us"] = floor_us(cfg, tokens, world, ceilings, passes, load=load) if known else None
    if row["median_us"]:
        row["tokens_per_s"] = tokens * world / row["median_us"] * 1e6
        FS = cfg.shared_width
        shared = (2 * FS if cfg.gated else FS) + FS
        row["tflops"] = (passes * 2 * tokens * cfg.hidden_size * (cfg.top_k * (cfg.ffn_in_size + cfg.ffn_size) + shared)
                         / row["median_us"] / 1e6)


def run_apart(args, backend: str) -> list[dict]:
    """Benchmark `backend` in a child process per rank (same cases, same seeds), before this process
    starts anything: used for symm_mem, since PyTorch and flashmoe_py each own NVSHMEM in their
    process. One node: the children meet at 127.0.0.1. -> the rows (on rank 0; [] elsewhere)."""
    info = detect_launcher()
    # The children make their own group: not torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE
    # would have them wait for a store nobody serves), not the MPI job.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "OMPI_", "PMI_", "PMIX_"))}
    env.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
               LOCAL_WORLD_SIZE=str(info.local_world_size), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(int(os.environ.get("MASTER_PORT", "29500")) + 17))
    argv = ["--backends", backend, "--routing", *args.routing, "--input-sets", str(args.input_sets)]
    if args.preset is not None:
        argv += ["--preset", *args.preset]
    for flag, value in (("--tokens", args.tokens), ("--custom", args.custom)):
        if value:
            argv += [flag, *map(str, value)]
    if args.random:
        argv += ["--random", str(args.random), "--random-seed", str(args.random_seed)]
    for flag, value in (("--dtype", args.dtype), ("--iters", args.iters)):
        if value:
            argv += [flag, str(value)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        try:
            rc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--rows-out", path],
                                env=env, timeout=CHILD_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = f"none: killed after {CHILD_TIMEOUT_S} s"
        if info.rank != 0:
            return []
        if rc != 0 or not os.path.exists(path):
            print(f"backend {backend} failed (child exit code {rc}); its rows are missing", file=sys.stderr)
            return []
        with open(path) as f:
            return json.load(f)


def row_name(row: dict) -> str:
    """A row's backend, and for fwd+bwd rows its backward: backend/backward (+ ' frozen' for a
    step with the experts frozen)."""
    return (row["backend"] + (f"/{row['backward']}" if row.get("backward") else "")
            + (" frozen" if row.get("frozen") == "experts" else ""))


def print_table(rows, ceilings, meta, world):
    print(f"\n{meta['device']} x{world}  {meta['comm']}  torch {meta['torch']}  commit {meta['commit']}  "
          f"{meta['date']}")
    if ceilings:
        print("ceilings: " + "  ".join(f"{k}={v:.0f}" for k, v in ceilings.items()))
    head = f"{'preset':<14}{'routing':<9}{'tokens':>7} {'backend':<16}{'median_us':>11}{'host_us':>9}" \
           f"{'floor_us':>10}{'of_floor':>9}{'TFLOP/s':>9}{'J/call':>8}{'rel_err':>10} check"
    print(head)
    print("-" * len(head))
    for r in rows:
        med = f"{r['median_us']:.1f}" if r["median_us"] else "FAILED"
        fl = f"{r['floor_us']:.1f}" if r["floor_us"] else "-"
        frac = f"{r['floor_us'] / r['median_us']:.0%}" if r["floor_us"] and r["median_us"] else "-"
        tf = f"{r['tflops']:.1f}" if r.get("tflops") else "-"
        host = f"{r['host_us']:.0f}" if r.get("host_us") else "-"
        joules = f"{r['joules_per_call']:.3f}" if r.get("joules_per_call") else "-"
        label = row_name(r) + {"1d+regroup": " (1d)", "fwd+bwd": " +bwd"}.get(r.get("mode"), "")
        # the worst of its checks: before and after timing, and a graph's replay against eager
        checks = [e for e in (r["rel_err"], r.get("rel_err_timed"), r.get("rel_err_vs_eager")) if e is not None]
        err = float("nan") if any(math.isnan(e) for e in checks) else max(checks)
        print(f"{r['preset']:<14}{r['routing']:<9}{r['tokens_per_rank']:>7} {label:<16}{med:>11}{host:>9}"
              f"{fl:>10}{frac:>9}{tf:>9}{joules:>8}{err:>10.1e} {'ok' if r.get('ok') else 'FAIL'}")
    if any(r.get("mode") == "1d+regroup" for r in rows):
        print("(1d): torch's all_to_all_vdev_2d refuses >= 16 experts per rank; symm_mem ran "
              "all_to_all_vdev + a local regroup by expert instead")


if __name__ == "__main__":
    main()
