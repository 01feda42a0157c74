"""The shared experts' tiles of the fused kernel: every token of this rank through one FFN,
local, no waits but for its own h."""

import triton
import triton.language as tl

from ..layout import WAIT_SHARED_HIDDEN
from ..transport import clock_ns, signal, wait_at_least
from .expert_ffn import activate, gemm_in, gemm_out, save_pre
from .tasks import grouped, report_timeout


@triton.jit
def shared_in_tile(m, j, x_ptr, weights, scratch, saved, dims, tokens, epoch, meta):
    """h_s[tokens m*BM.., f-tile j] = act(x @ shared_w_in[:, f-tile]) for this rank's own tokens;
    the tile j = 0 also stores each token's shared gate, sigmoid(x . shared_gate), when there is
    one. Nothing to wait for."""
    H, FS = dims.hidden, dims.shared_ffn
    BF: tl.constexpr = meta.BF
    BK: tl.constexpr = meta.BK
    t = m * meta.BM + tl.arange(0, meta.BM)
    valid = t < tokens
    rows = x_ptr + t.to(tl.int64) * H
    gate, up = gemm_in(rows, valid, weights.shared_w_in, 0, j, H, meta, meta.SHARED_PAIR)
    f = j * BF + tl.arange(0, BF)
    if meta.SAVE:
        save_pre(saved.shared_pre, t, valid, gate, up, f, FS, meta.SHARED_PAIR, meta)
    tl.store(scratch.shared_h + t.to(tl.int64)[:, None] * FS + f[None, :],
             activate(gate, up, meta).to(scratch.shared_h.dtype.element_ty), mask=valid[:, None] & (f < FS)[None, :])
    if meta.SHARED_GATE:
        if j == 0:
            logit = tl.zeros((meta.BM,), dtype=tl.float32)
            for k0 in range(0, H, BK):
                k = k0 + tl.arange(0, BK)
                a = tl.load(rows[:, None] + k[None, :], mask=valid[:, None] & (k < H)[None, :], other=0.0)
                g = tl.load(weights.shared_gate + k, mask=k < H, other=0.0)
                logit += tl.sum(a.to(tl.float32) * g.to(tl.float32)[None, :], axis=1)
            tl.store(scratch.shared_scale + t, tl.sigmoid(logit), mask=valid)
    signal(scratch.shared_h_flags + m * tl.cdiv(FS, BF) + j, epoch.to(tl.int32), "gpu")


@triton.jit
def shared_out_tile(m, n, weights, scratch, dims, tokens, epoch, wait_limit, meta):
    """y_s[tokens m*BM.., n-tile] = h_s @ shared_w_out[:, n-tile] (times the shared gate) once every
    f-tile of h_s is written. -> ready clock stamp when TRACE, else zero."""
    H, FS = dims.hidden, dims.shared_ffn
    BN_OUT: tl.constexpr = meta.BN_OUT
    NFS = tl.cdiv(FS, meta.BF)
    f_tiles = tl.arange(0, meta.NFS_POW2)
    short = wait_at_least(scratch.shared_h_flags + m * NFS + f_tiles, f_tiles < NFS, epoch.to(tl.int32),
                          wait_limit, scratch.status, "gpu", meta.ON_GPU)
    ready = clock_ns() if meta.TRACE else 0
    if tl.sum(short.to(tl.int32)) > 0:
        report_timeout(scratch, WAIT_SHARED_HIDDEN, -1, -1, m, epoch)
    else:
        t = m * meta.BM + tl.arange(0, meta.BM)
        valid = t < tokens
        acc = gemm_out(scratch.shared_h + t.to(tl.int64) * FS, valid, weights.shared_w_out, 0,
                        (n * BN_OUT).to(tl.int32), 0, FS, FS, meta)
        if meta.SHARED_GATE:
            acc = acc * tl.load(scratch.shared_scale + t, mask=valid, other=0.0)[:, None]
        cols = n * BN_OUT + tl.arange(0, BN_OUT)
        tl.store(scratch.shared_y + t.to(tl.int64)[:, None] * H + cols[None, :],
                 acc.to(scratch.shared_y.dtype.element_ty), mask=valid[:, None] & (cols < H)[None, :])
        signal(scratch.shared_y_flags + m * tl.cdiv(H, meta.BN) + n, epoch.to(tl.int32), "gpu")
    return ready


@triton.jit
def shared_task(s, n_sin, n_rows, x_ptr, weights, scratch, saved, dims, tokens, epoch, wait_limit, meta):
    """Shared-expert task s: shared_in tiles first, then shared_out tiles, each grid grouped as the
    experts' are. -> ready clock stamp when TRACE. Compiled only with shared experts."""
    ready = clock_ns() if meta.TRACE else 0
    if meta.SHARED:
        if s < n_sin:
            m, j = grouped(s, n_rows, tl.cdiv(dims.shared_ffn, meta.BF), meta.GROUP)
            shared_in_tile(m, j, x_ptr, weights, scratch, saved, dims, tokens, epoch, meta)
        else:
            m, n = grouped(s - n_sin, n_rows, tl.cdiv(dims.hidden, meta.BN_OUT), meta.GROUP)
            ready = shared_out_tile(m, n, weights, scratch, dims, tokens, epoch, wait_limit, meta)
    return ready
