"""Every routing mode of routing.route (torch ops) against the float64 reference, and the
properties MoEConfig's docstring states for each. (HF's own routers: tests/test_hf.py.)"""

import pytest
import torch
from decided import decided_choice
from grad_reference import rel_err

from flashmoe_py import MoEConfig
from flashmoe_py.reference import reference_routing
from flashmoe_py.routing import route
from seeds import fresh_seed

BASE = dict(hidden_size=24, ffn_size=8, num_experts=16, dtype="float32")

MODES = {
    "softmax_topk": dict(top_k=4),
    "softmax_topk, not renormalised": dict(top_k=4, renormalize=False),
    "topk_softmax, router bias": dict(top_k=4, routing="topk_softmax", router_bias=True),
    "sigmoid_grouped, 4 of 8 groups, scaled": dict(top_k=6, routing="sigmoid_grouped", n_group=8, topk_group=4,
                                                   routed_scaling_factor=2.5),
    "sigmoid_grouped, one group, not renormalised": dict(top_k=8, routing="sigmoid_grouped", renormalize=False),
    "topk_sigmoid": dict(top_k=1, routing="topk_sigmoid", renormalize=False),
    "topk_sigmoid, renormalised, capacity": dict(top_k=3, routing="topk_sigmoid", capacity_factor=0.5),
    "top-16 of 512, softmax": dict(top_k=16, num_experts=512),
}


def router_tensors(cfg: MoEConfig, gen: torch.Generator) -> dict:
    """Random router weights for cfg, each optional one it has included."""
    E, H = cfg.num_experts, cfg.hidden_size
    t = {"router_weight": torch.randn(E, H, generator=gen) / H ** 0.5}
    if cfg.router_bias:
        t["router_bias"] = torch.randn(E, generator=gen)
    if cfg.routing == "sigmoid_grouped":
        t["e_score_correction_bias"] = torch.randn(E, generator=gen) * 0.3
    return t


@pytest.mark.parametrize("mode", MODES)
def test_route_matches_reference(mode):
    cfg = MoEConfig(**{**BASE, **MODES[mode]})
    gen = torch.Generator().manual_seed(fresh_seed())
    biases = router_tensors(cfg, gen)
    router_weight = biases.pop("router_weight")
    for _ in range(20):  # with capacity, tokens are drawn again until no near-tie can move it (~1 draw in 150)
        x = torch.randn(61, cfg.hidden_size, generator=gen)
        rows = decided_choice(x, router_weight, cfg, biases.get("router_bias"),
                              biases.get("e_score_correction_bias"), margin=1e-5)
        if rows.all() or not cfg.capacity_factor:
            break
    r = route(x, router_weight, cfg, **biases)
    w, e, kept = reference_routing(x, router_weight, cfg, torch.float64, **biases)
    assert r.logits is None  # kept only when asked for
    logits = route(x, router_weight, cfg, **biases, keep_logits=True).logits
    want = x.double() @ router_weight.double().t() + biases.get("router_bias", torch.zeros(())).double()
    assert logits.dtype == torch.float32 and rel_err(logits, want) <= 1e-6
    assert rows.float().mean() > 0.5
    assert torch.equal(r.experts[rows], e[rows])
    torch.testing.assert_close(r.weights.double()[rows], w[rows], rtol=1e-5, atol=1e-7)
    if cfg.capacity_factor:
        assert rows.all(), "a near-tied token would move capacity for the others"
        assert torch.equal(r.kept, kept)
    else:
        assert r.kept is None


def test_grouped_routing_picks_from_the_best_groups_only():
    """Group g holds experts 4g..4g+3; a group scores its two best biased scores."""
    cfg = MoEConfig(**BASE, top_k=4, routing="sigmoid_grouped", n_group=4, topk_group=2)
    x = torch.randn(200, cfg.hidden_size)
    w = torch.randn(cfg.num_experts, cfg.hidden_size)
    bias = torch.randn(cfg.num_experts) * 0.3
    r = route(x, w, cfg, e_score_correction_bias=bias)
    biased = torch.sigmoid(x @ w.t()) + bias
    group_score = biased.view(-1, 4, 4).topk(2, dim=-1).values.sum(-1)
    for groups, picked in zip(group_score.topk(2, dim=-1).indices.tolist(), (r.experts // 4).tolist()):
        assert set(picked) <= set(groups)


def test_correction_bias_steers_the_choice_not_the_weights():
    """A large bias on expert 5 makes every token pick it; its weight is still its own unbiased
    sigmoid score (here not renormalised, scaled by 2)."""
    cfg = MoEConfig(**BASE, top_k=2, routing="sigmoid_grouped", renormalize=False, routed_scaling_factor=2.0)
    x = torch.randn(50, cfg.hidden_size)
    w = torch.randn(cfg.num_experts, cfg.hidden_size)
    bias = torch.zeros(cfg.num_experts)
    bias[5] = 10.0
    r = route(x, w, cfg, e_score_correction_bias=bias)
    assert (r.experts[:, 0] == 5).all()
    torch.testing.assert_close(r.weights[:, 0], 2.0 * torch.sigmoid(x @ w[5]))


@pytest.mark.parametrize("routing,renormalize", [("softmax_topk", True), ("topk_softmax", True),
                                                 ("sigmoid_grouped", True), ("topk_sigmoid", True)])
def test_renormalised_weights_sum_to_the_scaling_factor(routing, renormalize):
    cfg = MoEConfig(**BASE, top_k=3, routing=routing, renormalize=renormalize, routed_scaling_factor=1.5)
    bias = torch.zeros(16) if routing == "sigmoid_grouped" else None
    r = route(torch.randn(40, 24), torch.randn(16, 24), cfg, e_score_correction_bias=bias)
    torch.testing.assert_close(r.weights.sum(-1), torch.full((40,), 1.5))


def test_route_names_a_missing_or_unexpected_router_tensor():
    x, w = torch.randn(4, 24), torch.randn(16, 24)
    with pytest.raises(ValueError, match="router_bias is missing: this config has router_bias=True"):
        route(x, w, MoEConfig(**BASE, top_k=2, routing="topk_softmax", router_bias=True))
    with pytest.raises(ValueError, match="e_score_correction_bias was given, but only a layer with "
                                         "routing='sigmoid_grouped' has it"):
        route(x, w, MoEConfig(**BASE, top_k=2), e_score_correction_bias=torch.zeros(16))


@pytest.mark.parametrize("rows", [32, 8])  # more experts than the config (ids out of range), fewer
def test_route_refuses_a_router_weight_of_another_shape(rows):
    with pytest.raises(ValueError, match=f"router_weight has shape \\({rows}, 24\\), expected "
                                         "\\[num_experts, hidden_size\\] = \\(16, 24\\)"):
        route(torch.randn(4, 24), torch.randn(rows, 24), MoEConfig(**BASE, top_k=2))


@pytest.mark.parametrize("shape", [(2, 4, 24), (24,), (4, 12)])
def test_route_takes_x_as_tokens_by_hidden_size(shape):
    with pytest.raises(ValueError, match=f"x has shape \\({', '.join(map(str, shape))},?\\), "
                                         "expected \\[tokens, hidden_size=24\\]"):
        route(torch.randn(shape), torch.randn(16, 24), MoEConfig(**BASE, top_k=2))


def test_route_refuses_integer_inputs():
    with pytest.raises(ValueError, match="router_weight has dtype torch.bool; route takes a floating-point"):
        route(torch.randn(4, 24), torch.ones(16, 24, dtype=torch.bool), MoEConfig(**BASE, top_k=2))


def test_an_address_word_for_x_is_refused_where_torch_routes():
    """x_at names where the router kernel reads x; torch's ops (here: the CPU) would read x itself,
    silently other rows than the word names: refused."""
    with pytest.raises(ValueError, match="x_at: the router kernel reads x at an address word, but here torch's ops"):
        route(torch.randn(4, 24), torch.randn(16, 24), MoEConfig(**BASE, top_k=2),
              x_at=torch.zeros(1, dtype=torch.int64))


def test_an_address_word_for_a_strided_x_is_refused():
    """The kernel reads the word's rows as a contiguous [tokens, hidden] tensor, so an x of other
    strides (whose contiguous copy route would pass the kernel) cannot stand in for them."""
    with pytest.raises(ValueError, match=r"x: with x_at the router kernel reads x's rows .* strides \(1, 4\)"):
        route(torch.randn(24, 4).t(), torch.randn(16, 24), MoEConfig(**BASE, top_k=2),
              x_at=torch.zeros(1, dtype=torch.int64))
