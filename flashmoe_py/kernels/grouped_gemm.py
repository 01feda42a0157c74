"""Per-expert GEMMs over rows sorted by expert, for the explicit backward (backends/expert_grad.py):
the two products it needs, as Triton kernels with the forward engine's tiles (TMA boxes of the
weights, no host synchronisation for the row counts), to be timed against torch._grouped_mm
(bench/backward_gemms.py) before they replace it there.

    rows_times(a, w, counts, transpose)   [N, K] rows, expert e's counts[e] of them after the
                                          experts before it, times w[e] ([L, K, M]; transpose:
                                          w is [L, M, K] and w[e]^T is taken)       -> [N, M]
    outer(a, b, counts)                   each expert's a^T b over its rows          -> [L, K, M]

Both in the inputs' dtype with fp32 accumulation (tf32x3 dots for fp32 inputs); experts without
rows give zero blocks in outer. Programs past the last tile (the grid is sized from N and L, not
from the counts, which stay on the GPU) return at once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

ROWS_TILE = (128, 128, 64)  # rows, output columns, K step of rows_times
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
def rows_times_kernel(a_ptr, w_desc, out_ptr, tile_cum_ptr, row_cum_ptr, L, K, M,
                      TRANSPOSE: tl.constexpr, PRECISION: tl.constexpr, L_POW2: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    """a: [N, K]; w_desc: TMA over w [L, K, M] (boxes [1, BK, BN]) or, TRANSPOSE, [L, M, K] (boxes
    [1, BN, BK]); out: [N, M]. Program (row tile, column tile)."""
    e, row0, rows = _tile_of(tl.program_id(0), tile_cum_ptr, row_cum_ptr, L, BM, L_POW2)
    if rows > 0:
        n0 = tl.program_id(1) * BN
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
        cols = n0 + tl.arange(0, BN)
        tl.store(out_ptr + r.to(tl.int64)[:, None] * M + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & (cols < M)[None, :])


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
    tile_cum = torch.cumsum(torch.div(counts + BM - 1, BM, rounding_mode="floor"), 0).to(torch.int32)
    desc = TensorDescriptor.from_tensor(w, [1, BN, BK] if transpose else [1, BK, BN])
    grid = (triton.cdiv(N, BM) + L, triton.cdiv(M, BN))
    stages = 3 if a.dtype != torch.float32 else 2
    rows_times_kernel[grid](a, desc, out, tile_cum, _row_cum(counts), L, K, M, TRANSPOSE=transpose,
                            PRECISION=_precision(a.dtype), L_POW2=triton.next_power_of_2(L), BM=BM, BN=BN, BK=BK,
                            STAGES=stages, num_warps=8)
    return out


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
