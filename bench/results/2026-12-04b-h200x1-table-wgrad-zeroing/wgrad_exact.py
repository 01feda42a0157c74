"""One-off: the weight-gradient kernel where every expert has the same number of rows (a multiple
of the 64-row step: no part-full step to mask; one less: every last step masked) against random
uniform counts, beside torch._grouped_mm, each checked against it. Run from the repository root:
python bench/results/2026-12-04b-h200x1-table-wgrad-zeroing/wgrad_exact.py"""
import statistics
import sys

import torch

sys.path.insert(0, "bench")
from backward_kernels import timed  # noqa: E402
from wgrad_probe import expert_counts  # noqa: E402

from flashmoe_py import preset  # noqa: E402
from flashmoe_py.kernels.expert_wgrad import expert_wgrad  # noqa: E402

gen = torch.Generator(device="cuda").manual_seed(3)
for name, T in (("deepseek_v3", 4096), ("qwen3_30b_a3b", 4096)):
    cfg = preset(name)
    E, k, H, F = cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.ffn_size
    mean = T * k // E
    for kind in ("random", mean - 1, mean, mean + 32, mean + 64):
        counts = (expert_counts(T, E, k, 0.0, gen) if kind == "random"
                  else torch.full((E,), kind, dtype=torch.int64, device="cuda"))
        S = int(counts.sum())
        offs = torch.cumsum(counts, 0).to(torch.int32)
        part = int(((counts % 64) != 0).sum())
        for prod, (K, N) in (("dw_in", (H, 2 * F)), ("dw_out", (F, H))):
            a = torch.randn(S, K, device="cuda", generator=gen).bfloat16()
            b = torch.randn(S, N, device="cuda", generator=gen).bfloat16()
            want = torch._grouped_mm(a.t(), b, offs=offs)
            got = expert_wgrad(a, b, offs)
            err = float((got.float() - want.float()).norm() / want.float().norm())
            t = timed([(lambda a, b, o: torch._grouped_mm(a.t(), b, offs=o), [(a, b, offs)]),
                       (expert_wgrad, [(a, b, offs)])], 10, 3)
            g, w = statistics.median(t[0]), statistics.median(t[1])
            print(f"{name:14s} {T:6d} {kind!s:6s} part-full {part:3d}/{E} {prod:6s} grouped {g:8.1f} gluon {w:8.1f} "
                  f"ratio {w / g:.3f} err {err:.1e}", flush=True)
            del a, b, want, got
            torch.cuda.empty_cache()
