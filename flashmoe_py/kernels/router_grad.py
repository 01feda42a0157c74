"""The router weight's gradient in the explicit backward (backends/explicit_backward.py): the backward
of the router's logits = x @ router_weight^T,

    d_router_weight = d_logits^T @ x      [E, H] fp32

with d_logits [T, E] fp32 and x [T, H] in its own float dtype (bf16, fp16 or fp32), read as it is,
on the tensor cores at fp32's accuracy: bf16 x by split_dot (kernels/split_dot.py), other x as
tf32x3 products. It replaces the torch step there: a CUDA-core fp32 GEMM,
d_logits.t() @ x.float(), after an fp32 copy of x ([T, H], written and read again).

The grid is (expert blocks, column blocks, runs): the T tokens are cut into runs of RUN tokens (a
power of two; enough runs for about TARGET_PROGRAMS programs, at most MAX_RUNS unless runs of
MAX_RUN_TOKENS need more: token_runs); each program sums its run's tokens in token order into one
[BE, BH] tile of a partial sum [runs, E, H], and the runs' partials are added after the launch in a
fixed order (no atomics: the same bits every run). One run writes the output directly. Accuracy:
the tensor cores' fp32 accumulator over RUN tokens (kernels/split_dot.py), on an H200 1.6e-6 of
float64 at RUN = 512 and 6.8e-6 at 2,048, grows with RUN, so RUN stops at MAX_RUN_TOKENS (2.7e-5
at deepseek_v3's 16,384 tokens in two runs without that bound: bench/NOTES.md item 64). Memory:
the partial sum holds at most MAX_PARTIALS runs (E * H * 4 bytes each); more runs than that are
launched MAX_PARTIALS at a time, each launch's sum added to the output in token order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .split_dot import dot_modes, fp32_dot

BLOCK_COLS = 128
BLOCK_TOKENS = 64
MAX_BLOCK_EXPERTS = 64
TARGET_PROGRAMS = 256  # about two a streaming multiprocessor on an H100 / H200
MAX_RUNS = 16
MAX_RUN_TOKENS = 2048  # tokens one accumulator sums, for accuracy (the module docstring)
MAX_PARTIALS = 32  # runs a launch: deepseek_v3's partial sum at most 235 MB (65,536 tokens a launch)
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def router_grad_kernel(d_logits_ptr, x_ptr, out_ptr, T, E, H, RUN: tl.constexpr, SPLIT: tl.constexpr,
                       F32_DOTS: tl.constexpr, PRECISION: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr,
                       BT: tl.constexpr):
    """d_logits: [T, E] fp32 and x: [T, H] (a float dtype), both contiguous -> out [runs, E, H] fp32:
    out[r] = d_logits[tokens of run r]^T @ x[those tokens], one [BE, BH] tile of it; run r is
    tokens [r * RUN, (r + 1) * RUN), summed BT at a time in token order, each step's product by
    fp32_dot (SPLIT, F32_DOTS, PRECISION: split_dot.dot_modes of x). RUN is a constexpr (a power
    of two: few compiled versions)."""
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    run = tl.program_id(2).to(tl.int64)
    e_in, h_in = e < E, h < H
    acc = tl.zeros((BE, BH), dtype=tl.float32)
    # The last run's steps past T are masked, not skipped: an `if` around a step stops the compiler
    # prefetching the next tiles (no cp.async in the sm_90 build).
    for t0 in range(0, RUN, BT):
        t = run * RUN + t0 + tl.arange(0, BT)
        t_in = t < T
        d = tl.load(d_logits_ptr + e[:, None] + t[None, :] * E, mask=e_in[:, None] & t_in[None, :], other=0.0)
        xt = tl.load(x_ptr + t[:, None] * H + h[None, :], mask=t_in[:, None] & h_in[None, :], other=0.0)
        acc = fp32_dot(d, xt, acc, SPLIT, F32_DOTS, PRECISION)
    tl.store(out_ptr + (run * E + e[:, None]) * H + h[None, :], acc, mask=e_in[:, None] & h_in[None, :])


def block_experts(E: int) -> int:
    """Experts a program's tile covers (a power of two, 16..MAX_BLOCK_EXPERTS)."""
    return min(MAX_BLOCK_EXPERTS, max(16, triton.next_power_of_2(E)))


def token_runs(T: int, tiles: int) -> tuple[int, int]:
    """T tokens over an output of `tiles` [BE, BH] tiles -> (RUN, runs): tokens a run (a power of
    two from BLOCK_TOKENS to MAX_RUN_TOKENS) and the runs' count, enough to give about
    TARGET_PROGRAMS programs, and at most MAX_RUNS unless runs of MAX_RUN_TOKENS need more;
    RUN * runs >= T."""
    want = min(MAX_RUNS, max(1, triton.cdiv(TARGET_PROGRAMS, tiles)))
    run = min(MAX_RUN_TOKENS, max(BLOCK_TOKENS, triton.next_power_of_2(triton.cdiv(T, want))))
    return run, triton.cdiv(T, run)


def router_weight_grad(d_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d_logits: [T, E] fp32, contiguous; x: [T, H] in bf16, fp16 or fp32, contiguous; one device
    -> d_router_weight = d_logits^T @ x, [E, H] fp32, as the module docstring says (T == 0: zeros)."""
    if d_logits.dim() != 2 or d_logits.dtype != torch.float32 or not d_logits.is_contiguous():
        raise ValueError(f"router_weight_grad: d_logits is {d_logits.dtype} {tuple(d_logits.shape)} with strides "
                         f"{d_logits.stride()}; expected a contiguous [T, E] float32")
    if x.dim() != 2 or x.dtype not in X_DTYPES or not x.is_contiguous():
        raise ValueError(f"router_weight_grad: x is {x.dtype} {tuple(x.shape)} with strides {x.stride()}; "
                         "expected a contiguous [T, H] in bfloat16, float16 or float32")
    (T, E), H = d_logits.shape, x.shape[1]
    if x.shape[0] != T:
        raise ValueError(f"router_weight_grad: x has {x.shape[0]} tokens (rows), d_logits {T}; expected the same T")
    if x.device != d_logits.device:
        raise ValueError(f"router_weight_grad: d_logits on {d_logits.device}, x on {x.device}; expected one device")
    if not (T and E and H):
        return torch.zeros(E, H, dtype=torch.float32, device=x.device)
    BE = block_experts(E)
    tiles = (triton.cdiv(E, BE), triton.cdiv(H, BLOCK_COLS))
    RUN, runs = token_runs(T, tiles[0] * tiles[1])
    partials = torch.empty(min(runs, MAX_PARTIALS), E, H, dtype=torch.float32, device=x.device)
    out = None
    for first in range(0, T, MAX_PARTIALS * RUN):  # one launch unless there are more runs than MAX_PARTIALS
        n = min(T - first, MAX_PARTIALS * RUN)
        launch_runs = triton.cdiv(n, RUN)
        router_grad_kernel[(*tiles, launch_runs)](
            d_logits[first:], x[first:], partials, n, E, H, RUN=RUN, **dot_modes(x.dtype, x.is_cuda), BE=BE,
            BH=BLOCK_COLS, BT=BLOCK_TOKENS, num_warps=4)
        part = partials[0] if launch_runs == 1 else partials[:launch_runs].sum(0)
        if out is None:  # partials[0] is a view of what the next launch, if any, writes again
            out = part if first + n >= T or launch_runs > 1 else part.clone()
        else:
            out.add_(part)
    return out
