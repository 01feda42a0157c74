"""The fused kernel at world 2, 4 and 8 on one GPU (tests/ranks_on_one_gpu.py): every rank's kernel
in one process, each on its own stream and share of the SMs, exchanging rows, counts and flags
through the GPU's memory over transport "p2p". One process, no launcher:

    python tests/gpu/check_ranks_on_one_gpu.py [--worlds 2 4 8] [--calls 5] [--out results.json]

Every call: fresh random tokens, uneven counts (the last rank none), outputs NaN-poisoned, each
rank's output against the float32 reference with that rank's router's choice (bf16 bar 1e-2, fp32
1e-4 as for the GPU kernels), and no rank's wait may time out; load_s records each call's seconds
a rank's kernel variant took to compile (unless Triton's disk cache had it) and load, before any
rank launched (Ranks.call): how long a rank meeting a new variant keeps waiting peers on several
GPUs, where nothing loads it first. It checks the multi-rank protocol
at the current kernel where no multi-GPU machine is lent; NVLink's timing and the nvshmem
transport need one (launch/gpu_checks.sh, which runs this script too). Exit code 1 if any case
fails. The same harness runs worlds 1-8 in the Triton interpreter, a thread a rank
(tests/test_ranks_on_one_gpu.py). First passed on an H100 on 2026-12-05 (bench/NOTES.md item 84)."""

import os

# Each rank's stream its own hardware queue (CUDA's default is 8, shared by more streams): a rank's
# kernel, waiting on its peers, would otherwise hold back the launch of a peer queued behind it
# until the wait timed out. Before CUDA starts.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")  # no module loaded while a rank's kernel waits

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from ranks_on_one_gpu import Ranks  # noqa: E402

from flashmoe_py import MoEConfig  # noqa: E402

BARS = {"bfloat16": 1e-2, "float32": 1e-4}
MAX_TOKENS = 256
CONFIGS = {  # name: (config, worlds it runs at: None for --worlds)
    "bf16 swiglu top-4, 32 experts": (MoEConfig(hidden_size=512, ffn_size=768, num_experts=32, top_k=4,
                                                dtype="bfloat16"), None),
    "fp32 gelu top-2, 8 experts": (MoEConfig(hidden_size=256, ffn_size=384, num_experts=8, top_k=2,
                                             activation="gelu", dtype="float32"), (2,)),
}


def run_case(name: str, cfg: MoEConfig, world: int, calls: int) -> dict:
    """`calls` calls, stopped at the first that times out (a status word, once set, stays set: the
    ranks' later calls would end at once)."""
    ranks = Ranks(cfg, world, MAX_TOKENS)
    worst, timeouts, done, load_s = 0.0, [], 0, []
    while done < calls and not timeouts:
        tokens = [int(torch.randint(1, MAX_TOKENS + 1, (1,), generator=ranks.gen)) for _ in range(world - 1)] + [0]
        got = ranks.call(tokens)
        worst, done = max(worst, got["rel_err"]), done + 1
        timeouts = [t for t in got["timeouts"] if t is not None]
        load_s.append([round(s, 3) for s in got["load_s"]])
    return {"case": f"{name}, world {world}", "world": world, "dtype": cfg.dtype, "calls": done,
            "programs_per_rank": ranks.programs, "seed": ranks.seed, "max_rel_err": worst,
            "timeouts": timeouts, "load_s": load_s, "ok": worst <= BARS[cfg.dtype] and not timeouts}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    if any(w < 2 for w in args.worlds) or args.calls < 1:
        ap.error("--worlds takes 2 or more ranks, --calls at least 1")
    rows = []
    for name, (cfg, worlds) in CONFIGS.items():
        for world in worlds or args.worlds:
            r = run_case(name, cfg, world, args.calls)
            print(("ok  " if r["ok"] else "FAIL"), r["case"], {k: v for k, v in r.items() if k not in ("case", "ok")},
                  flush=True)
            rows.append(r)
    ok = all(r["ok"] for r in rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "ok": ok,
                       "commit": os.environ.get("FLASHMOE_COMMIT", "unknown"), "rows": rows}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
