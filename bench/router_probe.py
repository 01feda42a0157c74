"""The router kernel alone (kernels/router.py), by launch: its dot split over K chunks or not (and
into how many), the tokens a program by the expert count or 16. One GPU; each setting's calls are
captured in a CUDA graph (CALLS a replay: no host time) and timed with CUDA events, median of
ROUNDS replays, after one warm replay; the settings in turn. Each row says whether the setting picked the same
experts as `whole` (the split dot adds in another order: a near-tie may differ).

    python bench/router_probe.py --preset deepseek_v3 --tokens 1 8 128 [--chunks 8 16] [--out rows.json]"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flashmoe_py as fm  # noqa: E402
from flashmoe_py.kernels import router  # noqa: E402
from flashmoe_py.kernels.router import router_topk  # noqa: E402

CALLS, ROUNDS = 20, 15


def settings(num_experts: int, chunks: list[int]) -> dict:
    """Split (into as many chunks as the launcher takes at the token count) or not; the tokens a
    program by the expert count (the launcher's choice past SMALL_BT_TOKENS, and its only one before
    bench/NOTES.md item 85) or 16; split into at most each of `chunks` K chunks at any token count,
    with 16."""
    e_pow2 = max(16, triton.next_power_of_2(num_experts))
    by_e = 64 if e_pow2 <= 128 else 32 if e_pow2 <= 256 else 16
    return {"whole": dict(split=False, block_t=by_e), "whole_bt16": dict(split=False, block_t=16),
            "split": dict(split=True, block_t=by_e), "split_bt16": dict(split=True, block_t=16),
            **{f"split_bt16_c{n}": dict(split=True, block_t=16, max_chunks=n) for n in chunks}}


def router_call(cfg, x, w, correction, max_chunks: int | None = None, **setting):
    """A call of router_topk with the preset's routing on x [T, H] and w [E, H] in a setting."""
    def call():
        kept = router.MAX_CHUNKS, router.WIDE_SPLIT_TOKENS
        if max_chunks:  # at most max_chunks at any token count
            router.MAX_CHUNKS, router.WIDE_SPLIT_TOKENS = max_chunks, x.shape[0]
        try:
            return router_topk(x, w, cfg.top_k, cfg.renormalize, routing=cfg.routing, correction_bias=correction,
                               n_group=cfg.n_group, topk_group=cfg.topk_group,
                               scaling=cfg.routed_scaling_factor, **setting)
        finally:
            router.MAX_CHUNKS, router.WIDE_SPLIT_TOKENS = kept
    return call


def replay_us(call) -> float:
    """Median µs a call over ROUNDS replays of a graph of CALLS calls."""
    call()  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            call()
    graph.replay()
    times = []
    for _ in range(ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", nargs="+", default=["qwen3_30b_a3b", "deepseek_v3"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 128])
    p.add_argument("--chunks", type=int, nargs="*", default=[], help="also split into at most these K chunks")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(5)
    rows = []
    for name in args.preset:
        cfg = fm.preset(name)
        E, H = cfg.num_experts, cfg.hidden_size
        w = (torch.randn(E, H, generator=gen) / H**0.5).to("cuda", cfg.weight_dtype("router_weight"))
        correction = (torch.rand(E, generator=gen) / 4).cuda() if cfg.routing == "sigmoid_grouped" else None
        for tokens in args.tokens:
            x = torch.randn(tokens, H, generator=gen).to("cuda", cfg.torch_dtype)
            ref = router_call(cfg, x, w, correction, **settings(E, [])["whole"])()[1]
            for label, setting in settings(E, args.chunks).items():
                same = torch.equal(router_call(cfg, x, w, correction, **setting)()[1], ref)
                row = {"preset": name, "tokens": tokens, "setting": label, "us": round(replay_us(
                    router_call(cfg, x, w, correction, **setting)), 2), "same_experts": same}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "commit": os.environ.get("FLASHMOE_COMMIT", "unknown"), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
