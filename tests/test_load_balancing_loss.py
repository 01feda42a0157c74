"""MoELayer.load_balancing_loss: the auxiliary loss of Switch Transformer and Mixtral over the
layer's own routing, as transformers computes it, differentiable in x and the router's weights
with every backward, and refusing bad input by name."""

import pytest
import torch
from seeds import fresh_seed
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from flashmoe_py import MoEConfig, MoELayer, reference_forward
from flashmoe_py.routing import load_balancing_loss


def rel_err(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("backward", ["autograd", "saved", "recompute"])
def test_the_loss_is_transformers_and_its_gradients_add_to_the_layers(backward):
    """Mixtral's routing (softmax, top-2) on [batch, seq, H] tokens: the loss is transformers'
    load_balancing_loss_func of the router's logits, and a step on y . dy + 0.5 * loss gives x and
    the router's weight the gradients of that sum through the float64 reference and transformers'
    function."""
    cfg = MoEConfig(hidden_size=32, ffn_size=24, num_experts=6, top_k=2, dtype="float32")
    layer = MoELayer(cfg, seed=fresh_seed(), backward=backward)
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(3, 7, 32, generator=g, requires_grad=True)
    dy = torch.randn(3, 7, 32, generator=g)
    loss = layer.load_balancing_loss(x)
    ((layer(x) * dy).sum() + 0.5 * loss).backward()

    full = {n: t.detach().double().requires_grad_() for n, t in layer.full_weight_dict().items()}
    x64 = x.detach().double().requires_grad_()
    want = load_balancing_loss_func((x64.view(-1, 32) @ full["router_weight"].t(),), 6, 2)
    assert abs(loss.item() - want.item()) <= 1e-6 * want.item()
    ((reference_forward(x64, config=cfg, compute_dtype=torch.float64, **full) * dy).sum() + 0.5 * want).backward()
    assert rel_err(x.grad, x64.grad) <= 1e-5
    assert rel_err(layer.router_weight.grad, full["router_weight"].grad) <= 1e-5


def test_a_fresh_layer_s_loss_and_forward_compile_into_one_graph():
    """torch.compile(fullgraph=True) of a step's forward (the layer's output and its loss) on a layer
    that has not run yet: one graph, no break (the weights' expected shapes are set when the
    layer is built, not on first use), and the eager step's values."""
    cfg = MoEConfig(hidden_size=32, ffn_size=24, num_experts=6, top_k=2, dtype="float32")
    layer = MoELayer(cfg, seed=fresh_seed())
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(fresh_seed()))

    def step(x):
        return layer(x).sum() + layer.load_balancing_loss(x)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    assert rel_err(compiled, step(x)) <= 1e-6


@pytest.mark.parametrize("routing", ["softmax_topk", "topk_softmax", "sigmoid_grouped", "topk_sigmoid"])
def test_uniform_routing_gives_top_k_and_crowding_more(routing):
    """Every expert with the same share of slots and equal probabilities: top_k, for every
    routing; every slot on one expert that also has most of the probability: more."""
    cfg = MoEConfig(hidden_size=8, ffn_size=8, num_experts=4, top_k=2, routing=routing,
                    **({"n_group": 2, "topk_group": 1} if routing == "sigmoid_grouped" else {}))
    experts = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    assert float(load_balancing_loss(torch.zeros(4, 4), experts, cfg)) == pytest.approx(2.0, abs=1e-6)
    crowded = torch.tensor([[4.0, 0, 0, 0]]).expand(4, 4)
    assert float(load_balancing_loss(crowded, torch.zeros(4, 2, dtype=torch.int64), cfg)) > 3.0


def test_sigmoid_routings_normalise_each_tokens_scores():
    """sigmoid_grouped (DeepSeek-V3): P_e is the mean of each token's sigmoid scores over their
    sum; the experts counted are those the layer chooses, its correction bias steering them."""
    cfg = MoEConfig(hidden_size=16, ffn_size=8, num_experts=8, top_k=2, routing="sigmoid_grouped", n_group=4,
                    topk_group=2, dtype="float32")
    layer = MoELayer(cfg, seed=fresh_seed())
    with torch.no_grad():
        layer.e_score_correction_bias.copy_(torch.linspace(0, 3, 8))
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(fresh_seed()), dtype=torch.float32)
    s = torch.sigmoid(x.double() @ layer.router_weight.detach().double().t())
    chosen = layer.route(x).experts
    share = torch.bincount(chosen.reshape(-1), minlength=8).double() / 40
    want = 8 * (share * (s / s.sum(-1, keepdim=True)).mean(0)).sum()
    assert abs(layer.load_balancing_loss(x).item() - float(want)) <= 1e-6 * float(want)
    assert share[-1] > share[0]  # the bias steered the choice, and the loss counted it


def test_router_bias_is_in_the_logits_and_no_tokens_give_zero():
    cfg = MoEConfig(hidden_size=16, ffn_size=8, num_experts=4, top_k=1, routing="topk_softmax", router_bias=True,
                    dtype="float32")
    layer = MoELayer(cfg, seed=fresh_seed())
    x = torch.randn(30, 16)
    logits = x @ layer.router_weight.detach().t() + layer.router_bias.detach()
    want = load_balancing_loss_func((logits,), 4, 1)
    assert abs(layer.load_balancing_loss(x).item() - float(want)) <= 1e-6 * float(want)
    empty = torch.zeros(0, 16, requires_grad=True)
    loss = layer.load_balancing_loss(empty)
    loss.backward()
    assert loss.item() == 0.0 and float(layer.router_bias.grad.abs().sum()) == 0.0


def test_bad_input_is_refused_by_name():
    layer = MoELayer(MoEConfig(hidden_size=16, ffn_size=8, num_experts=4, top_k=1, dtype="float32"), seed=0)
    with pytest.raises(ValueError, match="x has dtype torch.float64"):
        layer.load_balancing_loss(torch.randn(5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="x"):
        layer.load_balancing_loss(torch.randn(5, 15))


def loss_under_fsdp_per_block(rank, world) -> str:
    """tests/test_data_parallel's model (a Linear, then the layer), the layer's block sharded on its
    own, as torchtitan shards blocks -> what load_balancing_loss raised outside its forward."""
    from test_data_parallel import model, wrap
    net = model(3, "autograd")
    wrap(net, "fsdp_per_block", world)
    try:
        net[1].load_balancing_loss(torch.randn(5, 32))
    except ValueError as e:
        return str(e)
    return "nothing raised"


def test_a_sharded_router_is_refused_by_name(dist_pools):
    for said in dist_pools(2).run(loss_under_fsdp_per_block):
        assert "load_balancing_loss: router_weight is sharded here" in said, said
