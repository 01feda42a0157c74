"""The expert biases' gradients in one pass over the backward's rows (backends/expert_grad.py).
Rows are sorted by local expert, expert e's ending at ends[e]; for a row r of expert e with the
gradient of GEMM1's output d_pre, the gradient of the layer's output at its token dy and its routing
weight scale:

    db_in[e]  = sum over e's rows of d_pre[r]           [L, F_in]  fp32
    db_out[e] = sum over e's rows of scale[r] dy[r]     [L, H]     fp32
    dot_b[r]  = <dy[r], bias_out[e]>                       [N]        fp32  (bias_out's share of <dy, y>)

d_pre and dy are read once. The grid is (experts, column blocks of d_pre then of dy): a program
sums its expert's rows of its columns in row order, and writes its columns' share of dot_b into a
row of partial sums, summed after the launch in a fixed order (no atomics: the same bits every run
for rows in the same order; backward="saved" hands them in the routing plan's, kernels/plan.py).
Under torch ops the same took eight passes over [N, H] and [N, F_in] in fp32 and two index_add_
scatters: 8.0 ms of gpt_oss_120b's 27.5 ms training step at 16,384 tokens on one H200
(bench/NOTES.md item 71)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 32
BLOCK_COLS = 128


@triton.jit
def bias_grad_kernel(d_pre_ptr, dy_ptr, scale_ptr, b_out_ptr, ends_ptr, db_in_ptr, db_out_ptr, dot_ptr,
                     N, F_IN, H, IN_BLOCKS, BR: tl.constexpr, BC: tl.constexpr):
    """d_pre: [N, F_IN]; dy: [N, H]; scale: [N] fp32; bias_out: [L, H]; ends: [L] -> db_in [L, F_IN],
    db_out [L, H] fp32 and dot: [column blocks of H, N] fp32, this block's partial sums of
    dy * bias_out. Program (e, c): expert e, column block c of d_pre (c < IN_BLOCKS) or of dy."""
    e = tl.program_id(0)
    c = tl.program_id(1)
    end = tl.load(ends_ptr + e).to(tl.int64)
    start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0).to(tl.int64)
    if c < IN_BLOCKS:
        cols = c * BC + tl.arange(0, BC)
        acc = tl.zeros([BR, BC], tl.float32)
        for r0 in range(start, end, BR):
            rows = r0 + tl.arange(0, BR)
            m = (rows < end)[:, None] & (cols < F_IN)[None, :]
            acc += tl.load(d_pre_ptr + rows[:, None] * F_IN + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(db_in_ptr + e.to(tl.int64) * F_IN + cols, tl.sum(acc, axis=0), mask=cols < F_IN)
    else:
        c_out = c - IN_BLOCKS
        cols = c_out * BC + tl.arange(0, BC)
        b = tl.load(b_out_ptr + e.to(tl.int64) * H + cols, mask=cols < H, other=0.0).to(tl.float32)
        acc = tl.zeros([BR, BC], tl.float32)
        for r0 in range(start, end, BR):
            rows = r0 + tl.arange(0, BR)
            m = (rows < end)[:, None] & (cols < H)[None, :]
            dy = tl.load(dy_ptr + rows[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += dy * tl.load(scale_ptr + rows, mask=rows < end, other=0.0)[:, None]
            tl.store(dot_ptr + c_out.to(tl.int64) * N + rows, tl.sum(dy * b[None, :], axis=1), mask=rows < end)
        tl.store(db_out_ptr + e.to(tl.int64) * H + cols, tl.sum(acc, axis=0), mask=cols < H)


def bias_grads(d_pre: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor, bias_out: torch.Tensor,
               ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d_pre: [N, F_in] and dy: [N, H] in one dtype, contiguous, rows sorted by local expert;
    scale: [N] fp32; bias_out: [L, H]; ends: [L] int32 or int64, contiguous, the cumulative row
    counts (the offs of torch._grouped_mm), all on one device -> (db_in [L, F_in], db_out [L, H],
    dot_b [N]), all fp32, as the module docstring says. ends[-1] must be at most N (not checked:
    that would synchronise with the GPU); rows past it belong to no expert and get dot_b 0."""
    if dy.dim() != 2:
        raise ValueError(f"bias_grads: dy must be [N, H], got {tuple(dy.shape)}")
    N, H = dy.shape
    L = ends.shape[0]
    if d_pre.dim() != 2 or d_pre.shape[0] != N or d_pre.dtype != dy.dtype:
        raise ValueError(f"bias_grads: d_pre {d_pre.dtype} {tuple(d_pre.shape)} must be [N, F_in] in dy's dtype "
                         f"({dy.dtype}, N = {N})")
    if scale.shape != (N,) or scale.dtype != torch.float32:
        raise ValueError(f"bias_grads: scale must be [{N}] float32, got {scale.dtype} {tuple(scale.shape)}")
    if bias_out.shape != (L, H):
        raise ValueError(f"bias_grads: bias_out must be [{L}, {H}] (ends' experts, dy's width), got "
                         f"{tuple(bias_out.shape)}")
    if ends.dim() != 1 or ends.dtype not in (torch.int32, torch.int64) or not ends.is_contiguous():
        raise ValueError(f"bias_grads: ends must be a contiguous [L] int32 or int64 tensor, got {ends.dtype} "
                         f"{tuple(ends.shape)}")
    if not all(t.is_contiguous() for t in (d_pre, dy, scale, bias_out)):
        raise ValueError("bias_grads: d_pre, dy, scale and bias_out must be contiguous")
    if any(t.device != dy.device for t in (d_pre, scale, bias_out, ends)):
        raise ValueError(f"bias_grads: d_pre, dy, scale, bias_out and ends must be on one device, got {d_pre.device}, "
                         f"{dy.device}, {scale.device}, {bias_out.device}, {ends.device}")
    F_in = d_pre.shape[1]
    db_in = torch.empty(L, F_in, dtype=torch.float32, device=dy.device)
    db_out = torch.empty(L, H, dtype=torch.float32, device=dy.device)
    in_blocks, out_blocks = triton.cdiv(F_in, BLOCK_COLS), triton.cdiv(H, BLOCK_COLS)
    partial = torch.zeros(out_blocks, N, dtype=torch.float32, device=dy.device)  # rows of no expert: 0
    if L:
        bias_grad_kernel[(L, in_blocks + out_blocks)](d_pre, dy, scale, bias_out, ends, db_in, db_out, partial,
                                                      N, F_in, H, in_blocks, BR=BLOCK_ROWS, BC=BLOCK_COLS)
    return db_in, db_out, partial.sum(0)
