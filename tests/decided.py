"""Which tokens' routing no rounding can change (shared by the router tests)."""

import math

import torch


def decided_choice(x, router_weight, cfg, router_bias=None, correction=None, margin=1e-4) -> torch.Tensor:
    """[T] bool: tokens whose k+1 largest float64 choice values (logits + router bias, or for
    'sigmoid_grouped' the sigmoid scores + correction bias), and grouped, their group scores, are
    all more than margin apart."""
    logits = x.double() @ router_weight.double().t() + (0 if router_bias is None else router_bias.double())
    choice = logits.sigmoid() + correction.double() if cfg.routing == "sigmoid_grouped" else logits
    ok = torch.ones(len(x), dtype=torch.bool)
    if cfg.routing == "sigmoid_grouped" and cfg.n_group > 1:
        scores = choice.view(len(x), cfg.n_group, -1).topk(2, dim=-1).values.sum(-1)  # [T, groups]
        groups = scores.sort(dim=1).values
        ok &= (groups[:, 1:] - groups[:, :-1]).min(dim=1).values > margin
        # the experts are the k largest of the chosen groups' (not of all: a near tie there decides)
        best = scores.topk(cfg.topk_group, dim=1).indices
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.view(len(x), cfg.n_group, -1).masked_fill(~chosen[..., None], -math.inf).view(len(x), -1)
    top = choice.sort(dim=1, descending=True).values[:, :cfg.top_k + 1]
    return ok & ((top[:, :-1] - top[:, 1:]).min(dim=1).values > margin)
