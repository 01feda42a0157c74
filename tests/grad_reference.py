"""What each rank's gradients must be, from float64 autograd through reference_forward (shared by
tests/test_backward.py and tests/gpu/check_backward.py).

At world W each rank routes its own tokens (capacity per source rank), so the reference gradient
of rank r's loss is that of reference_forward on rank r's tokens. What each rank's .grad holds:
  x:              rank r's own reference gradient;
  router_weight:  rank r's own reference gradient (replicated: only this rank's tokens' part);
  w_in, w_out:    the sum over every rank's reference gradient, for the experts rank r holds."""

import torch
import torch.distributed as dist

from flashmoe_py import MoELayer, reference_forward
from flashmoe_py.config import EXPERT_WEIGHTS
from flashmoe_py.gate_up import WEIGHTS as GATE_UP_WEIGHTS
from flashmoe_py.gate_up import to_halves


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    diff, norm = (got.double() - want.double()).norm(), want.double().norm()
    return float(diff / norm) if norm > 0 else float(diff)


def reference_grads(layer: MoELayer, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """d(sum(out * dy)) / d(x and each of the layer's parameters), by name, for this rank's tokens
    x [T, H], in float64 (collective: the expert weights' gradients are summed over ranks, then
    cut to this rank's experts; the correction bias is a buffer that only steers the choice)."""
    full = {name: t.detach().double() for name, t in layer.full_weight_dict().items()}
    leaves = {"x": x.detach().double().requires_grad_()}
    leaves |= {name: t.requires_grad_() for name, t in full.items() if name != "e_score_correction_bias"}
    out = reference_forward(leaves["x"], config=layer.config, compute_dtype=torch.float64, **full)
    if out.requires_grad:
        grads = dict(zip(leaves, torch.autograd.grad((out * dy.double()).sum(), list(leaves.values()))))
    else:  # no tokens: nothing depends on the weights
        grads = {name: torch.zeros_like(t) for name, t in leaves.items()}
    mine = torch.tensor(layer.placement.experts_on(layer.rank), device=x.device)
    for name in [n for n in EXPERT_WEIGHTS if n in grads]:  # the same order on every rank
        if layer.world_size > 1:
            dist.all_reduce(grads[name], group=layer.process_group)
        grads[name] = grads[name][mine]
    return grads


def grad_errors(layer: MoELayer, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """Backward of sum(layer(x) * dy), x [..., H] -> {x or parameter name: relative error against
    the reference}; None where .grad is None (x that needs no gradient)."""
    (layer(x) * dy).sum().backward()
    H = layer.config.hidden_size
    want = reference_grads(layer, x.reshape(-1, H), dy.reshape(-1, H))
    got = {"x": None if x.grad is None else x.grad.reshape(-1, H)}
    got |= {name: p.grad for name, p in layer.named_parameters()}
    if layer.config.gated:  # the layer's gate/up pairs -> the reference's halves
        got |= {n: to_halves(got[n]) for n in GATE_UP_WEIGHTS if got.get(n) is not None}
    assert set(got) == set(want), (sorted(got), sorted(want))
    return {n: None if got[n] is None else rel_err(got[n], want[n]) for n in want}
