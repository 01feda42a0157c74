"""Which tokens' routing no rounding can change (shared by the router tests)."""

import torch


def decided_choice(x, router_weight, cfg, router_bias=None, correction=None, margin=1e-4) -> torch.Tensor:
    """[T] bool: tokens whose k+1 largest float64 choice values (logits + router bias, or for
    'sigmoid_grouped' the sigmoid scores + correction bias), and grouped, their group scores, are
    all more than margin apart."""
    logits = x.double() @ router_weight.double().t() + (0 if router_bias is None else router_bias.double())
    choice = logits.sigmoid() + correction.double() if cfg.routing == "sigmoid_grouped" else logits
    top = choice.sort(dim=1, descending=True).values[:, :cfg.top_k + 1]
    ok = (top[:, :-1] - top[:, 1:]).min(dim=1).values > margin
    if cfg.routing == "sigmoid_grouped" and cfg.n_group > 1:
        groups = choice.view(len(x), cfg.n_group, -1).topk(2, dim=-1).values.sum(-1).sort(dim=1).values
        ok &= (groups[:, 1:] - groups[:, :-1]).min(dim=1).values > margin
    return ok
