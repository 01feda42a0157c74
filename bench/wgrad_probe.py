"""Probe: the weight-gradient GEMMs (a^T b per expert over its rows) in other layouts than the
explicit backward's torch._grouped_mm(a.t(), b, offs), on one GPU, at the presets' sizes:

    python bench/wgrad_probe.py [--preset P ...] [--tokens T ...] [--skew S ...] [--out results.json]

  grouped         torch._grouped_mm(a.t(), b, offs)             (today: backends/expert_grad.py)
  grouped_swapped b^T a per expert, read transposed (the CUTLASS tile's wide side on K, not N)
  grouped_pad8    grouped over each expert's rows padded with zeros to a multiple of 8
  grouped_aT_pad8 that with a^T stored contiguous ([K, S8]: the GEMM's A K-contiguous, which
                  torch._grouped_mm takes only for groups of whole 16 bytes)
  bmm_padded      torch.bmm over the experts' rows padded with zeros to the largest count
  gluon           kernels/expert_wgrad.py (Hopper, widths multiples of 8): a persistent,
                  warp-specialised kernel whose tile stores drain while the next tiles load
  grouped_compiled (--compiled) the grouped call under torch.compile's max-autotune

a: [S, K] bf16, b: [S, N] bf16, S = T * top_k rows sorted by expert, routed at random: k experts a
token drawn without replacement, expert e with weight exp(N(0, skew)) (0: uniform); a row's
most_over_mean is the busiest expert's rows over the mean. Every variant is checked against a
float32 product per expert (a_e^T b_e over its rows, one expert at a time: deepseek_v3's [E, K, N]
in float32 would be 30 GB), its output NaN-filled first (out= where the variant takes it, else a
NaN-filled block of the output's size freed just before the call, which the caching allocator
hands back), so a tile it skips fails (ok: within 1e-2; exit code 1 otherwise); then timed as
bench/backward_kernels.py times (CUDA events around --iters calls, the variants in turn, --rounds
rounds, default 5); the layout copies are not timed."""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backward_kernels import H200_TFLOPS, HBM_BYTES_PER_S, poisoned_call, timed  # noqa: E402
from layer import git_commit  # noqa: E402

from flashmoe_py import preset  # noqa: E402
from flashmoe_py.kernels.expert_wgrad import expert_wgrad  # noqa: E402

# An H200's rates as bench/layer.py's measure_ceilings found them (bench/backward_kernels.py says where)
TFLOPS, HBM = H200_TFLOPS, HBM_BYTES_PER_S


def padded(t: torch.Tensor, counts: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """t: [S, M] sorted by expert, counts[e] rows each -> [sum(width), M], expert e's rows then
    zeros up to width[e] rows."""
    starts, new_starts = torch.cumsum(counts, 0) - counts, torch.cumsum(width, 0) - width
    out = t.new_zeros(int(width.sum()), t.shape[1])
    e = torch.repeat_interleave(torch.arange(counts.shape[0], device=t.device), counts)
    pos = torch.arange(t.shape[0], device=t.device) - starts[e] + new_starts[e]
    return out.index_copy_(0, pos, t)


def variants(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, compiled: bool = False) -> tuple[dict, int]:
    """a: [S, K], b: [S, N] sorted by expert, counts [E] -> ({variant: (fn, args), fn(*args) giving
    [E, K, N]}, the rows bmm_padded adds). compiled: also torch.compile's max-autotune choice (ATen or
    Triton templates, ragged K included) for the grouped call: minutes of autotuning a shape."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    E, most = counts.shape[0], int(counts.max())
    w8 = (counts + 7) // 8 * 8
    offs8 = torch.cumsum(w8, 0).to(torch.int32)
    a8, b8 = padded(a, counts, w8), padded(b, counts, w8)
    a_pad = padded(a, counts, torch.full_like(counts, most)).view(E, most, -1)
    b_pad = padded(b, counts, torch.full_like(counts, most)).view(E, most, -1)

    def grouped(a_t, b, offs):
        return torch._grouped_mm(a_t, b, offs=offs)

    def swapped(b_t, a, offs):  # [E, N, K] read as [E, K, N]
        return torch._grouped_mm(b_t, a, offs=offs).transpose(1, 2)

    fns = {
        "grouped": (grouped, (a.t(), b, offs)),
        "grouped_swapped": (swapped, (b.t(), a, offs)),
        "grouped_pad8": (grouped, (a8.t(), b8, offs8)),
        "grouped_aT_pad8": (grouped, (a8.t().contiguous(), b8, offs8)),
        "bmm_padded": (torch.bmm, (a_pad.transpose(1, 2), b_pad)),
    }
    if a.is_cuda and torch.cuda.get_device_capability(a.device) == (9, 0) and a.shape[1] % 8 == 0:
        for st, ob in ((3, 1), (2, 2)) if b.shape[1] % 256 == 0 else ((3, 1), ):  # 2 buffers: whole tiles only
            fns[f"gluon_s{st}o{ob}"] = (functools.partial(expert_wgrad, stages=st, out_bufs=ob), (a, b, offs))
    if compiled:
        import torch._inductor.config as inductor_config
        inductor_config.max_autotune_gemm_backends = "ATEN,TRITON"
        fns["grouped_compiled"] = (torch.compile(grouped, mode="max-autotune-no-cudagraphs", dynamic=False),
                                   (a.t(), b, offs))
    return fns, E * most - a.shape[0]


def expert_counts(T: int, E: int, k: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    """[E] int64: the rows each expert gets when T tokens each draw k distinct experts, expert e
    with weight exp(N(0, skew)) (Gumbel top-k)."""
    bias = torch.randn(E, device=gen.device, generator=gen) * skew
    gumbel = -torch.empty(T, E, device=gen.device).exponential_(generator=gen).log()
    return torch.bincount((gumbel + bias).topk(k, dim=1).indices.flatten(), minlength=E)


def probe_parser(description: str, presets: list[str]) -> argparse.ArgumentParser:
    """The options the product probes share (this one and bench/dgrad_probe.py)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", nargs="+", default=presets)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--skew", type=float, nargs="+", default=[0.0],
                   help="experts' popularity: log-weights N(0, skew), k drawn without replacement (0: uniform)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5, help="every variant once a round, in turn")
    p.add_argument("--out", default=None)
    return p


def report(rows: list, point: dict, counts: torch.Tensor, medians: dict, errs: dict, floor: float, **extra) -> None:
    """Append a row a variant (point: preset, tokens, skew, gemm; medians and errs by variant;
    floor in µs; extra fields on every row) to rows, with the device, date and commit, and print it."""
    E, S = counts.shape[0], int(counts.sum())
    for v, med in medians.items():
        row = {**point, "most_over_mean": float(counts.max() * E / S), "variant": v, "median_us": med,
               "floor_us": floor, "of_floor": floor / med, "rel_err": errs[v], "ok": errs[v] <= 1e-2, **extra,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "commit": git_commit(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        rows.append(row)
        print(f"{row['preset']:14s} {row['tokens']:6d} {row['most_over_mean']:4.2f} {row['gemm']:7s} {v:15s} "
              f"{med:9.1f} us  floor {floor:8.1f}  {floor / med:5.0%}  err {errs[v]:.1e}"
              f"{'' if row['ok'] else '  FAIL'}", flush=True)


def finish(rows: list, out: str | None) -> int:
    """Write rows to out (JSON) if given; the exit code: 1 if any row failed its check."""
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


def probe_points(args: argparse.Namespace, gen: torch.Generator):
    """The probes' points, each expert's rows drawn on gen's device: for every preset, token count
    and skew in args, yield (point: preset, tokens, skew), (H, F, F_in, E), counts [E] int64, S."""
    for name, T, skew in itertools.product(args.preset, args.tokens, args.skew):
        cfg = preset(name)
        H, F, E, k = cfg.hidden_size, cfg.ffn_size, cfg.num_experts, cfg.top_k
        yield ({"preset": name, "tokens": T, "skew": skew}, (H, F, 2 * F if cfg.gated else F, E),
               expert_counts(T, E, k, skew, gen), T * k)


def reference_err(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> float:
    """||out - ref|| / ||ref|| over [E, K, N], ref[e] = a_e^T b_e over expert e's rows in float32,
    one expert at a time (zeros for an expert without rows); NaN anywhere in out gives NaN."""
    num = den = 0.0
    start = 0
    for e, n in enumerate(counts):
        ref = a[start:start + n].float().t() @ b[start:start + n].float()
        num += float((out[e].float() - ref).square().sum())
        den += float(ref.square().sum())
        start += n
    return (num / den) ** 0.5 if den else (float("nan") if num == 0 else float("inf"))


def checked_output(fn, fn_args: tuple, shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """fn(*fn_args) with its output NaN-filled before the call -> (the output, whether the poison
    held): fn's out= (expert_wgrad's) where it takes one, else backward_kernels.poisoned_call's NaN
    block, freed just before the call; on a GPU an output outside that block fails its row, since
    what a variant leaves unwritten would then be an earlier variant's value, not NaN."""
    if isinstance(fn, functools.partial) and fn.func is expert_wgrad:
        out = torch.full(shape, float("nan"), dtype=dtype, device=fn_args[0].device)
        return fn(*fn_args, out=out), True
    out, landed = poisoned_call(fn, fn_args, shape, dtype)
    return out, landed or not out.is_cuda


def checked_err(fn, fn_args: tuple, a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> float:
    """A variant's reference_err on its NaN-filled output (inf where the NaN filling missed it)."""
    out, poisoned = checked_output(fn, fn_args, (len(counts), a.shape[1], b.shape[1]), a.dtype)
    return reference_err(out, a, b, counts) if poisoned else float("inf")


def product_floor_us(S: int, K: int, N: int, E: int) -> float:
    """A per-expert product's floor in µs: its FLOPs at TFLOPS or, the larger, its bytes at HBM
    (E [K, N] weights or weight gradients once, S rows of K and N once; bf16). E: the experts
    whose weights it must touch (every one for the weight gradients, which are written even where
    no row came; those with rows for the products that read the weights)."""
    return max(2.0 * S * K * N / TFLOPS, 2.0 * (E * K * N + S * (K + N)) / HBM) * 1e6


def main() -> int:
    p = probe_parser(__doc__.splitlines()[0], ["qwen3_30b_a3b", "deepseek_v3", "mixtral_8x7b", "gpt_oss_120b"])
    p.add_argument("--compiled", action="store_true", help="also torch.compile max-autotune's grouped_mm")
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for point, (H, F, f_in, E), counts, S in probe_points(args, gen):
        for gemm, K, N in (("dw_in", H, f_in), ("dw_out", F, H)):
            a = torch.randn(S, K, device="cuda", generator=gen, dtype=torch.bfloat16)
            b = torch.randn(S, N, device="cuda", generator=gen, dtype=torch.bfloat16)
            fns, pad = variants(a, b, counts, args.compiled)
            errs = {v: checked_err(fn, fn_args, a, b, counts.tolist()) for v, (fn, fn_args) in fns.items()}
            times = timed([(fn, [fn_args]) for fn, fn_args in fns.values()], args.iters, args.rounds)
            medians = {v: statistics.median(us) for v, us in zip(fns, times)}
            report(rows, {**point, "gemm": gemm}, counts, medians, errs, product_floor_us(S, K, N, E), pad_rows=pad)
            del a, b, fns
            torch.cuda.empty_cache()
    return finish(rows, args.out)


if __name__ == "__main__":
    sys.exit(main())
