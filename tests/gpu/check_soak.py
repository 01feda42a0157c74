"""GPU soak: 10,000 back-to-back fused forwards with changing inputs and token counts.

Spot-checks against the reference every CHECK_EVERY calls, a count coprime with the six token
counts' cycle, so that the checks take each count (and each launch) in turn, and every count with
tokens must have been checked; GPU memory after warm-up (the first 100 calls and the first spot
check) and the symmetric heap's use must stay flat.

    bash launch/torchrun.sh tests/gpu/check_soak.py"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grad_reference import rel_err  # noqa: E402  (NaN counts as inf)

import flashmoe_py as fm  # noqa: E402

CHECK_EVERY = 499  # 499 = 1 (mod 6): successive checks step through the six token counts (500 took three)
FIRST_CHECK = 98  # before the warm-up's end (call 99)


def main():
    torch.set_grad_enabled(False)  # inference checks: no graph, nothing saved for a backward
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=10_000)
    args = p.parse_args()
    if args.calls <= FIRST_CHECK + 5 * CHECK_EVERY:
        p.error(f"--calls {args.calls}: more than {FIRST_CHECK + 5 * CHECK_EVERY} are needed to check each token count")
    cfg = fm.MoEConfig(hidden_size=512, ffn_size=512, num_experts=32, top_k=4)
    rt = fm.init(layers=[(cfg, 512)])
    layer = fm.MoELayer(cfg, backend="flash", max_tokens_per_rank=512, seed=7)
    full = layer.full_weight_dict()
    heap_start = rt.heap_used()
    sizes = [512, 96, 1, 300, 0 if rt.rank == 1 else 17, 256]  # graphs for each, then replays
    gen = torch.Generator(device="cuda").manual_seed(rt.rank)
    worst, checked, mem_after_warmup = 0.0, [], None
    t0 = time.perf_counter()
    for call in range(args.calls):
        T = sizes[call % len(sizes)]
        x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        out = layer(x)
        if call % CHECK_EVERY == FIRST_CHECK and T:
            ref = fm.reference_forward(x, config=cfg, **full)
            worst = max(worst, rel_err(out, ref))
            checked.append(T)
            del ref
        del x, out
        if call == 99:  # every token count has its CUDA graph, and cuBLAS (the reference's GEMMs)
            layer.synchronize()  # its workspace, by now
            mem_after_warmup = torch.cuda.memory_allocated()
    layer.synchronize()
    mem_end = torch.cuda.memory_allocated()
    stats = torch.tensor([worst, mem_end - mem_after_warmup], device="cuda", dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    row = {"calls": args.calls, "world": rt.world_size, "seconds": round(time.perf_counter() - t0, 1),
           "spot_checks_per_rank": len(checked), "token_counts_checked": sorted(set(checked)),
           "worst_rel_err": float(stats[0]),
           "memory_growth_bytes_max_over_ranks": int(stats[1]),
           "symmetric_heap_bytes": [heap_start, rt.heap_used()], "device": torch.cuda.get_device_name()}
    every_count = torch.tensor([float(set(checked) == {T for T in sizes if T})], device="cuda")
    dist.all_reduce(every_count, op=dist.ReduceOp.MIN)
    row["ok"] = (row["worst_rel_err"] <= 1e-2 and row["memory_growth_bytes_max_over_ranks"] <= 0
                 and heap_start == rt.heap_used() > 0 and bool(every_count.item()))
    if rt.rank == 0:
        print(json.dumps(row), flush=True)
    fm.finalize()
    sys.exit(0 if row["ok"] else 1)


if __name__ == "__main__":
    main()
