"""Where a forward's time goes (GPU).

Default: torch.profiler over repeated forwards on rank 0 (the routing plan's ops and the kernel);
--fwd-bwd: over training steps instead, forward and the backward from dy (layer(x).backward(dy)), with the
layer's backward (--backward), to see where a step's time goes.
--gaps N (with a GPU): also where the GPU sat idle between activities (a step's span, busy and
idle time, the N longest gaps with what ran either side), from the profile's trace.
--pyprofile N: where the host's time goes instead (cProfile over the steps, the N functions with the
most time of their own and the N with the most in total), for steps that are host-bound.
--trace: inside the fused kernel, from its task timestamps (kernels/fused_moe.py, TRACE): per task
kind, how many, when the first started and the last ended, median and summed durations, and how
long programs waited for the count words; one table per rank, JSON with --out.

    torchrun --nproc-per-node N bench/kernel_profile.py --preset qwen3_30b_a3b --tokens 128 --backend flash
    torchrun --nproc-per-node N bench/kernel_profile.py --preset qwen3_30b_a3b --tokens 4096 --fwd-bwd \\
        --backward saved
    torchrun --nproc-per-node N bench/kernel_profile.py --preset deepseek_v3 --tokens 16384 --trace \\
        --transport p2p nvshmem --out trace.json"""

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import threading

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flashmoe_py as fm  # noqa: E402
from flashmoe_py.backends import explicit_backward  # noqa: E402
from flashmoe_py.kernels.layout import heap_bytes_for  # noqa: E402
from flashmoe_py.kernels.layout import (TASK_COMBINE, TASK_DISPATCH, TASK_FFN_IN, TASK_FFN_OUT,  # noqa: E402
                                        TASK_PUBLISH, TASK_SHARED_IN, TASK_SHARED_OUT, TRACE_COLS,
                                        WAITED_COUNTS)
from flashmoe_py.runtime import detect_launcher  # noqa: E402
from layer import save_rows, training_step  # noqa: E402

KINDS = {TASK_PUBLISH.value: "publish", TASK_DISPATCH.value: "dispatch", TASK_FFN_IN.value: "ffn_in",
         TASK_FFN_OUT.value: "ffn_out", TASK_COMBINE.value: "combine", WAITED_COUNTS.value: "wait_counts",
         TASK_SHARED_IN.value: "shared_in", TASK_SHARED_OUT.value: "shared_out"}


def summarize(trace: list[list[int]]) -> dict:
    """trace: rows (program, kind, start_ns, ready_ns, done_ns, end_ns) of one launch (unwritten
    rows: program -1; kernels/fused_moe.py). -> {"span_us", "programs", "busy", "idle_end_us",
    kinds: {name: {n, first_start_us, last_end_us, median_us, sum_us, wait_us, math_us,
    tail_us}}}; times relative to the earliest start; wait/math/tail: medians of start->ready,
    ready->done, done->end; busy: task time / (programs * span); idle_end_us: how long a program
    sits idle after its last task until the kernel's last one ends, on average (the call's tail)."""
    rows = [r for r in trace if r[0] >= 0]
    if not rows:
        raise ValueError("the trace holds no rows: was the kernel launched with it?")
    t0 = min(r[2] for r in rows)
    span = max(r[5] for r in rows) - t0
    programs = len({r[0] for r in rows})
    kinds = {}
    for code, name in KINDS.items():
        mine = [r for r in rows if r[1] == code]
        if mine:
            def median_us(a, b, mine=mine):
                return statistics.median((r[b] - r[a]) / 1e3 for r in mine)
            kinds[name] = {"n": len(mine), "first_start_us": (min(r[2] for r in mine) - t0) / 1e3,
                           "last_end_us": (max(r[5] for r in mine) - t0) / 1e3, "median_us": median_us(2, 5),
                           "sum_us": sum(r[5] - r[2] for r in mine) / 1e3, "wait_us": median_us(2, 3),
                           "math_us": median_us(3, 4), "tail_us": median_us(4, 5)}
    tasks = sum(v["sum_us"] for k, v in kinds.items() if k != "wait_counts")
    ends = {}  # each program's last task end
    for r in rows:
        ends[r[0]] = max(ends.get(r[0], r[5]), r[5])
    idle_end = statistics.mean(t0 + span - end for end in ends.values()) / 1e3
    return {"span_us": span / 1e3, "programs": programs, "busy": tasks / (programs * span / 1e3),
            "idle_end_us": idle_end, "kinds": kinds}


def format_summary(s: dict) -> str:
    lines = [f"kernel span {s['span_us']:.1f} us over {s['programs']} programs, busy {s['busy']:.0%}, "
             f"idle after a program's last task {s['idle_end_us']:.1f} us",
             f"{'kind':<12}{'n':>8}{'first_us':>10}{'last_us':>10}{'median_us':>11}{'wait':>8}{'math':>8}"
             f"{'tail':>8}{'per_prog_us':>12}"]
    for name, k in s["kinds"].items():
        lines.append(f"{name:<12}{k['n']:>8}{k['first_start_us']:>10.1f}{k['last_end_us']:>10.1f}"
                     f"{k['median_us']:>11.2f}{k['wait_us']:>8.2f}{k['math_us']:>8.2f}{k['tail_us']:>8.2f}"
                     f"{k['sum_us'] / s['programs']:>12.1f}")
    return "\n".join(lines)


def trace_forward(layer, x, rt) -> dict:
    """One traced forward after warm-up (graph replays, as in the benchmark) -> summary."""
    backend = layer.backend
    programs = (backend.options.launch_override or {}).get("programs", backend.programs)  # the launch's
    rows = backend.geo.trace_rows(x.shape[0], programs)
    backend.trace = torch.full((rows, TRACE_COLS.value), -1, dtype=torch.int64, device=rt.device)
    for _ in range(5):
        layer(x)
    layer.synchronize()
    dist.barrier()
    backend.trace.fill_(-1)
    layer(x)
    layer.synchronize()
    summary = summarize(backend.trace.tolist())
    backend.trace = None
    return summary


def idle_gaps(kernels: list[tuple[str, float, float]], steps: int, top: int) -> dict:
    """kernels: (name, start, duration) in µs of every GPU activity (kernels, copies, sets) over
    `steps` calls -> where the GPU sat idle between them: per call the span (first start to last
    end), the busy time (the union of the activities) and the idle rest, and the `top` longest
    gaps with the activities before and after each. A gap is idle time on every stream."""
    spans = sorted((start, start + dur, name) for name, start, dur in kernels)
    gaps, busy, end, before = [], 0.0, None, None
    for start, stop, name in spans:
        if end is None or start > end:
            if end is not None:
                gaps.append((start - end, before, name))
            busy += stop - start
            end, before = stop, name
        elif stop > end:
            busy += stop - end
            end, before = stop, name
    span = (end - spans[0][0]) if spans else 0.0
    gaps.sort(key=lambda g: -g[0])
    return {"span_us": span / steps, "busy_us": busy / steps, "idle_us": (span - busy) / steps,
            "gaps": [{"us": round(us, 1), "after": a, "before": b} for us, a, b in gaps[:top]]}


def gpu_activities(prof) -> list[tuple[str, float, float]]:
    """(name, start, duration) in µs of every GPU kernel, copy and set in a torch.profiler run, read
    from its Chrome trace."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace:
            events = json.load(trace)["traceEvents"]
    return [(e["name"][:70], float(e["ts"]), float(e["dur"])) for e in events
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


@contextlib.contextmanager
def warmed_step(layer, x: torch.Tensor, fwd_bwd: bool):
    """-> a forward of x [T, H] (run in inference mode) or, fwd_bwd, a training step (forward, then
    backward from a gradient dy of the output, x and the parameters requiring grad), after five to warm
    up (graphs captured, kernels compiled); the ranks and the layer are in step on entry and exit."""
    if fwd_bwd:
        x = x.detach().requires_grad_(True)
        step = training_step(layer, x, torch.randn_like(x))
    else:
        def step():
            layer(x)
    with contextlib.nullcontext() if fwd_bwd else torch.inference_mode():
        for _ in range(5):
            step()
        layer.synchronize()
        dist.barrier()
        yield step
        layer.synchronize()
        dist.barrier()


def profile_steps(layer, x: torch.Tensor, iters: int, fwd_bwd: bool, shapes: bool = False):
    """torch.profiler over `iters` of warmed_step's steps -> the profile (with each op's input
    shapes recorded if shapes)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if x.is_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with warmed_step(layer, x, fwd_bwd) as step:
        with torch.profiler.profile(activities=activities, record_shapes=shapes) as prof:
            for _ in range(iters):
                step()
            if x.is_cuda:  # the GPU's work done; no copy of the layer's status word inside (--gaps)
                torch.cuda.synchronize()
    return prof


def host_profile(layer, x: torch.Tensor, iters: int, fwd_bwd: bool, top: int) -> str:
    """cProfile over `iters` of warmed_step's steps -> two tables of the `top` functions: by their
    own time and by their total. On a GPU the backward runs on autograd's device thread, which
    cProfile before Python 3.12 does not follow: there the layer's backward (explicit_backward's
    Function) is profiled on that thread, into the same tables."""
    with warmed_step(layer, x, fwd_bwd) as step:
        prof, in_backward = cProfile.Profile(), cProfile.Profile()
        backward = explicit_backward._Explicit.backward

        main_thread = threading.get_ident()

        def profiled_backward(ctx, *grads):
            if threading.get_ident() == main_thread or sys.version_info >= (3, 12):
                return backward(ctx, *grads)  # prof sees it already (3.12's cProfile sees every thread)
            in_backward.enable()
            try:
                return backward(ctx, *grads)
            finally:
                in_backward.disable()
        explicit_backward._Explicit.backward = staticmethod(profiled_backward)
        try:
            prof.enable()
            for _ in range(iters):
                step()
        finally:
            prof.disable()
            explicit_backward._Explicit.backward = staticmethod(backward)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    if in_backward.getstats():
        stats.add(in_backward)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3_30b_a3b")
    p.add_argument("--custom", nargs=4, type=int, metavar=("HIDDEN", "FFN", "EXPERTS", "TOP_K"),
                   help="this shape in place of the preset's, in the preset's dtype (e.g. one of "
                        "bench/layer.py's random_HxF_eEkK shapes)")
    p.add_argument("--tokens", type=int, nargs="+", default=[128])
    p.add_argument("--backend", default="flash")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--trace", action="store_true", help="the fused kernel's task trace instead")
    p.add_argument("--fwd-bwd", action="store_true", help="profile training steps, forward and backward")
    p.add_argument("--backward", default=None, help="the layer's backward with --fwd-bwd (MoELayer(backward=))")
    p.add_argument("--transport", nargs="+", default=["p2p"])
    p.add_argument("--override", type=json.loads, default=None,
                   help="launch settings as JSON, e.g. '{\"stages\": 4}' (MoELayer's launch_override)")
    p.add_argument("--rows", type=int, default=40, help="rows of the profile's table (by self time)")
    p.add_argument("--sort", choices=("gpu", "cpu"), default="gpu",
                   help="order the table by each op's own GPU time (on GPUs) or its own host time")
    p.add_argument("--shapes", action="store_true",
                   help="a row per op and input shapes (which of several calls of an op takes the time)")
    p.add_argument("--gaps", type=int, default=0,
                   help="also where the GPU sits idle between activities: a step's span, busy and idle "
                        "time, and this many of the longest gaps with what ran either side")
    p.add_argument("--pyprofile", type=int, default=0,
                   help="where the host's time goes instead: cProfile's this many functions by own and total time")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    fused = args.trace or args.backend == "flash"
    if args.override is not None and not fused:
        p.error(f"--override sets the fused kernel's launch: backend {args.backend!r} has none")
    if args.custom and min(args.custom) < 1:
        p.error(f"--custom {args.custom}: expected positive sizes")
    cfg, name = fm.preset(args.preset), args.preset
    if args.custom:
        h, f, e, k = args.custom
        cfg, name = fm.MoEConfig(h, f, e, k, dtype=cfg.dtype), f"custom_{h}x{f}_e{e}k{k}"
    world = detect_launcher().world_size
    transports = args.transport if fused else [None]
    rt = fm.init(nvshmem=fused, heap_bytes=max(heap_bytes_for(cfg, world, t, tr or "p2p") for t in args.tokens
                                               for tr in transports) if fused else None)
    results = []
    for T in args.tokens:
        for transport in transports:
            extra = ({"max_tokens_per_rank": T, "transport": transport, "launch_override": args.override}
                     if transport else {})
            layer = fm.MoELayer(cfg, backend="flash" if args.trace else args.backend,
                                backward=args.backward if args.fwd_bwd else None, **extra)
            x = torch.randn(T, cfg.hidden_size, device=rt.device, dtype=cfg.torch_dtype)
            title = f"{name} {transport or args.backend} tokens={T} world={world}"
            if args.trace:
                with torch.inference_mode():
                    summary = trace_forward(layer, x, rt)
                every = [None] * world
                dist.all_gather_object(every, summary)
                results.append({"preset": name, "tokens_per_rank": T, "world": world,
                                "transport": transport, "override": args.override, "ranks": every})
                if rt.rank == 0:
                    for r, s in enumerate(every):
                        print(f"\n### {title}: trace, rank {r}\n{format_summary(s)}", flush=True)
            elif args.pyprofile:
                text = host_profile(layer, x, args.iters, args.fwd_bwd, args.pyprofile)
                if rt.rank == 0:
                    print(f"\n### {title}: host time over {args.iters} steps\n{text}", flush=True)
            else:
                prof = profile_steps(layer, x, args.iters, args.fwd_bwd, args.shapes)
                if rt.rank == 0:
                    what = "training steps (forward + backward)" if args.fwd_bwd else "forwards"
                    sort = "self_cuda_time_total" if x.is_cuda and args.sort == "gpu" else "self_cpu_time_total"
                    print(f"\n### {title}: totals over {args.iters} {what}")
                    print(prof.key_averages(group_by_input_shape=args.shapes).table(
                        sort_by=sort, row_limit=args.rows, max_name_column_width=60))
                    if args.gaps and x.is_cuda:
                        g = idle_gaps(gpu_activities(prof), args.iters, args.gaps)
                        print(f"\n### {title}: a step's span {g['span_us']:.0f} us, GPU busy {g['busy_us']:.0f}, "
                              f"idle {g['idle_us']:.0f}; the longest gaps:")
                        for gap in g["gaps"]:
                            print(f"{gap['us']:9.1f} us  after {gap['after']}  before {gap['before']}")
                        results.append({"preset": name, "tokens_per_rank": T, "world": world,
                                        "backward": args.backward, **g})
            if layer.backend.name == "flash":
                layer.backend.close()
    if rt.rank == 0 and args.out:
        save_rows(args.out, results)
    fm.finalize()


if __name__ == "__main__":
    main()
