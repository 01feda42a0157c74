"""The routing weights' backward in one pass (backends/explicit_backward.py; routing.weights_backward
is the same in torch ops, which the CPU backward keeps): from each token's fp32 router logits, its
chosen experts and the gradient of their weights as routed_scaling_factor scaled them, the
logits' gradient [T, E] fp32, for every routing mode of config.ROUTINGS:

    softmax_topk    p = softmax(logits); w = p[chosen] (/ their sum when renormalised)
    topk_softmax    w = softmax(logits[chosen])
    topk_sigmoid,   s = sigmoid(logits[chosen]); w = s (/ their sum + 1e-20 when renormalised)
    sigmoid_grouped

One program a block of BT tokens holds their logits rows (E padded to BE, a power of two); a
chosen expert's value is taken out of its row by a one-hot sum over [BT, KP, BE] and its gradient
put back the same way (KP: top_k padded to a power of two, BT chosen so that the one-hot block
stays at most ONE_HOT elements and the logits block MAX_ROW_BLOCK). Under torch ops the same is
about fourteen launches of small kernels a backward, which on a host-bound step (qwen3_30b_a3b at
2,048-4,096 tokens on one H200, bench/NOTES.md item 70) are host time."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import MoEConfig

ONE_HOT = 4096  # elements of a program's [BT, KP, BE] one-hot block
MAX_ROW_BLOCK = 4096  # elements of its [BT, BE] logits block (251 registers at E 256, top-1, without it)
MODES = {"softmax_topk": 0, "topk_softmax": 1, "topk_sigmoid": 2, "sigmoid_grouped": 2}


@triton.jit
def weights_grad_kernel(logits_ptr, experts_ptr, grad_ptr, out_ptr, T, E, SCALE, MODE: tl.constexpr,
                        RENORM: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr,
                        BE: tl.constexpr):
    """logits: [T, E] fp32; experts: [T, K] (an int dtype); grad: [T, K] fp32 -> out [T, E] fp32,
    the gradient of the logits (the module docstring), tokens [pid BT, (pid + 1) BT)."""
    t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    e = tl.arange(0, BE)
    j = tl.arange(0, KP)
    t_in, e_in, j_in = t < T, e < E, j < K
    logits = tl.load(logits_ptr + t[:, None] * E + e[None, :], mask=t_in[:, None] & e_in[None, :], other=0.0)
    logits = tl.where(e_in[None, :], logits, -float("inf"))  # [BT, BE]
    ex = tl.load(experts_ptr + t[:, None] * K + j[None, :], mask=t_in[:, None] & j_in[None, :], other=-1)
    g = tl.load(grad_ptr + t[:, None] * K + j[None, :], mask=t_in[:, None] & j_in[None, :], other=0.0) * SCALE
    one_hot = ex.to(tl.int32)[:, :, None] == e[None, None, :]  # [BT, KP, BE]; padded choices match nothing
    if MODE == 0:
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probs = p / tl.sum(p, axis=1)[:, None]
        d = g
        if RENORM:
            chosen = tl.sum(tl.where(one_hot, probs[:, None, :], 0.0), axis=2)  # [BT, KP]
            total = tl.where(t_in[:, None], tl.sum(chosen, axis=1)[:, None], 1.0)  # rows past T: no 0 / 0
            d = (g - tl.sum(g * (chosen / total), axis=1)[:, None]) / total
        d_probs = tl.sum(tl.where(one_hot, d[:, :, None], 0.0), axis=1)  # [BT, BE]
        out = probs * (d_probs - tl.sum(probs * d_probs, axis=1)[:, None])
    else:
        if MODE == 1:
            chosen = tl.sum(tl.where(one_hot, logits[:, None, :], 0.0), axis=2)
            chosen = tl.where(j_in[None, :], chosen, -float("inf"))
            w = tl.exp(chosen - tl.max(chosen, axis=1)[:, None])
            w = w / tl.sum(w, axis=1)[:, None]
            d = w * (g - tl.sum(w * g, axis=1)[:, None])
        else:
            s = tl.sum(tl.where(one_hot, tl.sigmoid(logits)[:, None, :], 0.0), axis=2)  # padded choices: 0
            d_s = g
            if RENORM:
                total = tl.sum(s, axis=1)[:, None] + 1e-20
                d_s = (g - tl.sum(g * (s / total), axis=1)[:, None]) / total
            d = d_s * s * (1.0 - s)
        out = tl.sum(tl.where(one_hot, d[:, :, None], 0.0), axis=1)
    tl.store(out_ptr + t[:, None] * E + e[None, :], out, mask=t_in[:, None] & e_in[None, :])


def weights_grad(logits: torch.Tensor, experts: torch.Tensor, config: MoEConfig,
                 grad: torch.Tensor) -> torch.Tensor:
    """routing.weights_backward in one launch: logits [T, E] fp32, experts [T, k] (int32 or int64),
    grad [T, k] fp32 (of the scaled weights), on one device -> the logits' gradient [T, E] fp32."""
    if logits.dtype != torch.float32 or logits.dim() != 2:
        raise ValueError(f"weights_grad: logits must be [T, E] float32, got {logits.dtype} {tuple(logits.shape)}")
    T, E = logits.shape
    if experts.shape != (T, config.top_k) or experts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"weights_grad: experts must be [{T}, {config.top_k}] int32 or int64, got "
                         f"{experts.dtype} {tuple(experts.shape)}")
    if grad.shape != experts.shape or grad.dtype != torch.float32:
        raise ValueError(f"weights_grad: grad must be [{T}, {config.top_k}] float32, got {grad.dtype} "
                         f"{tuple(grad.shape)}")
    if not (logits.device == experts.device == grad.device):
        raise ValueError(f"weights_grad: logits, experts and grad must be on one device, got {logits.device}, "
                         f"{experts.device}, {grad.device}")
    logits, experts, grad = logits.contiguous(), experts.contiguous(), grad.contiguous()
    out = torch.empty_like(logits)
    K = config.top_k
    KP, BE = triton.next_power_of_2(K), triton.next_power_of_2(E)
    BT = max(1, min(32, ONE_HOT // (KP * BE), MAX_ROW_BLOCK // BE))  # top-1: the [BT, BE] tiles bound it
    BT = 1 << (BT.bit_length() - 1)  # a power of two
    if T:
        weights_grad_kernel[(triton.cdiv(T, BT),)](logits, experts, grad, out, T, E,
                                                   float(config.routed_scaling_factor), MODE=MODES[config.routing],
                                                   RENORM=bool(config.renormalize), K=K, KP=KP, BT=BT, BE=BE)
    return out
