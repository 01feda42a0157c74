"""Autograd steps whose derivatives are written out, so that autograd keeps their inputs in the
layer's dtype and no fp32 copy (backend torch's autograd, and the router's torch ops): the expert
activation (GEMM1's output, bias_in in fp32, the activation in fp32), rows scaled by per-row
weights in fp32 (the routing weights, the shared experts' gate) and the product of rows and a
weight in fp32 (the router's logits, the shared experts' gate). The activation's derivative
(activation_backward) is also the explicit backward's on the CPU (backends/expert_grad.py).

A first-order backward takes the written-out derivatives: the activation's in one kernel pass on
GPUs (kernels/activation_grad.py), on the CPU in torch ops whose fp32 temporaries are made
CPU_CHUNK_ROWS rows at a time (its result, d_pre, is whole). A
backward that records itself (create_graph=True: a gradient penalty) runs the step's torch ops
again under autograd and differentiates them, so second-order gradients are what autograd gives
through those ops."""

from __future__ import annotations

import math

import torch

from .config import MoEConfig
from .gate_up import gate_and_up
from .kernels.activation_grad import activation_input_grad
from .reference import activate

CPU_CHUNK_ROWS = 1024  # rows of the CPU activation backward's fp32 temporaries at a time


def activated(h: torch.Tensor, bias: torch.Tensor | None, counts: torch.Tensor | None,
              config: MoEConfig) -> torch.Tensor:
    """act(h + bias) [N, ffn] in h's dtype, computed in fp32 (float64 stays), keeping h (and bias)
    for the backward. h: [N, ffn_in], GEMM1's output; bias: None, bias_in of one expert
    [ffn_in], or of every local expert [L, ffn_in] with counts [L] its rows in h (sorted by
    expert)."""
    return _WrittenOut.apply(_activated_ops, _activation_first_order, h, bias, counts, config)


def weighted_sum(y: torch.Tensor, slot_w: torch.Tensor | None, slot_tok: torch.Tensor, tokens: int) -> torch.Tensor:
    """sum over the slots s of token t of slot_w[s] * y[s] -> [tokens, H] fp32 (float64 y: float64),
    keeping y in its dtype for the backward. y: [N, H], the slots' expert outputs; slot_w: [N]
    fp32, or None where the weight went into the expert's input; slot_tok: [N] int64, each slot's
    token."""
    return _WrittenOut.apply(_weighted_sum_ops, _weighted_sum_first_order, y, slot_w, slot_tok, tokens)


def scaled_rows(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y [N, H] times s [N] per row, in fp32 (float64 y: float64), keeping y in its dtype and s."""
    return _WrittenOut.apply(_scaled_rows_ops, _scaled_rows_first_order, y, s, None, None)


def fp32_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, H] @ w [E, H]^T in fp32 (in float64 where either is) -> [T, E], keeping x and w in
    their dtypes."""
    return _WrittenOut.apply(_product_ops, _product_first_order, x, w, None, None)


def activation_backward(pre: torch.Tensor, grad: torch.Tensor, config: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """pre: [N, F_in] fp32 (gated: the layer's gate/up pairs); grad: [N, F] fp32, the gradient of
    h = act(pre) -> (h [N, F], d_pre [N, F_in]), by the derivatives written out (no autograd: this
    runs inside a custom op's body too, below the autograd keys)."""
    act = config.activation
    if act == "relu":
        return pre.clamp_min(0), grad * (pre > 0)
    if act == "gelu":
        cdf = 0.5 * (1 + torch.erf(pre * 0.5 ** 0.5))
        return pre * cdf, grad * (cdf + pre * torch.exp(-0.5 * pre * pre) * (2 * math.pi) ** -0.5)
    gate, up = gate_and_up(pre)
    grad = grad.view(gate.shape)
    d_pre = torch.empty_like(pre)
    d_gate, d_up = gate_and_up(d_pre)
    if act == "swiglu":
        sig = torch.sigmoid(gate)
        silu = gate * sig
        d_gate.copy_(grad * up * sig * (1 + gate * (1 - sig)))
        d_up.copy_(grad * silu)
        return (silu * up).flatten(-2), d_pre
    if act != "clamped_swiglu":
        raise ValueError(f"unknown activation {act!r}")
    alpha, limit = config.swiglu_alpha, config.swiglu_limit
    g_c, u_c = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    sig = torch.sigmoid(alpha * g_c)
    glu = g_c * sig
    d_gate.copy_(grad * (u_c + 1) * sig * (1 + alpha * g_c * (1 - sig)) * (gate <= limit))
    d_up.copy_(grad * glu * ((up >= -limit) & (up <= limit)))
    return (glu * (u_c + 1)).flatten(-2), d_pre


def bias_rows(bias: torch.Tensor | None, counts: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A bias per row of n rows sorted by expert: one expert's [width] as it is (counts None: it
    broadcasts), every expert's [L, width] one row per row, [n, width], by counts [L]."""
    if bias is None or counts is None:
        return bias
    return bias.repeat_interleave(counts, dim=0, output_size=n)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or as it is where it is wider (float64: the tests' gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _pre(h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _wide(h) if bias is None else _wide(h) + _wide(bias)


def pre_activation(h: torch.Tensor, bias: torch.Tensor | None, counts: torch.Tensor | None) -> torch.Tensor:
    """h + bias in fp32 (float64 stays) [N, ffn_in], the activation's input; bias and counts as
    activated takes them."""
    return _pre(h, bias_rows(bias, counts, h.shape[0]))


def activation_of(pre: torch.Tensor, config: MoEConfig, dtype: torch.dtype) -> torch.Tensor:
    """The config's activation of pre [N, ffn_in] (the layer's gate/up pairs) -> [N, ffn] in dtype."""
    return activate(pre, config.activation, config.swiglu_alpha, config.swiglu_limit, paired=True).to(dtype)


def _activated_ops(h, bias, counts, config):
    """The forward's torch ops (recorded again for a second-order backward)."""
    return activation_of(pre_activation(h, bias, counts), config, h.dtype)


def _weighted_sum_ops(y, slot_w, slot_tok, tokens):
    rows = _wide(y) if slot_w is None else _scaled_rows_ops(y, slot_w, None, None)
    return rows.new_zeros(tokens, y.shape[1]).index_add_(0, slot_tok, rows)


def _scaled_rows_ops(y, s, _c, _d):
    return _wide(y) * s.unsqueeze(1)


def _product_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """fp32, or float64 where x or w is (the router takes any floating dtypes, mixed)."""
    return torch.promote_types(torch.promote_types(x.dtype, w.dtype), torch.float32)


def _product_ops(x, w, _c, _d):
    dtype = _product_dtype(x, w)
    return x.to(dtype) @ w.to(dtype).t()


def _recorded_again(ops, grad, inputs, needs, *rest):
    """The gradients of ops(*inputs, *rest) at the inputs that need one, by autograd through the
    ops run again, recorded (create_graph)."""
    with torch.enable_grad():
        out = ops(*inputs, *rest)
        wrt = [t for t, need in zip(inputs, needs) if need]
        got = iter(torch.autograd.grad(out, wrt, grad, create_graph=True, allow_unused=True))
    return [next(got) if need else None for need in needs]


def _activation_first_order(grad, needs, h, bias, counts, config):
    """(d_h, d_bias) of _activated_ops, each where needed: on GPUs one kernel pass (in h's dtype
    without a bias; with one, on h + bias and the gradient in fp32, so that d_bias sums fp32
    terms), elsewhere torch ops CPU_CHUNK_ROWS rows at a time."""
    n = h.shape[0]
    per_row = bias_rows(bias, counts, n)
    if _one_pass(h):
        pre, g = (h, grad) if per_row is None else (_pre(h, per_row), _wide(grad))
        d_pre = activation_input_grad(pre.contiguous(), g.to(pre.dtype).contiguous(), config)
    else:
        d_pre = torch.empty(h.shape, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        for lo in range(0, n, CPU_CHUNK_ROWS):
            rows = slice(lo, lo + CPU_CHUNK_ROWS)
            b = None if per_row is None else (per_row if counts is None else per_row[rows])
            d_pre[rows] = activation_backward(_pre(h[rows], b), _wide(grad[rows]), config)[1]
    d_bias = None
    if needs[1]:
        if counts is None:
            d_bias = d_pre.sum(0).to(bias.dtype)
        else:
            expert = torch.repeat_interleave(torch.arange(counts.shape[0], device=h.device), counts, output_size=n)
            d_bias = d_pre.new_zeros(bias.shape).index_add_(0, expert, d_pre).to(bias.dtype)
    return d_pre.to(h.dtype) if needs[0] else None, d_bias


def _one_pass(h: torch.Tensor) -> bool:
    """Whether the activation's first-order backward of h runs as one kernel pass: on GPUs,
    but not in float64 (the kernel's math is fp32)."""
    return h.is_cuda and h.dtype != torch.float64


def _weighted_sum_first_order(grad, needs, y, slot_w, slot_tok, _tokens):
    """(d_y, d_slot_w) of _weighted_sum_ops, each where needed."""
    g = grad[slot_tok]  # [N, H]: each slot's token's gradient
    if slot_w is None:
        return g.to(y.dtype) if needs[0] else None, None
    return _scaled_rows_first_order(g, needs, y, slot_w, None, None)


def _scaled_rows_first_order(grad, needs, y, s, _c, _d):
    """(d_y, d_s) of _scaled_rows_ops, each where needed."""
    d_y = (grad * s.unsqueeze(1)).to(y.dtype) if needs[0] else None
    d_s = (grad * _wide(y)).sum(1).to(s.dtype) if needs[1] else None
    return d_y, d_s


def _product_first_order(grad, needs, x, w, _c, _d):
    """(d_x, d_w) of _product_ops, each where needed."""
    dtype = _product_dtype(x, w)
    d_x = (grad @ w.to(dtype)).to(x.dtype) if needs[0] else None
    d_w = (grad.t() @ x.to(dtype)).to(w.dtype) if needs[1] else None
    return d_x, d_w


class _WrittenOut(torch.autograd.Function):
    """ops(a, b, c, d) with the derivatives first_order(grad, needs, a, b, c, d) writes out for a
    and b (c: a tensor, d: anything, neither differentiated), keeping a, b and c for the backward;
    a backward that records itself differentiates ops run again."""

    @staticmethod
    def forward(ctx, ops, first_order, a, b, c, d):
        ctx.ops, ctx.first_order, ctx.d = ops, first_order, d
        ctx.save_for_backward(a, b, c)
        return ops(a, b, c, d)

    @staticmethod
    def backward(ctx, grad):
        a, b, c = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:4]
        if torch.is_grad_enabled():
            grads = _recorded_again(ctx.ops, grad, (a, b), needs, c, ctx.d)
        else:
            grads = ctx.first_order(grad, needs, a, b, c, ctx.d)
        return (None, None, *grads, None, None)
