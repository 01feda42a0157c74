"""The routing weights' backward in one pass (kernels/weights_grad.py): the gradient of the router's
logits from that of the chosen experts' weights, for every routing mode, renormalised or not, with a
routed scaling factor. In the Triton interpreter (or on a GPU) against float64 autograd through
routing.weights_for and against the torch steps the CPU backward takes (routing.weights_backward),
on fresh random logits: expert counts and top-k that are not powers of two, token counts that are not
a multiple of the token block; the output poisoned first."""

import os

import pytest
import torch
from grad_reference import rel_err

from flashmoe_py import MoEConfig
from flashmoe_py.kernels import weights_grad as wg
from flashmoe_py.routing import weights_backward, weights_for
from seeds import fresh_seed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

ROUTINGS = {  # name: MoEConfig fields
    "softmax_topk": dict(routing="softmax_topk", renormalize=False),
    "softmax_topk, renormalised": dict(routing="softmax_topk", renormalize=True),
    "topk_softmax": dict(routing="topk_softmax"),
    "topk_sigmoid, renormalised, scaled": dict(routing="topk_sigmoid", renormalize=True, routed_scaling_factor=2.5),
    "sigmoid_grouped": dict(routing="sigmoid_grouped", renormalize=False, n_group=4, topk_group=2),
}


def close(got, want) -> bool:
    """Within 1e-5 of want, relatively; where want is zero (one expert renormalised: its weight is 1
    whatever the logits), within 1e-6 of zero."""
    if want.double().norm() < 1e-9:
        return float(got.abs().max()) <= 1e-6
    return rel_err(got, want) <= 1e-5


def draw(tokens, experts, top_k, fields):
    cfg = MoEConfig(hidden_size=8, ffn_size=8, num_experts=experts, top_k=top_k, dtype="float32", **fields)
    g = torch.Generator().manual_seed(fresh_seed())
    logits = torch.randn(tokens, experts, generator=g) * 2
    chosen = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :top_k]  # any distinct experts
    grad = torch.randn(tokens, top_k, generator=g)
    return cfg, logits.to(DEVICE), chosen.to(DEVICE), grad.to(DEVICE)


@pytest.mark.skipif(not RUNS, reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("tokens,experts,top_k,index", [(37, 20, 3, torch.int64), (5, 128, 8, torch.int32),
                                                        (70, 12, 1, torch.int64), (9, 64, 6, torch.int32),
                                                        (6, 256, 1, torch.int64)])
def test_matches_autograd_and_the_torch_steps(routing, tokens, experts, top_k, index):
    """(6, 256, 1): one choice of many experts, the block sized by the logits rows, not the one-hot."""
    fields = ROUTINGS[routing]
    if fields.get("n_group") and experts % fields["n_group"]:
        pytest.skip("experts must split into the groups")
    cfg, logits, chosen, grad = draw(tokens, experts, top_k, fields)
    got = wg.weights_grad(logits, chosen.to(index), cfg, grad)
    leaf = logits.double().requires_grad_()
    (weights_for(leaf, chosen, cfg) * grad.double()).sum().backward()
    assert got.dtype == torch.float32 and got.shape == logits.shape
    assert close(got, leaf.grad), rel_err(got, leaf.grad)
    assert close(got, weights_backward(logits, chosen, cfg, grad))


@pytest.mark.skipif(not RUNS, reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's sigmoid of -100
def test_large_logits_agree_with_the_torch_steps(routing):
    """Logits of magnitude ~100 (the softmax's exponent centred, the sigmoid saturated to 0 or 1):
    no NaN, and the torch steps' fp32 values to within 4 float32 ulps of the gradient's scale.
    Saturated, a weight's gradient p(g - sum p g) cancels terms of that scale to ~1e-4 of it, so
    relative errors are rounding of the terms, not of the result (one seed in some hundreds
    put the two orders of summation 3.6e-5 apart relatively, 0.46 ulp at the gradient's scale;
    against float64 the saturation itself differs)."""
    cfg, logits, chosen, grad = draw(21, 32, 4, ROUTINGS[routing])
    logits = logits * 50
    chosen = torch.topk(logits, 4, dim=1).indices  # as a router chooses: a renormalised total is never 0
    got = wg.weights_grad(logits, chosen, cfg, grad)
    want = weights_backward(logits, chosen, cfg, grad)
    assert not got.isnan().any()
    assert (got - want).abs().max() <= 4 * torch.finfo(torch.float32).eps * grad.abs().max()


@pytest.mark.skipif(not RUNS, reason="needs a GPU or the Triton interpreter")
def test_no_tokens_give_an_empty_gradient():
    cfg, logits, chosen, grad = draw(0, 16, 2, ROUTINGS["softmax_topk"])
    assert wg.weights_grad(logits, chosen, cfg, grad).shape == (0, 16)


@pytest.mark.skipif(not RUNS, reason="needs a GPU or the Triton interpreter")
def test_every_row_is_written(monkeypatch):
    """The output starts as NaN: every token's row, chosen or not, must be overwritten."""
    cfg, logits, chosen, grad = draw(33, 24, 4, ROUTINGS["topk_softmax"])
    monkeypatch.setattr(wg.torch, "empty_like", lambda t: torch.full_like(t, float("nan")))
    got = wg.weights_grad(logits, chosen.int(), cfg, grad)
    assert not got.isnan().any()
    assert rel_err(got, weights_backward(logits, chosen, cfg, grad)) <= 1e-5


def test_bad_arguments_are_refused_by_name():
    cfg = MoEConfig(hidden_size=8, ffn_size=8, num_experts=6, top_k=2, dtype="float32")
    logits, chosen, grad = torch.randn(4, 6), torch.zeros(4, 2, dtype=torch.int64), torch.randn(4, 2)
    with pytest.raises(ValueError, match="logits"):
        wg.weights_grad(logits.double(), chosen, cfg, grad)
    with pytest.raises(ValueError, match=r"logits must be \[T, E\]"):
        wg.weights_grad(logits[None], chosen, cfg, grad)
    with pytest.raises(ValueError, match="experts"):
        wg.weights_grad(logits, chosen[:, :1], cfg, grad)
    with pytest.raises(ValueError, match="experts"):
        wg.weights_grad(logits, chosen.float(), cfg, grad)
    with pytest.raises(ValueError, match="grad"):
        wg.weights_grad(logits, chosen, cfg, grad.double())
