"""Router scoring, top-k and the capacity policy: every backend's first stage (the router kernel
on GPUs, torch ops otherwise; both for every routing MoEConfig has)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MoEConfig
from .kernels.router import router_topk
from .lean_autograd import fp32_product


@dataclass
class Routing:
    """weights: [tokens, top_k] fp32; experts: [tokens, top_k] int64 global expert ids;
    kept: [tokens, top_k] bool, or None when dropless; logits: [tokens, num_experts] fp32 (router
    bias included), the scores' inputs, when route() was asked to keep them (the explicit
    backward's), else None."""

    weights: torch.Tensor
    experts: torch.Tensor
    kept: torch.Tensor | None
    logits: torch.Tensor | None = None


def route(x: torch.Tensor, router_weight: torch.Tensor, config: MoEConfig, *,
          router_bias: torch.Tensor | None = None,
          e_score_correction_bias: torch.Tensor | None = None, keep_logits: bool = False,
          x_at: torch.Tensor | None = None) -> Routing:
    """x: [tokens, hidden]; router_weight: [num_experts, hidden]; router_bias: [num_experts] when
    config.router_bias; e_score_correction_bias: [num_experts] when config.routing is
    'sigmoid_grouped' (MoEConfig describes each routing). Scores in fp32, the best expert first.
    On a GPU, with router_weight in x's dtype or fp32, every routing is one kernel
    (kernels/router.py), unless autograd records a graph through x, router_weight or router_bias:
    the kernel has no backward, so the torch ops route then (in bf16 a near-tied token may pick
    another k-th expert than the kernel would). keep_logits: the Routing also holds the logits the
    experts were chosen from (the kernel writes them as it goes). x_at: the kernel reads x's rows
    at the address this int64 word holds (router_topk's x_at: a CUDA graph's replays write it);
    where the torch ops would route instead (kernel_routes), or x is not contiguous (the kernel
    reads the word's rows as a contiguous [tokens, hidden] tensor), a ValueError."""
    _check_router_inputs(x, router_weight, config)
    config.check_weights({"router_bias": router_bias, "e_score_correction_bias": e_score_correction_bias})
    if x_at is not None and not x.is_contiguous():
        raise ValueError(f"x: with x_at the router kernel reads x's rows where the word points as a contiguous "
                         f"[tokens, hidden] tensor; got one with strides {x.stride()}")
    if kernel_routes(x, router_weight, router_bias):
        logits = (torch.empty(x.shape[0], config.num_experts, dtype=torch.float32, device=x.device)
                  if keep_logits else None)
        weights, experts = router_topk(
            x.contiguous(), router_weight.contiguous(), config.top_k, config.renormalize, routing=config.routing,
            router_bias=router_bias, correction_bias=e_score_correction_bias, n_group=config.n_group,
            topk_group=config.topk_group, scaling=config.routed_scaling_factor, logits_out=logits, x_at=x_at)
    elif x_at is not None:
        raise ValueError("x_at: the router kernel reads x at an address word, but here torch's ops route (x on "
                         f"{x.device}, router_weight {router_weight.dtype} against x's {x.dtype}, or autograd "
                         "recording through them)")
    else:
        logits = router_logits(x, router_weight, router_bias)
        experts = _CHOOSERS[config.routing](logits, config, e_score_correction_bias)
        weights = weights_for(logits, experts, config)
    kept = None
    capacity = config.capacity(x.shape[0])
    if capacity is not None:
        kept = keep_within_capacity(experts, config.num_experts, capacity)
    return Routing(weights, experts, kept, logits.detach() if keep_logits else None)


def router_logits(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, H] @ router_weight [E, H]^T (+ router_bias [E]) -> logits [T, E] fp32, in torch ops,
    differentiable, autograd keeping x and the weight (not fp32 copies)."""
    logits = fp32_product(x, router_weight).float()
    return logits if router_bias is None else logits + router_bias.float()


def _check_router_inputs(x: torch.Tensor, router_weight: torch.Tensor, config: MoEConfig) -> None:
    """Raise, naming it, unless x is a floating [tokens, hidden_size] tensor and router_weight a
    floating [num_experts, hidden_size] one. Every forward runs this (GPUs too): shape and dtype
    attributes only, no reduction, no device synchronisation."""
    E, H = config.num_experts, config.hidden_size
    for name, t in (("x", x), ("router_weight", router_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} has dtype {t.dtype}; route takes a floating-point tensor")
    if x.dim() != 2 or x.shape[1] != H:
        hint = " (2-D: flatten the leading dimensions first)" if x.dim() != 2 else ""
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [tokens, hidden_size={H}]{hint}")
    if tuple(router_weight.shape) != (E, H):
        raise ValueError(f"router_weight has shape {tuple(router_weight.shape)}, expected "
                         f"[num_experts, hidden_size] = ({E}, {H})")


def kernel_routes(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None) -> bool:
    """Whether route() takes the router kernel for these tensors now (a GPU, router_weight in x's
    dtype or fp32, no autograd recording through them), not torch's ops."""
    return (x.is_cuda and router_weight.dtype in (x.dtype, torch.float32)
            and not _records_graph(x, router_weight, router_bias))


# Each chooser: logits [T, E] fp32 -> experts [T, k] int64, best first; weights_for scores them.

def _choose_softmax_topk(logits: torch.Tensor, config: MoEConfig, _correction) -> torch.Tensor:
    return torch.topk(torch.softmax(logits, dim=-1), config.top_k, dim=-1).indices


def _choose_top_logits(logits: torch.Tensor, config: MoEConfig, _correction) -> torch.Tensor:
    return torch.topk(logits, config.top_k, dim=-1).indices


def _choose_sigmoid_grouped(logits: torch.Tensor, config: MoEConfig, correction: torch.Tensor) -> torch.Tensor:
    choice = torch.sigmoid(logits).detach() + correction  # steers the choice only: no gradient through it
    if config.topk_group < config.n_group:
        T, E = choice.shape
        group_score = choice.view(T, config.n_group, E // config.n_group).topk(2, dim=-1).values.sum(dim=-1)
        kept_groups = group_score.topk(config.topk_group, dim=-1).indices
        dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, kept_groups, False)
        choice = choice.masked_fill(dropped.repeat_interleave(E // config.n_group, dim=1), float("-inf"))
    return torch.topk(choice, config.top_k, dim=-1).indices


_CHOOSERS = {"softmax_topk": _choose_softmax_topk, "topk_softmax": _choose_top_logits,
             "sigmoid_grouped": _choose_sigmoid_grouped, "topk_sigmoid": _choose_top_logits}


def weights_for(logits: torch.Tensor, experts: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """logits: [T, E] fp32; experts: [T, k] int64, the experts config.routing chose for them ->
    their routing weights [T, k] fp32, scaled, differentiable in logits (the choice held fixed;
    weights_backward is its derivative written out)."""
    if config.routing == "softmax_topk":
        weights = torch.softmax(logits, dim=-1).gather(1, experts)
        if config.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    elif config.routing == "topk_softmax":
        weights = torch.softmax(logits.gather(1, experts), dim=-1)
    else:  # topk_sigmoid, sigmoid_grouped
        weights = torch.sigmoid(logits.gather(1, experts))
        if config.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * config.routed_scaling_factor if config.routed_scaling_factor != 1.0 else weights


def weights_backward(logits: torch.Tensor, experts: torch.Tensor, config: MoEConfig,
                     grad: torch.Tensor) -> torch.Tensor:
    """weights_for's backward: logits [T, E] fp32, experts [T, k], grad [T, k] fp32 (of the scaled
    weights) -> the logits' gradient [T, E] fp32 (zero off the chosen experts, except through a
    softmax over all of them), by the derivatives written out (no autograd)."""
    grad = grad * config.routed_scaling_factor

    def through_renormalisation(w: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """w = s / total, total = sum(s): d s from d w."""
        return (grad - (grad * w).sum(-1, keepdim=True)) / total

    out = torch.zeros_like(logits)
    if config.routing == "softmax_topk":
        probs = torch.softmax(logits, dim=-1)
        chosen = probs.gather(1, experts)
        d_chosen = grad
        if config.renormalize:
            total = chosen.sum(-1, keepdim=True)
            d_chosen = through_renormalisation(chosen / total, total)
        d_probs = out.scatter_(1, experts, d_chosen)
        return probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True))
    if config.routing == "topk_softmax":
        w = torch.softmax(logits.gather(1, experts), dim=-1)
        return out.scatter_(1, experts, w * (grad - (w * grad).sum(-1, keepdim=True)))
    s = torch.sigmoid(logits.gather(1, experts))  # topk_sigmoid, sigmoid_grouped
    d_s = grad
    if config.renormalize:
        total = s.sum(-1, keepdim=True) + 1e-20
        d_s = through_renormalisation(s / total, total)
    return out.scatter_(1, experts, d_s * s * (1 - s))


def _records_graph(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def load_balancing_loss(logits: torch.Tensor, experts: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """The auxiliary load-balancing loss of Switch Transformer and Mixtral, as transformers'
    load_balancing_loss_func takes it: num_experts * sum_e f_e P_e, where f_e is expert e's chosen
    slots over the tokens (top_k slots a token; no gradient through it) and P_e the mean over the
    tokens of the router's probability of e: the softmax of the logits over every expert, or for
    the sigmoid routings each token's sigmoid scores over their sum (as DeepSeek-V3's sequence-wise
    balance loss normalises them; that loss is per sequence and 1 when uniform, this one over the
    tokens given and top_k: k times it, its experts those chosen with the correction bias).
    logits: [T, E] fp32 (router bias included), differentiable; experts: [T, k] the chosen global
    ids -> a scalar fp32: top_k when routing is uniform, 0 (in logits' graph) without tokens."""
    if logits.shape[0] == 0:
        return logits.sum()
    if config.routing in ("sigmoid_grouped", "topk_sigmoid"):
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(dim=-1, keepdim=True)
    else:
        probs = torch.softmax(logits, dim=-1)
    share = histogram(experts.reshape(-1), config.num_experts).to(logits.dtype) / logits.shape[0]
    return config.num_experts * (share * probs.mean(dim=0)).sum()


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
