"""Gradients through MoELayer: right where a backward is claimed, refused everywhere else.

Where a backward exists (backend "torch", one rank, routing in torch ops), every gradient matches
float64 autograd through reference_forward. Elsewhere a forward that would record a graph raises
NotImplementedError on every rank, so no wrong gradient is ever handed back."""

import pytest
import torch

from flashmoe_py import MoEConfig, MoELayer, reference_forward

SMALL = dict(hidden_size=32, ffn_size=48, num_experts=4, dtype="float32")


def rel_err(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


def reference_grads(layer, x, dy) -> dict:
    """d(sum(out * dy)) / d(x and each of the layer's parameters), by name, in float64 through the
    reference (the correction bias is a buffer: it only steers selection, and has no gradient)."""
    leaves = {"x": x.detach().double().requires_grad_()}
    full = {name: t.detach().double() for name, t in layer.full_weight_dict().items()}
    leaves |= {name: t.requires_grad_() for name, t in full.items() if name != "e_score_correction_bias"}
    out = reference_forward(leaves["x"], config=layer.config, compute_dtype=torch.float64, **full)
    return dict(zip(leaves, torch.autograd.grad((out * dy.double()).sum(), list(leaves.values()))))


def check_gradients(cfg: MoEConfig) -> None:
    layer = MoELayer(cfg, seed=torch.seed() % 2**31)
    x = torch.randn(2, 9, cfg.hidden_size, requires_grad=True)  # [batch, seq, H]
    dy = torch.randn(2, 9, cfg.hidden_size)
    (layer(x) * dy).sum().backward()
    want = reference_grads(layer, x.view(18, -1), dy.view(18, -1))
    assert set(want) == {"x"} | {name for name, _ in layer.named_parameters()}
    for name, w in want.items():
        g = x.grad.view(18, -1) if name == "x" else getattr(layer, name).grad
        assert g is not None, name
        assert rel_err(g, w) <= 1e-5, name


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("top_k,capacity_factor,renormalize", [(1, None, False), (2, None, True), (3, 0.7, True)])
def test_one_rank_gradients_match_reference(activation, top_k, capacity_factor, renormalize):
    """(top-1 is not renormalised: its one weight would be 1, and the router's gradient 0.)"""
    check_gradients(MoEConfig(**SMALL, top_k=top_k, activation=activation, capacity_factor=capacity_factor,
                              renormalize=renormalize))


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


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_rank_gradients_match_reference_for_every_variant(variant):
    """Router, expert and shared-expert parameters, biases included, and the input."""
    check_gradients(MoEConfig(**{**SMALL, **VARIANTS[variant]}))


def forward_in_grad_mode(rank, world, cfg: dict):
    layer = MoELayer(MoEConfig.from_dict(cfg))
    x = torch.randn(6, cfg["hidden_size"], requires_grad=True)
    layer(x)


def test_no_backward_across_ranks_raises_on_every_rank(dist_pools):
    """World 2: the all-to-all has no backward yet, so grad mode is refused by both ranks, the
    rank that saw it and its peer (which must not wait for a forward that never comes)."""
    out = dist_pools(2).run_all(forward_in_grad_mode, MoEConfig(**SMALL, top_k=2).to_dict())
    assert [ok for ok, _ in out] == [False, False]
    assert {err[0] for _, err in out} <= {"NotImplementedError", "PeerInputError"}
    assert any(err[0] == "NotImplementedError" and "backward is not implemented" in err[1] for _, err in out)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_inference_contexts_record_nothing(context):
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    with context():
        out = layer(torch.randn(5, 32, requires_grad=True))
    assert out.grad_fn is None and not out.requires_grad


def test_frozen_layer_and_input_need_no_backward():
    layer = MoELayer(MoEConfig(**SMALL, top_k=2)).requires_grad_(False)
    assert layer(torch.randn(5, 32)).grad_fn is None


def test_compiled_layer_refuses_grad_mode():
    """The compiled layer is one custom op with no autograd formula: grad mode is refused there."""
    layer = MoELayer(MoEConfig(**SMALL, top_k=2))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="no backward"):
        compiled(torch.randn(5, 32))
