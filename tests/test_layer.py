"""MoELayer(backend="torch") against the float64 reference, on 1, 2 and 4 gloo ranks."""

import copy
import gc
import io
import os
import random
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from dist_pool import RankError
from seeds import fresh_seed
from flashmoe_py import ConsistencyError, ExpertPlacement, MoEConfig, MoELayer, preset, reference_forward
from flashmoe_py.backends import flash
from flashmoe_py.backends.flash import FlashBackend
from flashmoe_py.config import EXPERT_WEIGHTS
from flashmoe_py.gate_up import HALVES_VERSION, STATE_DICT_MARKER, to_halves
from flashmoe_py.heap import SymmetricHeap

FP32_TOL = 1e-5
BF16_TOL = 1e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def make_tokens(seed: int, rank: int, tokens: int, hidden: int, dtype, skewed=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    x = torch.randn(tokens, hidden, generator=g)
    return (x.abs() + 0.1 if skewed else x).to(dtype)


def skew_router(layer: MoELayer, hot: list[int]) -> None:
    """Route every (positive) token to the experts `hot`, first choice first."""
    with torch.no_grad():
        w = layer.router_weight
        w.mul_(0.01)
        for j, e in enumerate(hot):
            w[e] = (20.0 - j) / layer.config.hidden_size


# --- functions run on every rank of a DistPool: fn(rank, world_size, *args) ---

@torch.no_grad()
def layer_vs_reference(rank, world, cfg: dict, tokens_per_rank, seed, placement=None, hot=None):
    cfg = MoEConfig.from_dict(cfg)
    pl = ExpertPlacement.from_dict(placement) if placement else None
    layer = MoELayer(cfg, placement=pl, seed=seed)
    if hot is not None:
        skew_router(layer, hot)
    x = make_tokens(seed, rank, tokens_per_rank[rank], cfg.hidden_size, cfg.torch_dtype, hot is not None)
    out = torch.full_like(x, float("nan"))
    out.copy_(layer(x))
    full = layer.full_weights()
    ref = reference_forward(x, *full, cfg, compute_dtype=torch.float64)
    assert out.shape == x.shape and out.dtype == x.dtype
    return {"err": rel_err(out, ref) if x.shape[0] else float(out.numel()),
            "dropped": int(layer.last_stats.dropped_slots),
            "counts": layer.last_stats.expert_counts.tolist()}


@torch.no_grad()
def forward_3d(rank, world, cfg: dict, seed):
    cfg = MoEConfig.from_dict(cfg)
    layer = MoELayer(cfg, seed=seed)
    x = make_tokens(seed, rank, 2 * 5, cfg.hidden_size, cfg.torch_dtype).view(2, 5, -1)
    out = layer(x)
    ref = reference_forward(x.view(10, -1), *layer.full_weights(), cfg, torch.float64)
    return out.shape == x.shape, rel_err(out.view(10, -1), ref)


@torch.no_grad()
def bad_forward(rank, world, cfg: dict, bad_rank, kind):
    cfg = MoEConfig.from_dict(cfg)
    layer = MoELayer(cfg)
    x = make_tokens(1, rank, 6, cfg.hidden_size, cfg.torch_dtype)
    if kind == "dtensor":  # (every rank makes the mesh)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate
        mesh = init_device_mesh("cpu", (world,))
    if rank == bad_rank:
        x = {"hidden": lambda: make_tokens(1, rank, 6, cfg.hidden_size + 1, cfg.torch_dtype),
             "dtype": lambda: x.double(),
             "device": lambda: x.to("meta"),
             "rank1": lambda: x[0],
             "dtensor": lambda: DTensor.from_local(x, mesh, [Replicate()], run_check=False),
             "nested": lambda: torch.nested.nested_tensor([x[:2], x[2:]])}[kind]()
    layer(x)


def training_forward_of_an_inference_x(rank, world, cfg: dict, bad_rank, backward: str):
    """A training forward (and its backward), rank bad_rank's x made under torch.inference_mode."""
    cfg = MoEConfig.from_dict(cfg)
    layer = MoELayer(cfg, backward=backward)
    x = make_tokens(1, rank, 6, cfg.hidden_size, cfg.torch_dtype)
    if rank == bad_rank:
        with torch.inference_mode():
            x = x.clone()
    layer(x).sum().backward()


def build_layer(rank, world, cfgs: list, placements=None):
    cfg = MoEConfig.from_dict(cfgs[rank])
    pl = ExpertPlacement.from_dict(placements[rank]) if placements else None
    MoELayer(cfg, placement=pl)


# --- tests ---

SMALL = dict(hidden_size=32, ffn_size=48, num_experts=8, dtype="float32")


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("top_k", range(1, 9))
def test_matches_reference(dist_pools, world, activation, top_k):
    cfg = MoEConfig(**SMALL, top_k=top_k, activation=activation)
    tokens = [37, 5, 64, 1][:world]
    errs = [r["err"] for r in dist_pools(world).run(layer_vs_reference, cfg.to_dict(), tokens, fresh_seed())]
    assert max(errs) <= FP32_TOL, errs


@pytest.mark.parametrize("world", [2, 4])
def test_rank_with_zero_tokens(dist_pools, world):
    cfg = MoEConfig(**SMALL, top_k=2)
    tokens = [0] + [19] * (world - 1)
    res = dist_pools(world).run(layer_vs_reference, cfg.to_dict(), tokens, fresh_seed())
    assert res[0]["err"] == 0.0  # an empty output
    assert max(r["err"] for r in res[1:]) <= FP32_TOL


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("top_k", [1, 4])
def test_fully_skewed_routing(dist_pools, world, top_k):
    """Every token of every rank goes to the same top_k experts (all on the last rank)."""
    cfg = MoEConfig(**SMALL, top_k=top_k)
    hot = list(range(8 - top_k, 8))
    res = dist_pools(world).run(layer_vs_reference, cfg.to_dict(), [23, 40, 7, 16][:world],
                                fresh_seed(), None, hot)
    assert max(r["err"] for r in res) <= FP32_TOL
    for r, n in zip(res, [23, 40, 7, 16]):
        assert sum(r["counts"][e] for e in hot) == n * top_k


@pytest.mark.parametrize("policy", ["round_robin", "load_balanced"])
def test_other_placements_match_reference(dist_pools, policy):
    load = [random.random() ** 3 * 100 for _ in range(8)]
    pl = ExpertPlacement.build(policy, 8, 4, expert_load=load)
    cfg = MoEConfig(**SMALL, top_k=3)
    res = dist_pools(4).run(layer_vs_reference, cfg.to_dict(), [9, 33, 12, 20], fresh_seed(), pl.to_dict())
    assert max(r["err"] for r in res) <= FP32_TOL


def test_bf16_matches_reference(dist_pools):
    cfg = MoEConfig(**{**SMALL, "dtype": "bfloat16"}, top_k=2)
    res = dist_pools(2).run(layer_vs_reference, cfg.to_dict(), [50, 30], fresh_seed())
    assert max(r["err"] for r in res) <= BF16_TOL


@pytest.mark.parametrize("world", [1, 2])
def test_batch_seq_hidden_input(dist_pools, world):
    cfg = MoEConfig(**SMALL, top_k=2)
    for same_shape, err in dist_pools(world).run(forward_3d, cfg.to_dict(), fresh_seed()):
        assert same_shape and err <= FP32_TOL


@pytest.mark.parametrize("world", [1, 2, 4])
def test_capacity_drops_are_counted_exactly(dist_pools, world):
    """With a capacity factor, outputs still match the reference (which drops the same slots) and
    the dropped count equals the reference's."""
    cfg = MoEConfig(**SMALL, top_k=2, capacity_factor=0.5)
    hot = [6, 7]  # skewed, so the hot experts overflow
    tokens = [40, 12, 25, 8][:world]
    res = dist_pools(world).run(layer_vs_reference, cfg.to_dict(), tokens, fresh_seed(), None, hot)
    for r, n in zip(res, tokens):
        capacity = -(-n * 2 // 16)  # ceil(0.5 * n * 2 / 8)
        assert r["dropped"] == 2 * (n - capacity)
        assert r["err"] <= FP32_TOL


def test_dropless_never_drops(dist_pools):
    cfg = MoEConfig(**SMALL, top_k=2)
    res = dist_pools(2).run(layer_vs_reference, cfg.to_dict(), [64, 64], fresh_seed(), None, [7, 6])
    assert [r["dropped"] for r in res] == [0, 0]


@pytest.mark.parametrize("kind,field", [("hidden", "hidden_size"), ("dtype", "dtype"),
                                        ("device", "meta"), ("rank1", "shape"), ("dtensor", "x is a DTensor"),
                                        ("nested", "x is a nested tensor")])
def test_bad_input_raises_on_every_rank(dist_pools, kind, field):
    """nested: reading its shape raised torch's internal error on rank 0 alone, the other rank
    waiting until the group's timeout (a review's run)."""
    out = dist_pools(2).run_all(bad_forward, MoEConfig(**SMALL, top_k=2).to_dict(), 0, kind)
    (ok0, err0), (ok1, err1) = out
    assert not ok0 and err0[0] == "ValueError" and field in err0[1]
    assert not ok1 and err1[0] == "PeerInputError" and "rank(s) [0]" in err1[1]


@pytest.mark.parametrize("backward", ["autograd", "saved", "recompute"])
def test_an_x_made_under_inference_mode_is_refused_by_a_training_forward_on_every_rank(dist_pools, backward):
    """Every training forward saves x: torch raised "Inference tensors cannot be saved for
    backward" on that rank alone (autograd: at the router's product; saved and recompute: after the
    forward's all-to-alls, the other rank's backward waiting), the other rank waiting until the
    group's timeout (a review's runs)."""
    out = dist_pools(2).run_all(training_forward_of_an_inference_x, MoEConfig(**SMALL, top_k=2).to_dict(), 0,
                                backward)
    (ok0, err0), (ok1, err1) = out
    assert not ok0 and err0[0] == "ValueError" and "x was made under torch.inference_mode" in err0[1]
    assert not ok1 and err1[0] == "PeerInputError" and "rank(s) [0]" in err1[1]


@torch.no_grad()
def dropped_layer_is_freed(rank, world, cfg: dict):
    """A layer the caller lets go of is freed at once, without the garbage collector (its weights
    are GPU memory): -> whether it was."""
    import gc
    import weakref
    gc.disable()
    try:
        cfg = MoEConfig.from_dict(cfg)
        layer = MoELayer(cfg)
        layer(torch.randn(5, cfg.hidden_size))
        ref = weakref.ref(layer)
        del layer
        return ref() is None
    finally:
        gc.enable()


def test_a_dropped_layer_is_freed_without_the_garbage_collector(dist_pools):
    assert dist_pools(2).run(dropped_layer_is_freed, MoEConfig(**SMALL, top_k=2).to_dict()) == [True, True]


def test_bad_input_single_rank(dist_pools):
    with pytest.raises(RankError, match="hidden_size=32"):
        dist_pools(1).run(bad_forward, MoEConfig(**SMALL, top_k=2).to_dict(), 0, "hidden")


def test_experts_not_divisible_raises_on_every_rank(dist_pools):
    cfg = MoEConfig(hidden_size=16, ffn_size=16, num_experts=6, top_k=2).to_dict()
    out = dist_pools(4).run_all(build_layer, [cfg] * 4)
    assert all(not ok and "not divisible by world_size=4" in err[1] for ok, err in out)


def test_mismatched_config_raises_on_every_rank(dist_pools):
    a = MoEConfig(**SMALL, top_k=2).to_dict()
    b = MoEConfig(**SMALL, top_k=3).to_dict()
    out = dist_pools(2).run_all(build_layer, [a, b])
    for ok, err in out:
        assert not ok and err[0] == ConsistencyError.__name__ and "top_k" in err[1]


def test_mismatched_placement_raises_on_every_rank(dist_pools):
    cfg = MoEConfig(**SMALL, top_k=2).to_dict()
    pls = [ExpertPlacement.contiguous(8, 2).to_dict(), ExpertPlacement.round_robin(8, 2).to_dict()]
    out = dist_pools(2).run_all(build_layer, [cfg, cfg], pls)
    for ok, err in out:
        assert not ok and err[0] == ConsistencyError.__name__ and "placement" in err[1]


def test_load_full_weights_keeps_own_shard(dist_pools):
    res = dist_pools(2).run(load_and_gather, fresh_seed())
    assert all(res)


def load_and_gather(rank, world, seed):
    cfg = MoEConfig(**SMALL, top_k=2)
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(8, 32, generator=g), torch.randn(8, 32, 96, generator=g),
            torch.randn(8, 48, 32, generator=g))
    layer = MoELayer(cfg, placement=ExpertPlacement.round_robin(8, world))
    layer.load_full_weights(*full)
    assert torch.equal(to_halves(layer.w_in[1]), full[1][2 + rank])  # round robin: slot 1 holds expert world + rank
    return all(torch.equal(a, b) for a, b in zip(layer.full_weights(), full))


def test_state_from_full_is_the_state_dict_load_full_weights_leaves(dist_pools):
    """MoELayer.state_from_full(full, layout): this rank's state_dict for the full weights, without
    loading them (hf.py converts a transformers checkpoint with it, on each rank alone); a layer
    loading it holds what load_full_weights(**full) gives, in either gate/up layout."""
    assert all(dist_pools(2).run(state_from_full_and_loaded, fresh_seed()))


def state_from_full_and_loaded(rank, world, seed):
    cfg = MoEConfig(**SMALL, top_k=2)
    g = torch.Generator().manual_seed(seed)
    full = {"router_weight": torch.randn(8, 32, generator=g), "w_in": torch.randn(8, 32, 96, generator=g),
            "w_out": torch.randn(8, 48, 32, generator=g)}
    same = []
    for layout in ("halves", "interleaved"):
        loaded, taken = (MoELayer(cfg, placement=ExpertPlacement.round_robin(8, world)) for _ in range(2))
        loaded.load_full_weights(**full, gate_up_layout=layout)
        before = {k: t.clone() for k, t in taken.state_dict().items()}
        state = taken.state_from_full(full, layout)
        same.append(all(torch.equal(t, before[k]) for k, t in taken.state_dict().items()))  # nothing loaded
        taken.load_state_dict(state)
        same.append(all(torch.equal(t, loaded.state_dict()[k]) for k, t in taken.state_dict().items()))
    with pytest.raises(ValueError, match=r"\['w_mid'\] are not weights of a layer"):
        taken.state_from_full({**full, "w_mid": full["w_out"]})
    with pytest.raises(ValueError, match="w_out is missing"):
        taken.state_from_full({k: t for k, t in full.items() if k != "w_out"})
    return all(same)


def test_load_full_weights_checks_shapes():
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    with pytest.raises(ValueError, match="w_out has shape"):
        layer.load_full_weights(torch.zeros(8, 32), torch.zeros(8, 32, 96), torch.zeros(8, 32, 48))


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend='cuda_magic'"):
        MoELayer(MoEConfig(**SMALL, top_k=2), backend="cuda_magic")


def test_unknown_transport_is_named():
    with pytest.raises(ValueError, match="transport='ib' is not available; choose one of"):
        MoELayer(MoEConfig(**SMALL, top_k=2), transport="ib")


@pytest.mark.parametrize("timeout_s", [0, -1.0, float("inf"), float("nan"), "10", None, 86_401, 1e300])
def test_fused_timeout_must_be_positive_seconds_up_to_a_day(timeout_s):
    """(the kernel counts it in int64 nanoseconds: 1e300 failed at the first launch, past ~9.2e9 s
    it wrapped)"""
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds up to 86400"):
        MoELayer(MoEConfig(**SMALL, top_k=2), backend="flash", max_tokens_per_rank=8, timeout_s=timeout_s)


def test_eight_ranks_match_reference(dist_pools):
    """Nothing assumes at most 4 ranks: 8 gloo ranks, one with no tokens, 16 experts, top-4."""
    cfg = MoEConfig(**{**SMALL, "num_experts": 16}, top_k=4)
    tokens = [11, 0, 23, 5, 40, 1, 17, 9]
    res = dist_pools(8).run(layer_vs_reference, cfg.to_dict(), tokens, fresh_seed())
    assert max(r["err"] for i, r in enumerate(res) if tokens[i]) <= FP32_TOL


@torch.no_grad()
def nan_forward(rank, world, cfg: dict):
    layer = MoELayer(MoEConfig.from_dict(cfg))
    x = make_tokens(2, rank, 8, 32, torch.float32)
    x[3, 5] = float("nan")
    x[6, 0] = float("inf")
    out = layer(x)
    finite_rows = [t for t in range(8) if t not in (3, 6)]
    return bool(out[3].isnan().all()), bool(out[6].isfinite().any()), bool(out[finite_rows].isfinite().all())


def test_nan_and_inf_propagate_without_hanging(dist_pools):
    """A NaN/Inf token poisons its own output row (and nothing else); every rank completes."""
    for nan_row, inf_row_finite, others_finite in dist_pools(2).run(nan_forward,
                                                                    MoEConfig(**SMALL, top_k=2).to_dict()):
        assert nan_row and not inf_row_finite and others_finite


def test_non_contiguous_input_is_accepted():
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    x = torch.randn(10, 64)[:, ::2]  # strided: [10, 32], not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()))


@pytest.mark.parametrize("backend", ["torch", "flash"])
@pytest.mark.parametrize("max_tokens", [0, -4, 2.5, True])
def test_max_tokens_per_rank_must_be_a_positive_int_on_every_backend(backend, max_tokens):
    with pytest.raises(ValueError, match="max_tokens_per_rank must be a positive int"):
        MoELayer(MoEConfig(**SMALL, top_k=2), backend=backend, max_tokens_per_rank=max_tokens)


def test_torch_backend_refuses_a_bad_timeout_too():
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds up to"):
        MoELayer(MoEConfig(**SMALL, top_k=2), timeout_s=-1.0)


def test_torch_backend_enforces_max_tokens_per_rank():
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), max_tokens_per_rank=4)
    with torch.no_grad(), pytest.raises(ValueError, match="x has 5 tokens; max_tokens_per_rank=4"):
        layer(torch.randn(5, 32))


def build_with_timeout(rank, world, cfg: dict):
    MoELayer(MoEConfig.from_dict(cfg), timeout_s=5.0 + rank)


def test_layer_options_must_agree_across_ranks(dist_pools):
    out = dist_pools(2).run_all(build_with_timeout, MoEConfig(**SMALL, top_k=2).to_dict())
    assert all(not ok and err[0] == "ConsistencyError" and "options.timeout_s differs" in err[1] for ok, err in out)


def build_with_bad_timeout_on_rank_1(rank, world, cfg: dict):
    MoELayer(MoEConfig.from_dict(cfg), timeout_s=-1.0 if rank == 1 else 10.0)


def test_a_bad_option_on_one_rank_is_named_there_and_on_the_others(dist_pools):
    """The rejecting rank raises its own error, naming the argument (it raised the ranks'
    mismatch of its options, None against the others', which named nothing); the others say
    which rank rejected the layer and why."""
    out = dist_pools(2).run_all(build_with_bad_timeout_on_rank_1, MoEConfig(**SMALL, top_k=2).to_dict())
    (ok0, err0), (ok1, err1) = out
    assert not ok0 and err0[0] == "ConsistencyError" and "rank 1 rejected the layer: timeout_s" in err0[1], out
    assert not ok1 and err1[0] == "ValueError" and "timeout_s must be a positive" in err1[1], out


def test_fused_backend_needs_16_byte_weight_rows():
    with pytest.raises(ValueError, match="hidden_size, ffn_size and the shared experts' width in multiples of 8"):
        MoELayer(MoEConfig(hidden_size=36, ffn_size=48, num_experts=4, top_k=2), backend="flash", max_tokens_per_rank=8)


# --- routing modes, expert variants and shared experts (MoEConfig documents each) ---

VARIANTS = {
    "topk_softmax, router bias": dict(top_k=2, routing="topk_softmax", router_bias=True),
    "sigmoid_grouped, 2 of 4 groups, scaled": dict(top_k=3, routing="sigmoid_grouped", n_group=4, topk_group=2,
                                                   routed_scaling_factor=2.5),
    "sigmoid_grouped, one group, shared expert": dict(top_k=2, routing="sigmoid_grouped", shared_experts=1),
    "topk_sigmoid, weight on input, shared expert": dict(top_k=1, routing="topk_sigmoid", renormalize=False,
                                                         weight_on_input=True, shared_experts=1),
    "clamped_swiglu, expert biases": dict(top_k=2, activation="clamped_swiglu", swiglu_limit=1.0,
                                          expert_bias=True),
    "relu, two gated shared experts": dict(top_k=2, activation="relu", shared_experts=2, shared_ffn_size=16,
                                           shared_expert_gate=True),
    "grouped, capacity, biases": dict(top_k=2, routing="sigmoid_grouped", n_group=2, topk_group=1,
                                      capacity_factor=0.5, expert_bias=True),
    "top-10 of 16": dict(top_k=10, num_experts=16),
}


@torch.no_grad()
def variant_vs_reference(rank, world, cfg: dict, tokens_per_rank, seed, placement=None):
    """Like layer_vs_reference, with every weight the config has handed to the reference."""
    cfg = MoEConfig.from_dict(cfg)
    layer = MoELayer(cfg, placement=ExpertPlacement.from_dict(placement) if placement else None, seed=seed)
    x = make_tokens(seed, rank, tokens_per_rank[rank], cfg.hidden_size, cfg.torch_dtype)
    out = layer(x)
    ref = reference_forward(x, config=cfg, compute_dtype=torch.float64, **layer.full_weight_dict())
    return rel_err(out, ref) if x.shape[0] else float(out.numel())


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_match_reference(dist_pools, world, variant):
    cfg = MoEConfig(**{**SMALL, **VARIANTS[variant]})
    errs = dist_pools(world).run(variant_vs_reference, cfg.to_dict(), [29, 0, 41, 6][:world], fresh_seed())
    assert max(errs) <= FP32_TOL, errs


def test_variants_with_round_robin_placement(dist_pools):
    cfg = MoEConfig(**SMALL, top_k=2, routing="topk_softmax", router_bias=True, expert_bias=True,
                    activation="clamped_swiglu", shared_experts=1)
    pl = ExpertPlacement.round_robin(8, 4).to_dict()
    errs = dist_pools(4).run(variant_vs_reference, cfg.to_dict(), [9, 33, 12, 20], fresh_seed(), pl)
    assert max(errs) <= FP32_TOL


def test_float32_router_in_a_bf16_layer(dist_pools):
    """DeepSeek-V3's router stays in float32 while its experts are bf16."""
    cfg = MoEConfig(**{**SMALL, "dtype": "bfloat16"}, top_k=2, routing="sigmoid_grouped", router_dtype="float32",
                    shared_experts=1)
    errs = dist_pools(2).run(variant_vs_reference, cfg.to_dict(), [50, 30], fresh_seed())
    assert max(errs) <= BF16_TOL


def test_router_weights_keep_the_router_dtype():
    layer = MoELayer(MoEConfig(**{**SMALL, "dtype": "bfloat16"}, top_k=2, routing="topk_softmax",
                               router_bias=True, router_dtype="float32", expert_bias=True))
    assert layer.router_weight.dtype == layer.router_bias.dtype == torch.float32
    assert layer.w_in.dtype == layer.bias_in.dtype == torch.bfloat16


@pytest.mark.parametrize("backward", ["autograd", "saved", "recompute"])
def test_under_autocast_the_layer_computes_in_its_own_dtype_and_says_so_when_x_differs(backward):
    """torch.autocast does not reach the layer, forward or backward: a float32 layer under a
    bfloat16 autocast gives what it gives without (backend torch's matmuls, the router's among
    them, would otherwise run in bfloat16), and a bfloat16 x (a Linear's output there) is refused,
    naming autocast."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=1, backward=backward)
    x = make_tokens(fresh_seed(), 0, 6, 32, torch.float32).requires_grad_()
    got = {}
    # backward outside autocast, as torch's documentation says; the explicit backwards also inside
    for when in ("off", "forward", "forward_and_backward")[:2 if backward == "autograd" else 3]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=when != "off"):
            out = layer(x)
            if when == "forward_and_backward":
                out.square().sum().backward()
        if when != "forward_and_backward":
            out.square().sum().backward()
        got[when] = [out.detach(), x.grad, *(p.grad for p in layer.parameters())]
        x.grad = None
        layer.zero_grad()
    want = got.pop("off")
    for when, tensors in got.items():
        assert tensors[0].dtype == torch.float32
        assert all(torch.equal(a, b) for a, b in zip(tensors, want, strict=True)), when
    for forward in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):  # compiled: said too
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
                ValueError, match=r"x has dtype torch.bfloat16; the layer's dtype is torch.float32 \(the layer does "
                                  "not follow torch.autocast"):
            forward(x.bfloat16())


def load_a_dtensor_weight_on_rank_1(rank, world, seed):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate
    mesh = init_device_mesh("cpu", (world,))
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=seed)
    weights = layer.full_weight_dict()
    if rank == 1:
        weights["w_out"] = DTensor.from_local(weights["w_out"], mesh, [Replicate()], run_check=False)
    layer.load_full_weights(**weights)


def test_a_dtensor_weight_is_refused_on_every_rank_before_any_is_copied(dist_pools):
    """load_full_weights took a DTensor w_out on one rank past its checks: that rank failed indexing
    it after the router's and w_in's copies, and the other waited in the replicas' comparison
    until the process group's timeout."""
    (ok0, err0), (ok1, err1) = dist_pools(2).run_all(load_a_dtensor_weight_on_rank_1, fresh_seed())
    assert not ok1 and err1[0] == "ValueError" and "w_out is a DTensor" in err1[1]
    assert not ok0 and err0[0] == "ConsistencyError" and "w_out is a DTensor" in err0[1]


def full_weights_asked_otherwise_on_rank_1(rank, world, seed, how):
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=seed)
    asked = {"bad device": {"device": "gpu"}, "unusable device": {"device": "cuda:99"}, "dst": {"dst": 0},
             "device": {"device": "meta"}}[how]  # ("cpu:0" is the layer's own device)
    layer.full_weight_dict(**(asked if rank == 1 else {}))


@pytest.mark.parametrize("how", ["bad device", "unusable device", "dst", "device"])
def test_full_weight_dict_asked_otherwise_on_one_rank_raises_on_every_rank(dist_pools, how):
    """A device torch cannot parse on one rank raised torch's bare error there while the other
    waited in its gather until the process group's timeout; one it parses but cannot use (a GPU
    this torch or machine lacks) raised torch's bare error (AssertionError on a CPU-only torch)
    at the first copy; a dst or a device given on one rank only took other collectives there (one
    a local expert) and gloo aborted the process."""
    (ok0, err0), (ok1, err1) = dist_pools(2).run_all(full_weights_asked_otherwise_on_rank_1, fresh_seed(), how)
    assert not ok0 and not ok1 and err0[0] == "ConsistencyError"
    if how.endswith("device") and how != "device":
        device = "gpu" if how == "bad device" else "cuda:99"
        assert err1[0] == "ValueError" and f"device='{device}' cannot be used here" in err1[1], err1
    else:
        assert err1[0] == "ConsistencyError" and "the ranks' (dst, a gather per local expert) differ" in err1[1]


@pytest.mark.parametrize("bad, match", [
    ("x [5, 2H]", r"x has shape \(5, 64\)"), ("x 1-D", r"x has shape \(32,\)"), ("x int", "x must be a real"),
    ("x complex", "x must be a real"), ("compute_dtype str", "compute_dtype must be a floating-point torch.dtype"),
    ("router_weight int", "router_weight must be a real")])
def test_reference_forward_refuses_what_the_layer_refuses(bad, match):
    """The specification read a [5, 2H] x as 10 tokens and gave it back as [5, 2H], dropped a
    complex x's imaginary part, cast integer x and weights, and failed with torch's bare errors on
    a string compute_dtype."""
    cfg = MoEConfig(**SMALL, top_k=2)
    w = MoELayer(cfg, seed=fresh_seed()).full_weight_dict()
    x, dtype = torch.randn(5, SMALL["hidden_size"]), torch.float64
    x = {"x [5, 2H]": torch.randn(5, 2 * SMALL["hidden_size"]), "x 1-D": x[0], "x int": x.long(),
         "x complex": x.to(torch.complex64)}.get(bad, x)
    dtype = "float64" if bad == "compute_dtype str" else dtype
    if bad == "router_weight int":
        w["router_weight"] = w["router_weight"].long()
    with pytest.raises(ValueError, match=match):
        reference_forward(x, w.pop("router_weight"), w.pop("w_in"), w.pop("w_out"), cfg, dtype, **w)


@pytest.mark.parametrize("shape", [(8, 32, 95), (8, 32), ()])
def test_a_halves_checkpoint_of_another_shape_is_refused_naming_the_key(shape):
    """A checkpoint marked as halves converts its gated weights to pairs before load_state_dict's
    own shape check: a mis-shaped w_in failed inside the conversion with torch's bare error
    (unflatten's sizes, or an IndexError), naming no key."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=fresh_seed())
    state = layer.state_dict() | {"w_in": torch.randn(shape), STATE_DICT_MARKER: torch.tensor(HALVES_VERSION)}
    with pytest.raises(RuntimeError, match=r"size mismatch for w_in: copying a param with shape"):
        layer.load_state_dict(state)


@torch.no_grad()
def nan_forward_variant(rank, world, cfg: dict):
    layer = MoELayer(MoEConfig.from_dict(cfg))
    x = make_tokens(2, rank, 8, 32, torch.float32)
    x[3, 5] = float("nan")
    out = layer(x)
    return bool(out[3].isnan().all()), bool(out[[t for t in range(8) if t != 3]].isfinite().all())


@pytest.mark.parametrize("routing", ["topk_softmax", "sigmoid_grouped", "topk_sigmoid"])
def test_nan_token_poisons_its_row_only_in_every_routing(dist_pools, routing):
    cfg = MoEConfig(**SMALL, top_k=2, routing=routing, **({"n_group": 4, "topk_group": 2}
                                                          if routing == "sigmoid_grouped" else {}))
    for nan_row, others_finite in dist_pools(2).run(nan_forward_variant, cfg.to_dict()):
        assert nan_row and others_finite


def test_layer_holds_the_parameters_of_its_config():
    cfg = MoEConfig(**SMALL, top_k=2, routing="sigmoid_grouped", expert_bias=True, shared_experts=2,
                    shared_ffn_size=16, shared_expert_gate=True)
    layer = MoELayer(cfg)
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == {
        "router_weight": (8, 32), "w_in": (8, 32, 96), "w_out": (8, 48, 32), "bias_in": (8, 96), "bias_out": (8, 32),
        "shared_w_in": (32, 64), "shared_w_out": (32, 32), "shared_gate_weight": (1, 32)}
    assert layer.e_score_correction_bias.dtype == torch.float32 and "e_score_correction_bias" in layer.state_dict()
    assert layer.router_bias is None
    plain = MoELayer(MoEConfig(**SMALL, top_k=2))
    assert [n for n, _ in plain.named_parameters()] == ["router_weight", "w_in", "w_out"]


def test_fresh_draws_match_the_old_layers_for_todays_configs():
    """New parameters are drawn after the old ones, so a config without them gets the same layer."""
    cfg = MoEConfig(**SMALL, top_k=2)
    a, b = MoELayer(cfg, seed=5), MoELayer(cfg.replace(expert_bias=True, shared_experts=1), seed=5)
    for name in ("router_weight", "w_in", "w_out"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# --- full weights: every weight by name, and the rank checks of the replicated ones ---

def full_variant_weights(cfg: MoEConfig, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in cfg.weight_shapes().items()}


FULL = MoEConfig(**SMALL, top_k=2, routing="sigmoid_grouped", router_bias=True, expert_bias=True,
                 shared_experts=1, shared_expert_gate=True)


def load_and_gather_every_weight(rank, world, cfg: dict, seed):
    cfg = MoEConfig.from_dict(cfg)
    full = full_variant_weights(cfg, seed)
    layer = MoELayer(cfg, placement=ExpertPlacement.round_robin(8, world))
    layer.load_full_weights(**full)
    assert torch.equal(to_halves(layer.bias_in[1]), full["bias_in"][world + rank])  # slot 1 holds expert world + rank
    gathered = layer.full_weight_dict()
    return list(gathered) == list(full) and all(torch.equal(gathered[n], full[n]) for n in full)


def test_full_weight_dict_roundtrips_every_weight(dist_pools):
    assert dist_pools(2).run(load_and_gather_every_weight, FULL.to_dict(), fresh_seed()) == [True, True]


def test_interleaved_gate_up_columns_are_converted_when_loaded():
    """gpt-oss stores gate and up columns alternately; full_weight_dict gives gate | up halves."""
    cfg = MoEConfig(**SMALL, top_k=2, activation="clamped_swiglu", expert_bias=True, shared_experts=1)
    full = full_variant_weights(cfg, 0)
    layer = MoELayer(cfg)
    interleaved = {n: (torch.stack(t.chunk(2, dim=-1), dim=-1).flatten(-2) if n in ("w_in", "bias_in", "shared_w_in")
                       else t) for n, t in full.items()}
    assert torch.equal(interleaved["w_in"][..., 1], full["w_in"][..., 48])  # the first up column
    layer.load_full_weights(**interleaved, gate_up_layout="interleaved")
    assert all(torch.equal(layer.full_weight_dict()[n], full[n]) for n in full)


def test_gate_up_layout_is_checked():
    layer = MoELayer(MoEConfig(**SMALL, top_k=2, activation="gelu"))
    full = full_variant_weights(layer.config, 0)
    with pytest.raises(ValueError, match="gate_up_layout='interleaved' needs a gated activation"):
        layer.load_full_weights(**full, gate_up_layout="interleaved")
    with pytest.raises(ValueError, match="gate_up_layout='pairs'; choose one of"):
        layer.load_full_weights(**full, gate_up_layout="pairs")


def test_load_full_weights_names_a_numpy_argument():
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    full = full_variant_weights(layer.config, 0)
    with pytest.raises(TypeError, match="w_in must be a torch.Tensor, got ndarray"):
        layer.load_full_weights(full["router_weight"], full["w_in"].numpy(), full["w_out"])


def test_load_full_weights_names_a_missing_or_unexpected_weight():
    layer = MoELayer(FULL)
    full = full_variant_weights(FULL, 0)
    with pytest.raises(ValueError, match="shared_gate_weight is missing: this config has shared_expert_gate=True"):
        layer.load_full_weights(**{**full, "shared_gate_weight": None})
    plain = MoELayer(MoEConfig(**SMALL, top_k=2))
    with pytest.raises(ValueError, match="bias_out was given, but only a layer with expert_bias=True has it"):
        plain.load_full_weights(full["router_weight"], full["w_in"], full["w_out"], bias_out=full["bias_out"])


def test_reference_forward_takes_batch_seq_hidden():
    layer = MoELayer(FULL)
    x = torch.randn(3, 5, 32)
    out = reference_forward(x, config=FULL, compute_dtype=torch.float64, **layer.full_weight_dict())
    flat = reference_forward(x.view(15, 32), config=FULL, compute_dtype=torch.float64, **layer.full_weight_dict())
    assert out.shape == x.shape and torch.equal(out.view(15, 32), flat)


def build_with_rank_seed(rank, world, cfg: dict):
    MoELayer(MoEConfig.from_dict(cfg), seed=rank)


def test_rank_dependent_seed_raises_on_every_rank(dist_pools):
    out = dist_pools(2).run_all(build_with_rank_seed, MoEConfig(**SMALL, top_k=2).to_dict())
    for ok, err in out:
        assert not ok and err[0] == "ConsistencyError"
        assert "seed (MoELayer(seed=...) or reset_parameters(seed=...)): the ranks' seeds differ ([0, 1])" in err[1]


def load_rank_dependent(rank, world, cfg: dict, name):
    cfg = MoEConfig.from_dict(cfg)
    full = full_variant_weights(cfg, 7)
    if rank == 1:
        full[name] = full[name].clone()
        full[name].view(-1)[3] += 1e-3
    layer = MoELayer(cfg)
    layer.load_full_weights(**full)


@pytest.mark.parametrize("name", ["router_weight", "router_bias", "e_score_correction_bias", "shared_w_out",
                                  "shared_gate_weight"])
def test_replicated_weights_loaded_differently_raise_on_every_rank(dist_pools, name):
    out = dist_pools(2).run_all(load_rank_dependent, FULL.to_dict(), name)
    for ok, err in out:
        assert not ok and err[0] == "ConsistencyError"
        assert f"after load_full_weights, the replicated weights differ: {name} differs across ranks" in err[1]


def test_expert_weights_may_differ_across_ranks(dist_pools):
    """Each rank loads only its own experts: what it was given for the others is not compared."""
    dist_pools(2).run(load_rank_dependent, FULL.to_dict(), "w_in")


@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2", "glm45", "gpt_oss_120b", "llama4_scout", "qwen3_next"])
def test_model_presets_at_a_small_width_match_reference(dist_pools, name):
    """Each preset's expert count, top-k, routing and expert variant, with narrow experts."""
    cfg = preset(name, hidden_size=16, ffn_size=8, dtype="float32")
    if cfg.shared_ffn_size:
        cfg = cfg.replace(shared_ffn_size=12)
    errs = dist_pools(2).run(variant_vs_reference, cfg.to_dict(), [33, 20], fresh_seed())
    assert max(errs) <= FP32_TOL


def test_a_device_without_its_index_is_where_the_layer_runs():
    """device="cuda" is the current GPU ("cuda:0"), "cpu:0" the CPU: inputs there are taken."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), device="cpu:0")
    assert layer.device == layer.w_in.device and layer(torch.randn(3, 32)).shape == (3, 32)


@pytest.mark.parametrize("move", ["double", "bfloat16", "to_float16"])
def test_a_move_to_another_dtype_is_refused_before_anything_moves(move):
    """Module.double() and the like would leave the weights in another dtype than the config's (and
    the fused kernel's symmetric heap behind): refused, every weight where it was; a no-op move is taken."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    with pytest.raises(ValueError, match="MoELayer cannot move router_weight from torch.float32"):
        layer.to(torch.float16) if move == "to_float16" else getattr(layer, move)()
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    assert layer.to("cpu").float() is layer


def test_a_state_dict_of_another_placement_is_refused():
    """A state_dict holds this rank's slots; which expert each holds is saved with it (expert_ids), so
    a layer that places the experts otherwise refuses it instead of permuting them."""
    cfg = MoEConfig(**SMALL, top_k=2)
    saved = MoELayer(cfg, seed=1).state_dict()
    other = MoELayer(cfg, placement=ExpertPlacement.from_rank_lists([[1, 0, 2, 3, 4, 5, 6, 7]]))
    with pytest.raises(RuntimeError, match=r"expert_ids: the state_dict's slots hold experts \[0, 1, 2"):
        other.load_state_dict(saved)
    older = {n: t for n, t in saved.items() if n != "expert_ids"}  # saved before expert_ids: one order it can hold
    same = MoELayer(cfg)
    same.load_state_dict(older)
    assert torch.equal(same.w_in, saved["w_in"])


def test_a_state_dict_with_the_expert_biases_old_names_loads_them():
    """The expert biases were b_in and b_out before 2026-12-06 (renamed so that weight-decay rules
    that skip names with "bias" skip them): a state_dict saved then loads, strict, into the new
    names, and the caller's dict is left as it was."""
    cfg = MoEConfig(**SMALL, top_k=2, expert_bias=True)
    saved = MoELayer(cfg, seed=fresh_seed()).state_dict()
    old = {{"bias_in": "b_in", "bias_out": "b_out"}.get(n, n): t for n, t in saved.items()}
    keys = list(old)
    layer = MoELayer(cfg, seed=fresh_seed())
    layer.load_state_dict(old)
    assert all(torch.equal(getattr(layer, n), saved[n]) for n in ("bias_in", "bias_out", "w_in"))
    assert list(old) == keys
    both = {**old, "bias_in": saved["bias_in"]}  # the new name too: the old one is not a weight
    with pytest.raises(RuntimeError, match='Unexpected key.*"b_in"'):
        layer.load_state_dict(both)
    plain = MoELayer(MoEConfig(**SMALL, top_k=2))  # no expert biases: the caller's keys are named
    with pytest.raises(RuntimeError, match='Unexpected key.*"b_in", "b_out"'):
        plain.load_state_dict({**plain.state_dict(), "b_in": old["b_in"], "b_out": old["b_out"]})


def test_a_layer_pickled_before_the_rename_runs_and_an_old_name_set_is_refused():
    """A layer pickled (torch.save of the module) while its biases were b_in and b_out unpickles
    with them as bias_in and bias_out, and computes as the original; setting b_in now would
    register a parameter the layer never reads, silently: refused, naming the new name."""
    cfg = MoEConfig(**SMALL, top_k=2, expert_bias=True)
    layer = MoELayer(cfg, seed=fresh_seed())
    old = copy.deepcopy(layer)
    old.__dict__["_parameters"] = {{"bias_in": "b_in", "bias_out": "b_out"}.get(n, n): p
                                   for n, p in old._parameters.items()}  # as pickled before the rename
    blob = io.BytesIO()
    torch.save(old, blob)
    blob.seek(0)
    back = torch.load(blob, weights_only=False)
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in layer.named_parameters()]
    x = torch.randn(5, SMALL["hidden_size"])
    with torch.no_grad():
        assert torch.equal(back(x), layer(x))
    with pytest.raises(AttributeError, match="MoELayer.b_in is bias_in since 2026-12-06"):
        layer.b_in = torch.nn.Parameter(torch.zeros_like(layer.bias_in))


def test_a_state_dict_without_expert_ids_is_taken_only_where_the_slots_can_hold_one_order():
    """A checkpoint from before expert_ids: at one rank with every expert in order, its slots are the
    layer's; with another placement its experts' order is unknown and it is refused, saying how to
    mark it; entries without experts (a router alone) load anywhere."""
    cfg = MoEConfig(**SMALL, top_k=2)
    older = {n: t for n, t in MoELayer(cfg, seed=1).state_dict().items() if n != "expert_ids"}
    other = MoELayer(cfg, placement=ExpertPlacement.from_rank_lists([[1, 0, 2, 3, 4, 5, 6, 7]]))
    with pytest.raises(RuntimeError, match=r"expert_ids is missing beside expert weights.*placed_experts"):
        other.load_state_dict(dict(older))
    other.load_state_dict({"router_weight": older["router_weight"]}, strict=False)
    assert torch.equal(other.router_weight, older["router_weight"])
    other.load_state_dict({**older, "expert_ids": torch.tensor(other.placed_experts)})  # marked, as the error says
    assert torch.equal(other.w_in, older["w_in"])


def loaded_without_expert_ids(rank, world, seed):
    """Rank 1 loads rank 0's state_dict without its expert_ids -> the error, or None."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=seed)
    saved = [{n: t for n, t in layer.state_dict().items() if n != "expert_ids"}]
    torch.distributed.broadcast_object_list(saved, src=0)
    try:
        layer.load_state_dict(saved[0])
    except RuntimeError as e:
        return str(e)
    return None


def test_another_rank_s_state_dict_without_expert_ids_is_refused(dist_pools):
    """It loaded rank 0's experts into rank 1's slots, silently. Rank 0 refuses too: nothing in the
    state_dict says which rank saved it."""
    said = dist_pools(2).run(loaded_without_expert_ids, fresh_seed())
    assert all(f"rank {r} of 2, whose placement puts {[4 * r + i for i in range(4)]} there" in said[r]
               for r in range(2)), said


@pytest.mark.parametrize("entry, value, message", [
    ("w_in", lambda t: t.long(), "w_in: expected a floating-point tensor, got torch.int64"),
    ("router_weight", lambda t: t > 0, "router_weight: expected a floating-point tensor, got torch.bool"),
    ("gate_up_pairs", lambda t: torch.tensor(0.5), r"gate_up_pairs: expected an integer tensor of shape \(\)"),
    ("expert_ids", lambda t: t.float(), r"expert_ids: expected an integer tensor of shape \(8,\)")])
def test_a_state_dict_entry_of_another_kind_is_refused_not_cast(entry, value, message):
    """load_state_dict's copy would truncate an int weight (0.999 off) or a 0.5 layout marker (read as
    0: halves), silently."""
    cfg = MoEConfig(**SMALL, top_k=2, activation="swiglu")
    saved = MoELayer(cfg, seed=1).state_dict()
    saved[entry] = value(saved[entry])
    layer = MoELayer(cfg)
    before = {n: t.clone() for n, t in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=message):
        layer.load_state_dict(saved)
    assert all(torch.equal(t, before[n]) for n, t in layer.state_dict().items())


def test_an_assigned_state_dict_of_another_dtype_is_refused_before_anything_is_assigned():
    """load_state_dict(assign=True) raised after making a float64 w_in the layer's: its forwards then
    failed deep in torch, naming no weight."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    saved = layer.state_dict()
    with pytest.raises(RuntimeError, match=r"w_in is torch.float64 on cpu; load_state_dict\(assign=True\)"):
        layer.load_state_dict({**saved, "w_in": saved["w_in"].double()}, assign=True)
    assert layer.w_in.dtype == torch.float32
    layer.load_state_dict({**saved, "w_in": saved["w_in"].double()})  # copied in: cast, as torch does
    assert layer.w_in.dtype == torch.float32


def test_a_state_dict_of_a_layer_with_another_number_of_experts_is_refused_saying_so():
    """Its expert_ids, the first entry checked, named only a shape: the experts' counts now."""
    saved = MoELayer(MoEConfig(**{**SMALL, "num_experts": 4}, top_k=2), seed=1).state_dict()
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    with pytest.raises(RuntimeError, match=r"expert_ids: .* \(the state_dict's layer holds 4 experts a rank, this one "
                                           r"8: 8 over 1 ranks; a checkpoint of a layer with another number"):
        layer.load_state_dict(saved)


def test_a_sparse_input_is_refused_naming_x():
    """It failed in torch's reshape ("not implemented"), naming no argument."""
    with pytest.raises(ValueError, match="x is a torch.sparse_coo tensor"):
        MoELayer(MoEConfig(**SMALL, top_k=2))(torch.randn(4, SMALL["hidden_size"]).to_sparse())


def test_a_process_group_must_be_one():
    with pytest.raises(TypeError, match="process_group must be a torch.distributed ProcessGroup or None"):
        MoELayer(MoEConfig(**SMALL, top_k=2), process_group="x")


@pytest.mark.parametrize("dst", [0.5, True, "0", -1, 1])
def test_full_weight_dict_refuses_a_dst_that_is_no_rank(dst):
    """dst=0.5 gave every rank {} (no rank equals 0.5), silently; True was taken as rank 1."""
    with pytest.raises(ValueError, match=r"a global rank \(an int\), 0..0, or None"):
        MoELayer(MoEConfig(**SMALL, top_k=2)).full_weight_dict(dst=dst)


def test_load_full_weights_refuses_non_float_weights_and_changes_nothing_then():
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=0)
    before = {n: p.clone() for n, p in layer.named_parameters()}
    new = MoELayer(MoEConfig(**SMALL, top_k=2), seed=5).full_weight_dict()
    for bad in ({"router_weight": new["router_weight"] > 0}, {"w_in": new["w_in"].to(torch.complex64)},
                {"w_out": new["w_out"].to("meta")}, {"w_out": new["w_out"].to_sparse()}):
        name, t = next(iter(bad.items()))
        with pytest.raises(ValueError, match=f"{name} must be a dense real floating-point tensor with data"):
            layer.load_full_weights(**{**{k: new[k] for k in ("router_weight", "w_in", "w_out")}, **bad})
        assert all(torch.equal(p, before[n]) for n, p in layer.named_parameters())


def default_seeded_weights(rank, world, torch_seed):
    """Two layers built without a seed after torch.manual_seed(torch_seed + rank) -> their router
    weights (replicated) and this rank's first expert's w_in."""
    torch.manual_seed(torch_seed + rank)  # the ranks' generators differ: rank 0's draw is taken
    layers = [MoELayer(MoEConfig(**SMALL, top_k=2)) for _ in range(2)]
    return [(layer.router_weight.tolist(), layer.w_in[0].tolist()) for layer in layers]


def test_layers_built_without_a_seed_differ_and_follow_torch_s_seed(dist_pools):
    """With seed=0 by default, every layer of a model built from scratch had the same weights, and
    torch.manual_seed changed nothing."""
    seed = fresh_seed()
    (a, b), = dist_pools(1).run(default_seeded_weights, seed)
    assert a[0] != b[0] and a[1] != b[1]
    (again, _), = dist_pools(1).run(default_seeded_weights, seed)
    assert again == a
    (r0, _), (r1, _) = dist_pools(2).run(default_seeded_weights, seed)  # one function at any world size
    assert r0 == a and r1[0] == a[0] and r1[1] != a[1]  # rank 1's first expert is expert 4


def seeds_differing(rank, world, how):
    """Rank 0 without a seed, rank 1 with one (built so, or reset so) -> the error or None."""
    try:
        if how == "built":
            MoELayer(MoEConfig(**SMALL, top_k=2), seed=None if rank == 0 else 5)
        else:
            layer = MoELayer(MoEConfig(**SMALL, top_k=2))
            layer.reset_parameters(None if rank == 0 else 5)
    except ConsistencyError as e:
        return str(e)
    return None


@pytest.mark.parametrize("how", ["built", "reset"])
def test_ranks_whose_seeds_differ_all_raise(dist_pools, how):
    """A rank with seed None drew and gathered where one with an int did not: the next collectives
    paired up wrongly (a TypeError on one rank, the other waiting until the group's timeout)."""
    for said in dist_pools(2).run(seeds_differing, how):
        assert said is not None and "the ranks' seeds differ ([None, 5])" in said, said


@pytest.mark.parametrize("seed", [1.5, True, -1, "0"])
def test_seed_must_be_a_non_negative_int(seed):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        MoELayer(MoEConfig(**SMALL, top_k=2), seed=seed)


def test_a_seed_that_would_overflow_an_expert_s_generator_is_refused():
    """Expert e draws from seed + 1 + e: past 2**64 torch's generator overflowed, inside the
    collective weight draw, with an error naming no argument (and at 2 ranks, one rank's alone
    left the other waiting)."""
    MoELayer(MoEConfig(**SMALL, top_k=2), seed=2**64 - 9)
    with pytest.raises(ValueError, match=r"seed=18446744073709551608 is too large: .* below 2\*\*64"):
        MoELayer(MoEConfig(**SMALL, top_k=2), seed=2**64 - 8)


@pytest.mark.parametrize("seed, match", [(2**64 - 2, "is too large"), (-1, "non-negative int"),
                                         (True, "non-negative int"), ("3", "non-negative int")])
def test_reset_parameters_refuses_what_the_constructor_refuses_before_drawing_anything(seed, match):
    """The overflowing seed redrew the router and half the experts, then raised torch's overflow
    error (a half-reset layer); -1 was taken; True and "3" raised errors naming no argument."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=3)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    with pytest.raises(ValueError, match=f"reset_parameters: seed.*{match}"):
        layer.reset_parameters(seed)
    assert all(torch.equal(t, before[name]) for name, t in layer.state_dict().items())
    layer.reset_parameters(np.int64(4))
    assert torch.equal(layer.w_in, MoELayer(MoEConfig(**SMALL, top_k=2), seed=4).w_in)


def test_the_same_seed_draws_the_same_weights_whatever_torch_s_default_dtype():
    """The draws followed torch.get_default_dtype(): float64 gave other weights for the same seed."""
    cfg = MoEConfig(**SMALL, top_k=2)
    plain = MoELayer(cfg, seed=7)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        other = MoELayer(cfg, seed=7)
    finally:
        torch.set_default_dtype(default)
    assert all(torch.equal(t, other.state_dict()[name]) for name, t in plain.state_dict().items())


def test_a_replaced_correction_bias_is_refused_with_advice_that_keeps_it_a_buffer():
    """The correction bias is a buffer (it picks experts, no gradient): the advice was
    nn.Parameter(t), which made it a parameter that never gets a gradient (DDP then fails its
    second step). Set as the message says, it stays a buffer and the forward takes it."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2, routing="sigmoid_grouped"), seed=3)
    x = torch.randn(5, SMALL["hidden_size"])
    good = layer.e_score_correction_bias.clone() + 0.5
    layer.e_score_correction_bias = good.double()
    with pytest.raises(ValueError, match=r"e_score_correction_bias is \(8,\) torch.float64 .*set "
                                         r"layer.e_score_correction_bias = t with t of that shape"):
        layer(x)
    layer.e_score_correction_bias = good
    assert "e_score_correction_bias" not in dict(layer.named_parameters())
    assert torch.equal(dict(layer.named_buffers())["e_score_correction_bias"], good) and layer(x).isfinite().all()


@pytest.mark.parametrize("how, match", [
    ("w_in.data = w_in.data.double()", r"w_in is \(8, 32, 96\) torch.float64 on cpu; this layer's is \(8, 32, 96\) "
                                       "torch.float32"),
    ("w_out = torch.nn.Parameter(w_out.transpose(1, 2))", r"w_out is \(8, 32, 48\) .*this layer's is \(8, 48, 32\)"),
    ("w_in = torch.nn.Parameter(w_in[:4])", r"w_in is \(4, 32, 96\)"),
    ("router_weight.data = router_weight.data[:, :16]", r"router_weight is \(8, 16\)"),
])
def test_a_weight_replaced_by_another_shape_or_dtype_is_refused_naming_it(how, match):
    """Nothing read the weights' shapes at a forward: one with more expert slots than the layer
    has was read as it was (a wrong output where torch's grouped GEMM is not used), others failed
    inside torch naming no weight. A replacement of the same shape and dtype is taken."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=3)
    x = torch.randn(5, SMALL["hidden_size"])
    target, value = how.split(" = ")
    name, _, attr = target.partition(".")
    original = getattr(layer, name)
    replacement = eval(value, {"torch": torch}, {name: original})
    if attr:
        setattr(original, attr, replacement)
    else:
        setattr(layer, name, replacement)
    with pytest.raises(ValueError, match=match + f".*set layer.{name} = torch.nn.Parameter"):
        layer(x)
    fresh = MoELayer(MoEConfig(**SMALL, top_k=2), seed=5)
    with torch.no_grad():
        setattr(layer, name, torch.nn.Parameter(getattr(fresh, name).clone()))
        layer.load_state_dict(fresh.state_dict())
        assert torch.equal(layer(x), fresh(x))


def _strided(t: torch.Tensor) -> torch.Tensor:
    """t's values in a strided (non-contiguous) view."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def test_a_strided_weight_is_refused_where_the_fused_kernel_would_read_it():
    """The fused kernel reads contiguous rows: a strided weight (a Parameter set on the layer, or
    one load_state_dict(assign=True) put in) passed the weight check and its launch was refused
    after the routing plan had counted the call's rows (every later forward then waited until
    timeout_s). Backend flash refuses it at the forward's check and at load_state_dict, naming
    it (a halves checkpoint's weight is checked as converted, a new tensor); backend torch reads
    it as it is. (The flash backend is a bare stand-in here: it needs a GPU.)"""
    torch_layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=3)
    x = torch.randn(3, SMALL["hidden_size"])
    want = torch_layer(x)
    state = {k: v.clone() for k, v in torch_layer.state_dict().items()}
    torch_layer.w_out = torch.nn.Parameter(_strided(torch_layer.w_out.detach()))
    assert ((torch_layer(x) - want).norm() / want.norm()).item() <= 1e-6  # (the product's own rounding)
    flash_layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=3)
    flash_layer.backend = object.__new__(FlashBackend)
    flash_layer.w_out = torch.nn.Parameter(_strided(flash_layer.w_out.detach()))
    problem = flash_layer._input_problem(x)
    assert isinstance(problem, ValueError) and str(problem).startswith(
        "w_out is (8, 48, 32) torch.float32 on cpu, not contiguous; this layer's is (8, 48, 32) torch.float32 on cpu, "
        "contiguous"), problem
    with pytest.raises(RuntimeError, match="w_out is a strided view"):
        flash_layer.load_state_dict(state | {"w_out": _strided(state["w_out"])}, assign=True)
    state |= {"w_in": _strided(to_halves(state["w_in"])), STATE_DICT_MARKER: torch.tensor(HALVES_VERSION)}
    flash_layer.load_state_dict(state, assign=True)
    assert flash_layer._input_problem(x) is None and torch.equal(flash_layer.w_in, torch_layer.w_in)


def test_a_weight_the_config_lacks_is_refused_where_backend_torch_would_read_it():
    """bias_in set on a layer built without expert biases changed backend torch's output, silently."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=3)
    layer.bias_in = torch.nn.Parameter(torch.ones(8, 96))
    with pytest.raises(ValueError, match="bias_in was set on the layer, but only a layer with expert_bias=True has it"):
        layer(torch.randn(5, SMALL["hidden_size"]))
    # the expert weights that compute its peers' rows are fine: a flash rank refused for it still
    # serves them, and for a router weight of another dtype too (a launch with no tokens routes
    # nothing; one of another shape the routing still refuses, which fails the layer)
    assert layer._weights_problem(EXPERT_WEIGHTS) is None
    layer.router_weight = torch.nn.Parameter(layer.router_weight.detach().double())
    assert "router_weight is" in str(layer._weights_problem()) and layer._weights_problem(EXPERT_WEIGHTS) is None
    layer.w_out = torch.nn.Parameter(layer.w_out.detach()[:1])
    assert "w_out is (1, " in str(layer._weights_problem(EXPERT_WEIGHTS))


def forward_with_rank_0_s_router_elsewhere(rank, world):
    """Rank 0's router_weight replaced by one on the meta device -> what each rank raised."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=3)
    if rank == 0:
        layer.router_weight = torch.nn.Parameter(layer.router_weight.detach().to("meta"))
    try:
        with torch.no_grad():
            layer(torch.randn(5, SMALL["hidden_size"]))
    except (ValueError, RuntimeError) as e:
        return str(e)
    return None


def test_a_weight_on_another_device_raises_on_every_rank(dist_pools):
    """The error exchange was made on router_weight's device: a rank whose router had moved
    failed on its own, and the other waited until the process group's timeout."""
    said = dist_pools(2).run(forward_with_rank_0_s_router_elsewhere)
    assert "router_weight is (8, 32) torch.float32 on meta" in said[0], said
    assert said[1] is not None and "rank(s) [0] refused this MoE forward" in said[1], said


def flash_agreement_with_rank_0_rejecting(rank, world, rejects: bool):
    """backend flash's grad-mode agreement (every rank records; rank 0 rejects its forward when
    `rejects`) -> what each rank raised, or the tokens it returned."""
    layer = types.SimpleNamespace(device=torch.device("cpu"), world_size=world, process_group=None, rank=rank)
    error = ValueError("x has shape (5, 7)") if rejects and rank == 0 else None
    try:
        return flash._check_graphs_agree(layer, True, error, 0 if error else 3 + rank)
    except (ValueError, RuntimeError) as e:
        return str(e)


def test_a_training_forward_rejected_on_one_rank_raises_on_every_rank_before_any_launch(dist_pools):
    """backend flash: the rejecting rank launched the kernel with no tokens and raised, while the
    others' training forwards completed and their collective backwards waited for it until the
    process group's timeout. The grad-mode agreement (run before any launch) raises on all."""
    assert dist_pools(2).run(flash_agreement_with_rank_0_rejecting, False) == [[3, 4], [3, 4]]
    said = dist_pools(2).run(flash_agreement_with_rank_0_rejecting, True)
    assert said[0] == "x has shape (5, 7)"
    assert said[1] == "rank(s) [0] refused this MoE forward (their input, or their layer); rank 1 aborts it too " \
                      "(see the error on those ranks)"


@pytest.mark.parametrize("device, why", [("meta", "the layer draws its weights"),
                                         pytest.param("cuda", "Torch not compiled with CUDA", marks=pytest.mark.skipif(
                                             torch.cuda.is_available(), reason="a torch without CUDA"))])
def test_a_device_that_cannot_hold_the_layer_is_refused_naming_it(device, why):
    """Before: meta failed inside the weight draw (at 2 ranks after the ranks' comparison, leaving
    the others waiting), and "cuda" on a CPU-only torch escaped as an AssertionError."""
    with pytest.raises(ValueError, match=f"device='{device}' cannot be used here: {why}"):
        MoELayer(MoEConfig(**SMALL, top_k=2), device=device)


@pytest.mark.parametrize("move", ["to_empty", "to cpu:0"])
def test_a_copy_where_the_layer_already_is_leaves_it_alone(move):
    """Module.to_empty handed every tensor uninitialised storage (expert_ids too, whose check then
    blamed a checkpoint; backend flash's CUDA graphs would have kept the old addresses), and a CPU
    device index spelled out copies: both leave the layer's own tensors as they are, as torchtitan's
    meta skeleton (to_empty of the whole model, then its own initialisation) needs."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=3, device="cpu:0")
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), layer)
    before = {n: t.clone() for n, t in layer.state_dict().items()}
    ids = [t.data_ptr() for t in layer.parameters()]
    model.to_empty(device="cpu") if move == "to_empty" else model.to(torch.device("cpu", 0))
    assert all(torch.equal(t, before[n]) for n, t in layer.state_dict().items())
    assert [t.data_ptr() for t in layer.parameters()] == ids
    layer.to("cpu").float().share_memory()  # moves to where it is: taken
    x = torch.randn(5, 32)
    assert rel_err(layer(x), reference_forward(x, config=layer.config, **layer.full_weight_dict())) <= FP32_TOL


def test_the_layer_s_structure_cannot_be_reassigned():
    """A new placement (or config, rank, group, device) set on a built layer ran the old dispatch
    with the new placement's weight loading: 1.17 off the reference, silently."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    for name, value in (("placement", ExpertPlacement.from_rank_lists([list(range(7, -1, -1))])),
                        ("config", MoEConfig(**SMALL, top_k=3)), ("world_size", 2), ("device", torch.device("cpu"))):
        with pytest.raises(AttributeError, match=f"MoELayer.{name} is fixed when the layer is built"):
            setattr(layer, name, value)
    for divisor in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="expert_grad_divisor must be a positive int"):
            layer.expert_grad_divisor = divisor
    layer.expert_grad_divisor = 2
    assert layer.expert_grad_divisor == 2 and layer.placement.experts_on(0) == list(range(8))


def built_with_the_default_placement_on_rank_0(rank, world) -> list[int]:
    layer = MoELayer(MoEConfig(**SMALL, top_k=2),
                     placement=None if rank == 0 else ExpertPlacement.contiguous(SMALL["num_experts"], world))
    return layer.expert_ids.tolist()


def test_the_default_placement_agrees_with_the_same_placement_given(dist_pools):
    """Compared as what None resolves to: the contiguous placement given on rank 1 alone was
    refused as a mismatch."""
    assert dist_pools(2).run(built_with_the_default_placement_on_rank_0) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def refused_on_one_rank(rank, world, what: str) -> tuple[bool, tuple | None]:
    """Rank 1 alone calls `what` wrongly -> (ok, error) of each rank, none left waiting."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    full = layer.full_weight_dict()
    if what == "load_full_weights":
        layer.load_full_weights(**({**full, "w_in": full["w_in"][:, :4]} if rank == 1 else full))
    else:
        layer.full_weight_dict(gate_up_layout="pairs" if rank == 1 else "halves")


@pytest.mark.parametrize("what", ["load_full_weights", "full_weight_dict"])
def test_a_collective_method_refused_on_one_rank_raises_on_every_rank(dist_pools, what):
    """Rank 1's arguments refused before the collectives left rank 0 in them until the process
    group's timeout."""
    (ok0, err0), (ok1, err1) = dist_pools(2).run_all(refused_on_one_rank, what)
    assert not ok1 and err1[0] == "ValueError"
    assert not ok0 and err0[0] == "ConsistencyError" and f"rank 1 refused {what}: " in err0[1]


def broadcast_then_forward(rank, world, seed, device_check_only: bool) -> str:
    """Every tensor of the model's state_dict broadcast from rank 0, as a script that starts every
    rank from rank 0's model does -> the error of the next forward on this rank."""
    import torch.distributed as dist
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=seed)
    if device_check_only:  # as on a GPU, where the layer's own check reads only the version counter
        layer._expert_ids_problem = lambda: None
    for t in layer.state_dict().values():
        dist.broadcast(t, 0)  # rank 1's experts are rank 0's now; no version counter moves
    with pytest.raises(RuntimeError) as refused:
        layer(torch.randn(5, SMALL["hidden_size"]))
    return str(refused.value)


@pytest.mark.parametrize("device_check_only", [False, True])
def test_experts_overwritten_by_a_broadcast_are_refused_on_every_rank(dist_pools, device_check_only):
    """A collective writes past autograd's version counter: the forward ran rank 0's experts on
    rank 1, silently (0.95 / 1.03 off). The layer compares expert_ids with its placement every
    forward on the CPU, and backend torch's exchange on the device at world > 1."""
    said = dist_pools(2).run(broadcast_then_forward, fresh_seed(), device_check_only)
    if device_check_only:
        assert all("expert_ids on rank(s) [1] names other experts" in s and "dist.broadcast" in s for s in said)
    else:
        assert "rank(s) [1] refused this MoE forward" in said[0]
        assert "expert_ids holds experts [0, 1, 2, 3] on rank 1, whose placement puts [4, 5, 6, 7]" in said[1]


def ids_replaced_on_rank_1(rank, world) -> tuple:
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    if rank == 1:
        layer.expert_ids = torch.tensor([4, 5, 6])  # another shape: no comparison with the placement's
    layer(torch.randn(5, SMALL["hidden_size"]))


@pytest.mark.parametrize("how", ["assigned", "written in place", "written through .data"])
def test_expert_positions_replaced_or_written_is_refused(how):
    """The buffer that sends each slot to its expert's rank and slot, overwritten, routed tokens to
    other experts' weights silently (1.49 off the reference): it is the placement's, refused (a
    write through .data too, which autograd's version counter does not see). The weights export
    by the placement meanwhile, not by the buffer (they came out permuted)."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=fresh_seed())
    x = torch.randn(6, SMALL["hidden_size"])
    want = layer.full_weight_dict()
    layer(x)
    reversed_ = layer.expert_positions.flip(0)
    if how == "assigned":
        layer.expert_positions = reversed_
    elif how == "written in place":
        layer.expert_positions.copy_(reversed_)
    else:
        layer.expert_positions.data.copy_(reversed_)
    with pytest.raises(RuntimeError, match="expert_positions holds .* it is the placement's"):
        layer(x)
    got = layer.full_weight_dict()
    assert all(torch.equal(got[n], want[n]) for n in want)
    layer.expert_positions.copy_(reversed_.flip(0))  # the placement's again: taken
    with torch.no_grad():
        assert rel_err(layer(x), reference_forward(x, *layer.full_weights(), layer.config)) <= 1e-5


def test_an_expert_ids_buffer_of_another_shape_on_one_rank_raises_on_every_rank(dist_pools):
    """The device-side comparison raised on that rank before the exchange, leaving the others in it."""
    (ok0, err0), (ok1, err1) = dist_pools(2).run_all(ids_replaced_on_rank_1)
    assert not ok0 and not ok1 and "rank(s) [1]" in err0[1] and "expert_ids holds experts [4, 5, 6]" in err1[1]


def test_a_state_dict_s_experts_are_checked_against_the_placement():
    """Not against the expert_ids buffer, which a write past its version counter may have changed."""
    cfg = MoEConfig(**SMALL, top_k=2)
    saved = MoELayer(cfg, seed=1).state_dict()
    layer = MoELayer(cfg)
    layer.expert_ids.numpy()[:2] = [1, 0]  # a write autograd does not see
    layer.load_state_dict(saved)
    assert layer.expert_ids.tolist() == list(range(8)) and torch.equal(layer.w_in, saved["w_in"])
    saved["expert_ids"][:2] = torch.tensor([1, 0])
    with pytest.raises(RuntimeError, match=r"state_dict's slots hold experts \[1, 0, 2"):
        layer.load_state_dict(saved)


def test_placement_must_be_an_expert_placement():
    with pytest.raises(ValueError, match="placement must be an ExpertPlacement"):
        MoELayer(MoEConfig(**SMALL, top_k=2), placement="round_robin")


@pytest.mark.parametrize("option", [dict(launch_override={"stages": 2}), dict(transport="nvshmem")])
def test_the_torch_backend_refuses_the_fused_kernels_options(option):
    """They would be ignored: backend torch has no kernel launch and no transport to set."""
    with pytest.raises(ValueError, match="backend='torch' has neither"):
        MoELayer(MoEConfig(**SMALL, top_k=2), **option)


def test_a_fused_layer_whose_buffers_were_freed_refuses_to_run():
    """After flashmoe_py.finalize() (or its backend's close()) the kernel would write into freed
    symmetric memory: the fused backend's forwards check first (the backend itself needs a GPU; its
    heap and the check run here)."""
    heap = SymmetricHeap(types.SimpleNamespace(heaps=[], failed=None))
    backend = types.SimpleNamespace(heap=heap)
    FlashBackend.raise_if_closed(backend)  # a live heap: nothing to say
    heap.free()
    with pytest.raises(RuntimeError, match="symmetric buffers were freed"):
        FlashBackend.raise_if_closed(backend)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_fused_layer_refuses_to_be_copied(how):
    """A copy would hold plain tensors where the symmetric buffers were (its kernel storing into the
    original's on the peers), and a new heap is allocated by every rank together: refused, naming
    what to do instead (the backend needs a GPU: a bare one stands in here)."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    layer.backend = object.__new__(FlashBackend)
    with pytest.raises(TypeError, match="load_state_dict"):
        copy.deepcopy(layer) if how == "deepcopy" else torch.save(layer, io.BytesIO())


def test_a_shallow_copy_of_a_layer_is_refused():
    """It would share the backend, bound to one of the two layers: the other's forwards would run
    with its attributes, or fail once it is gone."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    with pytest.raises(TypeError, match="deepcopy"):
        copy.copy(layer)


def test_a_layer_with_a_parametrized_weight_deep_copies_and_still_refuses_pickling():
    """torch.nn.utils.parametrize refuses to pickle a parametrized module, not to copy it (an EMA
    copy of a model, say): the copy computes with the same parametrization and its own op key."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=fresh_seed(), backward="autograd")

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(layer, "w_out", Doubled())
    twin = copy.deepcopy(layer)
    x = torch.randn(7, SMALL["hidden_size"])
    assert torch.equal(twin(x), layer(x)) and int(twin._op_key) != int(layer._op_key)
    assert torch.equal(twin.w_out, 2 * layer.parametrizations.w_out.original)
    with pytest.raises(RuntimeError, match="parametrized modules"):
        torch.save(layer, io.BytesIO())


def test_a_layer_built_under_inference_mode_runs_and_so_do_placement_buffers_loaded_from_it():
    """As an nn.Linear can be: its placement buffers, whose in-place writes the layer watches,
    are ordinary tensors even then; ones loaded from inference tensors (assign=True) are read
    every forward, having no version counter."""
    cfg = MoEConfig(**SMALL, top_k=2)
    x = torch.randn(5, SMALL["hidden_size"])
    with torch.inference_mode():
        built = MoELayer(cfg, seed=1)
        out = built(x)
    assert not built.expert_ids.is_inference()
    assert rel_err(out, reference_forward(x, config=cfg, **built.full_weight_dict())) <= FP32_TOL
    layer = MoELayer(cfg, seed=1)
    with torch.inference_mode():
        buffers = {name: b.clone() for name, b in built.named_buffers() if name == "expert_ids"}
    layer.load_state_dict(buffers, strict=False, assign=True)
    assert layer.expert_ids.is_inference() and torch.equal(layer(x), out)


class _GraphsSeen:
    """FlashBackend._run's bookkeeping without a GPU: launches and captures counted, a captured
    forward's replay standing in for the graph."""

    def __init__(self, layer: MoELayer):
        self.layer, self.options = layer, types.SimpleNamespace(cuda_graphs=True)
        self.graphs, self.seen, self.graphed = {}, set(), ()
        self.status_ready = types.SimpleNamespace(record=lambda stream: None)
        self.launches = self.captures = 0

    def _launch(self, x, stream, saving=None):
        self.launches += 1
        return x.clone(), torch.zeros(SMALL["num_experts"] + 1, dtype=torch.int64), None

    def _capture(self, x, saving):
        self.captures += 1
        stats = torch.zeros(SMALL["num_experts"] + 1, dtype=torch.int64)
        return types.SimpleNamespace(replay=lambda x, stream: (x.clone(), stats, None))

    def run(self, x, key, stream="the caller's stream"):
        """_run on the caller's stream (None: inside the caller's capture)."""
        return FlashBackend._run(self, x, key, stream=stream)
    MAX_GRAPHS, MAX_SAVING_GRAPHS, MAX_SEEN = FlashBackend.MAX_GRAPHS, FlashBackend.MAX_SAVING_GRAPHS, 4


def test_captured_forwards_are_dropped_when_the_weights_are_replaced():
    """A CUDA graph replays the addresses it captured: weights replaced rather than updated in
    place (load_state_dict(assign=True), to_empty, functional_call) would be read from freed
    memory. Updated in place (an optimizer step), the graphs stay."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    backend, x = _GraphsSeen(layer), torch.randn(4, SMALL["hidden_size"])
    for _ in range(3):  # eager, then captured, then replayed
        backend.run(x, (4, False))
    assert (backend.launches, backend.captures) == (1, 1)
    with torch.no_grad():
        layer.w_in.mul_(2)
    backend.run(x, (4, False))
    assert (backend.launches, backend.captures) == (1, 1)
    layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    for _ in range(3):
        backend.run(x, (4, False))
    assert (backend.launches, backend.captures) == (2, 2) and len(backend.graphs) == 1


def test_captured_forwards_are_dropped_when_torch_deterministic_setting_switches():
    """A captured forward keeps its routing plan's way of numbering an expert's rows
    (kernels/plan.py): after torch.use_deterministic_algorithms is switched on, or off again, the
    next forwards are captured anew."""
    backend, x = _GraphsSeen(MoELayer(MoEConfig(**SMALL, top_k=2))), torch.randn(4, SMALL["hidden_size"])
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic, seen in ((False, (1, 1)), (True, (2, 2)), (False, (3, 3))):
            torch.use_deterministic_algorithms(deterministic)
            for _ in range(3):  # eager, then captured, then replayed
                backend.run(x, (4, False))
            assert (backend.launches, backend.captures) == seen and len(backend.graphs) == 1
    finally:
        torch.use_deterministic_algorithms(was)


def test_inside_the_callers_capture_every_forward_is_launched_into_it():
    """The caller's CUDA graph holds the launches themselves: no graph of the layer's own is
    captured inside it (a capture cannot nest)."""
    backend, x = _GraphsSeen(MoELayer(MoEConfig(**SMALL, top_k=2))), torch.randn(4, SMALL["hidden_size"])
    for _ in range(3):
        backend.run(x, (4, False), stream=None)
    assert (backend.launches, backend.captures, backend.graphs) == (3, 0, {})


@pytest.mark.parametrize("backward,shared", [("saved", 1), ("saved", 0), ("recompute", 1)])
def test_compile_variants_compiles_each_launch_a_forward_can_take_with_valid_arguments(monkeypatch, backward, shared):
    """FlashBackend.compile_variants (run when a layer on several GPUs is built): every launch
    of launch_variants, each also as a training forward saves under backward="saved", on no
    tokens, with arguments the kernel's launcher accepts (fused_kernel_args checks them)."""
    from flashmoe_py.kernels.fused_moe import fused_kernel_args
    from flashmoe_py.kernels.launch_config import launch_variants
    from flashmoe_py.kernels.layout import Geometry
    from flashmoe_py.kernels.router import SPLIT_TOKENS
    from flashmoe_py.kernels.workspace import LocalBuffers, Workspace

    cfg = MoEConfig(hidden_size=32, ffn_size=48, num_experts=8, top_k=2, dtype="bfloat16", shared_experts=shared)
    layer = MoELayer(cfg, max_tokens_per_rank=600, backward=backward)
    geo = Geometry.for_config(cfg, 1, 600)
    compiled = []

    def compile_fused(x, out, experts, plan, ws, launch, *, config, rank, timeout_s, saved=None, io=None):
        fused_kernel_args(x, out, experts, plan, ws, launch, config=config, rank=rank, timeout_s=timeout_s,
                          saved=saved, io=io)
        compiled.append((x.shape[0], launch, saved is not None, io is not None))

    monkeypatch.setattr(flash, "compile_fused", compile_fused)
    routed = []
    route = layer.route
    monkeypatch.setattr(layer, "route", lambda x, keep_logits=False, x_at=None: routed.append(
        (x.shape[0], keep_logits, torch.is_grad_enabled(), x_at is not None))
        or route(x, keep_logits=keep_logits, x_at=x_at))
    backend = types.SimpleNamespace(layer=layer, geo=geo, send_order=geo.send_order(0), options=layer.options,
                                    ws=Workspace.allocate(geo, cfg.torch_dtype, "p2p", "cpu", LocalBuffers("cpu", 1)),
                                    name="flash", programs=1, resident=True,  # the interpreter's static order: 1
                                    io=torch.zeros(2, dtype=torch.int64))
    backend.ws.scratch.comb_expect.zero_()
    FlashBackend.compile_variants(backend)
    launches = launch_variants(geo, torch.bfloat16, 1)
    saves = (False, True) if backward == "saved" else (False,)
    # each as a forward launches it: x and out through the address words
    assert len(launches) == 3 and compiled == [(0, launch, save, True) for launch in launches for save in saves]
    # routing and its plan run at a split size and past it (on a GPU: the router's launches a call
    # of up to 600 tokens can take, compiled), as a forward routes: without autograd, with and
    # without the logits a training forward keeps; the layer's expected rows left as they were
    # (on the CPU torch's ops route, so no address word: on GPUs each count also routes through one)
    assert routed[:4] == [(1, False, False, False), (1, True, False, False), (SPLIT_TOKENS + 1, False, False, False),
                          (SPLIT_TOKENS + 1, True, False, False)]
    assert not backend.ws.scratch.comb_expect.any()


def test_the_kernels_before_the_fused_one_compile_once_for_every_token_count():
    """compile_variants compiles the fused kernel's variants ahead; the router and plan kernels
    queued before it would still compile a variant at a token count Triton specialises on (1, a
    multiple of 16: up to 1.7 s on an H100's host, bench/NOTES.md item 85) while peers' kernels
    wait, unless their token-count arguments are not specialised (nor the router's chunk count,
    which follows the token count: 16 or 8). Read from Triton's own kernel
    objects, so in a process without the interpreter (which keeps no such list)."""
    code = ("from flashmoe_py.kernels import plan, router\n"
            "for k in (router.router_partial_kernel, router.router_kernel, plan.slot_ranks_kernel,\n"
            "          plan.slot_plan_kernel):\n"
            "    print(k.fn.__name__, sorted(p.name for p in k.params if p.do_not_specialize))")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "router_partial_kernel ['T']", "router_kernel ['CHUNKS', 'T']", "slot_ranks_kernel ['NS']",
        "slot_plan_kernel ['CHUNK_PROGRAMS', 'NS', 'SEND_CHUNKS', 'SLOT_PROGRAMS']"], proc.stdout


@pytest.mark.parametrize("transport", ["p2p", "nvshmem"])
def test_compile_fused_loads_an_nvshmem_kernel_where_its_module_is_initialised(monkeypatch, transport):
    """Transport "nvshmem"'s module must get nvshmemx_cumodule_init when Triton loads it, which
    nvshmem_launch's hook does only inside that context: compiled and loaded ahead (at a layer's
    build), outside it, the launch would find it loaded and never initialised."""
    import triton

    from flashmoe_py.kernels import fused_moe, transport as transport_module
    from flashmoe_py.kernels.launch_config import choose_launch
    from flashmoe_py.kernels.layout import Geometry
    from flashmoe_py.kernels.workspace import LocalBuffers, Workspace

    loaded_with_init = []

    class Compiled:
        @property
        def run(self):  # Triton loads the module here
            loaded_with_init.append(transport_module._init_next_load)
            return object()

    monkeypatch.setattr(fused_moe, "fused_moe_kernel", types.SimpleNamespace(warmup=lambda *a, grid, **k: Compiled()))
    monkeypatch.setattr(fused_moe, "nvshmem_device_library", lambda: "libnvshmem_device.bc")
    cfg = MoEConfig(hidden_size=32, ffn_size=48, num_experts=8, top_k=2, dtype="bfloat16")
    layer, geo = MoELayer(cfg, max_tokens_per_rank=64), Geometry.for_config(cfg, 1, 64)
    x = torch.empty(0, 32, dtype=torch.bfloat16)
    plan, _ = flash.routing_plan(layer.route(x), layer.expert_positions, geo, geo.send_order(0),
                                 torch.zeros(geo.local_experts * geo.max_chunks, dtype=torch.int64))
    ws = Workspace.allocate(geo, cfg.torch_dtype, transport, "cpu", LocalBuffers("cpu", 1))
    experts = flash.kernel_experts(layer)
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)  # as on a GPU: compile
    fused_moe.compile_fused(x, torch.empty_like(x), experts, plan, ws, choose_launch(geo, 0, x.dtype, 1), config=cfg,
                            rank=0, timeout_s=1.0)
    assert loaded_with_init == [transport == "nvshmem"]


def test_the_sizes_remembered_for_a_capture_are_bounded():
    """Training keys follow every rank's token counts: with varying batches they never stopped
    growing."""
    backend = _GraphsSeen(MoELayer(MoEConfig(**SMALL, top_k=2)))
    for tokens in range(1, 12):
        backend.run(torch.randn(tokens, SMALL["hidden_size"]), (tokens, False))
    assert backend.launches == 11 and len(backend.seen) <= backend.MAX_SEEN


def test_a_launch_override_edited_after_the_layer_was_built_does_not_reach_it():
    """The ranks compared the options at construction; an edit of the caller's dict afterwards
    would change this rank's eager launches only (not its captured ones, nor its peers')."""
    from flashmoe_py.options import FusedOptions
    override = {"stages": 2}
    options = FusedOptions(max_tokens_per_rank=8, launch_override=override)
    override["stages"] = 4
    assert options.launch_override == {"stages": 2}


def test_a_numpy_seed_and_token_limit_are_taken_as_ints():
    cfg = MoEConfig(**SMALL, top_k=2)
    layer = MoELayer(cfg, seed=np.int64(3), max_tokens_per_rank=np.int64(8))
    assert torch.equal(layer.w_in, MoELayer(cfg, seed=3).w_in) and type(layer.options.max_tokens_per_rank) is int


def test_a_weight_computed_at_each_forward_is_never_captured():
    """torch.nn.utils.parametrize makes w_out anew at each forward: a graph would replay the first
    one's memory, so the fused backend launches every forward."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    torch.nn.utils.parametrize.register_parametrization(layer, "w_out", torch.nn.Identity())
    backend, x = _GraphsSeen(layer), torch.randn(4, SMALL["hidden_size"])
    for _ in range(4):
        backend.run(x, (4, False))
    assert (backend.launches, backend.captures) == (4, 0)


EXPORT_ELSEWHERE = """
import sys, torch, flashmoe_py as fm
other = fm.MoELayer(fm.MoEConfig(hidden_size=32, ffn_size=48, num_experts=8, top_k=1, dtype="float32"))
program = torch.export.load(sys.argv[1])
try:
    program.module()(torch.randn(6, 32))
except RuntimeError as e:
    print(e)
"""


def test_an_exported_layer_runs_in_its_own_process_and_is_refused_in_another(tmp_path):
    """torch.export's program calls the layer it was made from: right where that layer lives; saved
    and loaded in another process (whose own layers are other layers, whatever their number) or
    after its layer was freed, a RuntimeError, not another layer's function."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=fresh_seed())
    x = torch.randn(6, SMALL["hidden_size"])
    with torch.no_grad():
        program = torch.export.export(layer, (x,))
        assert torch.equal(program.module()(x), layer(x))
    torch.export.save(program, tmp_path / "moe.pt2")
    said = subprocess.run([sys.executable, "-c", EXPORT_ELSEWHERE, str(tmp_path / "moe.pt2")], capture_output=True,
                          text=True, timeout=300)
    assert "no MoELayer of this process has op id" in said.stdout, said.stdout + said.stderr
    del layer
    gc.collect()
    with pytest.raises(RuntimeError, match="no MoELayer of this process has op id"), torch.no_grad():
        program.module()(x)


@pytest.mark.parametrize("routing", ["softmax_topk", "sigmoid_grouped"])
def test_a_program_exported_without_grad_trains_or_says_why_not(routing):
    """Exported under torch.no_grad (as for inference), the forward op keeps no copy of the
    correction bias it routed with: trained through anyway, sigmoid_grouped's backward raised an
    internal error (moe_backward's routing_bias); it now says to export with grad enabled. Routings
    without the bias train as the layer does."""
    extra = dict(routing=routing, n_group=4, topk_group=2) if routing == "sigmoid_grouped" else {}
    layer = MoELayer(MoEConfig(**SMALL, top_k=2, **extra), seed=fresh_seed())
    x = torch.randn(9, SMALL["hidden_size"], device=layer.device)
    with torch.no_grad():
        program = torch.export.export(layer, (x,)).module()
    got, want = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(want).square().sum().backward()
    if routing == "sigmoid_grouped":
        with pytest.raises(RuntimeError, match="traced without a graph to record.*export or compile the program "
                                               "with grad enabled"):
            program(got).square().sum().backward()
    else:
        program(got).square().sum().backward()
        assert rel_err(got.grad, want.grad) <= 1e-5
