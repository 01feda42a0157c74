"""Launch settings of the fused kernel, compared at full size: each setting checked against the
reference on tokens spread to the last tile, then timed in turn with the others, --rounds times
(CUDA events, median over iterations, two input sets and the rounds, max over ranks: drift and the
power cap fall on every setting alike), then checked again on a warm call. A setting whose kernel
does not fit the GPU (Triton's OutOfResources: shared memory, registers) is a row with its
`error`, untimed, and the others go on. Exit code 1 if any setting failed a check or did not fit.

    torchrun --nproc-per-node N bench/tune.py --preset mixtral_8x7b --tokens 4096 16384 \\
        --settings 128,8,3,8,256 128,8,3,8,128 [--out tune.json]
    torchrun --nproc-per-node 1 bench/tune.py --random 6 --only random_4864x768_e18k2 --settings auto block_m=64

A setting is block_m,num_warps,stages,group[,block_n[,dispatch_programs]] (the fields of
flashmoe_py.kernels.launch_config.LaunchConfig), or `auto`: what the layer picks by itself, or
fields by name over `auto` (`block_t=64`, `block_t=128,stages=4`). Each setting is a layer of its
own, built with MoELayer(launch_override=...)."""

import argparse
import json
import os
import statistics
import sys

import torch
from triton.runtime.errors import OutOfResources

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flashmoe_py as fm  # noqa: E402
from flashmoe_py.kernels.layout import heap_bytes_for  # noqa: E402
from flashmoe_py.runtime import detect_launcher  # noqa: E402
from layer import Timer, checked_tokens, max_over_ranks, random_shapes, reference_rows, rel_err, save_rows  # noqa: E402

KEYS = ("block_m", "num_warps", "stages", "group", "block_n", "dispatch_programs")


def parse_setting(text: str) -> dict:
    """'auto' -> {}; 'block_t=64,stages=4' -> those fields; '128,8,3,8' -> KEYS in order."""
    if text == "auto":
        return {}
    if "=" in text:
        return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
    return dict(zip(KEYS, map(int, text.split(","))))


def tuned_shapes(presets: list[str] | None, n_random: int, only: list[str] | None, seed: int) -> list[tuple]:
    """-> [(name, MoEConfig)]: the presets named (mixtral_8x7b when none is named and no random
    shape is asked for), then bench/layer.py's first n_random random shapes (bf16), only those
    named in `only` if given (a name among none of them is an error)."""
    names = presets if presets is not None else ([] if n_random else ["mixtral_8x7b"])
    drawn = random_shapes(n_random, seed, "bfloat16")
    unknown = sorted(set(only or ()) - {n for n, _ in drawn})
    if unknown:
        raise ValueError(f"--only {unknown}: not among the random shapes {[n for n, _ in drawn]}")
    return [(n, fm.preset(n)) for n in names] + [(n, c) for n, c in drawn if only is None or n in only]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="*", default=None, help="preset names (default mixtral_8x7b unless --random)")
    p.add_argument("--random", type=int, default=0, metavar="N",
                   help="also bench/layer.py's first N random shapes (random_shapes, --random-seed)")
    p.add_argument("--only", nargs="*", default=None, help="of the random shapes, only those named")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--settings", nargs="+", default=["128,8,3,8,256", "128,8,3,8,128"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="times every setting is timed, in turn with the others")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    settings = [parse_setting(s) for s in args.settings]
    world = detect_launcher().world_size
    shapes = tuned_shapes(args.preset, args.random, args.only, args.random_seed)
    # every setting's layer is alive at once (timed in turn): a heap for each
    rt = fm.init(heap_bytes=len(settings) * max(heap_bytes_for(c, world, max(args.tokens)) for _, c in shapes))
    timer, rows = Timer(rt.device), []
    for name, cfg in shapes:
        for T in args.tokens:
            rows += tuned_point(name, cfg, T, settings, args, timer, rt, world)
    if rt.rank == 0 and args.out:
        save_rows(args.out, rows)
    fm.finalize()
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


def tuned_point(name, cfg, T, settings, args, timer, rt, world) -> list[dict]:
    """One shape at T tokens a rank: a layer per setting (the same seed: the same function), each
    checked, the settings timed in turn for args.rounds rounds, each checked again -> a row each
    (one whose kernel does not fit the GPU: not ok, its `error` and no time)."""
    gen = torch.Generator().manual_seed(rt.rank + 1)
    xs = [torch.randn(T, cfg.hidden_size, generator=gen).to(rt.device, cfg.torch_dtype) for _ in range(2)]
    picked = checked_tokens(T).to(rt.device)
    def build(setting):
        return fm.MoELayer(cfg, backend="flash", max_tokens_per_rank=T, seed=17, launch_override=setting)

    layers = [build(settings[0])]  # the reference first: its full copy of the weights is gone before the others
    ref = reference_rows(xs[0], picked, cfg, layers[0].full_weight_dict())
    layers += [build(setting) for setting in settings[1:]]
    def error(layer) -> float:
        return max_over_ranks(rel_err(layer(xs[0])[picked], ref), rt.device)

    with torch.inference_mode():
        errs, refused = [], []
        for layer in layers:  # the first call compiles the setting's kernel
            try:
                errs.append(error(layer))
                refused.append(None)
            except OutOfResources as e:  # the same kernel on every rank: each refuses it alike
                errs.append(None)
                refused.append(str(e))
        live = [i for i, why in enumerate(refused) if why is None]
        times: list[list[float]] = [[] for _ in settings]
        for _ in range(args.rounds):
            for i in live:
                for x in xs:
                    times[i] += timer.time(lambda layer=layers[i], x=x: layer(x), args.iters, warmup=3)
        errs_timed = [error(layer) if why is None else None for layer, why in zip(layers, refused)]
        for i in live:
            layers[i].synchronize()
    rows = []
    for setting, own, err, err_timed, why, layer in zip(settings, times, errs, errs_timed, refused, layers):
        if why is None:
            row = {"median_us": max_over_ranks(statistics.median(own), rt.device), "rel_err": err,
                   "rel_err_timed": err_timed, "ok": max(err, err_timed) <= 1e-2}
        else:
            row = {"median_us": None, "rel_err": None, "rel_err_timed": None, "ok": False, "error": why}
        rows.append({"preset": name, "tokens_per_rank": T, "world": world, **setting, **row})
        if rt.rank == 0:
            print(json.dumps(rows[-1]), flush=True)
        layer.backend.close()
    return rows


if __name__ == "__main__":
    main()
