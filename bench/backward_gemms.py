"""The explicit backward's four per-expert GEMMs (issue 19), kernels/grouped_gemm.py against
torch._grouped_mm (what backends/expert_grad.py runs today), on a preset's shapes at a token
count, bf16, rows spread evenly over the experts as uniform routing does:

    g      = dy w_out[e]^T       rows_times(dy, w_out, transpose=True)    [N, H] x [F, H]^T
    d_rows = d_pre w_in[e]^T     rows_times(d_pre, w_in, transpose=True)  [N, F_in] x [H, F_in]^T
    dw_in  = rows^T d_pre        outer(rows, d_pre)                       per expert [H, F_in]
    dw_out = sh^T dy             outer(sh, dy)                            per expert [F, H]
    g+act  = g, then the activation's backward: dgrad_activation (g never stored) against
             torch._grouped_mm and the activation_grad kernel (what the GPU backward runs today);
             checked on d_pre

Each checked against float32 on three experts first (bf16 bar 1e-2), then timed (CUDA events,
median of --iters calls after warm-up, two input sets), with the floor of each: its FLOPs at the
bf16 GEMM ceiling measured in the same run, or its bytes (weights or weight gradients once, rows
once) at the copy ceiling, whichever is longer.

    python bench/backward_gemms.py --preset qwen3_30b_a3b deepseek_v3 --tokens 4096 [--out rows.json]"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flashmoe_py as fm  # noqa: E402
from flashmoe_py.backends.expert_grad import activation_backward  # noqa: E402
from flashmoe_py.kernels.activation_grad import activation_grad  # noqa: E402
from flashmoe_py.kernels.grouped_gemm import dgrad_activation, outer, rows_times  # noqa: E402


def timed(fn, iters: int) -> float:
    """Median µs of fn() over iters calls after three warm-up calls (CUDA events)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def ceilings(dev) -> tuple[float, float]:
    """(bf16 GEMM FLOP/s, copy bytes/s) measured here: an 8192^3 GEMM, a 1 GiB copy."""
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    flops = 2 * 8192 ** 3 / (timed(lambda: a @ a, 10) * 1e-6)
    x = torch.empty(2 ** 29, device=dev, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    return flops, 2 * x.numel() * 2 / (timed(lambda: y.copy_(x), 10) * 1e-6)


def per_expert_reference(name: str, t: dict, e: int) -> torch.Tensor:
    """float32 result of GEMM `name` for expert e (its rows, or its weight-gradient block)."""
    s = t["slices"][e]
    rows = {k: t[k][s].float() for k in ("rows", "dy", "d_pre", "sh", "pre")}
    if name == "g+act":
        g = rows["dy"] @ t["w_out"][e].float().t()
        return activation_backward(rows["pre"], g * t["scale"][s][:, None], t["cfg"])[1]
    if name == "g":
        return rows["dy"] @ t["w_out"][e].float().t()
    if name == "d_rows":
        return rows["d_pre"] @ t["w_in"][e].float().t()
    if name == "dw_in":
        return rows["rows"].t() @ rows["d_pre"]
    return rows["sh"].t() @ rows["dy"]


def gemms(w_in: torch.Tensor, w_out: torch.Tensor, counts: torch.Tensor, cfg) -> dict:
    """name -> (ours(t), torch's(t), multiply-adds, elements moved at least once), t an input set."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    N = int(counts.sum())
    H, f_in, F = w_in.shape[1], w_in.shape[2], w_out.shape[1]
    return {
        "g": (lambda t: rows_times(t["dy"], w_out, counts, transpose=True),
              lambda t: torch._grouped_mm(t["dy"], w_out.transpose(1, 2), offs=offs), N * H * F,
              w_out.numel() + N * (H + F)),
        "d_rows": (lambda t: rows_times(t["d_pre"], w_in, counts, transpose=True),
                   lambda t: torch._grouped_mm(t["d_pre"], w_in.transpose(1, 2), offs=offs), N * f_in * H,
                   w_in.numel() + N * (f_in + H)),
        "dw_in": (lambda t: outer(t["rows"], t["d_pre"], counts),
                  lambda t: torch._grouped_mm(t["rows"].t(), t["d_pre"], offs=offs), N * H * f_in,
                  w_in.numel() + N * (H + f_in)),
        "dw_out": (lambda t: outer(t["sh"], t["dy"], counts),
                   lambda t: torch._grouped_mm(t["sh"].t(), t["dy"], offs=offs), N * F * H,
                   w_out.numel() + N * (F + H)),
        "g+act": (lambda t: dgrad_activation(t["dy"], w_out, t["pre"], t["scale"], counts, cfg)[1],
                  lambda t: activation_grad(t["pre"], torch._grouped_mm(t["dy"], w_out.transpose(1, 2), offs=offs),
                                            t["scale"], cfg)[1], N * H * F,
                  w_out.numel() + N * (H + 2 * f_in + F)),
    }


def measure(gemm: str, fn, sets: list[dict], iters: int) -> dict:
    """Check fn (one GEMM) against float32 on three experts of the first input set, then time it
    over every set -> {us, rel_err, ok}."""
    got, L = fn(sets[0]).float(), sets[0]["w_in"].shape[0]
    errs = []
    for e in (0, L // 2, L - 1):
        want = per_expert_reference(gemm, sets[0], e)
        part = got[sets[0]["slices"][e]] if gemm in ("g", "d_rows", "g+act") else got[e]
        errs.append(float((part - want).norm() / want.norm()))
    us = statistics.median([timed(lambda t=t: fn(t), iters) for t in sets])
    return {"us": us, "rel_err": max(errs), "ok": max(errs) <= 1e-2}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["qwen3_30b_a3b"])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    flop_rate, byte_rate = ceilings(dev)
    out_rows = []
    for name in args.preset:
        cfg = fm.preset(name)
        L, H, F, f_in = cfg.num_experts, cfg.hidden_size, cfg.ffn_size, cfg.ffn_in_size
        gen = torch.Generator(device=dev).manual_seed(0)
        bf = dict(device=dev, dtype=torch.bfloat16)
        w_in = torch.randn(L, H, f_in, generator=gen, **bf) * H ** -0.5
        w_out = torch.randn(L, F, H, generator=gen, **bf) * F ** -0.5
        for T in args.tokens:
            N = T * cfg.top_k
            counts = torch.full((L,), N // L, dtype=torch.int64, device=dev)
            counts[: N % L] += 1
            ends = torch.cumsum(counts, 0).tolist()
            slices = [slice(end - int(n), end) for n, end in zip(counts.tolist(), ends)]
            sets = [{"rows": torch.randn(N, H, generator=gen, **bf), "dy": torch.randn(N, H, generator=gen, **bf),
                     "d_pre": torch.randn(N, f_in, generator=gen, **bf), "sh": torch.randn(N, F, generator=gen, **bf),
                     "pre": torch.randn(N, f_in, generator=gen, **bf),
                     "scale": torch.rand(N, generator=gen, device=dev) + 0.5,
                     "w_in": w_in, "w_out": w_out, "slices": slices, "cfg": cfg} for _ in range(2)]
            for gemm, (ours, theirs, macs, elems) in gemms(w_in, w_out, counts, cfg).items():
                floor = max(2 * macs / flop_rate, 2 * elems / byte_rate) * 1e6
                row = {"preset": name, "tokens": T, "gemm": gemm, "floor_us": floor,
                       "device": torch.cuda.get_device_name(), "commit": os.environ.get("FLASHMOE_COMMIT", "unknown")}
                for impl, fn in (("triton", ours), ("torch", theirs)):
                    row |= {f"{impl}_{k}": v for k, v in measure(gemm, fn, sets, args.iters).items()}
                row["speedup"] = row["torch_us"] / row["triton_us"]
                out_rows.append(row)
                print(f"{name} T={T} {gemm:7s} triton {row['triton_us']:8.1f} us "
                      f"({100 * floor / row['triton_us']:3.0f}% floor, err {row['triton_rel_err']:.1e})  torch "
                      f"{row['torch_us']:8.1f} us ({100 * floor / row['torch_us']:3.0f}%)  {row['speedup']:.2f}x",
                      flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ceilings": {"flop_s": flop_rate, "byte_s": byte_rate}, "rows": out_rows}, f, indent=1)


if __name__ == "__main__":
    main()
