"""GPU gradients of backend="torch" (NCCL, routing in torch ops while a graph is recorded)
against float64 autograd through the reference; run one process per GPU:

    bash launch/torchrun.sh tests/gpu/check_backward.py [--out results.json]

Every case: fresh random [batch, seq, H] inputs, uneven token counts (one rank with none when
there are several), all four gradients (what each rank's must be: tests/grad_reference.py).
Exit code 1 if any case fails."""

import argparse
import json
import os
import random
import sys

import torch
import torch.distributed as dist

from flashmoe_py import MoEConfig, MoELayer
from flashmoe_py.routing import route

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from grad_reference import grad_errors

TOL = {"bfloat16": 1e-2, "float32": 1e-5}
CASES = [  # (name, config overrides); hidden 64, ffn 96, 16 experts unless overridden
    ("fp32 swiglu top-2", dict(top_k=2)),
    ("fp32 gelu top-1, not renormalised", dict(top_k=1, activation="gelu", renormalize=False)),
    ("fp32 relu top-8, capacity 0.7", dict(top_k=8, activation="relu", capacity_factor=0.7)),
    ("fp32 swiglu top-4, 128 experts", dict(top_k=4, num_experts=128)),
    ("bf16 swiglu top-2", dict(top_k=2, dtype="bfloat16")),
    ("bf16 swiglu top-8, capacity 1.0", dict(top_k=8, dtype="bfloat16", capacity_factor=1.0)),
]


def same_seed() -> int:
    t = torch.tensor([random.SystemRandom().randrange(2**31)], device="cuda")
    dist.broadcast(t, 0)
    return int(t)


def run_case(name, overrides, rank, world) -> dict:
    cfg = MoEConfig(**{"hidden_size": 64, "ffn_size": 96, "num_experts": 16, "dtype": "float32", **overrides})
    seed = same_seed()
    layer = MoELayer(cfg, backend="torch", seed=seed)
    g = torch.Generator().manual_seed(seed + 7919 * (rank + 1))
    seq = 0 if world > 1 and rank == world - 1 else 37 + 11 * rank
    x = torch.randn(3, seq, cfg.hidden_size, generator=g).to("cuda", cfg.torch_dtype).requires_grad_()
    dy = torch.randn(x.shape, generator=g).to("cuda", cfg.torch_dtype)
    errs = grad_errors(layer, x, dy)
    worst = torch.tensor([max(errs.values())], device="cuda", dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"case": name, "max_rel_err": float(worst), "ok": float(worst) <= TOL[cfg.dtype], **errs}


def router_kernel_kept_for_inference(rank) -> dict:
    """Without a graph the router kernel still routes: its weights carry no autograd history;
    with one, the torch ops do and the weights do."""
    cfg = MoEConfig(hidden_size=64, ffn_size=96, num_experts=16, top_k=2, dtype="bfloat16")
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        inference = route(x, w, cfg).weights.grad_fn is None
    training = route(x, w, cfg).weights.grad_fn is not None
    return {"case": "router kernel without a graph, torch ops with one", "ok": inference and training}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    rows = [run_case(name, o, rank, world) for name, o in CASES] + [router_kernel_kept_for_inference(rank)]
    if rank == 0:
        for r in rows:
            print(("ok  " if r["ok"] else "FAIL"), r["case"], {k: v for k, v in r.items() if k not in ("case", "ok")})
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"world_size": world, "rows": rows}, f, indent=1)
    ok = all(r["ok"] for r in rows)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
