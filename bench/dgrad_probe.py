"""Probe: the backward's products with transposed weights (g = dy w_out[e]^T, d_rows = d_pre
w_in[e]^T, rows sorted by expert) as torch._grouped_mm (the explicit backward's today) and as
kernels/expert_dgrad.py at several tile shapes, on one GPU, at the presets' sizes:

    python bench/dgrad_probe.py [--preset P ...] [--tokens T ...] [--skew S ...] [--out results.json]

a: [S, K] bf16, w: [E, N, K] bf16 (as the layer stores w_out, and w_in with N = H), S = T * top_k
rows routed at random as bench/wgrad_probe.py routes them. Every variant is checked against a
float32 product per expert (ok: within 1e-2; exit code 1 otherwise) with its output poisoned
first, then timed as bench/backward_kernels.py times (CUDA events around --iters calls, the
variants in turn, --rounds rounds, default 5). The floor is the larger of the products at TFLOPS and the
bytes (w once, a and out once) at HBM."""

from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backward_kernels import timed  # noqa: E402
from wgrad_probe import finish, probe_parser, probe_points, product_floor_us, report  # noqa: E402

from flashmoe_py.kernels.expert_dgrad import DgradTiles, RowTiles, expert_dgrad  # noqa: E402

SHAPES = {  # name: (block_m, block_n, block_k, stages, warps, wide_last); "wide": wide last tiles
    "128x256s4w8": DgradTiles(128, 256, 64, 4, 8, wide_last=False),
    "128x256s3w8": DgradTiles(128, 256, 64, 3, 8, wide_last=False),
    "128x128s4w4": DgradTiles(128, 128, 64, 4, 4, wide_last=False),
    "128x128s5w8": DgradTiles(128, 128, 64, 5, 8, wide_last=False),
    "128x128s5w8wide": DgradTiles(128, 128, 64, 5, 8, wide_last=True),  # TILES; 200 KB of shared memory
    "128x128s4w8wide": DgradTiles(128, 128, 64, 4, 8, wide_last=True),
    "64x256s5w4": DgradTiles(64, 256, 64, 5, 4, wide_last=False),
    "256x128s4w8": DgradTiles(256, 128, 64, 4, 8, wide_last=False),
    "256x128s3w8": DgradTiles(256, 128, 64, 3, 8, wide_last=False),
    "128x128s3w4": DgradTiles(128, 128, 64, 3, 4, wide_last=False),  # 96 KB of shared memory: two programs an SM
    "128x128s3w8": DgradTiles(128, 128, 64, 3, 8, wide_last=False),
    "64x128s4w4": DgradTiles(64, 128, 64, 4, 4, wide_last=False),
    "128x64s6w4": DgradTiles(128, 64, 64, 6, 4, wide_last=False),
}


def reference_err(out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, counts: list[int]) -> float:
    """||out - ref|| / ||ref||, ref each expert's rows times its w^T in float32."""
    num = den = 0.0
    start = 0
    for e, n in enumerate(counts):
        ref = a[start:start + n].float() @ w[e].float().t()
        num += float((out[start:start + n].float() - ref).square().sum())
        den += float(ref.square().sum())
        start += n
    return (num / den) ** 0.5


def main() -> int:
    p = probe_parser(__doc__.splitlines()[0], ["deepseek_v3", "qwen3_30b_a3b"])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for point, (H, F, f_in, E), counts, S in probe_points(args, gen):
        ends = torch.cumsum(counts, 0).to(torch.int32)
        for gemm, K, N in (("g", H, F), ("d_rows", f_in, H)):
            a = torch.randn(S, K, device="cuda", generator=gen, dtype=torch.bfloat16)
            w = torch.randn(E, N, K, device="cuda", generator=gen, dtype=torch.bfloat16) / K ** 0.5
            w_t = w.transpose(1, 2)
            fns = {"grouped": (lambda a, w_t, ends: torch._grouped_mm(a, w_t, offs=ends), (a, w_t, ends))}
            for v in args.shapes:
                tiles = RowTiles.of(ends, S, SHAPES[v].block_m, SHAPES[v].wide_last)
                fns[v] = (lambda a, w, ends, tiles=tiles, shape=SHAPES[v]:
                          expert_dgrad(a, w, ends, tiles, shape), (a, w, ends))
            errs = {"grouped": reference_err(torch._grouped_mm(a, w_t, offs=ends), a, w, counts.tolist())}
            for v in args.shapes:
                out = torch.full((S, N), float("nan"), dtype=a.dtype, device=a.device)
                expert_dgrad(a, w, ends, shape=SHAPES[v], out=out)
                errs[v] = reference_err(out, a, w, counts.tolist())
                del out
            times = timed([(fn, [fn_args]) for fn, fn_args in fns.values()], args.iters, args.rounds)
            report(rows, {**point, "gemm": gemm}, counts, {v: statistics.median(us) for v, us in zip(fns, times)},
                   errs, product_floor_us(S, K, N, int((counts > 0).sum())))  # experts without rows: not read
            del a, w, w_t, fns
            torch.cuda.empty_cache()
    return finish(rows, args.out)


if __name__ == "__main__":
    sys.exit(main())
