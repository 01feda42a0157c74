"""GPU gradients of MoELayer against autograd through the reference, for backend "torch" (NCCL,
routing in torch ops while a graph is recorded; backwards "autograd" and "saved") and backend
"flash" (the fused forward, then backward="saved", which reads the GEMM1 outputs the kernel
kept, or "recompute": backends/explicit_backward.py); run one process per GPU:

    bash launch/torchrun.sh tests/gpu/check_backward.py [--presets] [--out results.json]

Every case: fresh random [batch, seq, H] inputs, uneven token counts (one rank with none when
there are several), every gradient (what each rank's must be: tests/grad_reference.py), against
float64. At world 1 also a training step captured whole in the caller's CUDA graph and replayed
on fresh inputs, and the captures its backward refuses (capacity, the fp32 per-expert products).
--presets (world 1): the full-size presets on backend flash, backward "saved" and
"recompute", against a float32 reference taken one expert at a time
(grad_reference.lean_grad_errors). Exit code 1 if any case fails."""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import flashmoe_py as fm
from flashmoe_py import MoEConfig, MoELayer
from flashmoe_py.kernels.layout import heap_bytes_for
from flashmoe_py.routing import route
from flashmoe_py.runtime import detect_launcher

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "bench"))
from grad_reference import grad_errors, lean_grad_errors  # noqa: E402
from seeds import same_seed  # noqa: E402
from layer import captured_graph, training_step  # noqa: E402  (bench/layer.py)

TOL = {"bfloat16": 1e-2, "float32": 1e-5}
FLASH_FP32_TOL = 1e-4  # a GPU kernel's bar (its forward is the fused kernel's)
PRESET_TOKENS = {"mixtral_8x7b": 1024, "qwen3_30b_a3b": 2048, "gpt_oss_120b": 2048, "deepseek_v3": 2048}
CASES = [  # (name, config overrides); hidden 64, ffn 96, 16 experts unless overridden
    ("fp32 swiglu top-2", dict(top_k=2)),
    ("fp32 gelu top-1, not renormalised", dict(top_k=1, activation="gelu", renormalize=False)),
    ("fp32 relu top-8, capacity 0.7", dict(top_k=8, activation="relu", capacity_factor=0.7)),
    ("fp32 swiglu top-4, 128 experts", dict(top_k=4, num_experts=128)),
    ("bf16 swiglu top-2", dict(top_k=2, dtype="bfloat16")),
    ("bf16 swiglu top-8, capacity 1.0", dict(top_k=8, dtype="bfloat16", capacity_factor=1.0)),
]


def make_layer(cfg: MoEConfig, backend: str, backward: str | None, seed: int, tokens: int) -> MoELayer:
    if backend == "flash":
        return MoELayer(cfg, backend="flash", seed=seed, max_tokens_per_rank=tokens, backward=backward)
    return MoELayer(cfg, backend="torch", seed=seed, backward=backward)


def case_config(overrides: dict) -> MoEConfig:
    return MoEConfig(**{"hidden_size": 64, "ffn_size": 96, "num_experts": 16, "dtype": "float32", **overrides})


def max_tokens(world: int) -> int:
    """The most tokens a rank passes in run_case (3 x (37 + 11 rank))."""
    return 3 * (37 + 11 * (world - 1))


def run_case(name, overrides, backend, backward, rank, world) -> dict:
    """Backend flash takes three steps at one token count, each on fresh inputs: the first
    launched, the second captured in a CUDA graph, the third replayed from it (a training forward
    of backward="saved" is replayed, what it saved lent out of the graph's buffers); then two
    forwards before their two backwards (the second replay must leave the first forward's saved
    outputs as they were). The worst error counts."""
    cfg = case_config(overrides)
    seed = same_seed()
    layer = make_layer(cfg, backend, backward, seed, max_tokens(world))
    g = torch.Generator().manual_seed(seed + 7919 * (rank + 1))
    seq = 0 if world > 1 and rank == world - 1 else 37 + 11 * rank
    errs: dict = {}

    def draw():
        x = torch.randn(3, seq, cfg.hidden_size, generator=g).to("cuda", cfg.torch_dtype).requires_grad_()
        return x, torch.randn(x.shape, generator=g).to("cuda", cfg.torch_dtype)

    def step(x, dy, y=None):
        layer.zero_grad(set_to_none=True)
        for n, e in grad_errors(layer, x, dy, y=y).items():
            errs[n] = e if errs.get(n) is None else errs[n] if e is None else max(errs[n], e)

    for _ in range(3 if backend == "flash" else 1):
        step(*draw())
    extra = {}
    if backend == "flash":
        inputs = [draw(), draw()]
        outputs = [layer(x) for x, _ in inputs]
        for (x, dy), y in zip(inputs, outputs):
            step(x, dy, y)
        extra["graphs_kept"] = len(layer.backend.graphs)  # recorded: whether the replays above were replays
    return finish(layer, name, backend, backward or layer.options.backward_for(backend), cfg, errs, **extra)


CAPTURED_CASES = [  # (name, config overrides): bf16, whose expert products torch._grouped_mm takes
    ("captured step: bf16 swiglu top-2", dict(top_k=2, dtype="bfloat16")),
    ("captured step: bf16 gelu top-8, 128 experts, biases", dict(top_k=8, num_experts=128, activation="gelu",
                                                                 dtype="bfloat16", expert_bias=True)),
    ("captured step: bf16 sigmoid_grouped, router bias, weight on input, gated shared expert",
     dict(top_k=2, routing="sigmoid_grouped", n_group=4, topk_group=2, router_bias=True, weight_on_input=True,
          shared_experts=1, shared_expert_gate=True, dtype="bfloat16")),
]
REFUSED_CASES = [  # (name, config overrides, what the error names)
    ("captured step refused: capacity", dict(top_k=2, dtype="bfloat16", capacity_factor=1.0), "capacity_factor"),
    ("captured step refused: fp32 per-expert products", dict(top_k=2), "per-expert products"),
]
CAPTURED_TOKENS = 96


def captured_step(layer: MoELayer, x: torch.Tensor, dy: torch.Tensor) -> torch.cuda.CUDAGraph:
    """A whole training step (grads cleared, then the backward of sum(layer(x) * dy)) captured in
    a CUDA graph, as a caller would, after two steps on a side stream to warm up (the benchmark's
    own capture, bench/layer.py)."""
    return captured_graph(training_step(layer, x, dy), warmups=2)


def run_captured(name: str, overrides: dict, backward: str) -> dict:
    """World 1: a training step captured whole in the caller's CUDA graph, then replayed on three
    fresh inputs copied into the captured x and dy (each routed otherwise than the captured one):
    every gradient the replay leaves in .grad against the reference, each time."""
    cfg = case_config(overrides)
    seed = same_seed()
    layer = make_layer(cfg, "flash", backward, seed, CAPTURED_TOKENS)
    g = torch.Generator().manual_seed(seed + 1)

    def draw():
        return (torch.randn(CAPTURED_TOKENS, cfg.hidden_size, generator=g).to("cuda", cfg.torch_dtype),
                torch.randn(CAPTURED_TOKENS, cfg.hidden_size, generator=g).to("cuda", cfg.torch_dtype))
    x0, dy = draw()
    x = x0.requires_grad_()
    graph = captured_step(layer, x, dy)
    errs: dict = {}
    for _ in range(3):
        fresh_x, fresh_dy = draw()
        with torch.no_grad():
            x.copy_(fresh_x)
            dy.copy_(fresh_dy)
        for n, e in grad_errors(layer, x, dy, step=graph.replay).items():
            errs[n] = e if errs.get(n) is None else errs[n] if e is None else max(errs[n], e)
    return finish(layer, name, "flash", backward, cfg, errs)


def run_refused(name: str, overrides: dict, names: str, backward: str) -> dict:
    """World 1: where the backward would synchronise with the host, capturing a training step
    raises a RuntimeError that says why (names) instead of breaking the capture."""
    cfg = case_config(overrides)
    layer = make_layer(cfg, "flash", backward, same_seed(), CAPTURED_TOKENS)
    x = torch.randn(CAPTURED_TOKENS, cfg.hidden_size, device="cuda", dtype=cfg.torch_dtype).requires_grad_()
    try:
        captured_step(layer, x, torch.randn_like(x))
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    layer.backend.close()
    torch.cuda.synchronize()
    return {"case": name, "backend": "flash", "backward": backward, "error": message[:300],
            "ok": "cannot be captured in a CUDA graph" in message and names in message}


def run_preset(name: str, backward: str, rank: int) -> dict:
    """A full-size preset on backend flash at world 1, bf16, with backward ("saved" or
    "recompute"), against the lean float32 reference."""
    cfg, tokens = fm.preset(name), PRESET_TOKENS[name]
    seed = same_seed()
    layer = make_layer(cfg, "flash", backward, seed, tokens)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, cfg.hidden_size, generator=g).to("cuda", cfg.torch_dtype).requires_grad_()
    dy = torch.randn(x.shape, generator=g).to("cuda", cfg.torch_dtype)
    start = time.perf_counter()
    report: dict = {}
    errs = lean_grad_errors(layer, x, dy, report=report)
    return finish(layer, f"preset {name}, {tokens} tokens", "flash", backward, cfg, errs,
                  seconds=round(time.perf_counter() - start, 1), **report)


def finish(layer, name, backend, backward, cfg, errs, **extra) -> dict:
    worst = torch.tensor([max(e for e in errs.values() if e is not None)], device="cuda", dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if backend == "flash":
        layer.backend.close()
    tol = FLASH_FP32_TOL if backend == "flash" and cfg.dtype == "float32" else TOL[cfg.dtype]
    return {"case": name, "backend": backend, "backward": backward, "dtype": cfg.dtype,
            "max_rel_err": float(worst), "ok": float(worst) <= tol, **errs, **extra}


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


def router_builds_agree(presets: list[str], draws: int = 16, tokens: int = 2048) -> dict:
    """The router kernel chooses the same experts and weights, bit for bit, with and without
    keep_logits (its SAVE_LOGITS build), and reading x through an address word (X_AT) or not:
    backward="recompute" routes x again with the logits kept after a forward that routed it
    through the layer's address word without them. Fresh random x and router weights, each
    preset's routing at full size."""
    differ = 0
    for name in presets:
        cfg = fm.preset(name)
        E, H = cfg.num_experts, cfg.hidden_size
        for _ in range(draws):
            x = torch.randn(tokens, H, device="cuda", dtype=cfg.torch_dtype)
            w = (torch.randn(E, H, device="cuda") / H**0.5).to(cfg.weight_dtype("router_weight"))
            biases = {"router_bias": (torch.randn(E, device="cuda").to(cfg.weight_dtype("router_bias"))
                                      if cfg.router_bias else None),
                      "e_score_correction_bias": (torch.randn(E, device="cuda") / 10
                                                  if cfg.routing == "sigmoid_grouped" else None)}
            word = torch.tensor([x.data_ptr()], device="cuda")
            stand_in = torch.full_like(x, float("nan"))
            plain = route(x, w, cfg, **biases)
            for other in (route(x, w, cfg, keep_logits=True, **biases), route(stand_in, w, cfg, x_at=word, **biases),
                          route(stand_in, w, cfg, keep_logits=True, x_at=word, **biases)):
                differ += int(((plain.experts != other.experts) | (plain.weights != other.weights)).any(1).sum())
    return {"case": "router kernel's choice with and without keep_logits and x through an address word",
            "ok": differ == 0,
            "tokens_differing": differ, "tokens": draws * tokens * len(presets)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", action="store_true", help="also the full-size presets (world 1, flash)")
    ap.add_argument("--out")
    args = ap.parse_args()
    world = detect_launcher().world_size
    presets = list(PRESET_TOKENS) if args.presets and world == 1 else []
    configs = [(fm.preset(n), PRESET_TOKENS[n]) for n in presets]
    configs += [(case_config(o), max_tokens(world)) for _, o in CASES]
    configs += [(case_config(c[1]), CAPTURED_TOKENS) for c in CAPTURED_CASES + REFUSED_CASES]
    rt = fm.init(heap_bytes=max(heap_bytes_for(c, world, t) for c, t in configs))
    rank = rt.rank
    runs = [("torch", "autograd"), ("torch", "saved"), ("flash", "saved"), ("flash", "recompute")]

    def done(r: dict) -> dict:  # printed as it comes: a run cut short keeps what it checked
        if rank == 0:
            print(("ok  " if r["ok"] else "FAIL"), r["case"], {k: v for k, v in r.items() if k not in ("case", "ok")},
                  flush=True)
        return r

    rows = [done(run_case(name, o, backend, backward, rank, world)) for backend, backward in runs
            for name, o in CASES]
    if world == 1:
        rows += [done(run_captured(name, o, b)) for b in ("saved", "recompute") for name, o in CAPTURED_CASES]
        rows += [done(run_refused(name, o, names, b)) for b in ("saved", "recompute")
                 for name, o, names in REFUSED_CASES]
    elif rank == 0:  # said, not left out silently: they run in a one-GPU call (backward1, PRESETS=1 for presets)
        print(f"world {world}: the captured-step, refused-capture and --presets cases run at world 1 only", flush=True)
    rows += [done(router_kernel_kept_for_inference(rank))]
    if presets:
        rows.append(done(router_builds_agree(presets)))
    rows += [done(run_preset(n, b, rank)) for b in ("saved", "recompute") for n in presets]
    if rank == 0:
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "world_size": world,
                           "world_1_only_cases_skipped": world > 1,
                           "commit": os.environ.get("FLASHMOE_COMMIT", "unknown"), "rows": rows}, f, indent=1)
    ok = all(r["ok"] for r in rows)
    fm.finalize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
