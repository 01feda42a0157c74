"""The explicit backward's router-side kernels alone on a GPU, beside the torch steps they replace
and the HBM floor, at the presets' sizes (one process, one GPU):

    python bench/backward_kernels.py [--preset P ...] [--tokens T] [--out results.json]

  token_sum   each token's slot rows summed plus d_logits @ router_weight (kernels/token_sum.py),
              against rows[where].sum + an fp32 GEMM: at fixed tiles (tokens x columns, warps),
              at the tiles it chooses, and those without the router term;
  router_grad d_logits^T @ x (kernels/router_grad.py), against d_logits.t() @ x.float().

Every variant is checked against a float64 product first (fresh random inputs; token_sum, which
takes no out=, after a NaN-filled [T, H] fp32 block was freed, which the caching allocator hands to
its output, so a tile it skips is NaN, not an earlier variant's value; on a GPU a kernel variant
whose output missed that block fails), then timed with
CUDA events around --iters calls back to back, on each of --input-sets input sets, the variants in
turn for --rounds rounds: the median, least and most µs a call. (The 2026-12-03g results took one
event pair a call, with its launch gap, and varied 10-30% between calls.)"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flashmoe_py import preset  # noqa: E402
from flashmoe_py.kernels import router_grad, token_sum  # noqa: E402
from layer import git_commit, rel_err  # noqa: E402

# An H200's rates as bench/layer.py's measure_ceilings found them (its rows in
# bench/results/2026-12-03h-h200x1-token-sum-loop/fb_*.json: 792-805 TFLOP/s, 4,229-4,257 GB/s),
# not the spec sheet's 4.8 TB/s; bench/wgrad_probe.py's and bench/dgrad_probe.py's floors use them too.
H200_TFLOPS, HBM_BYTES_PER_S = 792e12, 4.256e12
TOKEN_SUM_TILES = [(32, 128, 4), (64, 128, 4), (32, 256, 4), (64, 128, 8), (16, 128, 4)]  # tokens, columns, warps


def timed(cases: list, iters: int, rounds: int) -> list[list[float]]:
    """cases: [(fn, input sets)] -> for each case, the µs of one call in every round and input set:
    iters calls back to back between one pair of CUDA events (the host launches ahead of the GPU:
    no launch gap is timed), the cases taken in turn in each round (so a drift of the GPU's pace
    falls on all of them). The host's clock where there is no GPU (the Triton interpreter: a check
    of this script)."""
    for fn, sets in cases:  # warm-up: compiles, allocator
        for inputs in sets:
            fn(*inputs)
    times = [[] for _ in cases]
    for _ in range(rounds):
        for (fn, sets), out in zip(cases, times):
            for inputs in sets:
                if not inputs[0].is_cuda:
                    start = time.perf_counter()
                    for _ in range(iters):
                        fn(*inputs)
                    out.append((time.perf_counter() - start) * 1e6 / iters)
                    continue
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn(*inputs)
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) * 1e3 / iters)
    return times


def poisoned_call(fn, args: tuple, shape: tuple, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, bool]:
    """fn(*args) right after a NaN-filled block of `shape` was allocated and freed (for a function
    without out=: the caching allocator hands that block to its next allocation of the same size)
    -> (the output, whether it landed in that block)."""
    poison = torch.full(shape, float("nan"), dtype=dtype, device=args[0].device)
    ptr = poison.data_ptr()
    del poison
    out = fn(*args)
    return out, out.data_ptr() == ptr


def token_sum_inputs(T: int, k: int, H: int, E: int, router_dtype: torch.dtype, gen: torch.Generator,
                     device: str):
    """rows [T*k, H] bf16 in a random slot order, where [T, k], d_logits [T, E], router [E, H]."""
    rows = torch.randn(T * k, H, generator=gen).to(device, torch.bfloat16)
    where = torch.randperm(T * k, generator=gen).view(T, k).to(device)
    d_logits = (torch.randn(T, E, generator=gen) / E).to(device)
    router = (torch.randn(E, H, generator=gen) / H**0.5).to(device, router_dtype)
    return rows, where, d_logits, router


def bench_config(name: str, cfg, T: int, iters: int, input_sets: int, rounds: int,
                 device: str = "cuda") -> list[dict]:
    """Rows for one MoEConfig at T tokens: each variant's median, least and most µs a call over the
    rounds and input sets, its floor, and its error against float64."""
    H, E, k = cfg.hidden_size, cfg.num_experts, cfg.top_k
    router_dtype = cfg.router_torch_dtype
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    out_rows = []

    ts_sets = [token_sum_inputs(T, k, H, E, router_dtype, gen, device) for _ in range(input_sets)]
    rows, where, d_ts, w = ts_sets[0]
    want = rows.double()[where].sum(1) + d_ts.double() @ w.double()
    # Bytes: the rows read once, dx written once in fp32, d_logits and the router weight read once.
    ts_floor = ((rows.numel() * 2 + T * H * 4 + d_ts.numel() * 4 + w.numel() * w.element_size())
                / HBM_BYTES_PER_S * 1e6)

    def torch_token_sum(rows, where, d, w):
        return rows[where].sum(1, dtype=torch.float32) + d @ w.float()

    variants = {"torch": torch_token_sum}
    for tile in TOKEN_SUM_TILES:
        def run(rows, where, d, w, tile=tile):
            return token_sum.token_sum(rows, where, d, w, tile=tile)
        variants["kernel {}x{} w{}".format(*tile)] = run

    def chosen(rows, where, d, w):
        return token_sum.token_sum(rows, where, d, w)

    def chosen_rows_only(rows, where, d, w):
        return token_sum.token_sum(rows, where)

    variants["chosen tiles"], variants["chosen tiles, no router term"] = chosen, chosen_rows_only
    rg_sets = [((torch.randn(T, E, generator=gen) / E).to(device),
                torch.randn(T, H, generator=gen).to(device, cfg.torch_dtype)) for _ in range(input_sets)]
    d, x = rg_sets[0]
    rg_want = d.double().t() @ x.double()
    rg_floor = (d.numel() * 4 + x.numel() * x.element_size() + E * H * 4) / HBM_BYTES_PER_S * 1e6
    rg_variants = {"torch": lambda d, x: d.t() @ x.float(), "kernel": router_grad.router_weight_grad}

    cases, meta = [], []
    for label, fn in variants.items():
        ref = want if "no router" not in label else rows.double()[where].sum(1)
        cases.append((fn, ts_sets))
        got, poisoned = poisoned_call(fn, (rows, where, d_ts, w), (T, H))
        # the kernel's output is its first allocation: on a GPU it must have landed in the NaN block
        # (torch's steps compute every element, wherever their result lands)
        must = label != "torch" and got.is_cuda
        meta.append(("token_sum", label, ts_floor, rel_err(got, ref), poisoned or not must))
        del got
    for label, fn in rg_variants.items():
        cases.append((fn, rg_sets))
        meta.append(("router_grad", label, rg_floor, rel_err(fn(d, x), rg_want), True))
    times = timed(cases, iters, rounds)
    for (op, label, floor, err, poisoned), us in zip(meta, times):
        out_rows.append({"preset": name, "tokens": T, "op": op, "variant": label, "median_us": statistics.median(us),
                         "min_us": min(us), "max_us": max(us), "floor_us": floor, "rel_err": err,
                         "ok": err <= 1e-5 and poisoned})
    return out_rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["qwen3_30b_a3b", "deepseek_v3", "mixtral_8x7b"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20, help="calls back to back between two events")
    p.add_argument("--rounds", type=int, default=5, help="every variant once a round, in turn")
    p.add_argument("--input-sets", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for name in args.preset:
        rows += bench_config(name, preset(name), args.tokens, args.iters, args.input_sets, args.rounds)
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "commit": git_commit(), "torch": torch.__version__}
    print(f"{'preset':14} {'op':11} {'variant':34} {'median_us':>9} {'floor_us':>8} {'of_floor':>8} {'rel_err':>8}")
    for r in rows:
        r.update(meta)
        print(f"{r['preset']:14} {r['op']:11} {r['variant']:34} {r['median_us']:9.1f} {r['floor_us']:8.1f} "
              f"{r['floor_us'] / r['median_us']:8.0%} {r['rel_err']:8.1e}{'' if r['ok'] else '  FAIL'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
