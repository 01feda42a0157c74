"""GPU correctness of backend="flash" against the reference; run one process per GPU:

    bash launch/torchrun.sh tests/gpu/check_flash.py [--calls 1000] [--transport nvshmem] [--out results.json]

Every case: fresh random inputs, uneven token counts (one rank with none), relative error against
the float32 reference (max over ranks; NaN counts as inf); the CUDA-graph case's outputs are
poisoned first (the others are the layer's own new tensors). Exit code 1 if any case fails."""

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist

import flashmoe_py as fm
from flashmoe_py import MoEConfig, MoELayer, reference_forward
from flashmoe_py.reference import reference_routing
from flashmoe_py.kernels.layout import heap_bytes_for
from flashmoe_py.runtime import detect_launcher

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from grad_reference import routed_otherwise  # noqa: E402

TOL = {"bfloat16": 1e-2, "float32": 1e-4}
# one token's row, routed as the reference routed it (worst_row): bf16 rows of backend torch on the
# CPU reach ~6.4e-3 (2,048 tokens, three configs, six seeds); a wrong row is off by ~1
ROW_TOL = {"bfloat16": 5e-2, "float32": 1e-3}
TRANSPORT = "p2p"  # --transport


def rel_err(out, ref):
    """-> the relative error, inf where it is NaN (an output left unwritten, still NaN-poisoned, must
    fail the case: max() would skip a NaN)."""
    err = float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
    return math.inf if math.isnan(err) else err


def max_all(v: float) -> float:
    t = torch.tensor([v], device="cuda", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def skew(layer, hot):
    with torch.no_grad():
        layer.router_weight.mul_(0.01)
        for j, e in enumerate(hot):
            layer.router_weight[e] = (20.0 - j) / layer.config.hidden_size


def tokens_for(rank, world, max_tokens, gen):
    if rank == world - 1 and world > 1:
        return 0  # a rank with no tokens
    return int(torch.randint(1, max_tokens + 1, (1,), generator=gen))


def routed_otherwise_mask(layer, x, full) -> torch.Tensor:
    """bool [T]: the tokens of x [T, H] whose experts the layer's router (the router kernel, on
    GPUs) chose otherwise than the float32 reference's routing (near ties)."""
    with torch.no_grad():
        _, experts, _ = reference_routing(x, full["router_weight"], layer.config,
                                          router_bias=full.get("router_bias"),
                                          e_score_correction_bias=full.get("e_score_correction_bias"))
    return routed_otherwise(layer, x, experts)[1]


def worst_row(out, ref, otherwise) -> float:
    """The largest relative error of one row (token) of out [T, H] against ref, over the rows
    routed as the reference routed them (not otherwise [T]): a norm over all T rows hides one
    wrong row at large T (at 16,384 tokens a zeroed row adds ~0.008 to it, under the bf16 bar)."""
    same = ~otherwise.to(out.device)
    if not same.any():
        return 0.0
    o, r = out[same].float(), ref[same].float()
    if not o.isfinite().all():
        return math.inf
    return float(((o - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-30)).max())


def run_case(name, cfg, max_tokens, rank, world, hot=None, calls=1, override=None):
    seed = random.SystemRandom().randrange(2**31)
    seed = int(max_all(seed))  # the same weights on every rank
    layer = MoELayer(cfg, backend="flash", max_tokens_per_rank=max_tokens, seed=seed, transport=TRANSPORT,
                     launch_override=override)
    if hot is not None:
        skew(layer, hot)
    full = layer.full_weight_dict()
    gen = torch.Generator().manual_seed(seed + 7919 * (rank + 1))
    worst, worst_call, dropped, row_worst, t0 = 0.0, {}, 0, 0.0, time.perf_counter()
    for call in range(calls):
        T = tokens_for(rank, world, max_tokens, gen) if calls == 1 or call % 3 else max_tokens
        x = torch.randn(T, cfg.hidden_size, generator=gen).to("cuda", cfg.torch_dtype)
        if hot is not None:
            x = x.abs() + 0.1
        out = layer(x)
        dropped += int(layer.last_stats.dropped_slots)
        ref = reference_forward(x, config=cfg, **full)
        if T:
            err = rel_err(out, ref) if out.isfinite().all() else math.inf
            otherwise = routed_otherwise_mask(layer, x, full)
            if cfg.capacity_factor is None:  # (under capacity one near tie moves other tokens' drops too)
                row_worst = max(row_worst, worst_row(out, ref, otherwise))
            if err >= worst:
                worst_call = {"rel_err": err, "tokens": T, "tokens_routed_otherwise": int(otherwise.sum())}
                worst = err
    layer.synchronize()
    err = max_all(worst)
    row_worst = max_all(row_worst)
    # a split asked for (f_split) must have happened: GEMM2 tiles whose parts took tickets, any call
    split = None
    if (override or {}).get("f_split", 1) > 1:
        split = int(max_all(float(((layer.backend.ws.scratch.out_tickets >> 8) > 0).sum())))
    # with a capacity, over 10 calls or more some slot must have been dropped (a single call drops
    # none 2.5-4% of the time at capacity 1.0): else the drop path went untested. Any rank's.
    dropped = int(max_all(float(dropped)))
    drops_seen = cfg.capacity_factor is None or calls < 10 or dropped > 0
    layer.backend.close()
    # worst_call: this rank's worst call, its error, its tokens and how many of them the layer's
    # router sent to other experts than the reference's (near ties: such a token's output takes
    # another expert's part; under capacity other tokens' drops can change too)
    row = {"case": name, "transport": TRANSPORT, "config": cfg.to_dict(), "max_tokens": max_tokens, "world": world,
           "calls": calls, "rel_err": err, "worst_row_rel_err": row_worst,
           "ok": err <= TOL[cfg.dtype] and row_worst <= ROW_TOL[cfg.dtype] and split != 0 and drops_seen,
           "seed": seed, "dropped_slots_max_rank": dropped,
           "worst_call_rank0": worst_call, "seconds": round(time.perf_counter() - t0, 2)}
    if override:
        row["launch_override"] = override
    if split is not None:
        row["split_tiles"] = split
    if rank == 0:
        print(json.dumps(row), flush=True)
    return row


def run_graph_case(cfg, tokens, rank, world, replays=5):
    """The forward captured once in a CUDA graph, replayed on fresh inputs copied into its input."""
    seed = int(max_all(random.SystemRandom().randrange(2**31)))
    layer = MoELayer(cfg, backend="flash", max_tokens_per_rank=tokens, seed=seed, transport=TRANSPORT)
    full = layer.full_weight_dict()
    gen = torch.Generator().manual_seed(seed + rank)
    static = torch.randn(tokens, cfg.hidden_size, generator=gen).to("cuda", cfg.torch_dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(static)
    worst = 0.0
    for _ in range(replays):
        static.copy_(torch.randn(tokens, cfg.hidden_size, generator=gen).to("cuda", cfg.torch_dtype))
        out.fill_(float("nan"))
        graph.replay()
        worst = max(worst, rel_err(out, reference_forward(static, config=cfg, **full)))
    layer.synchronize()
    err = max_all(worst)
    layer.backend.close()
    row = {"case": f"cuda graph x{replays} replays", "transport": TRANSPORT, "config": cfg.to_dict(),
           "max_tokens": tokens,
           "world": world, "calls": replays, "rel_err": err, "ok": err <= TOL[cfg.dtype], "seed": seed}
    if rank == 0:
        print(json.dumps(row), flush=True)
    return row


def run_own_graph_case(cfg, tokens, rank, world, name):
    """The layer's own CUDA graph (captured at its second call of a token count), replayed on x
    wherever it lies: new tensors, a view at a 16-byte offset into a larger one, one at a 2-byte
    offset (read from an aligned copy) and a strided one; each call's output a tensor of its own,
    unchanged by the calls after it."""
    seed = int(max_all(random.SystemRandom().randrange(2**31)))
    layer = MoELayer(cfg, backend="flash", max_tokens_per_rank=tokens, seed=seed, transport=TRANSPORT)
    full = layer.full_weight_dict()
    gen = torch.Generator().manual_seed(seed + rank)
    H = cfg.hidden_size

    def draw():
        return torch.randn(tokens, H, generator=gen).to("cuda", cfg.torch_dtype)

    big = torch.randn(tokens * H + 64, generator=gen).to("cuda", cfg.torch_dtype)
    xs = [draw(), draw(), draw(), big[8:8 + tokens * H].view(tokens, H), big[1:1 + tokens * H].view(tokens, H),
          torch.randn(H, tokens, generator=gen).to("cuda", cfg.torch_dtype).t(), draw()]
    kept = []
    worst = 0.0
    for x in xs:
        out = layer(x)
        worst = max(worst, rel_err(out, reference_forward(x, config=cfg, **full)))
        kept.append((out, out.clone()))
    layer.synchronize()
    changed = sum(not torch.equal(out, copy) for out, copy in kept)  # a later call wrote an earlier output
    graphs = len(layer.backend.graphs)
    err = max_all(worst)
    ok = err <= TOL[cfg.dtype] and max_all(float(changed)) == 0 and graphs == 1
    layer.backend.close()
    row = {"case": name, "transport": TRANSPORT, "config": cfg.to_dict(), "max_tokens": tokens, "world": world,
           "calls": len(xs), "rel_err": err, "outputs_overwritten": changed, "graphs": graphs, "ok": ok,
           "seed": seed}
    if rank == 0:
        print(json.dumps(row), flush=True)
    return row


def main():
    torch.set_grad_enabled(False)  # inference checks: no graph, nothing saved for a backward
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--presets", action="store_true", help="also the full-size model presets")
    p.add_argument("--transport", default="p2p", choices=["p2p", "nvshmem"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    global TRANSPORT
    TRANSPORT = args.transport
    world = detect_launcher().world_size
    E = 4 * world
    small = dict(hidden_size=256, ffn_size=384, num_experts=E)
    cases = [
        ("fp32 swiglu k2", MoEConfig(**small, top_k=2, dtype="float32"), 100, None),
        ("fp32 gelu k1", MoEConfig(**small, top_k=1, activation="gelu", dtype="float32"), 77, None),
        ("fp32 relu k8", MoEConfig(**{**small, "num_experts": 8 * world}, top_k=8, activation="relu",
                                   dtype="float32"), 64, None),
        ("bf16 swiglu k4 odd shapes", MoEConfig(hidden_size=200, ffn_size=136, num_experts=E, top_k=4),
         150, None),
        ("bf16 skewed to one expert k1", MoEConfig(**small, top_k=1), 300, [E - 1]),
        ("bf16 skewed k2", MoEConfig(**small, top_k=2), 300, [E - 1, 0]),
        ("bf16 capacity 1.0", MoEConfig(**small, top_k=2, capacity_factor=1.0), 128, None),
        ("bf16 topk_softmax, router bias, k4", MoEConfig(**small, top_k=4, routing="topk_softmax", router_bias=True),
         128, None),
        ("bf16 sigmoid_grouped, fp32 router, 2 of 4 groups, k4",
         MoEConfig(**{**small, "num_experts": 8 * world}, top_k=4, routing="sigmoid_grouped", n_group=4,
                   topk_group=2, routed_scaling_factor=2.5, router_dtype="float32"), 128, None),
        ("bf16 topk_sigmoid k1", MoEConfig(**small, top_k=1, routing="topk_sigmoid", renormalize=False), 128, None),
        ("bf16 k10 of 16 per rank", MoEConfig(**{**small, "num_experts": 16 * world}, top_k=10), 64, None),
        ("bf16 gated shared expert 200 wide (gate/up pairs of 8), expert biases, k2",
         MoEConfig(**small, top_k=2, expert_bias=True, shared_experts=1, shared_ffn_size=200,
                   shared_expert_gate=True), 128, None),
    ]
    if args.presets:
        cases += [(n, fm.preset(n), t, None) for n, t in
                  [("mixtral_8x7b", 1024), ("qwen3_30b_a3b", 2048), ("gpt_oss_120b", 2048), ("deepseek_v3", 16384)]]
    # Experts narrower than hidden at 128 rows per expert: the back-to-back calls run with half the
    # programs dispatching while the rest compute (backends/flash.py picks that split).
    soak = MoEConfig(**{**small, "ffn_size": 128}, top_k=2)
    rt = fm.init(heap_bytes=max(heap_bytes_for(c, world, t, TRANSPORT) for _, c, t, _ in cases))
    rank = rt.rank
    rows = [run_case(n, c, t, rank, world, hot) for n, c, t, hot in cases]
    # GEMM2 tiles split over the FFN in parts at few tokens (LaunchConfig.f_split, which only a
    # launch_override asks for so far): 8 and 5 f-tiles, 1-16 tokens a call; each case also fails
    # unless some tile was split
    rows += [run_case("bf16 swiglu k2, GEMM2 split in up to 8 parts", MoEConfig(**{**small, "ffn_size": 1024}, top_k=2),
                      8, rank, world, calls=60, override={"f_split": 8}),
             run_case("fp32 clamped_swiglu, expert biases, k4, GEMM2 split in up to 4 parts",
                      MoEConfig(**{**small, "ffn_size": 640}, top_k=4, activation="clamped_swiglu", expert_bias=True,
                                dtype="float32"), 16, rank, world, calls=30, override={"f_split": 4})]
    if world == 1:  # token rows copied into expert order before the launch (sorted_rows: world 1 only)
        rows += [run_case("bf16 swiglu k2, rows in expert order (sorted_rows)", MoEConfig(**small, top_k=2), 300, rank,
                          world, calls=30, override={"sorted_rows": 1}),
                 run_case("bf16 skewed k2, rows in expert order (sorted_rows)", MoEConfig(**small, top_k=2), 300, rank,
                          world, hot=[E - 1, 0], override={"sorted_rows": 1}),
                 run_case("fp32 clamped_swiglu, biases, weight on input, capacity 1.0, rows in expert order",
                          MoEConfig(**small, top_k=1, activation="clamped_swiglu", expert_bias=True,
                                    weight_on_input=True, capacity_factor=1.0, dtype="float32"),
                          200, rank, world, calls=30, override={"sorted_rows": 1}),
                 # top-1: GEMM2 tiles store into the output, no combine tasks (direct_out: world 1 only, where
                 # choose_launch takes it for every top-1 layer without shared experts), and the combine it replaces
                 run_case("bf16 swiglu k1, rows stored into the output (direct_out)", MoEConfig(**small, top_k=1), 300,
                          rank, world, calls=30, override={"direct_out": 1}),
                 run_case("bf16 swiglu k1, through the combine (direct_out=0)", MoEConfig(**small, top_k=1), 300,
                          rank, world, calls=30, override={"direct_out": 0}),
                 run_case("fp32 clamped_swiglu, biases, weight on input, capacity 0.7, direct_out and sorted_rows",
                          MoEConfig(**small, top_k=1, activation="clamped_swiglu", expert_bias=True,
                                    weight_on_input=True, capacity_factor=0.7, dtype="float32"),
                          200, rank, world, calls=30, override={"direct_out": 1, "sorted_rows": 1})]
    rows.append(run_graph_case(soak, 200, rank, world))
    rows += [run_own_graph_case(soak, 200, rank, world, "the layer's graph on x wherever it lies"),
             run_own_graph_case(MoEConfig(**small, top_k=1, capacity_factor=0.7), 200, rank, world,
                                "the layer's graph on x wherever it lies, top-1, capacity 0.7")]
    if args.calls:
        rows.append(run_case(f"back-to-back x{args.calls}", soak, 256, rank, world, calls=args.calls))
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "world": world, "rows": rows}, f, indent=1)
    fm.finalize()
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
