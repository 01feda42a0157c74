"""Router scoring, top-k and the capacity policy: every backend's first stage (the router kernel
on GPUs, torch ops otherwise; both for every routing MoEConfig has)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MoEConfig
from .kernels.router import MAX_EXPERTS, router_topk


@dataclass
class Routing:
    """weights: [tokens, top_k] fp32; experts: [tokens, top_k] int64 global expert ids;
    kept: [tokens, top_k] bool, or None when dropless."""

    weights: torch.Tensor
    experts: torch.Tensor
    kept: torch.Tensor | None


def route(x: torch.Tensor, router_weight: torch.Tensor, config: MoEConfig, *,
          router_bias: torch.Tensor | None = None,
          e_score_correction_bias: torch.Tensor | None = None) -> Routing:
    """x: [tokens, hidden]; router_weight: [num_experts, hidden]; router_bias: [num_experts] when
    config.router_bias; e_score_correction_bias: [num_experts] when config.routing is
    'sigmoid_grouped' (MoEConfig describes each routing). Scores in fp32, the best expert first.
    On a GPU, with router_weight in x's dtype or fp32 and up to MAX_EXPERTS experts, every
    routing is one kernel (kernels/router.py), unless autograd records a graph through x,
    router_weight or router_bias: the kernel has no backward, so the torch ops route then (in
    bf16 a near-tied token may pick another k-th expert than the kernel would)."""
    config.check_weights({"router_bias": router_bias, "e_score_correction_bias": e_score_correction_bias})
    if _router_kernel_fits(x, router_weight, config) and not _records_graph(x, router_weight, router_bias):
        weights, experts = router_topk(
            x.contiguous(), router_weight.contiguous(), config.top_k, config.renormalize, routing=config.routing,
            router_bias=router_bias, correction_bias=e_score_correction_bias, n_group=config.n_group,
            topk_group=config.topk_group, scaling=config.routed_scaling_factor)
    else:
        logits = x.float() @ router_weight.float().t()
        if router_bias is not None:
            logits = logits + router_bias.float()
        weights, experts = _SCORERS[config.routing](logits, config, e_score_correction_bias)
        if config.routed_scaling_factor != 1.0:
            weights = weights * config.routed_scaling_factor
    kept = None
    capacity = config.capacity(x.shape[0])
    if capacity is not None:
        kept = keep_within_capacity(experts, config.num_experts, capacity)
    return Routing(weights, experts, kept)


def _router_kernel_fits(x: torch.Tensor, router_weight: torch.Tensor, config: MoEConfig) -> bool:
    return (x.is_cuda and router_weight.dtype in (x.dtype, torch.float32)
            and config.num_experts <= MAX_EXPERTS)


# Each scorer: logits [T, E] fp32 -> (weights [T, k], experts [T, k] int64), before scaling.

def _softmax_topk(logits: torch.Tensor, config: MoEConfig, _correction) -> tuple[torch.Tensor, torch.Tensor]:
    weights, experts = torch.topk(torch.softmax(logits, dim=-1), config.top_k, dim=-1)
    if config.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def _topk_softmax(logits: torch.Tensor, config: MoEConfig, _correction) -> tuple[torch.Tensor, torch.Tensor]:
    top, experts = torch.topk(logits, config.top_k, dim=-1)
    return torch.softmax(top, dim=-1), experts


def _topk_sigmoid(logits: torch.Tensor, config: MoEConfig, _correction) -> tuple[torch.Tensor, torch.Tensor]:
    top, experts = torch.topk(logits, config.top_k, dim=-1)
    return _renormalize_sigmoid(torch.sigmoid(top), config), experts


def _sigmoid_grouped(logits: torch.Tensor, config: MoEConfig,
                     correction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.sigmoid(logits)
    choice = scores.detach() + correction  # steers the choice only: no gradient through it
    if config.topk_group < config.n_group:
        T, E = choice.shape
        group_score = choice.view(T, config.n_group, E // config.n_group).topk(2, dim=-1).values.sum(dim=-1)
        kept_groups = group_score.topk(config.topk_group, dim=-1).indices
        dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, kept_groups, False)
        choice = choice.masked_fill(dropped.repeat_interleave(E // config.n_group, dim=1), float("-inf"))
    experts = torch.topk(choice, config.top_k, dim=-1).indices
    return _renormalize_sigmoid(scores.gather(1, experts), config), experts


def _renormalize_sigmoid(weights: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) if config.renormalize else weights


_SCORERS = {"softmax_topk": _softmax_topk, "topk_softmax": _topk_softmax,
            "sigmoid_grouped": _sigmoid_grouped, "topk_sigmoid": _topk_sigmoid}


def _records_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def keep_within_capacity(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """experts: [tokens, top_k] -> kept: [tokens, top_k] bool.

    Slots claim an expert's `capacity` places in order of (choice rank k, token index), so every
    token's first choice is served before any second choice."""
    tokens, top_k = experts.shape
    flat = experts.t().reshape(-1)  # slot order (k, token)
    order = torch.sort(flat, stable=True).indices
    counts = histogram(flat, num_experts)
    group_start = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.empty_like(flat)
    rank_in_expert[order] = torch.arange(flat.numel(), device=flat.device) - group_start[flat[order]]
    return (rank_in_expert < capacity).view(top_k, tokens).t()


def histogram(values: torch.Tensor, bins: int) -> torch.Tensor:
    """[bins] int64 counts of int64 `values` in [0, bins); unlike torch.bincount on CUDA, this
    needs no host synchronisation."""
    counts = torch.zeros(bins, dtype=torch.int64, device=values.device)
    return counts.scatter_add_(0, values, torch.ones_like(values))
