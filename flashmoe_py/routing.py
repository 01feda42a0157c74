"""Router scoring, top-k and the capacity policy: every backend's first stage (the router kernel
on GPUs, torch ops otherwise)."""

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


def route(x: torch.Tensor, router_weight: torch.Tensor, config: MoEConfig) -> Routing:
    """x: [tokens, hidden]; router_weight: [num_experts, hidden]. Scores are a softmax over all
    experts in fp32; the top-k weights are renormalised to sum to 1 when config.renormalize.
    On a GPU, with x and router_weight of one dtype and up to MAX_EXPERTS experts, one kernel
    does it all (kernels/router.py), unless autograd records a graph through x or router_weight:
    the kernel has no backward, so the torch ops route then (in bf16 a near-tied token may pick
    another k-th expert than the kernel would)."""
    if (x.is_cuda and router_weight.dtype == x.dtype and config.num_experts <= MAX_EXPERTS
            and not _records_graph(x, router_weight)):
        weights, experts = router_topk(x.contiguous(), router_weight.contiguous(), config.top_k,
                                       config.renormalize)
    else:
        logits = x.float() @ router_weight.float().t()
        probs = torch.softmax(logits, dim=-1)
        weights, experts = torch.topk(probs, config.top_k, dim=-1)
        if config.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    kept = None
    capacity = config.capacity(x.shape[0])
    if capacity is not None:
        kept = keep_within_capacity(experts, config.num_experts, capacity)
    return Routing(weights, experts, kept)


def _records_graph(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


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
