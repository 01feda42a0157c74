"""GPU: a rank that never launches its part makes its peers' forwards fail fast and clearly.

Every rank runs one good forward; then only rank 0 runs a second one. Its kernel must give up
within about timeout_s, `synchronize()` must raise FusedKernelError naming the wait, and every
rank must still tear down and exit cleanly (2+ GPUs).   bash launch/torchrun.sh tests/gpu/check_faults.py"""

import json
import sys
import time

import torch
import torch.distributed as dist

import flashmoe_py as fm
from flashmoe_py import FusedKernelError

TIMEOUT_S = 2.0


def main():
    torch.set_grad_enabled(False)  # inference checks: no graph, nothing saved for a backward
    cfg = fm.MoEConfig(hidden_size=256, ffn_size=256, num_experts=16, top_k=2)
    rt = fm.init(layers=[(cfg, 128)])
    if rt.world_size < 2:  # no peer to stay away: the second forward would succeed
        print("check_faults needs 2 or more GPUs", flush=True)
        sys.exit(2)
    layer = fm.MoELayer(cfg, backend="flash", max_tokens_per_rank=128, timeout_s=TIMEOUT_S,
                        cuda_graphs=False)
    x = torch.randn(100, 256, device="cuda", dtype=torch.bfloat16)
    layer(x)
    layer.synchronize()  # a good call everywhere first
    dist.barrier()
    row = {"rank": rt.rank, "world": rt.world_size}
    if rt.rank == 0:
        t0 = time.perf_counter()
        layer(x)
        try:
            layer.synchronize()
            row["error"] = None
        except FusedKernelError as e:
            row["error"] = str(e)
        row["seconds_to_error"] = round(time.perf_counter() - t0, 2)
        try:
            layer(x)  # a failed layer stays failed: refused before any launch
            row["refused_after"] = False
        except FusedKernelError:
            row["refused_after"] = True
        print(json.dumps(row), flush=True)
    ok = torch.tensor([1 if rt.rank else int(row["error"] is not None and "timed out" in row["error"]
                                             and TIMEOUT_S <= row["seconds_to_error"] <= TIMEOUT_S + 1.0
                                             and row["refused_after"])], device="cuda")
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    t0 = time.perf_counter()
    fm.finalize()
    if rt.rank == 0:
        print(json.dumps({"finalize_seconds": round(time.perf_counter() - t0, 2), "ok": bool(ok)}))
    sys.exit(0 if int(ok) else 1)


if __name__ == "__main__":
    main()
