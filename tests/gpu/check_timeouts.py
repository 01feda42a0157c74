"""GPU, one process, no NVSHMEM: the fused kernel's bounded waits, timed by the host.

Rank 0 of a 2-rank layer runs alone on this GPU (tests/one_rank.py; rank 1's buffers are scratch):
rank 1 never publishes its counts, or announces rows and never sends them, or announces none and
never returns rank 0's expert outputs. Each time the kernel (every SM's program) must record the
wait and rank 1 in its status word and end within timeout_s plus a little, not a multiple of it,
however many of its programs were waiting: a wait gives up after timeout_s of the GPU's clock, and
the others at once after the first failure. Then a 1-rank layer launched with twice as many
programs as SMs (64- and 128-row tiles), so half of them wait for an SM: in the static GEMM1 order
(static_ffn_in=1) the GEMM2 tiles that need those programs' tiles must end the call at the timeout
with the hidden-tile wait, whose description names the override; on the task queue the same launch
must simply finish, its output the reference's. A kernel that hangs instead is reported with its
status and control words, and the check exits 2.

    python tests/gpu/check_timeouts.py [--repeat N] [--out rows.json]"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from one_rank import OneRank  # noqa: E402

from flashmoe_py import MoEConfig, reference_forward  # noqa: E402
from flashmoe_py.kernels.layout import (WAIT_CHUNK, WAIT_COMBINE, WAIT_COUNTS, WAIT_HIDDEN_STATIC,  # noqa: E402
                                        WAITS, describe_timeout)

SLACK_S = 0.25  # routing, launch and the host's wake-up, beside timeout_s
HUNG_S = 10.0  # past timeout_s: the kernel is hung; say so and what its control words hold, then exit


def timed_failure(cfg, tokens, peer_rows, timeout_s, programs, world=2, static_ffn_in=0, block_m=64):
    """A fresh rank 0 of `world` ranks; rank 1 publishes peer_rows rows per expert (None: publishes
    nothing). -> (status list, seconds from launch to the kernel's end, ctl list, rel err of the
    output against the float32 reference). A kernel still running HUNG_S after its timeout ends the
    process (status and ctl copied out beside it first)."""
    rank = OneRank(cfg, max_tokens=tokens, world=world, device="cuda")
    if peer_rows is not None:
        rank.peer_published(1, peer_rows)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    x, out = rank.forward(tokens, timeout_s=timeout_s, programs=programs, static_ffn_in=static_ffn_in,
                          block_m=block_m)
    done = torch.cuda.Event()
    done.record()
    while not done.query():
        if time.perf_counter() - t0 > timeout_s + HUNG_S:
            side = torch.cuda.Stream()  # not ordered after the running kernel; copies need no SM
            with torch.cuda.stream(side):
                status, ctl = (t.to("cpu", non_blocking=True) for t in (rank.status, rank.ctl))
            side.synchronize()
            print(json.dumps({"hung_after_s": round(time.perf_counter() - t0, 1), "peer_rows": peer_rows,
                              "status": status.tolist(), "ctl": ctl.tolist()}), flush=True)
            os._exit(2)
        time.sleep(0.001)
    seconds = time.perf_counter() - t0
    err = float("nan")
    if world == 1:
        ref = reference_forward(x, config=cfg, compute_dtype=torch.float32, **rank.full_weights())
        err = float((out.float() - ref).norm() / ref.norm())
    return rank.status.tolist(), seconds, rank.ctl.tolist(), err


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=1, help="run the cases this many times")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = MoEConfig(hidden_size=1024, ffn_size=512, num_experts=16, top_k=4)
    tokens = 2048
    timed_failure(cfg, tokens, None, 0.1, programs)  # compiles the kernel
    cases = [("peer never publishes its counts", None, WAIT_COUNTS, 0.5),
             ("peer never publishes its counts", None, WAIT_COUNTS, 2.0),
             ("peer announces rows, never sends them", 512, WAIT_CHUNK, 1.0),
             ("peer announces no rows, never returns outputs", 0, WAIT_COMBINE, 1.0)]
    rows = []
    for name, peer_rows, wait, timeout_s in cases * args.repeat:
        status, seconds, ctl, _ = timed_failure(cfg, tokens, peer_rows, timeout_s, programs)
        ok = (status[:3] == [1, wait.value, 1] and timeout_s <= seconds <= timeout_s + SLACK_S
              and ctl == [2, 0, 0, 0])
        rows.append({"case": name, "timeout_s": timeout_s, "seconds_to_kernel_end": round(seconds, 3),
                     "wait": WAITS.get(status[1], status[1]), "peer": status[2], "status": status[:6],
                     "ctl_after": ctl, "programs": programs, "ok": ok})
        print(json.dumps(rows[-1]), flush=True)
    # Half the programs without an SM at first (one program fills an SM): the static order waits
    # for them and must end at the timeout, naming the override; the queue must not wait at all.
    # Row tiles of 64 and of 128 (the chooser's here): where a timeout's give-up was decided warp by
    # warp, 128-row launches through MoELayer hung in five of seven tries (bench/NOTES.md item 78).
    launches, timeout_s = [(static, block_m) for static in (1, 0) for block_m in (64, 128)], 1.0
    for static, block_m in launches:  # compiles the world-1 kernels (seconds each) before any is timed
        timed_failure(cfg, tokens, None, 0.1, 2 * programs, world=1, static_ffn_in=static, block_m=block_m)
    for static, block_m in launches * args.repeat:
        status, seconds, ctl, err = timed_failure(cfg, tokens, None, timeout_s, 2 * programs, world=1,
                                                  static_ffn_in=static, block_m=block_m)
        text = describe_timeout(status, 0) or ""
        if static:
            ok = (status[:2] == [1, WAIT_HIDDEN_STATIC.value] and "static_ffn_in" in text
                  and timeout_s <= seconds <= timeout_s + SLACK_S and ctl == [2, 0, 0, 0])
        else:
            ok = status[0] == 0 and seconds < timeout_s and err <= 1e-2 and ctl == [2, 0, 0, 0]
        rows.append({"case": f"twice as many programs as SMs, static_ffn_in={static}, block_m={block_m}",
                     "timeout_s": timeout_s,
                     "seconds_to_kernel_end": round(seconds, 3), "status": status[:6], "timeout": text,
                     "rel_err": err, "ctl_after": ctl, "programs": 2 * programs, "ok": ok})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "commit": os.environ.get("FLASHMOE_COMMIT", "unknown"), "rows": rows}, f, indent=1)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
