"""The single-process reference forward: the semantics every backend is tested against.

Written for clarity, not speed: float32 (or float64) math, a plain loop over experts and over
token-slots for the capacity policy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import MoEConfig


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """h: [n, ffn_in] -> [n, ffn]; swiglu splits h into (gate | up) halves."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    raise ValueError(f"unknown activation {activation!r}")


def reference_routing(x: torch.Tensor, router_weight: torch.Tensor, config: MoEConfig,
                      compute_dtype: torch.dtype = torch.float32):
    """-> (weights [T, k], experts [T, k] int64, kept [T, k] bool)."""
    logits = x.to(compute_dtype) @ router_weight.to(compute_dtype).t()
    probs = torch.softmax(logits, dim=-1)
    weights, experts = torch.topk(probs, config.top_k, dim=-1)
    if config.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    kept = torch.ones_like(experts, dtype=torch.bool)
    if config.capacity_factor is not None:
        capacity = math.ceil(config.capacity_factor * x.shape[0] * config.top_k / config.num_experts)
        used = [0] * config.num_experts
        ids = experts.tolist()
        for k in range(config.top_k):
            for t in range(x.shape[0]):
                e = ids[t][k]
                kept[t, k] = used[e] < capacity
                used[e] += 1
    return weights, experts, kept


def reference_forward(x: torch.Tensor, router_weight: torch.Tensor, w_in: torch.Tensor,
                      w_out: torch.Tensor, config: MoEConfig,
                      compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One rank's tokens through the full (unsharded) layer.

    x: [T, hidden]; router_weight: [E, hidden]; w_in: [E, hidden, ffn_in] (swiglu: gate | up);
    w_out: [E, ffn, hidden]. Returns [T, hidden] in compute_dtype. Capacity, if configured, is
    applied per source rank, so pass exactly the tokens one rank routes."""
    weights, experts, kept = reference_routing(x, router_weight, config, compute_dtype)
    xc = x.to(compute_dtype)
    out = torch.zeros_like(xc)
    for e in range(config.num_experts):
        token, k = torch.nonzero((experts == e) & kept, as_tuple=True)
        if token.numel() == 0:
            continue
        h = activate(xc[token] @ w_in[e].to(compute_dtype), config.activation)
        y = h @ w_out[e].to(compute_dtype)
        out.index_add_(0, token, y * weights[token, k].unsqueeze(1))
    return out
