"""This rank's token rows copied into expert order before the fused kernel (LaunchConfig.sorted_rows,
world 1): each kept slot's row lands where its expert tile reads it, so a GEMM1 tile's rows are
one block, loaded as TMA boxes instead of gathered row by row (cp.async, a CTA barrier a K step).

    recv[slot_row[t, k]] = x[t]      for each kept slot (slot_row >= 0)       [S, H]

The copy costs about 400 / C of GEMM1's time on an H200, C GEMM1's columns (2F for gated experts,
F otherwise): 4 bytes an element of a slot's row at the copy rate, against 2C flops an element
at the GEMM rate. The TMA loop saves 5-7% of it (bench/NOTES.md items 57 and 90), so it pays
from about 8,192 columns (gated experts 4,096 wide: launch_config.SORTED_MIN_COLUMNS), in calls of
4,096 slots or more (tokens x top-k: SORTED_MIN_SLOTS) and from 384 rows an expert (SORTED_ROWS):
fewer slots, and fewer rows at three of four points, measured slower on one H100."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .addresses import check_words, rebase

BLOCK_SLOTS = 16
BLOCK_COLS = 512
NUM_WARPS = 4


@triton.jit(do_not_specialize=["NS"])  # one variant at any token count (compile_sort_rows)
def sort_rows_kernel(x_ptr, x_at, slot_row_ptr, recv_ptr, NS, H, TOP_K: tl.constexpr, BS: tl.constexpr,
                     BH: tl.constexpr, X_AT: tl.constexpr):
    """x: [NS / TOP_K, H] (with X_AT at the address the int64 x_at holds: kernels/addresses.py);
    slot_row: [NS] int32 (slot s = token * TOP_K + choice; -1: dropped);
    recv: rows of H -> recv[slot_row[s]] := x[s // TOP_K] for BS slots."""
    x_ptr = rebase(x_ptr, x_at, X_AT)
    s = tl.program_id(0) * BS + tl.arange(0, BS)
    row = tl.load(slot_row_ptr + s, mask=s < NS, other=-1)
    kept = row >= 0
    src = x_ptr + (s // TOP_K).to(tl.int64)[:, None] * H
    dst = recv_ptr + row.to(tl.int64)[:, None] * H
    for h0 in range(0, H, BH):
        cols = h0 + tl.arange(0, BH)
        m = kept[:, None] & (cols < H)[None, :]
        tl.store(dst + cols[None, :], tl.load(src + cols[None, :], mask=m), mask=m)


def _launch_args(x: torch.Tensor, slot_row: torch.Tensor, recv: torch.Tensor, x_at: torch.Tensor | None):
    """Shapes checked -> (grid, args, kwargs) of sort_rows_kernel."""
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x: expected a contiguous [tokens, H] tensor, got {tuple(x.shape)}")
    T, H = x.shape
    if slot_row.dtype != torch.int32 or slot_row.dim() != 2 or slot_row.shape[0] != T or not slot_row.is_contiguous():
        raise ValueError(f"slot_row: expected contiguous int32 [{T}, top_k], got {slot_row.dtype} "
                         f"{tuple(slot_row.shape)}")
    if recv.dtype != x.dtype or recv.shape[-1] != H or not recv.is_contiguous():
        raise ValueError(f"recv: expected contiguous {x.dtype} rows of {H}, got {recv.dtype} {tuple(recv.shape)}")
    if x_at is not None:
        check_words("x_at", x_at, 1, x.device)
    NS = slot_row.numel()
    return ((triton.cdiv(NS, BLOCK_SLOTS),), (x, slot_row if x_at is None else x_at, slot_row, recv, NS, H),
            {"TOP_K": slot_row.shape[1], "BS": BLOCK_SLOTS, "BH": BLOCK_COLS, "X_AT": x_at is not None,
             "num_warps": NUM_WARPS})


def sort_rows(x: torch.Tensor, slot_row: torch.Tensor, recv: torch.Tensor, x_at: torch.Tensor | None = None) -> None:
    """recv[slot_row[t, k]] := x[t] for every kept slot. x: [T, H]; slot_row: [T, K] int32, each
    slot's row in recv (kernels/plan.RoutingPlan.slot_row: this rank's region at world 1), -1 for
    a dropped slot; recv: [.., H] of x's dtype, holding every row slot_row names; x_at: None, or
    an int64 word holding the address of the rows read instead (x standing in for them:
    kernels/addresses.py)."""
    grid, args, kwargs = _launch_args(x, slot_row, recv, x_at)
    if slot_row.numel():
        sort_rows_kernel[grid](*args, **kwargs)


def compile_sort_rows(x: torch.Tensor, slot_row: torch.Tensor, recv: torch.Tensor,
                      x_at: torch.Tensor | None = None) -> None:
    """Compile sort_rows' kernel for these dtypes and top-k (and x_at or not), launching nothing
    (on a GPU)."""
    grid, args, kwargs = _launch_args(x, slot_row, recv, x_at)
    sort_rows_kernel.warmup(*args, grid=grid, **kwargs)
