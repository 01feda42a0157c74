"""Router kernel: logits -> softmax -> top-k -> (renormalised) weights, one launch for BT tokens a program.

Same semantics as routing.route's torch ops: logits x @ router_weight^T with an fp32 accumulator, a
softmax over all E experts in fp32, the k largest probabilities in descending order (ties: the
lower expert id), rescaled to sum to 1 when renormalising. fp32 inputs take the exact fp32 dot;
bf16 inputs take the tensor cores, whose fp32 accumulation is a little coarser than an FMA GEMM's:
on an H200, 12 of 3 x 16,384 deepseek_v3 tokens picked a different top-8 than float64 routing
(near-ties; the fp32 GEMM of the upcast inputs: 2), 5 for qwen3, 0 for mixtral
(bench/results/2026-11-23-h200x2-sweep/router_accuracy.log). In exchange, routing 16,384
deepseek_v3 tokens went from 1.72 ms (upcast copy of x, FMA GEMM, softmax, top-k) to 0.24 ms."""

import torch
import triton
import triton.language as tl

from ..config import MAX_TOP_K

MAX_EXPERTS = 256  # the whole row of logits lives in registers


@triton.jit
def router_topk_kernel(x_ptr, w_ptr, weights_ptr, experts_ptr, T, H, E,
                       TOP_K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr,
                       RENORMALIZE: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr,
                       BK: tl.constexpr):
    """x: [T, H]; w: [E, H] (x's dtype); weights: [T, TOP_K] fp32; experts: [T, TOP_K] int64."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = t < T
    e = tl.arange(0, E_POW2)
    emask = e < E
    logits = tl.zeros((BT, E_POW2), dtype=tl.float32)
    for k0 in range(0, H, BK):
        k = k0 + tl.arange(0, BK)
        kmask = k < H
        a = tl.load(x_ptr + t.to(tl.int64)[:, None] * H + k[None, :], mask=tmask[:, None] & kmask[None, :],
                    other=0.0)
        b = tl.load(w_ptr + e.to(tl.int64)[None, :] * H + k[:, None], mask=kmask[:, None] & emask[None, :],
                    other=0.0)
        logits += tl.dot(a, b, input_precision=PRECISION)
    logits = tl.where(emask[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    kk = tl.arange(0, K_POW2)[None, :]
    top_w = tl.zeros((BT, K_POW2), dtype=tl.float32)
    top_e = tl.zeros((BT, K_POW2), dtype=tl.int32)
    # A non-finite logit makes its token's whole row of probabilities NaN, as in torch's softmax.
    # NaN equals nothing, so it would match no maximum (the pick would be a padding column): it
    # ranks as 2.0, above every probability, and the token still gets k distinct experts of its
    # own (the lowest ids first, as torch.topk ranks NaN above numbers) with NaN weights.
    left = tl.where(emask[None, :], tl.where(p == p, p, 2.0), -1.0)  # taken, padding: below all
    for j in tl.static_range(TOP_K):
        best = tl.max(left, axis=1)
        pick = tl.min(tl.where(left == best[:, None], e[None, :], E_POW2), axis=1)
        top_w = tl.where(kk == j, tl.where(best > 1.0, float("nan"), best)[:, None], top_w)
        top_e = tl.where(kk == j, pick[:, None], top_e)
        left = tl.where(e[None, :] == pick[:, None], -1.0, left)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    out = t.to(tl.int64)[:, None] * TOP_K + kk
    m = tmask[:, None] & (kk < TOP_K)
    tl.store(weights_ptr + out, top_w, mask=m)
    tl.store(experts_ptr + out, top_e.to(tl.int64), mask=m)


def router_topk(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool,
                block_t: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H]; router_weight: [E, H], E <= MAX_EXPERTS, x's dtype and device; block_t: tokens
    per program (a power of two >= 16; default by E).
    -> (weights [T, top_k] fp32, experts [T, top_k] int64), best expert first."""
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x: expected a contiguous [tokens, hidden] tensor, got {tuple(x.shape)}")
    T, H = x.shape
    E = router_weight.shape[0]
    if (tuple(router_weight.shape) != (E, H) or not router_weight.is_contiguous()
            or router_weight.dtype != x.dtype):
        raise ValueError(f"router_weight: expected a contiguous [E, {H}] {x.dtype} tensor, got "
                         f"{router_weight.dtype} {tuple(router_weight.shape)}")
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"router_weight has {E} experts; the router kernel takes 1..{MAX_EXPERTS}")
    if not 1 <= top_k <= min(MAX_TOP_K, E):
        raise ValueError(f"top_k={top_k}: expected 1..min({MAX_TOP_K}, {E})")
    if block_t is not None and (block_t < 16 or triton.next_power_of_2(block_t) != block_t):
        raise ValueError(f"block_t={block_t}: expected a power of two >= 16")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    experts = torch.empty(T, top_k, dtype=torch.int64, device=x.device)
    if T:
        e_pow2 = max(16, triton.next_power_of_2(E))
        bt = block_t or (64 if e_pow2 <= 128 else 32)
        router_topk_kernel[(triton.cdiv(T, bt),)](
            x, router_weight, weights, experts, T, H, E,
            TOP_K=top_k, K_POW2=triton.next_power_of_2(top_k), E_POW2=e_pow2, RENORMALIZE=renormalize,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BT=bt, BK=64,
            num_warps=8 if bt * e_pow2 >= 8192 else 4)
    return weights, experts
