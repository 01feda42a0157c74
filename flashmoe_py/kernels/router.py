"""Router kernel: logits -> scores -> top-k -> weights, one launch for BT tokens a program, for
every routing the layer has (MoEConfig describes them; routing.route uses this kernel on GPUs):

  softmax_topk     softmax over all E experts, the k largest probabilities, optionally rescaled
                   to sum to 1 (Mixtral, Qwen, OLMoE);
  topk_softmax     the k largest logits, softmax over those k (gpt-oss, with a router bias);
  sigmoid_grouped  scores = sigmoid(logits); the k largest of scores + a correction bias, among
                   the topk_group best of n_group equal groups (a group scores the sum of its two
                   largest biased scores); weights = the picked experts' unbiased scores,
                   optionally over their sum + 1e-20 (DeepSeek-V3, GLM-4.5, Kimi-K2);
  topk_sigmoid     the k largest logits, sigmoid of each, optionally over their sum + 1e-20
                   (Llama-4).

Then every routing's weights are multiplied by the scaling factor. Logits are x @ router_weight^T
(+ router_bias) with an fp32 accumulator: a bf16 router takes the tensor cores, whose fp32
accumulation is a little coarser than an FMA GEMM's (on an H200, 12 of 3 x 16,384 deepseek_v3
tokens picked a different top-8 than float64 routing: near-ties;
bench/results/2026-11-23-h200x2-sweep/router_accuracy.log); an fp32 router (DeepSeek-V3 and
GLM-4.5 keep theirs in fp32) takes the exact fp32 dot of the upcast activations. The k experts
come best first (ties: the lower expert id). A token with a non-finite logit gets k distinct,
existing experts with non-finite weights, as under torch's ops (which rank NaN above numbers).

Up to 2,048 tokens a program takes 16 tokens, and up to 512 tokens, for a router weight of 512 KiB
or more, the logits' dot is split over the hidden size first (router_partial_kernel, a program per
16 tokens and K chunk; the chunks' sums then added in chunk order): a program reads the whole
weight for its tokens, at one SM's rate."""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..config import NUM_EXPERTS_LIMIT, TOP_K_LIMIT
from .addresses import check_words, rebase

MAX_EXPERTS = NUM_EXPERTS_LIMIT  # the whole row of logits lives in registers
MAX_TOP_K = TOP_K_LIMIT
# The launch by token count (the router alone, graph-replayed, one H100 and one H200; bench/NOTES.md
# items 85-86). A program reads the whole router weight for its rows, so its time is one SM's read
# of the weight (deepseek_v3's 3.7 MB: ~65 us at any count of 16-row programs up to 2,048 tokens)
# until the programs' reads together fill L2. Up to SPLIT_TOKENS tokens, for a router weight of
# SPLIT_MIN_BYTES or more (qwen3's 0.5 MB, the smallest measured, gains; mixtral's 64 KB, one
# program's read in ~1 us, is not measured), the dot is first split over K chunks, at most
# MAX_CHUNKS (16) up to 128 tokens and 8 past them: a program per 16 tokens and chunk reads its
# chunk's share; the router kernel adds the chunk sums, CHUNKS x 16 rows x E floats, where fewer
# chunks pay as tokens fill its rows. On the H100, against no split: deepseek_v3 65 -> 40-47 us at
# 1-512 tokens, kimi_k2 126-129 -> 28-42, qwen3_next 47 -> 29-35, gpt_oss 16.5 -> 8.6-11.2; at
# 1,024 tokens deepseek_v3 and qwen3_next no longer gain. In the layer (H100, 8-512 tokens),
# against the rule before (up to 128 tokens 16 a program and 56-64 chunks for a router of 2 MB or
# more, past them by the expert count): qwen3 -3.3..-3.8%, gpt_oss -0.6..-2.6%, deepseek_v3
# -0.3..-0.5%. Up to SMALL_BT_TOKENS, 16 tokens a program (the top-k selection's work follows a
# program's rows, used or not): faster than 32-64 for every router at 1-2,048 tokens and slower at
# 4,096 (H200: qwen3 20.6 -> 15.0 us, deepseek_v3 85.0 -> 67.6 at 2,048; 20.7 -> 21.6, 90.6 ->
# 96.6 at 4,096). Past that, 64, 32 or 16 tokens by the expert count.
SMALL_BT, SMALL_BT_TOKENS, SPLIT_TOKENS, MAX_CHUNKS, WIDE_SPLIT_TOKENS = 16, 2048, 512, 16, 128
SPLIT_MIN_BYTES = 512 * 1024
ROUTINGS = {"softmax_topk": 0, "topk_softmax": 1, "sigmoid_grouped": 2, "topk_sigmoid": 3}
SOFTMAX_TOPK = tl.constexpr(0)
TOPK_SOFTMAX = tl.constexpr(1)
SIGMOID_GROUPED = tl.constexpr(2)
TOPK_SIGMOID = tl.constexpr(3)


class RouterMeta(NamedTuple):
    """Compile-time settings (tl.constexpr each): ROUTING (ROUTINGS), TOP_K (K_POW2 its power of
    two), E_POW2 >= E, RENORMALIZE, HAS_BIAS (router bias), N_GROUP (NG_POW2 its power of two),
    TOPK_GROUP and GROUP_SIZE (E / N_GROUP) of sigmoid_grouped, UPCAST (an fp32 router: x is
    upcast, the dot is exact fp32), PRECISION of fp32 dots, SAVE_LOGITS (also write the logits, for
    a training forward's backward), BT tokens a program, BK the K step, SPLIT (the logits are
    router_partial_kernel's chunk sums, not the kernel's own dot), X_AT (x's address is the word
    x_at holds: kernels/addresses.py)."""

    ROUTING: tl.constexpr
    TOP_K: tl.constexpr
    K_POW2: tl.constexpr
    E_POW2: tl.constexpr
    RENORMALIZE: tl.constexpr
    HAS_BIAS: tl.constexpr
    N_GROUP: tl.constexpr
    NG_POW2: tl.constexpr
    TOPK_GROUP: tl.constexpr
    GROUP_SIZE: tl.constexpr
    UPCAST: tl.constexpr
    PRECISION: tl.constexpr
    SAVE_LOGITS: tl.constexpr
    BT: tl.constexpr
    BK: tl.constexpr
    SPLIT: tl.constexpr
    X_AT: tl.constexpr


class DotMeta(NamedTuple):
    """router_partial_kernel's compile-time settings, RouterMeta's of the same names (only these:
    one variant of it whatever the routing)."""

    E_POW2: tl.constexpr
    UPCAST: tl.constexpr
    PRECISION: tl.constexpr
    BT: tl.constexpr
    BK: tl.constexpr
    X_AT: tl.constexpr


@triton.jit
def _dot_span(x_ptr, w_ptr, t, tmask, e, emask, H, k_lo, k_hi, meta):
    """[BT, E_POW2] fp32: x[t, k] . w[e, k] summed over k in [k_lo, k_hi), k_hi <= H (meta: a
    RouterMeta or DotMeta)."""
    acc = tl.zeros((meta.BT, meta.E_POW2), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, meta.BK):
        k = k0 + tl.arange(0, meta.BK)
        kmask = k < k_hi
        a = tl.load(x_ptr + t.to(tl.int64)[:, None] * H + k[None, :], mask=tmask[:, None] & kmask[None, :],
                    other=0.0)
        b = tl.load(w_ptr + e.to(tl.int64)[None, :] * H + k[:, None], mask=kmask[:, None] & emask[None, :],
                    other=0.0)
        if meta.UPCAST:
            a = a.to(tl.float32)
        acc += tl.dot(a, b, input_precision=meta.PRECISION)
    return acc


@triton.jit(do_not_specialize=["T"])  # one variant at any token count, as router_kernel
def router_partial_kernel(x_ptr, x_at, w_ptr, partial_ptr, T, H, E, CHUNK_K, meta):
    """The split dot: program (i, c) -> partial[c, t, e] (fp32 [chunks, T, E]) = x[t, k] . w[e, k]
    over chunk c's k in [c * CHUNK_K, (c + 1) * CHUNK_K) and < H, for tokens t of block i (BT);
    x at the address x_at holds with X_AT."""
    x_ptr = rebase(x_ptr, x_at, meta.X_AT)
    t = tl.program_id(0) * meta.BT + tl.arange(0, meta.BT)
    c = tl.program_id(1)
    e = tl.arange(0, meta.E_POW2)
    tmask, emask = t < T, e < E
    k_lo = c * CHUNK_K
    acc = _dot_span(x_ptr, w_ptr, t, tmask, e, emask, H, k_lo, tl.minimum(k_lo + CHUNK_K, H), meta)
    rows = (c.to(tl.int64) * T + t)[:, None] * E + e[None, :]
    tl.store(partial_ptr + rows, acc, mask=tmask[:, None] & emask[None, :])


@triton.jit
def _logits(x_ptr, w_ptr, bias_ptr, partial_ptr, t, tmask, e, emask, T, H, E, CHUNKS, meta):
    """[BT, E_POW2] fp32 logits of tokens t (padding columns -inf): the dot over all of H, or,
    with SPLIT, router_partial_kernel's CHUNKS chunk sums added in chunk order."""
    if meta.SPLIT:
        logits = tl.zeros((meta.BT, meta.E_POW2), dtype=tl.float32)
        m = tmask[:, None] & emask[None, :]
        row = t.to(tl.int64)  # chunk c's row of token t: c * T + t
        for _ in range(CHUNKS):
            logits += tl.load(partial_ptr + row[:, None] * E + e[None, :], mask=m, other=0.0)
            row += T
    else:
        logits = _dot_span(x_ptr, w_ptr, t, tmask, e, emask, H, 0, H, meta)
    if meta.HAS_BIAS:
        logits += tl.load(bias_ptr + e, mask=emask, other=0.0).to(tl.float32)[None, :]
    return tl.where(emask[None, :], logits, float("-inf"))


@triton.jit
def _take_best(key, avail, e, E_POW2: tl.constexpr):
    """Per row, the available column with the largest key (NaN above everything; ties: the
    lowest column) -> (its column [BT], its key [BT])."""
    key = tl.where(key != key, float("inf"), key)
    best = tl.max(tl.where(avail, key, float("-inf")), axis=1)
    pick = tl.min(tl.where(avail & (key == best[:, None]), e[None, :], E_POW2), axis=1)
    return pick, best


@triton.jit
def _kept_groups(choice, emask, e, meta):
    """sigmoid_grouped: [BT, E_POW2] bool, the experts of each token's TOPK_GROUP best groups
    (a group scores the sum of its two largest `choice` values)."""
    NG_POW2: tl.constexpr = meta.NG_POW2
    g_idx = tl.arange(0, NG_POW2)[None, :]
    group_of = e // meta.GROUP_SIZE
    g_score = tl.full((meta.BT, NG_POW2), float("-inf"), tl.float32)
    for g in tl.static_range(meta.N_GROUP):
        in_g = emask[None, :] & (group_of == g)[None, :]
        first, top1 = _take_best(choice, in_g, e, meta.E_POW2)
        _, top2 = _take_best(choice, in_g & (e[None, :] != first[:, None]), e, meta.E_POW2)
        g_score = tl.where(g_idx == g, (top1 + top2)[:, None], g_score)
    g_avail = g_idx < meta.N_GROUP
    kept = tl.zeros((meta.BT, NG_POW2), dtype=tl.int1)
    for _ in tl.static_range(meta.TOPK_GROUP):
        gp, _ = _take_best(g_score, g_avail & ~kept, tl.arange(0, NG_POW2), NG_POW2)
        kept = kept | (g_idx == gp[:, None])
    in_kept = tl.zeros((meta.BT, meta.E_POW2), dtype=tl.int1)
    for g in tl.static_range(meta.N_GROUP):
        g_kept = tl.sum(tl.where(g_idx == g, kept.to(tl.int32), 0), axis=1) > 0
        in_kept = in_kept | (g_kept[:, None] & (group_of == g)[None, :])
    return in_kept


@triton.jit(do_not_specialize=["T", "CHUNKS"])  # one variant at any token and chunk count (compile_variants)
def router_kernel(x_ptr, x_at, w_ptr, bias_ptr, correction_ptr, weights_ptr, experts_ptr, logits_ptr, partial_ptr, T,
                  H, E, CHUNKS, scaling, meta):
    """x: [T, H] (with X_AT, at the address the int64 x_at holds); w: [E, H] (x's dtype, or fp32
    with UPCAST); bias, correction: [E] fp32 (read
    when HAS_BIAS / sigmoid_grouped); weights: [T, TOP_K] fp32; experts: [T, TOP_K] int64;
    logits: [T, E] fp32, written when SAVE_LOGITS (with the router bias); partial: [CHUNKS, T, E]
    fp32 from router_partial_kernel, read in place of x and w when SPLIT."""
    x_ptr = rebase(x_ptr, x_at, meta.X_AT)
    BT: tl.constexpr = meta.BT
    TOP_K: tl.constexpr = meta.TOP_K
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = t < T
    e = tl.arange(0, meta.E_POW2)
    emask = e < E
    logits = _logits(x_ptr, w_ptr, bias_ptr, partial_ptr, t, tmask, e, emask, T, H, E, CHUNKS, meta)
    if meta.SAVE_LOGITS:
        tl.store(logits_ptr + t.to(tl.int64)[:, None] * E + e[None, :], logits, mask=tmask[:, None] & emask[None, :])
    if meta.ROUTING == SOFTMAX_TOPK:
        # A non-finite logit makes its token's whole row NaN, as in torch's softmax.
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        value = p / tl.sum(p, axis=1)[:, None]
        choice = value
    elif meta.ROUTING == SIGMOID_GROUPED:
        value = tl.sigmoid(logits)
        choice = value + tl.load(correction_ptr + e, mask=emask, other=0.0)[None, :]
    else:
        value = logits
        choice = logits
    avail = emask[None, :] & tmask[:, None]
    if meta.ROUTING == SIGMOID_GROUPED:
        if meta.TOPK_GROUP < meta.N_GROUP:
            avail = avail & _kept_groups(choice, emask, e, meta)
    kk = tl.arange(0, meta.K_POW2)[None, :]
    top_v = tl.zeros((BT, meta.K_POW2), dtype=tl.float32)
    top_e = tl.zeros((BT, meta.K_POW2), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        pick, _ = _take_best(choice, avail, e, meta.E_POW2)
        v = tl.sum(tl.where(e[None, :] == pick[:, None], value, 0.0), axis=1)
        top_v = tl.where(kk == j, v[:, None], top_v)
        top_e = tl.where(kk == j, pick[:, None], top_e)
        avail = avail & (e[None, :] != pick[:, None])
    live = kk < TOP_K
    if meta.ROUTING == TOPK_SOFTMAX:
        p = tl.where(live, tl.exp(top_v - tl.max(tl.where(live, top_v, float("-inf")), axis=1)[:, None]), 0.0)
        top_w = p / tl.sum(p, axis=1)[:, None]
    elif meta.ROUTING == TOPK_SIGMOID:
        top_w = tl.sigmoid(top_v)
    else:
        top_w = top_v
    if meta.RENORMALIZE:
        total = tl.sum(tl.where(live, top_w, 0.0), axis=1)[:, None]
        if meta.ROUTING == SOFTMAX_TOPK:
            top_w = top_w / total
        elif meta.ROUTING != TOPK_SOFTMAX:
            top_w = top_w / (total + 1e-20)
    top_w = top_w * scaling
    out = t.to(tl.int64)[:, None] * TOP_K + kk
    m = tmask[:, None] & live
    tl.store(weights_ptr + out, top_w, mask=m)
    tl.store(experts_ptr + out, top_e.to(tl.int64), mask=m)


def router_launch_tokens(max_tokens: int) -> list[int]:
    """A token count of each launch router_topk takes by default (split, then 16 tokens a program,
    then by the expert count), up to max_tokens, fewest first: calling it at each compiles every
    variant a call of 1..max_tokens tokens can launch (for a given router and routing)."""
    return [tokens for tokens in (1, SPLIT_TOKENS + 1, SMALL_BT_TOKENS + 1) if tokens <= max(max_tokens, 1)]


def router_topk(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool = True, *,
                routing: str = "softmax_topk", router_bias: torch.Tensor | None = None,
                correction_bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1,
                scaling: float = 1.0, block_t: int | None = None,
                logits_out: torch.Tensor | None = None, split: bool | None = None,
                x_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H]; router_weight: [E, H] in x's dtype or fp32, E <= MAX_EXPERTS, on x's device;
    router_bias: [E] or None; correction_bias: [E] (routing 'sigmoid_grouped'); n_group,
    topk_group: sigmoid_grouped's groups; scaling: every weight's factor; logits_out: a contiguous [T, E] fp32 tensor on
    x's device into which the logits the choice was made from are written (router bias
    included), or None; split: the dot split over K chunks first (router_partial_kernel; its sums
    are added in another order, so a logit may differ in its last bits; its [chunks, T, E] fp32
    sums are a new tensor, so split=True at many tokens takes that memory), or not; None: split up
    to SPLIT_TOKENS tokens for a router weight of SPLIT_MIN_BYTES or more. At most MAX_CHUNKS chunks up
    to WIDE_SPLIT_TOKENS tokens and half as many past them; a hidden size of one K step is never
    split. block_t, tokens a program: a power of two >= 16, by default SMALL_BT up to
    SMALL_BT_TOKENS tokens, and past them 64, 32 or 16 by E (up to 128, 256, 512 experts). Each
    kernel compiles one variant for every token count and chunk count of a block_t and split,
    with x_at and without (router_launch_tokens names a count of each). x_at: None, or an int64 word on x's device
    holding the address the kernels read x's rows from instead (kernels/addresses.py: x then
    stands in for a tensor of its shape, dtype and alignment; a CUDA graph's replays write the
    word).
    -> (weights [T, top_k] fp32, experts [T, top_k] int64), best expert first."""
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x: expected a contiguous [tokens, hidden] tensor, got {tuple(x.shape)}")
    T, H = x.shape
    E = router_weight.shape[0]
    if (tuple(router_weight.shape) != (E, H) or not router_weight.is_contiguous()
            or router_weight.dtype not in (x.dtype, torch.float32) or router_weight.device != x.device):
        raise ValueError(f"router_weight: expected a contiguous [E, {H}] tensor of {x.dtype} or float32 on "
                         f"{x.device}, got {router_weight.dtype} {tuple(router_weight.shape)} on "
                         f"{router_weight.device}")
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"router_weight has {E} experts; the router kernel takes 1..{MAX_EXPERTS}")
    if not 1 <= top_k <= min(MAX_TOP_K, E):
        raise ValueError(f"top_k={top_k}: expected 1..min({MAX_TOP_K}, {E})")
    if routing not in ROUTINGS:
        raise ValueError(f"routing={routing!r}: expected one of {sorted(ROUTINGS)}")
    grouped = routing == "sigmoid_grouped"
    if grouped and (correction_bias is None or E % n_group or not 1 <= topk_group <= n_group
                    or topk_group * (E // n_group) < top_k or (n_group > 1 and E // n_group < 2)):
        raise ValueError(f"routing='sigmoid_grouped': expected correction_bias [E] and n_group dividing E={E} "
                         f"with 1 <= topk_group <= n_group, top_k <= topk_group * E / n_group and, with groups, "
                         f"at least 2 experts a group (a group scores its two best); got n_group={n_group}, "
                         f"topk_group={topk_group}")
    for name, t in (("router_bias", router_bias), ("correction_bias", correction_bias)):
        if t is not None and (tuple(t.shape) != (E,) or t.device != x.device):
            raise ValueError(f"{name}: expected [{E}] on {x.device}, got {tuple(t.shape)} on {t.device}")
    if x_at is not None:
        check_words("x_at", x_at, 1, x.device)
    if logits_out is not None and (tuple(logits_out.shape) != (T, E) or logits_out.dtype != torch.float32
                                   or not logits_out.is_contiguous() or logits_out.device != x.device):
        raise ValueError(f"logits_out: expected a contiguous [{T}, {E}] float32 tensor on {x.device}, got "
                         f"{logits_out.dtype} {tuple(logits_out.shape)} on {logits_out.device}")
    if block_t is not None and (block_t < 16 or triton.next_power_of_2(block_t) != block_t):
        raise ValueError(f"block_t={block_t}: expected a power of two >= 16")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    experts = torch.empty(T, top_k, dtype=torch.int64, device=x.device)
    if T:
        e_pow2 = max(16, triton.next_power_of_2(E))
        bt = block_t or (SMALL_BT if T <= SMALL_BT_TOKENS else 64 if e_pow2 <= 128 else 32 if e_pow2 <= 256 else 16)
        upcast = router_weight.dtype == torch.float32 and x.dtype != torch.float32
        precision = "ieee" if router_weight.dtype == torch.float32 else "tf32"
        # The router's [BK, E] tile, pipelined: at most 32 KB a stage (fp32 x 512 experts: BK 16).
        bk = max(16, min(64, 32768 // (e_pow2 * router_weight.element_size())))
        most = MAX_CHUNKS if T <= WIDE_SPLIT_TOKENS else MAX_CHUNKS // 2
        chunk_k = bk * triton.cdiv(triton.cdiv(H, bk), most)
        chunks = triton.cdiv(H, chunk_k)
        if split is None:
            split = T <= SPLIT_TOKENS and router_weight.numel() * router_weight.element_size() >= SPLIT_MIN_BYTES
        split = split and chunks > 1
        c = tl.constexpr
        dummy = weights  # for pointers a routing does not read
        at = dummy if x_at is None else x_at
        partial = dummy
        if split:
            partial = torch.empty(chunks, T, E, dtype=torch.float32, device=x.device)
            dot_meta = DotMeta(E_POW2=c(e_pow2), UPCAST=c(upcast), PRECISION=c(precision), BT=c(SMALL_BT), BK=c(bk),
                               X_AT=c(x_at is not None))
            router_partial_kernel[(triton.cdiv(T, SMALL_BT), chunks)](x, at, router_weight, partial, T, H, E, chunk_k,
                                                                       dot_meta, num_warps=4)
        meta = RouterMeta(ROUTING=c(ROUTINGS[routing]), TOP_K=c(top_k), K_POW2=c(triton.next_power_of_2(top_k)),
                          E_POW2=c(e_pow2), RENORMALIZE=c(renormalize), HAS_BIAS=c(router_bias is not None),
                          N_GROUP=c(n_group if grouped else 1),
                          NG_POW2=c(triton.next_power_of_2(n_group if grouped else 1)),
                          TOPK_GROUP=c(topk_group if grouped else 1),
                          GROUP_SIZE=c(E // n_group if grouped else E), UPCAST=c(upcast), PRECISION=c(precision),
                          SAVE_LOGITS=c(logits_out is not None), BT=c(bt), BK=c(bk), SPLIT=c(split),
                          X_AT=c(x_at is not None))
        bias = router_bias.float().contiguous() if router_bias is not None else dummy
        correction = correction_bias.float().contiguous() if grouped else dummy
        router_kernel[(triton.cdiv(T, bt),)](
            x, at, router_weight, bias, correction, weights, experts, dummy if logits_out is None else logits_out,
            partial, T, H, E, chunks, float(scaling), meta,
            num_warps=8 if bt * e_pow2 >= 8192 else 4)
    return weights, experts
