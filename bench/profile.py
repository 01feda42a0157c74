"""Where a forward's time goes: torch.profiler over repeated forwards on rank 0 (GPU).

    torchrun --nproc-per-node N bench/profile.py --preset qwen3_30b_a3b --tokens 128 --backend flash"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flashmoe_py as fm  # noqa: E402
from flashmoe_py.heap import heap_bytes_for  # noqa: E402
from flashmoe_py.runtime import detect_launcher  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen3_30b_a3b")
    p.add_argument("--tokens", type=int, nargs="+", default=[128])
    p.add_argument("--backend", default="flash")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    cfg = fm.preset(args.preset)
    world = detect_launcher().world_size
    rt = fm.init(heap_bytes=max(heap_bytes_for(cfg, world, t) for t in args.tokens))
    for T in args.tokens:
        extra = {"max_tokens_per_rank": T} if args.backend == "flash" else {}
        layer = fm.MoELayer(cfg, backend=args.backend, **extra)
        x = torch.randn(T, cfg.hidden_size, device=rt.device, dtype=cfg.torch_dtype)
        with torch.inference_mode():
            for _ in range(5):
                layer(x)
            layer.synchronize()
            dist.barrier()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                    torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(args.iters):
                    layer(x)
                layer.synchronize()
            dist.barrier()
        if rt.rank == 0:
            print(f"\n### {args.preset} {args.backend} tokens={T} world={world}: per-forward averages")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        if args.backend == "flash":
            layer.backend.close()
    fm.finalize()


if __name__ == "__main__":
    main()
