"""Per-expert GEMMs over rows sorted by expert, for the explicit backward (backends/expert_grad.py):
the two products it needs, as Triton kernels with the forward engine's tiles (TMA boxes of the
weights, no host synchronisation for the row counts), to be timed against torch._grouped_mm
(bench/backward_gemms.py) before they replace it there.

    rows_times(a, w, counts, transpose)   [N, K] rows, expert e's counts[e] of them after the
                                          experts before it, times w[e] ([L, K, M]; transpose:
                                          w is [L, M, K] and w[e]^T is taken)       -> [N, M]
    dgrad_activation(dy, w_out, pre, ..)  g = dy w_out[e]^T with the activation's backward in
                                          the epilogue (g never stored)  -> sh, d_pre, dot
    outer(a, b, counts)                   each expert's a^T b over its rows          -> [L, K, M]

Both in the inputs' dtype with fp32 accumulation (tf32x3 dots for fp32 inputs); experts without
rows give zero blocks in outer. Programs past the last tile (the grid is sized from N and L, not
from the counts, which stay on the GPU) return at once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..config import MoEConfig
from ..gate_up import pair_width
from .activation_grad import activation_backward_tile
from .fused_moe import ACT_CODES

ROWS_TILE = (128, 128, 64)  # rows, output columns, K step of rows_times
# dgrad_activation's: 64 FFN columns, as the activation's epilogue at 128 spills (sm_90, qwen3:
# 255 registers and a 1.5 KB stack; at 64, 12 LDL/STL)
DGRAD_TILE = (128, 64, 64)
OUTER_TILE = (128, 128, 64)  # output rows (a's columns), output columns, rows a step of outer


@triton.jit
def _tile_of(t, tile_cum_ptr, row_cum_ptr, L, BM: tl.constexpr, L_POW2: tl.constexpr):
    """Row tile t of all experts' BM-row tiles, numbered expert by expert (tile_cum: [L] inclusive
    prefix sums of each expert's tiles; row_cum: [L + 1] exclusive prefix sums of its rows) ->
    (expert, first row, rows in the tile: 0 past the last tile)."""
    idx = tl.arange(0, L_POW2)
    cum = tl.load(tile_cum_ptr + idx, mask=idx < L, other=2**30)
    e = tl.minimum(tl.sum((cum <= t).to(tl.int32)), L - 1)  # experts whose tiles all come before t
    before = tl.sum(tl.where(idx == e - 1, cum, 0))  # tiles of the experts before e
    row0 = tl.load(row_cum_ptr + e) + (t - before) * BM
    rows = tl.minimum(tl.load(row_cum_ptr + e + 1) - row0, BM)
    return e, row0, tl.where(t < tl.load(tile_cum_ptr + L - 1), rows, 0)


@triton.jit
def _rows_product(a_ptr, w_desc, e, row0, rows, n0, K, TRANSPOSE: tl.constexpr, PRECISION: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    """Rows row0.. (rows of them) of a [N, K] times columns n0.. of expert e's w (w_desc: TMA over
    [L, K, M], boxes [1, BK, BN], or TRANSPOSE [L, M, K], boxes [1, BN, BK]) -> (acc [BM, BN]
    fp32, the rows [BM] int64, valid [BM])."""
    r = row0 + tl.arange(0, BM)
    valid = tl.arange(0, BM) < rows
    a_rows = a_ptr + tl.where(valid, r, row0).to(tl.int64) * K
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        k = k0 + tl.arange(0, BK)
        a = tl.load(a_rows[:, None] + k[None, :], mask=(k < K)[None, :], other=0.0)
        if TRANSPOSE:
            b = w_desc.load([e, n0, k0]).reshape(BN, BK).T
        else:
            b = w_desc.load([e, k0, n0]).reshape(BK, BN)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc, r.to(tl.int64), valid


@triton.jit
def rows_times_kernel(a_ptr, w_desc, out_ptr, tile_cum_ptr, row_cum_ptr, L, K, M,
                      TRANSPOSE: tl.constexpr, PRECISION: tl.constexpr, L_POW2: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    """a: [N, K]; w_desc: _rows_product's; out: [N, M]. Program (row tile, column tile)."""
    e, row0, rows = _tile_of(tl.program_id(0), tile_cum_ptr, row_cum_ptr, L, BM, L_POW2)
    if rows > 0:
        n0 = tl.program_id(1) * BN
        acc, r, valid = _rows_product(a_ptr, w_desc, e, row0, rows, n0, K, TRANSPOSE, PRECISION, BM, BN, BK, STAGES)
        cols = n0 + tl.arange(0, BN)
        tl.store(out_ptr + r[:, None] * M + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & (cols < M)[None, :])


@triton.jit
def dgrad_activation_kernel(dy_ptr, w_out_desc, pre_ptr, scale_ptr, sh_ptr, d_pre_ptr, dot_ptr, tile_cum_ptr,
                            row_cum_ptr, L, N, H, F, ACT: tl.constexpr, GATED: tl.constexpr, PAIR: tl.constexpr,
                            ALPHA: tl.constexpr, LIMIT: tl.constexpr, PRECISION: tl.constexpr,
                            L_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            STAGES: tl.constexpr):
    """g = dy w_out[e]^T for a row tile and BN FFN columns (w_out_desc over [L, F, H], boxes
    [1, BN, BK]), never stored: the activation's backward on it (activation_backward_tile) writes
    d_pre, sh = scale * act(pre), and this column tile's partial sums of act(pre) * g into row
    program_id(1) of dot [column tiles, N]."""
    e, row0, rows = _tile_of(tl.program_id(0), tile_cum_ptr, row_cum_ptr, L, BM, L_POW2)
    if rows > 0:
        n0 = tl.program_id(1) * BN
        g, r, valid = _rows_product(dy_ptr, w_out_desc, e, row0, rows, n0, H, True, PRECISION, BM, BN, BK, STAGES)
        f = n0 + tl.arange(0, BN)
        m = valid[:, None] & (f < F)[None, :]
        scale = tl.load(scale_ptr + r, mask=valid, other=0.0)[:, None]
        h = activation_backward_tile(pre_ptr, d_pre_ptr, r[:, None], f, m, g, scale, F, ACT, GATED, PAIR, ALPHA,
                                     LIMIT)
        tl.store(sh_ptr + r[:, None] * F + f[None, :], (scale * h).to(sh_ptr.dtype.element_ty), mask=m)
        tl.store(dot_ptr + tl.program_id(1).to(tl.int64) * N + r, tl.sum(tl.where(m, h * g, 0.0), axis=1),
                 mask=valid)


@triton.jit
def outer_kernel(a_ptr, b_ptr, out_ptr, row_cum_ptr, K, M, PRECISION: tl.constexpr,
                 BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, STAGES: tl.constexpr):
    """a: [N, K], b: [N, M]; out: [L, K, M], out[e] = a[rows of e]^T b[rows of e]. Program
    (expert, K tile, M tile), a loop over its expert's rows, BR at a time."""
    e = tl.program_id(0)
    k0 = tl.program_id(1) * BK
    n0 = tl.program_id(2) * BN
    first = tl.load(row_cum_ptr + e)
    end = tl.load(row_cum_ptr + e + 1)
    ks = k0 + tl.arange(0, BK)
    ns = n0 + tl.arange(0, BN)
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for r0 in tl.range(first, end, BR, num_stages=STAGES):
        r = r0 + tl.arange(0, BR)
        live = r < end
        a = tl.load(a_ptr + r.to(tl.int64)[:, None] * K + ks[None, :], mask=live[:, None] & (ks < K)[None, :],
                    other=0.0)
        b = tl.load(b_ptr + r.to(tl.int64)[:, None] * M + ns[None, :], mask=live[:, None] & (ns < M)[None, :],
                    other=0.0)
        acc = tl.dot(a.T, b, acc, input_precision=PRECISION)
    tl.store(out_ptr + e.to(tl.int64) * K * M + ks[:, None] * M + ns[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(ks < K)[:, None] & (ns < M)[None, :])


def _tile_cum(counts: torch.Tensor, BM: int) -> torch.Tensor:
    """counts [L] -> int32 [L] inclusive prefix sums of each expert's BM-row tiles (_tile_of's)."""
    return torch.cumsum(torch.div(counts + BM - 1, BM, rounding_mode="floor"), 0).to(torch.int32)


def _row_cum(counts: torch.Tensor) -> torch.Tensor:
    """counts [L] -> int32 [L + 1] exclusive prefix sums (on counts' device, no synchronisation)."""
    return torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)


def _precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


def rows_times(a: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, transpose: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """a: [N, K] contiguous, sorted by expert (counts: [L] int, sum N, on a's device); w: [L, K, M]
    or, transpose, [L, M, K], contiguous, in a's dtype -> [N, M] in a's dtype (into out if given):
    each expert's rows times w[e] (or w[e]^T)."""
    N, K = a.shape
    L = counts.shape[0]
    M = w.shape[1] if transpose else w.shape[2]
    if w.dim() != 3 or w.shape[0] != L or (w.shape[2] if transpose else w.shape[1]) != K:
        raise ValueError(f"rows_times: a {tuple(a.shape)}, w {tuple(w.shape)}, {L} counts, transpose={transpose}: "
                         f"expected w [{L}, {K}, M]" + (" transposed" if transpose else ""))
    if a.dtype != w.dtype or not (a.is_contiguous() and w.is_contiguous()):
        raise ValueError("rows_times: a and w must be contiguous and of one dtype")
    BM, BN, BK = ROWS_TILE
    out = torch.empty(N, M, dtype=a.dtype, device=a.device) if out is None else out
    if N == 0 or M == 0:
        return out
    desc = TensorDescriptor.from_tensor(w, [1, BN, BK] if transpose else [1, BK, BN])
    grid = (triton.cdiv(N, BM) + L, triton.cdiv(M, BN))
    stages = 3 if a.dtype != torch.float32 else 2
    rows_times_kernel[grid](a, desc, out, _tile_cum(counts, BM), _row_cum(counts), L, K, M, TRANSPOSE=transpose,
                            PRECISION=_precision(a.dtype), L_POW2=triton.next_power_of_2(L), BM=BM, BN=BN, BK=BK,
                            STAGES=stages, num_warps=8)
    return out


def dgrad_activation(dy: torch.Tensor, w_out: torch.Tensor, pre: torch.Tensor, scale: torch.Tensor,
                     counts: torch.Tensor, config: MoEConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy: [N, H] sorted by expert (counts [L]); w_out: [L, F, H]; pre: [N, F_in] (gated: gate/up
    pairs), all contiguous in one dtype; scale: [N] fp32 -> (sh [N, F], d_pre [N, F_in] in dy's
    dtype, dot [N] fp32), what activation_grad(pre, rows_times(dy, w_out, counts, transpose=True),
    scale, config) returns, with g = dy w_out[e]^T never written to memory."""
    N, H = dy.shape
    L, F = w_out.shape[0], w_out.shape[1]
    f_in = 2 * F if config.gated else F
    if (w_out.shape != (L, F, H) or pre.shape != (N, f_in) or scale.shape != (N,) or counts.shape != (L,)
            or len({dy.dtype, w_out.dtype, pre.dtype}) != 1 or scale.dtype != torch.float32):
        raise ValueError(f"dgrad_activation: dy {tuple(dy.shape)}, w_out {tuple(w_out.shape)}, pre {tuple(pre.shape)}, "
                         f"scale {scale.dtype} {tuple(scale.shape)}, counts {tuple(counts.shape)}: expected w_out "
                         f"[L, F, {H}], pre [{N}, {f_in}] in dy's dtype, scale [{N}] float32, counts [L]")
    if not all(t.is_contiguous() for t in (dy, w_out, pre, scale)):
        raise ValueError("dgrad_activation: dy, w_out, pre and scale must be contiguous")
    BM, BN, BK = DGRAD_TILE
    sh = torch.empty(N, F, dtype=dy.dtype, device=dy.device)
    d_pre = torch.empty_like(pre)
    partial = torch.empty(triton.cdiv(F, BN), N, dtype=torch.float32, device=dy.device)
    if N and F:
        desc = TensorDescriptor.from_tensor(w_out, [1, BN, BK])
        grid = (triton.cdiv(N, BM) + L, triton.cdiv(F, BN))
        dgrad_activation_kernel[grid](dy, desc, pre, scale, sh, d_pre, partial, _tile_cum(counts, BM),
                                      _row_cum(counts), L, N, H, F,
                                      ACT=ACT_CODES[config.activation], GATED=config.gated,
                                      PAIR=pair_width(F) if config.gated else 1, ALPHA=float(config.swiglu_alpha),
                                      LIMIT=float(config.swiglu_limit), PRECISION=_precision(dy.dtype),
                                      L_POW2=triton.next_power_of_2(L), BM=BM, BN=BN, BK=BK,
                                      STAGES=3 if dy.dtype != torch.float32 else 2, num_warps=8)
    return sh, d_pre, partial.sum(0)


def outer(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a: [N, K], b: [N, M], contiguous, one dtype, sorted by expert (counts: [L], sum N) ->
    [L, K, M] in their dtype (into out if given): each expert's a^T b over its rows (zero for an
    expert without rows)."""
    if a.shape[0] != b.shape[0] or a.dtype != b.dtype or not (a.is_contiguous() and b.is_contiguous()):
        raise ValueError(f"outer: a {a.dtype} {tuple(a.shape)} and b {b.dtype} {tuple(b.shape)}: expected one dtype, "
                         "one row count, contiguous")
    K, M, L = a.shape[1], b.shape[1], counts.shape[0]
    BK, BN, BR = OUTER_TILE
    out = torch.empty(L, K, M, dtype=a.dtype, device=a.device) if out is None else out
    if L and K and M:
        grid = (L, triton.cdiv(K, BK), triton.cdiv(M, BN))
        outer_kernel[grid](a, b, out, _row_cum(counts), K, M, PRECISION=_precision(a.dtype), BK=BK, BN=BN, BR=BR,
                           STAGES=3 if a.dtype != torch.float32 else 2, num_warps=8)
    return out
