"""The fused kernel's last tasks: each token's k expert rows (and the shared experts' row),
weighted and summed into out."""

import triton
import triton.language as tl

from ..layout import WAIT_COMBINE, WAIT_SHARED_OUT
from ..transport import clock_ns, wait_at_least
from .tasks import report_timeout


@triton.jit
def combine_tile(tt, n0, out_ptr, plan, sym, scratch, dims, tokens, epoch, wait_limit, meta):
    """out[tokens, n-tiles] = sum_k w[t, k] * y[slot(t, k), n-tile] (+ y_s[tokens, n-tile]) for BT
    tokens and the SPAN column tiles of BN from n0 (those < NN), once each slot's chunk counters
    have reached the rows this rank expects in them (one wait for all BT x TOP_K slots and SPAN
    columns, then every row's load of a column tile can be in flight at once), and the shared
    output's tiles are written. Each column tile reads its slots' rows and weights per k as [BT]
    vectors in the tile's own row layout (a [BT, TOP_K] table split per k would cost a layout
    conversion through shared memory per k: +10% on qwen3 at SPAN 1, bench/NOTES.md item 52).
    -> (ready, done) clock stamps when TRACE."""
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
    for c in tl.static_range(SPAN):
        if n0 + c < NN:
            cols = (n0 + c) * BN + tl.arange(0, BN)
            cmask = cols < H
            acc = tl.zeros((BT, BN), dtype=tl.float32)
            if meta.SHARED:
                acc += tl.load(scratch.shared_y + t.to(tl.int64)[:, None] * H + cols[None, :],
                               mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            for kk in tl.static_range(TOP_K):
                s = t.to(tl.int64) * TOP_K + kk
                d = tl.load(plan.slot_dest + s, mask=tmask, other=-1)
                ok = d >= 0
                row = tl.load(plan.slot_row + s, mask=ok, other=0).to(tl.int64)
                if meta.WEIGHT_ON_INPUT:  # the weight went in with the rows: their outputs add as they are
                    w = tl.where(ok, 1.0, 0.0)
                else:
                    w = tl.load(plan.slot_w + s, mask=ok, other=0.0)
                y = tl.load(sym.combine_y.local + (d.to(tl.int64) * S + row)[:, None] * H + cols[None, :],
                            mask=ok[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")
                acc += w[:, None] * y.to(tl.float32)
            tl.store(out_ptr + t.to(tl.int64)[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=tmask[:, None] & cmask[None, :])
    done = clock_ns() if meta.TRACE else 0
    if missing < W:
        report_timeout(scratch, WAIT_COMBINE, missing, -1, tt, epoch)
    return ready, done
