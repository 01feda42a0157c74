"""The fused kernel's last tasks: each token's k expert rows (and the shared experts' row),
weighted and summed into out."""

import triton
import triton.language as tl

from ..layout import WAIT_COMBINE, WAIT_SHARED_OUT
from ..transport import clock_ns, wait_at_least
from .tasks import report_timeout

# Combine tasks of at most this many choices a token sum their column tiles as one wide tile.
# One H100, against summing them in turn, two rounds each: mixtral (top-2) at 4,096 / 16,384
# tokens -1.0 / -0.3%, gpt_oss (top-4) -0.8 / +0.0%; qwen3 (top-8) at 16,384 +5.5%, spilling
# (bench/results/2026-12-07l-h100x1-wide-combine-topk4, 2026-12-07f-h100x1-wide-combine-tile).
WIDE_TOP_K = tl.constexpr(4)


@triton.jit
def combine_tile(tt, n0, out_ptr, plan, sym, scratch, dims, tokens, epoch, wait_limit, meta):
    """out[tokens, n-tiles] = sum_k w[t, k] * y[slot(t, k), n-tile] (+ y_s[tokens, n-tile]) for BT
    tokens and the SPAN column tiles of BN from n0 (those < NN), once each slot's chunk counters
    have reached the rows this rank expects in them (one wait for all BT x TOP_K slots and SPAN
    columns), and the shared output's tiles are written. Up to WIDE_TOP_K choices a token, the
    SPAN column tiles are summed as one [BT, SPAN x BN] tile (columns past H masked): per k its
    slots' destinations, rows and weights are read once, all three at once (a dropped slot's row
    is read and not used), and every column's row loads are in flight together. Beyond that the
    wide tile's registers spill (qwen3's top-8 build, Triton 3.6: local loads / stores 7 / 6 ->
    42 / 34), so each column tile is summed in turn. Slot fields are read per k as [BT] vectors
    in the tile's own row layout (a [BT, TOP_K] table split per k would cost a layout conversion
    through shared memory per k: +10% on qwen3 at SPAN 1, bench/NOTES.md item 52). -> (ready,
    done) clock stamps when TRACE."""
    W, H, S = dims.world, dims.hidden, dims.source_rows
    NN = tl.cdiv(H, meta.BN)
    TOP_K: tl.constexpr = meta.TOP_K
    BT: tl.constexpr = meta.BT
    BN: tl.constexpr = meta.BN
    SPAN: tl.constexpr = meta.SPAN
    t = tt * BT + tl.arange(0, BT)
    tmask = t < tokens
    k = tl.arange(0, meta.K_POW2)
    slots = t.to(tl.int64)[:, None] * TOP_K + k[None, :]
    dest = tl.load(plan.slot_dest + slots, mask=tmask[:, None] & (k[None, :] < TOP_K), other=-1)
    live = dest >= 0
    chunk = tl.load(plan.slot_chunk + slots, mask=live, other=0).to(tl.int64)
    expect = tl.load(scratch.comb_expect + chunk, mask=live, other=0)
    span = n0 + tl.arange(0, SPAN)
    if SPAN == 1:
        short = wait_at_least(sym.combine_counts.local + chunk * NN + n0, live, expect, wait_limit, scratch.status,
                              meta.PEER_SCOPE, meta.ON_GPU)
        missing = tl.min(tl.where(short, dest, W))  # the lowest rank whose rows did not come back (W: none)
    else:
        words = (chunk * NN)[:, :, None] + span[None, None, :]
        short = wait_at_least(sym.combine_counts.local + words, live[:, :, None] & (span < NN)[None, None, :],
                              expect[:, :, None], wait_limit, scratch.status, meta.PEER_SCOPE, meta.ON_GPU)
        missing = tl.min(tl.where(short, dest[:, :, None], W))
    if meta.SHARED:  # the shared output tiles holding these tokens and columns (BT | BM, BN | BN_OUT)
        flags = scratch.shared_y_flags + (tt * BT) // meta.BM * NN + (span * BN) // meta.BN_OUT
        if tl.sum(wait_at_least(flags, span < NN, epoch.to(tl.int32), wait_limit, scratch.status, "gpu",
                                meta.ON_GPU).to(tl.int32)) > 0:
            report_timeout(scratch, WAIT_SHARED_OUT, -1, -1, tt, epoch)
    ready = clock_ns() if meta.TRACE else 0
    if TOP_K <= WIDE_TOP_K:
        _sum_columns(t, tmask, n0 * BN, out_ptr, plan, sym, scratch, H, S, meta, SPAN * BN)
    else:
        for c in tl.static_range(SPAN):
            if n0 + c < NN:
                _sum_columns(t, tmask, (n0 + c) * BN, out_ptr, plan, sym, scratch, H, S, meta, BN)
    done = clock_ns() if meta.TRACE else 0
    if missing < W:
        report_timeout(scratch, WAIT_COMBINE, missing, -1, tt, epoch)
    return ready, done


@triton.jit
def _sum_columns(t, tmask, c0, out_ptr, plan, sym, scratch, H, S, meta, WIDTH: tl.constexpr):
    """out[t, c0 : c0 + WIDTH] (those < H) = the weighted sum of t's slots' rows (+ the shared
    output's). Up to WIDE_TOP_K choices, each slot's row and weight are read with its destination
    (a dropped slot's too, not used), not after it."""
    cols = c0 + tl.arange(0, WIDTH)
    cmask = cols < H
    t64 = t.to(tl.int64)
    acc = tl.zeros((meta.BT, WIDTH), dtype=tl.float32)
    if meta.SHARED:
        acc += tl.load(scratch.shared_y + t64[:, None] * H + cols[None, :],
                       mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    for kk in tl.static_range(meta.TOP_K):
        s = t64 * meta.TOP_K + kk
        d = tl.load(plan.slot_dest + s, mask=tmask, other=-1)
        ok = d >= 0
        read = tmask if meta.TOP_K <= WIDE_TOP_K else ok
        row = tl.load(plan.slot_row + s, mask=read, other=0).to(tl.int64)
        if meta.WEIGHT_ON_INPUT:  # the weight went in with the rows: their outputs add as they are
            w = tl.where(ok, 1.0, 0.0)
        else:  # (a dropped slot's weight multiplies the zeros its masked load gives)
            w = tl.load(plan.slot_w + s, mask=read, other=0.0)
        y = tl.load(sym.combine_y.local + (d.to(tl.int64) * S + row)[:, None] * H + cols[None, :],
                    mask=ok[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")
        acc += w[:, None] * y.to(tl.float32)
    tl.store(out_ptr + t64[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])
