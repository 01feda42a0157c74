"""GPU: a rank killed mid-job (SIGKILL) makes every surviving rank's next forward fail with
FusedKernelError within about timeout_s, and the survivors still tear down and exit.

torchrun would stop the whole job as soon as one worker dies, so this script launches its own
processes (one per GPU, torchrun's environment variables) and judges them from outside:

    python tests/gpu/check_killed_rank.py [--out result.json]"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

TIMEOUT_S = 2.0
JOB_LIMIT_S = 180  # the whole job, launcher included: a hang fails the check


def worker():
    import torch
    import torch.distributed as dist

    import flashmoe_py as fm
    from flashmoe_py import FusedKernelError

    torch.set_grad_enabled(False)  # an inference check: no graph, nothing saved for a backward
    cfg = fm.MoEConfig(hidden_size=256, ffn_size=256, num_experts=16, top_k=2)
    rt = fm.init(layers=[(cfg, 128)])
    layer = fm.MoELayer(cfg, backend="flash", max_tokens_per_rank=128, timeout_s=TIMEOUT_S)
    x = torch.randn(100, 256, device="cuda", dtype=torch.bfloat16)
    layer(x)
    layer.synchronize()
    dist.barrier()  # a good call everywhere first
    if rt.rank == rt.world_size - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1.0)  # the victim is gone before anyone launches again
    row = {"rank": rt.rank}
    t0 = time.perf_counter()
    try:
        layer(x)
        layer.synchronize()
        row["error"] = None
    except FusedKernelError as e:
        row["error"] = str(e)
    row["seconds_to_error"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    fm.finalize()
    row["finalize_seconds"] = round(time.perf_counter() - t0, 2)
    print("RESULT " + json.dumps(row), flush=True)


def launch(n: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    t0 = time.perf_counter()
    for r in range(n):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "NVSHMEM_DISABLE_NVLS": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs, rcs = [], []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, JOB_LIMIT_S - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        outs.append(out)
        rcs.append(p.returncode)
    survivors = [json.loads(line[7:]) for out in outs for line in out.splitlines() if line.startswith("RESULT ")]
    ok = (rcs[-1] == -signal.SIGKILL and all(rc == 0 for rc in rcs[:-1]) and len(survivors) == n - 1
          and all(s["error"] and "timed out" in s["error"] and f"from rank {n - 1}" in s["error"]
                  and TIMEOUT_S <= s["seconds_to_error"] <= TIMEOUT_S + 2.0 for s in survivors))  # + a capture
    return {"world": n, "victim": n - 1, "return_codes": rcs, "survivors": survivors,
            "job_seconds": round(time.perf_counter() - t0, 1), "timeout_s": TIMEOUT_S, "ok": ok,
            "logs_tail": [o[-1500:] for o in outs] if not ok else None}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--gpus", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.worker:
        return worker()
    import torch
    n = args.gpus or torch.cuda.device_count()
    if n < 2:  # the only rank would be the victim: nothing judged
        print(f"check_killed_rank needs 2 or more GPUs, got {n}", flush=True)
        sys.exit(2)
    result = launch(n)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), **result}, f, indent=1)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
