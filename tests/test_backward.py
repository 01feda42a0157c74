"""Gradients through MoELayer(backend="torch") against float64 autograd through the reference,
at 1, 2 and 4 gloo ranks (what each rank's .grad must hold: tests/grad_reference.py), for every
backward: "autograd" (through the torch backend's ops), "saved" and "recompute"
(backends/explicit_backward.py: explicit steps after an inference forward, from what it saved or
with routing and GEMM1 run again; backend "flash"'s backwards)."""

import copy
import io

import pytest
import torch
import torch.nn.utils.prune
from grad_reference import grad_errors, lean_grad_errors, near_a_kink, rel_err
from seeds import fresh_seed

from flashmoe_py import MoEConfig, MoELayer, reference_forward
from flashmoe_py.backends import capture, expert_grad, torch_ep
from flashmoe_py.backends.explicit_backward import moe_backward
from flashmoe_py.backends.flash import CapturedForward, graphs_to_drop
from flashmoe_py.backends.saved import SavedForward
from flashmoe_py.options import BACKWARDS
from flashmoe_py.routing import Routing

SMALL = dict(hidden_size=32, ffn_size=48, num_experts=8, dtype="float32")
FP32_TOL = 1e-5


VARIANTS = {
    "topk_softmax, router bias": dict(top_k=2, routing="topk_softmax", router_bias=True),
    "sigmoid_grouped, 2 of 4 groups, scaled": dict(top_k=2, num_experts=8, routing="sigmoid_grouped", n_group=4,
                                                   topk_group=2, routed_scaling_factor=2.5),
    "sigmoid_grouped, not renormalised, capacity": dict(top_k=3, routing="sigmoid_grouped", renormalize=False,
                                                        capacity_factor=0.7),
    "topk_sigmoid, weight on input, shared expert": dict(top_k=1, routing="topk_sigmoid", renormalize=False,
                                                         weight_on_input=True, shared_experts=1),
    "topk_sigmoid, renormalised": dict(top_k=2, routing="topk_sigmoid"),
    # A small limit, so that the clamps (and their zero gradients) are hit.
    "clamped_swiglu, expert biases": dict(top_k=2, activation="clamped_swiglu", swiglu_limit=0.8,
                                          expert_bias=True),
    "gelu, two gated shared experts": dict(top_k=2, activation="gelu", shared_experts=2, shared_ffn_size=16,
                                           shared_expert_gate=True),
    "everything at once": dict(top_k=2, num_experts=8, routing="sigmoid_grouped", n_group=2, topk_group=1,
                               router_bias=True, expert_bias=True, weight_on_input=True, shared_experts=1,
                               shared_expert_gate=True, routed_scaling_factor=1.5),
}




# --- functions run on every rank of a DistPool: fn(rank, world_size, *args) ---

def off_the_kinks(layer: MoELayer, shape: tuple, g: torch.Generator) -> torch.Tensor:
    """Fresh x of shape (+ [H]) in the layer's dtype, drawn again while a pre-activation sits on a
    kink of the activation (near_a_kink). Collective: every rank, once."""
    cfg, full = layer.config, layer.full_weight_dict()
    x = torch.randn(*shape, cfg.hidden_size, generator=g).to(cfg.torch_dtype)
    while near_a_kink(x, full, cfg):
        x = torch.randn(*shape, cfg.hidden_size, generator=g).to(cfg.torch_dtype)
    return x


def layer_grad_errors(rank, world, cfg: dict, seed, shapes, x_needs_grad=None, backward=None) -> dict:
    """Backward of sum(layer(x) * dy) for fresh x of shapes[rank] (+ [H]) on every rank ->
    {gradient: relative error against the reference}; None where .grad is None. x is drawn again
    while a pre-activation sits on a kink of the activation (near_a_kink)."""
    cfg = MoEConfig.from_dict(cfg)
    layer = MoELayer(cfg, seed=seed, backward=backward)
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    x = off_the_kinks(layer, shapes[rank], g)
    x.requires_grad_(x_needs_grad is None or x_needs_grad[rank])
    return grad_errors(layer, x, torch.randn(x.shape, generator=g).to(cfg.torch_dtype))


def dropped_token_grads(rank, world, cfg: dict, seed, backward) -> tuple[list[float], int]:
    """Every token ranks the last top_k experts alike, so capacity keeps the first tokens' slots
    and drops every slot of the later ones: -> (|x.grad| of each of those, how many there are)."""
    cfg = MoEConfig.from_dict(cfg)
    layer = MoELayer(cfg, seed=seed, backward=backward)
    with torch.no_grad():
        layer.router_weight.mul_(0.01)
        for j in range(cfg.top_k):  # positive tokens: choice j is expert E - 1 - j
            layer.router_weight[-1 - j] += cfg.top_k - j
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    x = (torch.randn(16, cfg.hidden_size, generator=g).abs() + 0.1).requires_grad_()
    (layer(x) * torch.randn(x.shape, generator=g)).sum().backward()
    capacity = cfg.capacity(16)
    return x.grad[capacity:].norm(dim=1).tolist(), 16 - capacity


def forward_with_grad_mode(rank, world, cfg: dict, grad_mode, backward):
    layer = MoELayer(MoEConfig.from_dict(cfg), backward=backward)
    with torch.set_grad_enabled(grad_mode[rank]):
        layer(torch.randn(6, cfg["hidden_size"]))


def forward_in_context(rank, world, cfg: dict, context: str, backward) -> bool:
    """-> whether the output of a forward under `context` records nothing."""
    layer = MoELayer(MoEConfig.from_dict(cfg), backward=backward)
    with {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]():
        out = layer(torch.randn(5, cfg["hidden_size"], requires_grad=True))
    return out.grad_fn is None and not out.requires_grad


def step_as_if_captured(rank, world, cfg: dict, seed, backward, captured: str, shape: tuple | None = None) -> dict:
    """A training step on fresh x of `shape` [batch, seq] (default shapes_for(world)[rank]), after
    one step without (a capture's warm-up), with capture.capturing saying yes for the whole step
    (captured="step") or for its backward only ("backward"), as inside a caller's CUDA graph
    capture -> grad_errors, or the refusal's error."""
    cfg = MoEConfig.from_dict(cfg)
    layer = MoELayer(cfg, seed=seed, backward=backward)
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    x = off_the_kinks(layer, shape or shapes_for(world)[rank], g).requires_grad_()
    dy = torch.randn(x.shape, generator=g).to(cfg.torch_dtype)
    (layer(x) * dy).sum().backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    previous = capture.capturing
    try:
        if captured == "step":
            capture.capturing = lambda where: True
            return grad_errors(layer, x, dy)
        y = layer(x)
        capture.capturing = lambda where: True
        return grad_errors(layer, x, dy, y=y)
    finally:
        capture.capturing = previous


# --- tests ---

def shapes_for(world: int) -> list[tuple[int, int]]:
    """[batch, seq] per rank: unequal token counts, so the all-to-all splits are uneven."""
    return [(2, 5 + 3 * r) for r in range(world)]


# The explicit backwards over fewer top-k values: they share the routing and exchange code paths
# whatever k is (the autograd one is the layer's default), and each other's but for where the
# routing and GEMM1's outputs come from.
TOP_K = {"autograd": range(1, 9), "saved": (1, 3, 8), "recompute": (2,)}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("backward,top_k", [(b, k) for b in BACKWARDS for k in TOP_K[b]])
@pytest.mark.parametrize("capacity_factor", [None, 0.7])
def test_gradients_match_reference(dist_pools, world, activation, backward, top_k, capacity_factor):
    """[batch, seq, H] input; top-1 is not renormalised (its one weight would be 1, and the
    router's gradient exactly 0)."""
    cfg = MoEConfig(**SMALL, top_k=top_k, activation=activation, capacity_factor=capacity_factor,
                    renormalize=top_k > 1)
    for errs in dist_pools(world).run(layer_grad_errors, cfg.to_dict(), fresh_seed(), shapes_for(world),
                                      None, backward):
        assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("backward", BACKWARDS)
def test_eight_ranks_gradients_match_reference(dist_pools, backward):
    """A node's worth of ranks (8 gloo processes): 16 experts, top-4, capacity on, uneven token
    counts with one rank holding none; every rank's gradients as the reference says."""
    cfg = MoEConfig(**{**SMALL, "num_experts": 16}, top_k=4, capacity_factor=1.0)
    shapes = [(1, n) for n in (11, 0, 23, 5, 30, 1, 17, 9)]
    for errs in dist_pools(8).run(layer_grad_errors, cfg.to_dict(), fresh_seed(), shapes, None, backward):
        assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("activation", ["relu", "clamped_swiglu"])
def test_inputs_on_a_kink_are_found(activation):
    """near_a_kink (which layer_grad_errors draws x away from) finds a row whose pre-activation
    sits on a kink of the activation (within float32 rounding), and only there."""
    limit = {"swiglu_limit": 1.0} if activation == "clamped_swiglu" else {}
    cfg = MoEConfig(**SMALL, top_k=2, activation=activation, **limit, expert_bias=True, shared_experts=1,
                    shared_ffn_size=16)
    full = MoELayer(cfg, seed=fresh_seed()).full_weight_dict()
    for _ in range(100):  # rows far from every kink: near_a_kink must say so
        x = torch.randn(6, cfg.hidden_size, dtype=torch.float64)
        if not near_a_kink(x, full, cfg):
            break
    else:
        pytest.fail("near_a_kink found a kink in 100 draws of random rows")
    kink = 0.0 if activation == "relu" else -1.0  # up's lower limit (the up half: columns F..)
    for w, b, col in ((full["w_in"][3].double(), full["bias_in"][3].double(), cfg.ffn_in_size - 1),
                      (full["shared_w_in"].double(), None, cfg.shared_ffn_in_size - 1)):
        on = x.clone()  # row 2 moved along column col's weights until its pre-activation is the kink
        pre = on[2] @ w[:, col] + (0 if b is None else b[col])
        on[2] += (kink - pre + 1e-9) * w[:, col] / w[:, col].square().sum()
        assert near_a_kink(on, full, cfg)
    assert not near_a_kink(x, full, MoEConfig(**SMALL, top_k=2, activation="swiglu"))


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("top_k", [2, 8])
@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradients_without_renormalisation(dist_pools, world, top_k, backward):
    cfg = MoEConfig(**SMALL, top_k=top_k, renormalize=False)
    for errs in dist_pools(world).run(layer_grad_errors, cfg.to_dict(), fresh_seed(), shapes_for(world),
                                      None, backward):
        assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("backward", BACKWARDS)
def test_bf16_gradients_match_reference(dist_pools, backward):
    """bf16 weights and activations (fp32 activation math): measured 3-5e-3 at top-k 1-8."""
    cfg = MoEConfig(**{**SMALL, "dtype": "bfloat16"}, top_k=4)
    for errs in dist_pools(2).run(layer_grad_errors, cfg.to_dict(), fresh_seed(), shapes_for(2), None, backward):
        assert max(errs.values()) <= 1e-2, errs


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradients_match_reference_for_every_variant(dist_pools, world, variant, backward):
    """Router, expert and shared-expert parameters, biases included, and the input."""
    cfg = MoEConfig(**{**SMALL, **VARIANTS[variant]})
    for errs in dist_pools(world).run(layer_grad_errors, cfg.to_dict(), fresh_seed(), shapes_for(world),
                                      None, backward):
        assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradients_with_a_rank_without_tokens(dist_pools, backward):
    """Rank 0 routes nothing; it still serves the others' backward (its x.grad is empty). (No rank
    has a single token: its router gradient is a near-cancelling difference whose float32
    rounding reached 1.2e-5 of its tiny norm, 1 run in ~30.)"""
    cfg = MoEConfig(**SMALL, top_k=2)
    res = dist_pools(4).run(layer_grad_errors, cfg.to_dict(), fresh_seed(), [(0, 3), (1, 9), (2, 7), (1, 5)],
                            None, backward)
    assert res[0]["x"] == 0.0
    for errs in res:
        assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradients_when_only_one_ranks_input_needs_grad(dist_pools, backward):
    """Rank 1's x needs no gradient, but rank 0's tokens at rank 1's experts still get theirs."""
    cfg = MoEConfig(**SMALL, top_k=3)
    res = dist_pools(2).run(layer_grad_errors, cfg.to_dict(), fresh_seed(), shapes_for(2), [True, False],
                            backward)
    assert res[1]["x"] is None
    for rank, errs in enumerate(res):
        got = {n: e for n, e in errs.items() if (n, rank) != ("x", 1)}
        assert None not in got.values() and max(got.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("backward", BACKWARDS)
def test_dropped_slots_get_no_gradient(dist_pools, world, backward):
    """A token whose every slot is over capacity does not reach the output: its gradient is 0.
    (The hot experts are on the last rank, so at world 2 rank 0's experts get no rows; its
    backward must still take part in both all-to-alls.)"""
    cfg = MoEConfig(**SMALL, top_k=2, capacity_factor=1.0)
    for norms, dropped in dist_pools(world).run(dropped_token_grads, cfg.to_dict(), fresh_seed(), backward):
        assert dropped > 0 and norms == [0.0] * dropped


@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradients_without_grouped_mm(monkeypatch, backward):
    """Where torch._grouped_mm is missing (e.g. fp32 on some GPUs), the per-expert loop is
    differentiable too."""
    monkeypatch.setattr(torch_ep, "grouped_mm_works", lambda device_type, dtype: False)
    errs = layer_grad_errors(0, 1, MoEConfig(**SMALL, top_k=3, capacity_factor=0.7, expert_bias=True).to_dict(),
                             fresh_seed(), shapes_for(1), None, backward)
    assert max(errs.values()) <= FP32_TOL, errs


def backward_twice(rank, world, cfg: dict, seed, backward) -> float:
    """-> relative difference between the gradients of two backward passes through one retained
    graph and twice those of one."""
    layer = MoELayer(MoEConfig.from_dict(cfg), seed=seed, backward=backward)
    x = torch.randn(9 + rank, cfg["hidden_size"], generator=torch.Generator().manual_seed(seed + rank))
    loss = layer(x).square().sum()
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in layer.parameters()]
    loss.backward()
    return max(rel_err(p.grad, 2 * g) for p, g in zip(layer.parameters(), once))


@pytest.mark.parametrize("backward", BACKWARDS)
def test_backward_twice_through_a_retained_graph(dist_pools, backward):
    errs = dist_pools(2).run(backward_twice, MoEConfig(**SMALL, top_k=2).to_dict(), fresh_seed(), backward)
    assert max(errs) <= FP32_TOL


def test_expert_ffn_takes_a_stride_0_gradient():
    """out.sum() hands back an expanded gradient, which torch._grouped_mm's CPU backward rejects
    unless made contiguous; an expert with no rows gets a zero gradient."""
    x, w_in, w_out = torch.randn(10, 32), torch.randn(3, 32, 48), torch.randn(3, 48, 32)
    counts = torch.tensor([4, 0, 6])
    leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out)]
    cfg = MoEConfig(hidden_size=32, ffn_size=48, num_experts=3, top_k=1, activation="relu", dtype="float32")
    torch_ep.expert_ffn(*leaves[:1], counts, *leaves[1:], cfg).sum().backward()
    ref = [t.double().requires_grad_() for t in (x, w_in, w_out)]
    rx, rw_in, rw_out = ref
    torch.cat([torch.relu(rx[:4] @ rw_in[0]) @ rw_out[0],
               torch.relu(rx[4:] @ rw_in[2]) @ rw_out[2]]).sum().backward()
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad, want.grad) <= FP32_TOL
    assert not leaves[1].grad[1].any() and not leaves[2].grad[1].any()


def test_experts_without_rows_get_zero_gradients_not_none():
    """A rank whose experts receive no row this step (routing can leave them all idle) still hands
    autograd zero gradients for them, as the reference's are; None would fail an optimizer's
    bookkeeping and the gradient checks (seen once in CI-sized runs at world 2)."""
    cfg = MoEConfig(hidden_size=32, ffn_size=48, num_experts=2, top_k=1, dtype="float32", expert_bias=True)
    weights = [torch.randn(2, 32, 96), torch.randn(2, 48, 32), torch.randn(2, 96), torch.randn(2, 32)]
    leaves = [t.requires_grad_() for t in weights]
    y = torch_ep.expert_ffn(torch.randn(0, 32), torch.zeros(2, dtype=torch.int64), leaves[0], leaves[1], cfg,
                            leaves[2], leaves[3])
    y.sum().backward()
    assert y.shape == (0, 32)
    assert all(t.grad is not None and not t.grad.any() for t in leaves)


@pytest.mark.parametrize("hidden_size,ffn_size", [(30, 48), (32, 21)])
@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradients_for_sizes_grouped_mm_cannot_take(hidden_size, ffn_size, backward):
    """torch._grouped_mm wants rows of a multiple of 16 bytes; other sizes take the per-expert loop."""
    cfg = MoEConfig(**{**SMALL, "hidden_size": hidden_size, "ffn_size": ffn_size}, top_k=2)
    errs = layer_grad_errors(0, 1, cfg.to_dict(), fresh_seed(), shapes_for(1), None, backward)
    assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("backward", BACKWARDS)
def test_grad_mode_mismatch_raises_on_every_rank(dist_pools, backward):
    """Rank 0 records a graph and rank 1 does not: rank 0's backward would wait for rank 1 forever,
    so both refuse the forward."""
    out = dist_pools(2).run_all(forward_with_grad_mode, MoEConfig(**SMALL, top_k=2).to_dict(), [True, False],
                                backward)
    for ok, err in out:
        assert not ok and err[0] == "RuntimeError" and "rank(s) [0] record an autograd graph" in err[1]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("backward", BACKWARDS)
def test_inference_contexts_record_nothing(dist_pools, world, context, backward):
    assert all(dist_pools(world).run(forward_in_context, MoEConfig(**SMALL, top_k=2).to_dict(), context, backward))


@pytest.mark.parametrize("backward", BACKWARDS)
def test_frozen_layer_and_input_need_no_backward(backward):
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), backward=backward).requires_grad_(False)
    assert layer(torch.randn(5, 32)).grad_fn is None


@pytest.mark.parametrize("backward", ["saved", "recompute", "compiled"])
def test_frozen_experts_run_no_weight_gradient_gemms(backward, monkeypatch):
    """Fine-tuning that freezes the experts, routed and shared, and trains the router: the explicit
    backwards and the compiled op ran every expert's weight-gradient GEMMs (a^T b over its rows)
    and dropped them. None runs now, and x, the router and the shared gate get their gradients."""
    cfg = MoEConfig(**SMALL, top_k=2, expert_bias=True, router_bias=True, shared_experts=1, shared_expert_gate=True)
    layer = MoELayer(cfg, seed=fresh_seed(), backward=None if backward == "compiled" else backward)
    for name, p in layer.named_parameters():
        p.requires_grad_(name in ("router_weight", "router_bias", "shared_gate_weight"))
    forward = torch.compile(layer, backend="aot_eager", fullgraph=True) if backward == "compiled" else layer
    outer, products = expert_grad._Groups.outer, []
    monkeypatch.setattr(expert_grad._Groups, "outer", lambda groups, a, b: products.append(a.shape) or
                        outer(groups, a, b))
    x = torch.randn(16, SMALL["hidden_size"], requires_grad=True)
    errs = grad_errors(layer, x, torch.randn(x.shape), forward)
    assert products == []
    trained = {n: e for n, e in errs.items() if e is not None}
    assert set(trained) == {"x", "router_weight", "router_bias", "shared_gate_weight"}
    assert max(trained.values()) <= FP32_TOL, errs


def test_the_saved_backward_keeps_the_routing_and_gemm1_outputs():
    """backward="saved" keeps x, the parameters, and of the experts only GEMM1's outputs before the
    activation, one row per kept slot in the experts' order."""
    cfg = MoEConfig(**SMALL, top_k=2, expert_bias=True)
    layer = MoELayer(cfg, backward="saved")
    x = torch.randn(7, 32, requires_grad=True)
    node = layer(x).grad_fn.next_functions[0][0]
    assert [id(t) for t in node.saved_tensors[1:]] == [id(p) for p in layer.parameters()]
    saved = node.saved_forward
    experts = saved.routing.experts.reshape(-1)[saved.slot]
    assert torch.equal(experts, experts.sort().values)  # one rank: in the experts' order
    with torch.no_grad():
        want = torch.stack([x[s // 2] @ layer.w_in[e] + layer.bias_in[e] for s, e in zip(saved.slot, experts)])
    assert saved.pre.shape == (14, 2 * 48) and rel_err(saved.pre, want) <= FP32_TOL
    assert saved.shared_pre is None
    assert rel_err(saved.routing.logits, x.detach() @ layer.router_weight.detach().t()) <= FP32_TOL


def test_a_backward_from_a_routing_without_logits_is_refused():
    """The explicit backward takes the routing weights' derivatives from the forward's logits; a
    SavedForward routed without them is a caller's mistake, named, not a silent recomputation."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), backward="saved")
    x = torch.randn(7, 32, requires_grad=True)
    node = layer(x).grad_fn.next_functions[0][0]
    node.saved_forward.routing.logits = None
    with pytest.raises(ValueError, match="no logits"):
        moe_backward(layer, x.detach(), torch.randn(7, 32), {"w_in"}, True, saved=node.saved_forward)


def test_the_recompute_backward_saves_only_the_input():
    """backward="recompute" keeps x and the parameters for its backward, none of the experts'
    activations: the graph holds one node, whatever the expert FFN's size."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), backward="recompute")
    x = torch.randn(7, 32, requires_grad=True)
    node = layer(x).grad_fn.next_functions[0][0]  # under the output's view: the layer's one node
    saved = node.saved_tensors
    assert saved[0].data_ptr() == x.data_ptr() and saved[0].shape == x.shape  # x itself (a view)
    assert [id(t) for t in saved[1:]] == [id(p) for p in layer.parameters()]


@pytest.mark.parametrize("variant", ["swiglu", "clamped_swiglu, biases", "gelu", "shared expert with its gate",
                                     "top-1, weight on the input, a shared expert"])
def test_the_autograd_backward_in_bf16_keeps_no_fp32_copy_of_a_token_or_slot_row(variant):
    """backend torch's autograd computes the router's logits, the activation, the routing weights'
    products and the shared experts' gate in fp32, and keeps what they read in bf16 (x, GEMM1's
    outputs, the expert outputs), not fp32 copies or the activation's fp32 temporaries: no fp32
    tensor it keeps holds a row of hidden size per token or per slot."""
    changes = {"swiglu": {}, "clamped_swiglu, biases": dict(activation="clamped_swiglu", expert_bias=True),
               "gelu": dict(activation="gelu"), "shared expert with its gate": dict(shared_experts=1,
                                                                                   shared_expert_gate=True),
               "top-1, weight on the input, a shared expert": dict(top_k=1, weight_on_input=True,
                                                                   shared_experts=1)}[variant]
    cfg = MoEConfig(**{**SMALL, "dtype": "bfloat16", "top_k": 2, **changes})
    layer = MoELayer(cfg, seed=fresh_seed(), backward="autograd")
    T = 64
    x = torch.randn(T, 32, dtype=torch.bfloat16, requires_grad=True)
    params = {p.data_ptr() for p in layer.parameters()}
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        layer(x)
    fp32 = [t.numel() for t in kept if t.dtype == torch.float32 and t.data_ptr() not in params]
    assert max(fp32) < T * 32, sorted(fp32)[-3:]  # the largest: the router's [T, experts] scores
    rows = cfg.top_k * T
    assert any(t.dtype == torch.bfloat16 and t.shape == (rows, cfg.ffn_in_size) for t in kept)  # GEMM1's output


def test_an_unknown_backward_is_refused():
    with pytest.raises(ValueError, match="backward='remember'"):
        MoELayer(MoEConfig(**SMALL, top_k=2), backward="remember")


@pytest.mark.parametrize("backward", ["saved", "recompute"])
def test_an_in_place_update_between_forward_and_backward_is_caught(backward):
    """The parameters are saved for the backward: changing one before it raises, as autograd does."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), backward=backward)
    out = layer(torch.randn(7, 32, requires_grad=True))
    with torch.no_grad():
        layer.w_in.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("backward", ["saved", "recompute"])
@pytest.mark.parametrize("tokens", [7, 0])
def test_an_expanded_output_gradient_is_taken(backward, tokens):
    """y.sum() hands back a stride-0 gradient (torch._grouped_mm refuses one, and .contiguous()
    leaves an empty one's strides): the shared experts' products too get the reference's."""
    cfg = MoEConfig(**{**SMALL, **VARIANTS["gelu, two gated shared experts"]})
    layer = MoELayer(cfg, seed=fresh_seed(), backward=backward)
    x = torch.randn(tokens, 32).requires_grad_()
    if tokens == 0:  # nothing depends on the weights: zeros (the float64 reference has no graph here)
        layer(x).sum().backward()
        assert x.grad.shape == x.shape and all(not p.grad.any() for p in layer.parameters())
        return
    errs = grad_errors(layer, x, torch.ones(tokens, 32), step=lambda: layer(x).sum().backward())
    assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("backward", ["autograd", "saved", "recompute"])
def test_an_empty_input_of_any_strides_gets_an_empty_gradient(backward):
    """An empty slice of a transposed tensor ([0, H], strides (2, 2)): torch takes any empty tensor
    for contiguous, and the shared experts' grouped products refused those strides."""
    cfg = MoEConfig(**{**SMALL, **VARIANTS["gelu, two gated shared experts"]})
    layer = MoELayer(cfg, seed=fresh_seed(), backward=backward)
    big = torch.randn(32, 2, requires_grad=True)
    layer(big[:, ::2][:, :0].t()).sum().backward()
    assert big.grad.shape == big.shape and not big.grad.any() and all(not p.grad.any() for p in layer.parameters())


@pytest.mark.parametrize("backward", ["saved", "recompute", "compiled"])
def test_a_second_order_gradient_is_refused(backward):
    """The explicit backward's steps are not differentiable: a gradient penalty through them raises
    instead of giving wrong or missing second-order gradients."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), backward=None if backward == "compiled" else backward)
    forward = torch.compile(layer, backend="aot_eager", fullgraph=True) if backward == "compiled" else layer
    x = torch.randn(7, 32, requires_grad=True)
    with pytest.raises(NotImplementedError if backward != "compiled" else RuntimeError,
                       match="first-order gradients only" if backward != "compiled" else "double backward"):
        gx, = torch.autograd.grad(forward(x).sum(), x, create_graph=True)
        gx.square().sum().backward()


def second_order_at_world(rank, world, seed) -> str:
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=seed, backward="autograd")
    x = torch.randn(5 + 3 * rank, 32, generator=torch.Generator().manual_seed(seed + rank), requires_grad=True)
    try:
        gx, = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        gx.square().sum().backward()
    except NotImplementedError as e:
        return str(e)
    return "no error"


def test_a_second_order_gradient_through_the_all_to_alls_is_refused(dist_pools):
    """Backend torch's dispatch and combine backwards are not recorded: at 2 ranks a gradient
    penalty's parameter gradients came out 0.4-0.8 off, silently. Every rank raises, none hangs."""
    for message in dist_pools(2).run(second_order_at_world, fresh_seed()):
        assert "second-order" in message


@pytest.mark.parametrize("backward", ["recompute", "compiled", "saved"])
def test_a_correction_bias_update_before_the_backward_changes_no_gradient(backward):
    """Balancing without an auxiliary loss moves the correction bias between steps, often between
    a forward and its backward: a backward that routes again routes as its forward did."""
    cfg = MoEConfig(**{**SMALL, **VARIANTS["sigmoid_grouped, 2 of 4 groups, scaled"]})
    layer = MoELayer(cfg, seed=fresh_seed(), backward=None if backward == "compiled" else backward)
    forward = torch.compile(layer, backend="aot_eager", fullgraph=True) if backward == "compiled" else layer
    g = torch.Generator().manual_seed(fresh_seed())
    x, dy = torch.randn(16, 32, generator=g).requires_grad_(), torch.randn(16, 32, generator=g)
    y = forward(x)
    bias = layer.e_score_correction_bias
    at_forward, shifted = bias.clone(), bias + 10 * torch.randn(bias.shape, generator=g)
    with torch.no_grad():
        before = layer.route(x).experts
        bias.copy_(shifted)
        assert (layer.route(x).experts != before).any()  # the update would route otherwise

    def step():
        (y * dy).sum().backward()
        with torch.no_grad():
            bias.copy_(at_forward)  # for the reference: the function the forward computed

    errs = grad_errors(layer, x, dy, step=step)
    assert max(errs.values()) <= FP32_TOL, errs


def compiled_grad_errors(rank, world, cfg: dict, seed, shapes) -> dict:
    """layer_grad_errors through torch.compile(fullgraph=True): the layer is one forward op and one
    backward op (backward="recompute"'s steps) with no graph break."""
    cfg = MoEConfig.from_dict(cfg)
    layer = MoELayer(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    x = torch.randn(*shapes[rank], cfg.hidden_size, generator=g).requires_grad_()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    return grad_errors(layer, x, torch.randn(x.shape, generator=g), compiled)


def step_with_rank_0_compiled(rank, world, backward: str, seed: int, compiled: bool):
    """A training step, rank 0's layer compiled when `compiled` and rank 1's eager (as after
    torch._dynamo's recompile limit on one rank) -> what the rank raised, else its x gradient."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=seed, backward=backward)
    forward = torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled and rank == 0 else layer
    g = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(6, SMALL["hidden_size"], generator=g, requires_grad=True)
    try:
        forward(x).square().sum().backward()
    except RuntimeError as e:
        return str(e)
    return x.grad


@pytest.mark.parametrize("backward", ["autograd", "saved"])
def test_a_compiled_rank_beside_an_eager_one_agrees_on_its_backward_or_raises_on_both(dist_pools, backward):
    """Under torch.compile the layer's backward is its own (explicit_backward), whose collectives
    are not backend torch's recorded ops': with backward="autograd", a rank compiled beside an
    eager one aborted in gloo (a collective's sizes mismatched; NCCL would have hung or mixed the
    ranks' rows). The forward's agreement compares what each backward will run and raises on
    both, naming it; with backward="saved" both run the layer's own, as an all-eager step does."""
    seed = fresh_seed()
    said = dist_pools(2).run(step_with_rank_0_compiled, backward, seed, True)
    if backward == "saved":
        eager = dist_pools(2).run(step_with_rank_0_compiled, backward, seed, False)
        assert all(rel_err(got, want) <= 1e-5 for got, want in zip(said, eager, strict=True)), said
    else:
        for s in said:
            assert isinstance(s, str) and "would run different collectives: rank(s) [1] backend torch's recorded " \
                "ops (backward='autograd'); rank(s) [0] the layer's own backward" in s, said


def block_with_an_empty_rank(rank, world, seed, mode: str, compiled: bool):
    """A block h + 2 * layer(h), rank 1 with no tokens, compiled with inductor (torch.compile's
    default) or eager, mode "no_grad", "grad" or "frozen" (x's gradient only: the backward op's
    one output has no elements on rank 1) -> (the output, and x's gradient where taken)."""
    grad = mode != "no_grad"
    torch._dynamo.reset()
    cfg = MoEConfig(**SMALL, top_k=2)
    layer = MoELayer(cfg, seed=seed).requires_grad_(mode != "frozen")
    block = lambda h: h + 2 * layer(h)  # noqa: E731
    forward = torch.compile(block, fullgraph=True) if compiled else block
    import torch._inductor.config as inductor_config  # compiled afresh: the cache's key omits side effects
    x = torch.randn(6 if rank == 0 else 0, cfg.hidden_size, generator=torch.Generator().manual_seed(seed),
                    requires_grad=grad)
    with torch.set_grad_enabled(grad), inductor_config.patch(fx_graph_cache=False):
        y = forward(x)
        if grad:
            y.square().sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("mode", ["no_grad", "grad", "frozen"])
def test_a_rank_with_no_tokens_runs_the_compiled_layer_where_its_output_feeds_another_op(dist_pools, mode):
    """inductor dropped the layer's op on a rank with no tokens where its output (no elements) fed
    another op (a zero-element load is a no-op, and the op looked free of side effects): that rank
    skipped the all-to-alls its peer waited in (gloo: "connection closed by peer", or a collective
    size mismatch with grad; NCCL would wait until its timeout). Both ops are side-effectful now."""
    seed = fresh_seed()
    compiled = dist_pools(2).run(block_with_an_empty_rank, seed, mode, True)
    eager = dist_pools(2).run(block_with_an_empty_rank, seed, mode, False)
    for (y, dx), (y_ref, dx_ref) in zip(compiled, eager, strict=True):
        assert y.shape == y_ref.shape and (y.numel() == 0 or rel_err(y, y_ref) <= 1e-5)
        assert (dx is None) == (dx_ref is None) and (dx is None or dx.numel() == 0 or rel_err(dx, dx_ref) <= 1e-5)


@pytest.mark.parametrize("backward", ["autograd", "saved", "recompute", "compiled"])
def test_gradients_are_taken_at_the_weights_the_forward_ran_with(backward):
    """torch.func.functional_call: the forward runs on other tensors than the layer's, put back
    before the backward; the explicit backwards and the compiled ops read those the forward ran
    with (they read the layer's own, ~10 off). The same as a layer that holds those weights."""
    cfg = MoEConfig(**{**SMALL, **VARIANTS["everything at once"]})
    seed = fresh_seed()
    layer = MoELayer(cfg, seed=seed, backward=None if backward == "compiled" else backward)
    holder = MoELayer(cfg, seed=seed)
    with torch.no_grad():
        for p in holder.parameters():
            p.mul_(1.5)
    new = {n: p.detach().clone().requires_grad_() for n, p in holder.named_parameters()}
    forward = lambda params, x: torch.func.functional_call(layer, params, (x,))  # noqa: E731
    if backward == "compiled":
        forward = torch.compile(forward, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(2, 7, cfg.hidden_size, generator=g), torch.randn(2, 7, cfg.hidden_size, generator=g)
    y = forward(new, x)
    (y * dy).sum().backward()
    (holder(x) * dy).sum().backward()
    assert rel_err(y.detach(), holder(x).detach()) <= FP32_TOL
    errs = {n: rel_err(new[n].grad, p.grad) for n, p in holder.named_parameters()}
    assert max(errs.values()) <= FP32_TOL, errs


def test_the_compiled_layer_reads_what_the_region_updated_before_it():
    """Inside one compiled region, a weight and the correction bias updated in place before the
    layer: the ops' inputs carry the updates (functionalisation applies them to the layer's own
    tensors only when the region ends), as the eager step has them."""
    cfg = MoEConfig(**{**SMALL, **VARIANTS["everything at once"]})
    seed = fresh_seed()

    def step(layer, x):
        layer.w_out.mul_(2)
        layer.e_score_correction_bias.add_(torch.arange(cfg.num_experts, dtype=torch.float32))
        return layer(x)

    x = torch.randn(16, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        eager = step(MoELayer(cfg, seed=seed), x)
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(MoELayer(cfg, seed=seed), x)
    assert rel_err(compiled, eager) <= FP32_TOL


def copied(layer: MoELayer, how: str) -> MoELayer:
    """copy.deepcopy(layer), or torch.save then torch.load of it."""
    if how == "deepcopy":
        return copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copied_layer_compiled_runs_the_copy(how):
    """A reference model or an EMA teacher is a copy of the model (copy.deepcopy, or torch.save then
    torch.load, maybe in another process); the compiled op finds its layer by an id, which a copy
    kept: it ran the original (its statistics, its backend's buffers), or failed where the original
    was gone, or in another process ran whichever layer had that id there. Forward and gradients
    of the copy, changed after copying, against its eager self."""
    cfg = MoEConfig(**{**SMALL, **VARIANTS["everything at once"]})
    original = MoELayer(cfg, seed=fresh_seed())
    layer = copied(original, how)
    if how == "torch.save":
        del original  # as in another process
    with torch.no_grad():
        layer.w_in.mul_(-1)
        layer.router_weight.mul_(2)
    x = torch.randn(16, cfg.hidden_size, requires_grad=True)
    dy = torch.randn(16, cfg.hidden_size)
    got = {}
    for mode, forward in (("eager", layer), ("compiled", torch.compile(layer, backend="aot_eager", fullgraph=True))):
        layer.last_stats = None
        (forward(x) * dy).sum().backward()
        assert layer.last_stats is not None
        got[mode] = [forward(x).detach(), x.grad, *(p.grad for p in layer.parameters())]
        x.grad = None
        layer.zero_grad()
    assert max(rel_err(a, b) for a, b in zip(got["compiled"], got["eager"], strict=True)) <= FP32_TOL
    if how == "deepcopy":
        assert original.last_stats is None  # never run


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copied_layer_reads_its_own_attributes(how, backward):
    """prepare_ddp after copying a model sets the copy's expert_grad_divisor; backend torch's
    forwards read a second, hidden layer's (made by copying the backend's weak reference to its
    layer), so under DDP the copy's expert gradients were world_size times too large, silently
    (backward "autograd"; the explicit backwards read the layer itself)."""
    cfg = MoEConfig(**SMALL, top_k=2)
    layer = copied(MoELayer(cfg, seed=fresh_seed(), backward=backward), how)
    x, dy = torch.randn(16, cfg.hidden_size), torch.randn(16, cfg.hidden_size)
    grads = {}
    for divisor in (1, 2):
        layer.expert_grad_divisor = divisor
        (layer(x) * dy).sum().backward()
        grads[divisor] = layer.w_in.grad
        layer.zero_grad(set_to_none=True)
    assert rel_err(grads[2] * 2, grads[1]) <= FP32_TOL


def test_a_deep_copy_of_a_layer_compiled_in_place_runs_the_copy():
    """Module.compile() keeps the compiled call in the module: a deep copy that kept it ran the
    original."""
    cfg = MoEConfig(**SMALL, top_k=2)
    original = MoELayer(cfg, seed=fresh_seed())
    original.compile(backend="aot_eager", fullgraph=True)
    layer = copy.deepcopy(original)
    with torch.no_grad():
        layer.w_in.mul_(-1)
        x = torch.randn(16, cfg.hidden_size)
        assert rel_err(layer(x), reference_forward(x, config=cfg, **layer.full_weight_dict())) <= FP32_TOL


def test_a_layer_built_under_the_meta_default_device_compiles():
    """torchtitan builds its model skeleton under `with torch.device("meta")`: the op's key, made
    on the default device, was a meta tensor, so the compiled op ran its fake (1.7e29 off the
    reference, no error). The layer's own tensors are on its device, the key on the CPU."""
    with torch.device("meta"):  # the default seed too: it is drawn on the CPU
        layer = MoELayer(MoEConfig(**SMALL, top_k=2), device="cpu")
    x = torch.randn(16, SMALL["hidden_size"], requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    assert rel_err(y, reference_forward(x, config=layer.config, **layer.full_weight_dict())) <= FP32_TOL
    errs = grad_errors(layer, x, torch.randn(x.shape), y=y)
    assert max(errs.values()) <= FP32_TOL, errs


def test_layers_compiled_one_by_one_share_one_graph():
    """torchtitan compiles a model block by block (block.compile()). The op found its layer by an
    int attribute, a constant every block's graph guarded on: each block recompiled, and past
    torch's recompile limit (8) the rest ran uncompiled. Three layers of one shape but their own
    weights and top-k, compiled one after another without a recompile, each with its own forward
    and gradients."""
    torch._dynamo.reset()
    layers = [MoELayer(MoEConfig(**SMALL, top_k=k), seed=fresh_seed()) for k in (2, 3, 4)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for layer in layers:
            layer.compile(backend="aot_eager", fullgraph=True)
            x = torch.randn(16, SMALL["hidden_size"], requires_grad=True)
            y = layer(x)
            assert rel_err(y, reference_forward(x, config=layer.config, **layer.full_weight_dict())) <= FP32_TOL
            errs = grad_errors(layer, x, torch.randn(x.shape), y=y)
            assert max(errs.values()) <= FP32_TOL, errs


def copy_in_a_group(rank, world, seed, how):
    """A layer of a dist.new_group over every rank, or of the default group passed by name, copied:
    the copy's outputs and x gradient against the original's -> the largest relative error."""
    import torch.distributed as dist
    cfg = MoEConfig(**SMALL, top_k=2)
    group = dist.new_group(list(range(world))) if how == "deepcopy, new_group" else dist.group.WORLD
    original = MoELayer(cfg, seed=seed, process_group=group)
    layer = copied(original, how.partition(",")[0])
    x = torch.randn(12, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + rank), requires_grad=True)
    got = []
    for each in (original, layer):
        y = each(x)
        y.square().sum().backward()
        got.append((y.detach(), x.grad))
        x.grad = None
    return max(rel_err(a, b) for a, b in zip(*got, strict=True))


@pytest.mark.parametrize("how", ["deepcopy, new_group", "deepcopy, WORLD", "torch.save, WORLD"])
def test_a_layer_of_a_process_group_copies(dist_pools, how):
    """A ProcessGroup can be neither copied nor pickled: a copy shares its layer's group, and the
    default group passed by name is kept as the default (None)."""
    assert max(dist_pools(2).run(copy_in_a_group, fresh_seed(), how)) <= FP32_TOL


@pytest.mark.parametrize("in_graph", [-1, 0, 1])
def test_the_forward_op_agrees_with_its_fake_on_a_permuted_input(in_graph):
    """A sequence-first [S, B, H] view: the op returns a contiguous output; its fake said x's
    strides (inductor then failed on an assertion about strides)."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    x = torch.randn(3, 2, SMALL["hidden_size"]).transpose(0, 1).requires_grad_(in_graph == 1)
    checks = torch.library.opcheck(torch.ops.flashmoe.moe_forward.default,
                                   (x, list(layer.parameters()), None, layer._op_key, in_graph))
    assert set(checks.values()) == {"SUCCESS"}, checks


@pytest.mark.parametrize("world", [1, 2])
def test_compiled_layer_gradients_match_reference(dist_pools, world):
    cfg = MoEConfig(**{**SMALL, **VARIANTS["everything at once"]})
    for errs in dist_pools(world).run(compiled_grad_errors, cfg.to_dict(), fresh_seed(), shapes_for(world)):
        assert max(errs.values()) <= FP32_TOL, errs


def lean_against_full(rank, world, cfg: dict, seed, tokens, scaled: str | None = None) -> tuple[dict, dict, bool]:
    """The lean reference's errors and grad_errors' float64 ones for the same step's gradients
    (two layers of the same seed, fresh x of tokens[rank] rows), and whether the scaled
    parameter's gradient is zero on this rank (its experts got no rows: nothing to be wrong);
    scaled: a parameter whose gradient both layers get 1% too large (a hook), a wrong gradient
    both must see."""
    cfg = MoEConfig.from_dict(cfg)
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    x, dy = (torch.randn(tokens[rank], cfg.hidden_size, generator=g) for _ in range(2))
    layers = [MoELayer(cfg, seed=seed) for _ in range(2)]
    if scaled is not None:
        for layer in layers:
            getattr(layer, scaled).register_hook(lambda grad: grad * 1.01)
    lean = lean_grad_errors(layers[0], x.clone().requires_grad_(), dy, torch.float64)
    full = grad_errors(layers[1], x.clone().requires_grad_(), dy)
    return lean, full, scaled is not None and not getattr(layers[1], scaled).grad.any()


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("variant, scaled", [("topk_softmax, router bias", None), ("everything at once", None),
                                             ("everything at once", "w_out"),
                                             ("everything at once", "shared_w_in")])
def test_the_lean_reference_agrees_with_the_float64_one(dist_pools, variant, scaled, world):
    """The full-size reference (one expert at a time, each expert's loss on its own; at world 2
    each expert's gradient summed over the ranks' tokens where it is held) reports the errors
    grad_errors' float64 autograd through reference_forward does, gradient by gradient: the
    layer's right ones (~1e-7) and one made 1% wrong (1e-2). One rank with no tokens at world 2."""
    cfg = MoEConfig(**{**SMALL, **VARIANTS[variant]})
    for lean, full, scaled_zero in dist_pools(world).run(lean_against_full, cfg.to_dict(), fresh_seed(),
                                                         [13, 0][:world], scaled):
        assert set(lean) == set(full), (lean, full)
        for name in full:
            assert abs(lean[name] - full[name]) <= 1e-3 * full[name] + 1e-12, (name, lean, full)
            if name != scaled:
                assert full[name] <= FP32_TOL, (name, full)
            else:  # a zero gradient (no rows here, or no tokens for a rank's own) stays right when scaled
                assert (full[name] == 0.0) if scaled_zero else abs(full[name] - 1e-2) < 1e-4, (name, full)


class _Replays:
    """A captured forward's stand-in for a CUDA graph: each replay writes its call number into
    the saved buffers, as a replay overwrites the graph's outputs in place."""

    def __init__(self, *buffers: torch.Tensor):
        self.buffers, self.calls = buffers, 0

    def replay(self) -> None:
        self.calls += 1
        for b in self.buffers:
            b.fill_(self.calls)


def test_an_addressed_replay_names_the_caller_s_x_and_a_new_output_to_the_graph(monkeypatch):
    """A forward captured `addressed` (its kernels reading x and writing out through the address
    words) copies nothing in or out: each replay writes x's address and a new output's into the
    words, before the graph runs, and returns that output (zeros first where the launch leaves
    dropped tokens' rows unwritten); an x that is not contiguous or 16-byte aligned is read from
    an aligned copy."""
    io = torch.zeros(2, dtype=torch.int64)
    seen = []

    class Graph:
        def replay(self):
            seen.append(io.tolist())

    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))  # not zeros
    for zero_out in (False, True):  # as _capture leaves it: neither the captured x nor its out kept
        captured = CapturedForward(Graph(), None, (None, torch.zeros(3), None), io, addressed=True, zero_out=zero_out)
        x = torch.randn(3, 4)
        out, stats, _ = captured.replay(x, None)
        assert seen[-1] == [x.data_ptr(), out.data_ptr()] and out.shape == (3, 4)
        assert (not out.any()) if zero_out else out.isnan().all()
        later, _, _ = captured.replay(torch.randn(3, 4), None)
        assert later.data_ptr() != out.data_ptr()  # the earlier output is the caller's, untouched
    big = torch.randn(13)
    for x in (big[1:13].view(3, 4), torch.randn(4, 3).t()):  # 4 bytes off alignment, strided
        captured.replay(x, None)
        assert seen[-1][0] != x.data_ptr() and seen[-1][0] % 16 == 0


def test_a_replayed_training_forward_lends_its_saved_outputs_until_the_next_replay():
    """A replayed saving forward hands out the graph's own buffers, no copy. The next replay
    first gives the SavedForward lent before copies of them if it is still alive (its backward
    has not run), and copies nothing once it is gone (a forward, then its backward)."""
    pre, shared_pre, kept = torch.zeros(6, 4), torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.bool)
    routing = Routing(torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int64), kept, torch.rand(3, 8))
    static = SavedForward(routing, torch.arange(6), torch.tensor([[6]]), pre, shared_pre)
    outputs = (torch.zeros(3, 4), torch.zeros(3), static)
    captured = CapturedForward(_Replays(pre, shared_pre), torch.zeros(3, 4), outputs, torch.zeros(2, dtype=torch.int64),
                               addressed=False, zero_out=False)
    first = captured.replay(torch.ones(3, 4), None)[2]
    assert first.pre is pre and (pre == 1).all()
    second = captured.replay(torch.ones(3, 4), None)[2]  # the first is still waiting for its backward
    assert (first.pre == 1).all() and (first.shared_pre == 1).all()
    assert all(a is not b for a, b in [(first.pre, pre), (first.shared_pre, shared_pre), (first.slot, static.slot),
                                       (first.routing.kept, kept), (first.routing.weights, routing.weights),
                                       (first.routing.logits, routing.logits)])
    assert second.pre is pre and (pre == 2).all()
    del first, second  # both released (explicit_backward drops its SavedForward when its backward runs)
    assert captured.lent() is None
    third = captured.replay(torch.ones(3, 4), None)[2]
    assert third.pre is pre and (pre == 3).all() and third.routing is routing


def test_a_backward_releases_what_the_forward_saved_while_its_loss_is_still_held():
    """The usual loop holds the last loss (and its autograd graph) into the next forward: the
    saved forward must be released by its backward, not by the graph, or a CUDA graph's next
    replay would copy it every step. A second backward through the retained graph recomputes
    (test_backward_twice_through_a_retained_graph)."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=fresh_seed(), backward="saved")
    x = torch.randn(12, SMALL["hidden_size"], requires_grad=True)
    loss = layer(x).square().sum()
    node = loss.grad_fn
    while type(node).__name__ != "_ExplicitBackward":
        node = node.next_functions[0][0]
    assert node.saved_forward is not None
    loss.backward()
    assert node.saved_forward is None and loss.grad_fn is not None


def test_kept_graphs_hold_few_training_forwards():
    """Graphs are dropped least recently used first: training forwards' (keys of three fields,
    holding what they saved) past their own limit, then any past the overall one."""
    keys = [(64, False, "s"), (8, True), (128, False, "s"), (16, True), (256, False, "s")]
    assert graphs_to_drop(keys, max_graphs=8, max_saving=2) == [(64, False, "s")]
    assert graphs_to_drop(keys, max_graphs=3, max_saving=2) == [(64, False, "s"), (8, True)]
    assert graphs_to_drop(keys, max_graphs=8, max_saving=3) == []


@pytest.mark.parametrize("backward", ["saved", "recompute"])
def test_a_captured_step_runs_at_world_1_dropless_in_bf16(backward):
    """Inside a caller's CUDA graph capture the training step runs where it needs no host
    synchronisation: world 1, no capacity, bf16 per-expert products (the GPU replays it on new
    inputs: tests/gpu/check_backward.py). 64 tokens: over 10, the bf16 router gradient's error
    against float64 passed 1e-2 in 6 of 1,500 seeds (a token's two expert terms nearly cancel; max
    2.3e-2), over 64 never (max 6.6e-3)."""
    cfg = MoEConfig(**{**SMALL, "dtype": "bfloat16"}, top_k=2).to_dict()
    errs = step_as_if_captured(0, 1, cfg, fresh_seed(), backward, "step", shape=(4, 16))
    assert None not in errs.values() and max(errs.values()) <= 1e-2, errs


@pytest.mark.parametrize("backward", ["saved", "recompute"])
def test_a_captured_backward_with_capacity_is_refused(backward):
    cfg = MoEConfig(**{**SMALL, "dtype": "bfloat16"}, top_k=2, capacity_factor=1.0).to_dict()
    with pytest.raises(RuntimeError, match=r"backward cannot be captured in a CUDA graph here: with capacity_factor"):
        step_as_if_captured(0, 1, cfg, fresh_seed(), backward, "step")


@pytest.mark.parametrize("backward", ["saved", "recompute"])
def test_captured_per_expert_products_other_than_bf16_are_refused(backward):
    """float32 rows: torch._grouped_mm's float32 path (or a loop) reads the row counts on the host."""
    with pytest.raises(RuntimeError, match=r"for torch\.float32 rows of these sizes its per-expert products"):
        step_as_if_captured(0, 1, MoEConfig(**SMALL, top_k=2).to_dict(), fresh_seed(), backward, "step")


@pytest.mark.parametrize("backward", BACKWARDS)
def test_a_captured_training_forward_at_world_2_is_refused_on_every_rank(dist_pools, backward):
    """At world > 1 a forward under grad mode compares the ranks on the host (and backend torch's
    all-to-all takes its split sizes there): every rank raises, naming it, before any collective."""
    out = dist_pools(2).run_all(step_as_if_captured, MoEConfig(**SMALL, top_k=2).to_dict(), fresh_seed(),
                                backward, "step")
    for ok, err in out:
        assert not ok and err[0] == "RuntimeError", err
        assert "MoELayer's forward cannot be captured in a CUDA graph here: at world 2" in err[1], err


@pytest.mark.parametrize("backward", ["saved", "recompute"])
def test_a_captured_backward_at_world_2_is_refused_on_every_rank(dist_pools, backward):
    """The backward captured on its own after an eager forward: at world > 1 the all-to-all's split
    sizes come to the host, so every rank raises, naming it, before any collective."""
    out = dist_pools(2).run_all(step_as_if_captured, MoEConfig(**SMALL, top_k=2).to_dict(), fresh_seed(),
                                backward, "backward")
    for ok, err in out:
        assert not ok and err[0] == "RuntimeError" and "at world 2 its all-to-all split sizes" in err[1], err


@pytest.mark.parametrize("probe", [lambda: torch_ep.grouped_mm_works("cpu", torch.bfloat16),
                                   lambda: expert_grad._grouped_outer_works("cpu", torch.bfloat16)])
def test_a_probe_is_never_taken_inside_a_capture(monkeypatch, probe):
    """The one-time probes of torch._grouped_mm refuse a capture instead of caching a failure
    there as 'does not work' (which would send every later step down the synchronising loop)."""
    torch_ep.grouped_mm_works.cache_clear()
    expert_grad._grouped_outer_works.cache_clear()
    monkeypatch.setattr(capture, "capturing", lambda where: True)
    with pytest.raises(RuntimeError, match="probed once, on first use"):
        probe()
    monkeypatch.undo()
    assert probe()  # the refusal cached nothing


class _Scaled(torch.nn.Module):
    def forward(self, w):
        return 2 * w


def test_a_parametrized_weight_is_refused_by_the_explicit_backwards_and_works_elsewhere():
    """torch.nn.utils.parametrize keeps w_out as parametrizations.w_out.original: the explicit
    backwards would give it no gradient (they did, silently), so they refuse; inference (eager and
    compiled) and backend torch's autograd backward take it."""
    cfg = MoEConfig(**SMALL, top_k=2)
    x = torch.randn(6, cfg.hidden_size)
    layers = {b: MoELayer(cfg, seed=3, backward=b) for b in ("autograd", "recompute")}
    for layer in layers.values():
        torch.nn.utils.parametrize.register_parametrization(layer, "w_out", _Scaled())
    with pytest.raises(NotImplementedError, match="its weights w_out are not its own parameters; "
                                                  "parametrizations.w_out.original are parameters but not its weights"):
        layers["recompute"](x.clone().requires_grad_())
    with torch.no_grad():
        eager = layers["recompute"](x)
        compiled = torch.compile(layers["recompute"], backend="aot_eager", fullgraph=True)(x)
        plain = MoELayer(cfg, seed=3)
        plain.w_out.mul_(2)
        assert rel_err(eager, plain(x)) <= FP32_TOL and rel_err(compiled, eager) <= FP32_TOL
    (layers["autograd"](x) * x).sum().backward()
    assert layers["autograd"].parametrizations.w_out.original.grad is not None


WRAPPERS = {
    "prune": lambda layer: torch.nn.utils.prune.l1_unstructured(layer, "w_in", amount=0.3),
    "weight_norm": lambda layer: torch.nn.utils.weight_norm(layer, "w_out", dim=0),
    "spectral_norm": lambda layer: torch.nn.utils.spectral_norm(layer, "router_weight"),
    "a parameter of the user's": lambda layer: layer.register_parameter("scale", torch.nn.Parameter(torch.ones(1))),
}


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_a_hook_wrapped_weight_is_refused_by_the_explicit_backwards_and_trains_under_autograd(wrap):
    """prune, weight_norm and spectral_norm replace a weight by parameters of their own
    (w_in_orig, w_out_g and w_out_v, router_weight_orig) and make the weight in a forward
    pre-hook: the explicit backwards gave those parameters no gradient (None), silently, and the
    compiled op's backward a KeyError. They refuse now, eager and compiled; backend torch's
    autograd backward gives every parameter its gradient."""
    cfg = MoEConfig(**SMALL, top_k=2)
    x = torch.randn(6, cfg.hidden_size, requires_grad=True)
    layers = {b: MoELayer(cfg, seed=3, backward=b) for b in ("autograd", "saved", "recompute")}
    for layer in layers.values():
        WRAPPERS[wrap](layer)
    for name in ("saved", "recompute"):
        with pytest.raises(NotImplementedError, match="gives gradients to its own weights only"):
            layers[name](x)
    with pytest.raises(NotImplementedError, match="gives gradients to its own weights only"):
        torch.compile(layers["autograd"], backend="aot_eager")(x)
    (layers["autograd"](x) * x).sum().backward()
    missing = [n for n, p in layers["autograd"].named_parameters() if p.grad is None and n != "scale"]
    assert not missing


def test_a_frozen_parameter_of_the_user_s_is_taken_by_the_explicit_backwards():
    """It needs no gradient: only a parameter that trains is refused."""
    cfg = MoEConfig(**SMALL, top_k=2)
    x = torch.randn(6, cfg.hidden_size, requires_grad=True)
    layer, plain = MoELayer(cfg, seed=3, backward="saved"), MoELayer(cfg, seed=3, backward="saved")
    layer.register_parameter("scale", torch.nn.Parameter(torch.ones(1), requires_grad=False))
    (layer(x) * x).sum().backward()
    (plain(x) * x).sum().backward()
    assert all(torch.equal(p.grad, plain.get_parameter(n).grad) for n, p in layer.named_parameters() if n != "scale")


def parametrized_on_rank_0_only(rank, world):
    """weight_norm on rank 0's w_out only, backward "saved" -> what each rank raised."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2), seed=3, backward="saved")
    if rank == 0:
        torch.nn.utils.weight_norm(layer, "w_out", dim=0)
    try:
        layer(torch.randn(6, SMALL["hidden_size"], requires_grad=True))
    except (NotImplementedError, RuntimeError) as e:
        return str(e)
    return None


def test_a_parametrization_on_one_rank_is_refused_on_every_rank(dist_pools):
    """The refusal was raised by the rank alone, before the forward's exchange: the other rank's
    forward waited for it until the process group's timeout."""
    said = dist_pools(2).run(parametrized_on_rank_0_only)
    assert "gives gradients to its own weights only" in said[0], said
    assert said[1] is not None and "rank(s) [0] refused this MoE forward" in said[1], said


def test_a_nan_error_is_inf_so_that_no_max_drops_it():
    """max(0.0, nan) is 0.0 and NCCL's MAX keeps the finite value: the GPU checks took a NaN
    gradient for a pass."""
    assert rel_err(torch.tensor([float("nan"), 1.0]), torch.ones(2)) == float("inf")
    assert max(0.0, rel_err(torch.full((2,), float("nan")), torch.ones(2))) == float("inf")


def _explicit_node(out: torch.Tensor):
    """The layer's explicit-backward node in out's autograd graph."""
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_ExplicitBackward":
            return node
        stack += [fn for fn, _ in node.next_functions]
    raise AssertionError("no _ExplicitBackward node")


@pytest.mark.parametrize("hooks", ["checkpoint", "save_on_cpu"])
def test_backward_saved_keeps_nothing_of_its_own_under_saved_tensor_hooks(hooks):
    """What backward="saved" keeps (GEMM1's rows, the routing) was an autograd Function's own
    attribute, outside saved-tensor hooks: non-reentrant activation checkpointing freed none of
    it (2 MiB a layer here, held from forward to backward) and save_on_cpu left it on the device.
    Under such hooks it keeps nothing and its backward recomputes, with the same gradients."""
    cfg = MoEConfig(**SMALL, top_k=2)
    layer = MoELayer(cfg, seed=fresh_seed(), backward="saved")
    x = torch.randn(64, SMALL["hidden_size"], requires_grad=True)
    dy = torch.randn(x.shape)
    y = layer(x)
    assert _explicit_node(y).saved_forward is not None  # without hooks it keeps them
    y.backward(dy)
    want = [x.grad.clone(), *(p.grad.clone() for p in layer.parameters())]
    x.grad = None
    layer.zero_grad()
    if hooks == "checkpoint":
        y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    else:
        with torch.autograd.graph.save_on_cpu():
            y = layer(x)
    assert _explicit_node(y).saved_forward is None
    y.backward(dy)
    got = [x.grad, *(p.grad for p in layer.parameters())]
    assert all(rel_err(g, w) <= 1e-5 for g, w in zip(got, want, strict=True))


def test_the_compiled_backward_s_shapes_are_contiguous_as_its_gradients_are():
    """Backend torch takes a strided weight; the compiled backward op's fake gave its gradient the
    weight's strides while moe_backward makes contiguous ones, so inductor's stride assertion
    failed ("expected ... stride 128==1")."""
    import flashmoe_py.layer  # noqa: F401  (registers the ops)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        strided = torch.empty(8, 4).t()
        x, dy = torch.empty(3, 4), torch.empty(3, 4)
        grads = torch.ops.flashmoe.moe_backward(x, dy, [strided], torch.empty(1, dtype=torch.int64), None,
                                                [True, True])
    assert [tuple(g.shape) for g in grads] == [(3, 4), (4, 8)] and all(g.is_contiguous() for g in grads)


@pytest.mark.parametrize("lean", [False, True])
def test_a_gradient_the_backward_never_produced_fails_the_comparison(lean):
    """grad_errors and lean_grad_errors (the GPU checks' comparisons): a parameter that requires a
    gradient and is left without one (a backward that dropped it) counts as inf, not as nothing
    to compare; a frozen one is still skipped."""
    cfg = MoEConfig(hidden_size=64, ffn_size=96, num_experts=8, top_k=2, dtype="float32")
    layer = MoELayer(cfg, backend="torch", seed=fresh_seed())
    layer.w_in.requires_grad_(False)  # frozen: nothing to compare
    for name in ("router_weight", "w_out"):  # dropped after autograd accumulated it
        getattr(layer, name).register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    x, dy = torch.randn(37, 64, requires_grad=True), torch.randn(37, 64)
    errs = lean_grad_errors(layer, x, dy) if lean else grad_errors(layer, x, dy)
    assert errs["router_weight"] == errs["w_out"] == float("inf")
    assert errs["x"] <= 1e-5 and errs.get("w_in") is None
