"""The single-process reference forward: the semantics every backend is tested against.

Written for clarity, not speed: float32 (or float64) math, a plain loop over experts and over
token-slots for the capacity policy. MoEConfig's docstring states each routing and expert
variant in words; this is the same in code."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT, MoEConfig, x_shape_problem
from .gate_up import gate_and_up


def activate(h: torch.Tensor, activation: str, swiglu_alpha: float = GPT_OSS_SWIGLU_ALPHA,
             swiglu_limit: float = GPT_OSS_SWIGLU_LIMIT, paired: bool = False) -> torch.Tensor:
    """h: [n, ffn_in] -> [n, ffn]; the gated activations split h into (gate | up) halves, or, with
    `paired`, into the layer's own pairs of columns (flashmoe_py/gate_up.py)."""
    if activation in ("swiglu", "clamped_swiglu"):
        gate, up = gate_and_up(h) if paired else h.chunk(2, dim=-1)
        if activation == "swiglu":
            out = F.silu(gate) * up
        else:
            gate = gate.clamp(max=swiglu_limit)
            up = up.clamp(min=-swiglu_limit, max=swiglu_limit)
            out = gate * torch.sigmoid(swiglu_alpha * gate) * (up + 1)
        return out.flatten(-2) if paired else out
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    raise ValueError(f"unknown activation {activation!r}")


def route_tokens(logits: torch.Tensor, config: MoEConfig,
                 e_score_correction_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k], experts [T, k] int64), best first, before scaling."""
    k = config.top_k
    if config.routing == "softmax_topk":
        weights, experts = torch.softmax(logits, dim=-1).topk(k)
        return (weights / weights.sum(-1, keepdim=True) if config.renormalize else weights), experts
    if config.routing == "topk_softmax":
        top, experts = logits.topk(k)
        return torch.softmax(top, dim=-1), experts
    if config.routing == "topk_sigmoid":
        top, experts = logits.topk(k)
        weights = torch.sigmoid(top)
    else:  # sigmoid_grouped
        scores = torch.sigmoid(logits)
        biased = scores.detach() + e_score_correction_bias.to(logits.dtype)
        if config.topk_group < config.n_group:
            per_group = config.num_experts // config.n_group
            group = torch.arange(config.num_experts, device=logits.device) // per_group   # [E]
            group_score = torch.stack([biased[:, group == g].topk(2).values.sum(-1)
                                       for g in range(config.n_group)], dim=-1)           # [T, n_group]
            best_groups = group_score.topk(config.topk_group).indices                      # [T, topk_group]
            allowed = (group[None, None, :] == best_groups[:, :, None]).any(dim=1)         # [T, E]
            biased = biased.masked_fill(~allowed, float("-inf"))
        experts = biased.topk(k).indices
        weights = scores.gather(-1, experts)
    return (weights / (weights.sum(-1, keepdim=True) + 1e-20) if config.renormalize else weights), experts


def reference_routing(x: torch.Tensor, router_weight: torch.Tensor, config: MoEConfig,
                      compute_dtype: torch.dtype = torch.float32, *,
                      router_bias: torch.Tensor | None = None,
                      e_score_correction_bias: torch.Tensor | None = None):
    """x: [T, H] -> (weights [T, k] compute_dtype, experts [T, k] int64, kept [T, k] bool)."""
    config.check_weights({"router_bias": router_bias, "e_score_correction_bias": e_score_correction_bias})
    logits = x.to(compute_dtype) @ router_weight.to(compute_dtype).t()
    if router_bias is not None:
        logits = logits + router_bias.to(compute_dtype)
    weights, experts = route_tokens(logits, config, e_score_correction_bias)
    weights = weights * config.routed_scaling_factor
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


def ffn(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, config: MoEConfig,
        bias_in: torch.Tensor | None = None, bias_out: torch.Tensor | None = None) -> torch.Tensor:
    """One expert (or the shared experts): x [n, H] @ w_in [H, F_in] (+ bias_in), activation,
    @ w_out [F, H] (+ bias_out), in x's dtype."""
    h = x @ w_in.to(x.dtype)
    if bias_in is not None:
        h = h + bias_in.to(x.dtype)
    y = activate(h, config.activation, config.swiglu_alpha, config.swiglu_limit) @ w_out.to(x.dtype)
    return y + bias_out.to(x.dtype) if bias_out is not None else y


def reference_forward(x: torch.Tensor, router_weight: torch.Tensor, w_in: torch.Tensor,
                      w_out: torch.Tensor, config: MoEConfig,
                      compute_dtype: torch.dtype = torch.float32, *,
                      router_bias: torch.Tensor | None = None,
                      e_score_correction_bias: torch.Tensor | None = None,
                      bias_in: torch.Tensor | None = None, bias_out: torch.Tensor | None = None,
                      shared_w_in: torch.Tensor | None = None, shared_w_out: torch.Tensor | None = None,
                      shared_gate_weight: torch.Tensor | None = None) -> torch.Tensor:
    """One rank's tokens through the full (unsharded) layer.

    x: [T, hidden] or [batch, seq, hidden]. Weights (any dtype) named and shaped as
    MoEConfig.weight_shapes() gives them: router_weight [E, H]; w_in [E, H, F_in] (gated: gate |
    up); w_out [E, F, H]; and those of the optional ones the config has (MoELayer.full_weight_dict()
    returns them all). Returns x's shape in compute_dtype. Capacity, if configured, is applied per
    source rank, so pass exactly the tokens one rank routes."""
    given = {"router_weight": router_weight, "w_in": w_in, "w_out": w_out, "bias_in": bias_in, "bias_out": bias_out,
             "shared_w_in": shared_w_in, "shared_w_out": shared_w_out, "shared_gate_weight": shared_gate_weight}
    config.check_weights(given)
    _check_inputs(x, compute_dtype, config, given | {"router_bias": router_bias,
                                                     "e_score_correction_bias": e_score_correction_bias})
    xc = x.reshape(-1, config.hidden_size).to(compute_dtype)
    weights, experts, kept = reference_routing(xc, router_weight, config, compute_dtype,
                                               router_bias=router_bias,
                                               e_score_correction_bias=e_score_correction_bias)
    return routed_sum(xc, weights, experts, kept, w_in, w_out, config, bias_in=bias_in, bias_out=bias_out,
                      shared_w_in=shared_w_in, shared_w_out=shared_w_out,
                      shared_gate_weight=shared_gate_weight).view(x.shape)


def _check_inputs(x, compute_dtype, config: MoEConfig, given: dict) -> None:
    """ValueError naming the argument: x not [T, H] or [B, S, H] of real floating point, a weight
    not real floating point, compute_dtype not a floating-point torch.dtype (as the layer refuses)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a real floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if (shape := x_shape_problem(x, config.hidden_size)) is not None:
        raise ValueError(shape)
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise ValueError(f"compute_dtype must be a floating-point torch.dtype (e.g. torch.float64), got "
                         f"{compute_dtype!r}")
    for name, t in given.items():
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            got = getattr(t, "dtype", type(t).__name__)
            raise ValueError(f"{name} must be a real floating-point tensor, got {got}")


def routed_sum(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, kept: torch.Tensor | None,
               w_in: torch.Tensor, w_out: torch.Tensor, config: MoEConfig, *,
               bias_in: torch.Tensor | None = None, bias_out: torch.Tensor | None = None,
               shared_w_in: torch.Tensor | None = None, shared_w_out: torch.Tensor | None = None,
               shared_gate_weight: torch.Tensor | None = None) -> torch.Tensor:
    """reference_forward after its routing: x [T, H] in the dtype to compute in; weights, experts,
    kept [T, k] (a routing's scaled weights, global expert ids, kept slots; kept None: every slot)
    -> [T, H], each token's kept experts' outputs summed with those weights (weight_on_input: the
    weight scales the expert's input), plus the shared experts' (gated), in x's dtype. Weights as
    reference_forward takes them (the full layer's)."""
    out = torch.zeros_like(x)
    for e in range(config.num_experts):
        chosen = experts == e
        token, k = torch.nonzero(chosen if kept is None else chosen & kept, as_tuple=True)
        if token.numel() == 0:
            continue
        w = weights[token, k].to(x.dtype).unsqueeze(1)
        biases = (bias_in[e], bias_out[e]) if config.expert_bias else (None, None)
        if config.weight_on_input:
            y = ffn(w * x[token], w_in[e], w_out[e], config, *biases)
        else:
            y = w * ffn(x[token], w_in[e], w_out[e], config, *biases)
        out.index_add_(0, token, y)
    if config.shared_experts:
        shared = ffn(x, shared_w_in, shared_w_out, config)
        if config.shared_expert_gate:
            shared = torch.sigmoid(x @ shared_gate_weight.to(x.dtype).t()) * shared
        out = out + shared
    return out
