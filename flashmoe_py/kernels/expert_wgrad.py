"""Per-expert weight gradients, out[e] = a_e^T b_e over each expert's rows (the backward's w_in and
w_out gradients), as one persistent, warp-specialised Gluon kernel for Hopper (sm_90).

    a [S, K], b [S, N] bf16, rows sorted by expert; ends [E] int32, the cumulative row counts (the
    offs of torch._grouped_mm); out [E, K, N] bf16 (zeros for an expert without rows).

Each expert's reduction is short where experts are many (deepseek_v3 at 4,096 tokens: 128 rows an
expert, two steps of 64) while its output is large (deepseek_v3's dw_in: 15 GB a call), so a tile is
a few products between its loads and its store, and the schedule must keep loads and stores in
flight across tiles:

  producer    one warp: each tile's row steps, a's [BR, BM] box and b's two [BR, BN] boxes by TMA
              into a ring of stages, tile after tile, waiting for a free stage (and, at a step
              that reaches past its expert, for the boxes to land: below);
  consumers   two warp groups on every tile, group c the columns [c BN, (c + 1) BN) of the
              program's [BM, 2 BN] tile: each step's products a^T b_c from shared memory (a read
              transposed), one step's in flight while the next step's boxes land; then the tile
              through the group's own buffer out by an asynchronous TMA store, which drains while
              the next tile's products run.

A step's box can reach into the next expert's rows: the producer zeroes those rows of a's box in
shared memory once it has landed (stores only, but for the 8 rows that hold the expert's last), then
releases the stage to the consumers on a barrier of its own, so the consumers never touch a box
(they zeroed their b boxes before: 6-14% slower on one H200, bench/NOTES.md item 68). The consumers
wait on that barrier only at such steps; the producer arrives on it at every step, so its phases
keep in step with the ring's (items 68-69). Rows past S and a's columns past K arrive as zeros from
TMA; out is stored through a [E, K, N] descriptor in [1, BM, BN] boxes, so a tile's rows past K
(K not a multiple of BM: gpt_oss_120b's 2,880) are not stored."""

from __future__ import annotations

import torch
import triton

BM, BN, BR = 128, 128, 64  # each consumer's output tile [BM, BN] (a program's tile [BM, 2 BN]); rows a step
# Where it is used in place of torch._grouped_mm (backends/expert_grad.py): up to this many rows an
# expert on average. Measured on one H200 at 4,096 tokens (bench/wgrad_probe.py, uniform and skewed
# routing, bench/results/2026-12-04a-h200x1-expert-wgrad/): 0.6-21% faster at deepseek_v3's 128 and
# qwen3_30b_a3b's 256 rows an expert, 4-27% slower at mixtral_8x7b's 1,024 (longer reductions,
# where the grouped kernel's products run closer to the tensor cores' rate); at qwen3_30b_a3b's 512
# (8,192 tokens) up to 8% faster but up to 7% slower under skewed routing (before the producer
# zeroed a: bench/results/2026-12-04b-h200x1-table-wgrad-zeroing/), so left to torch from 257.
MAX_MEAN_ROWS = 256


def suits(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> bool:
    """Whether expert_wgrad takes these operands (check_wgrad's conditions on a and b, a Hopper
    GPU, the Triton it was built and measured with: Gluon's API moves between releases) and is the
    faster choice for them (at most MAX_MEAN_ROWS rows an expert on average)."""
    if not (a.is_cuda and b.is_cuda and torch.cuda.get_device_capability(a.device) == (9, 0)):
        return False
    return (triton.__version__.startswith("3.6.") and _operand_problem(a, b) is None
            and a.shape[0] <= MAX_MEAN_ROWS * num_experts)


def _operand_problem(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """What keeps a and b from the kernel (bf16 [S, K] and [S, N], contiguous, at 16-byte aligned
    addresses, K and N multiples of 8 for TMA rows of whole 16 bytes), or None."""
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return f"a and b must be bfloat16, got {a.dtype} and {b.dtype}"
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        return f"a [S, K] and b [S, N] must share S, got {tuple(a.shape)} and {tuple(b.shape)}"
    if not (a.is_contiguous() and b.is_contiguous()):
        return "a and b must be contiguous"
    if a.shape[1] % 8 or b.shape[1] % 8:
        return f"a's width {a.shape[1]} and b's {b.shape[1]} must be multiples of 8"
    if a.data_ptr() % 16 or b.data_ptr() % 16:
        return "a and b must start at 16-byte aligned addresses for TMA"
    return None


def check_wgrad(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor) -> None:
    """Raise ValueError (naming the argument) unless expert_wgrad can take these operands: a and b
    as _operand_problem asks, on one CUDA device with ends [E] int32, contiguous."""
    problem = _operand_problem(a, b)
    if problem:
        raise ValueError(f"expert_wgrad: {problem}")
    if ends.dim() != 1 or ends.dtype != torch.int32 or not ends.is_contiguous():
        raise ValueError(f"expert_wgrad: ends must be a contiguous [E] int32 tensor, got {tuple(ends.shape)} "
                         f"{ends.dtype} with strides {ends.stride()}")
    if not (a.device == b.device == ends.device and a.is_cuda):
        raise ValueError(f"expert_wgrad: a, b and ends must be on one CUDA device, got {a.device}, {b.device}, "
                         f"{ends.device}")


def expert_wgrad(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor, out: torch.Tensor | None = None,
                 stages: int = 3, out_bufs: int = 1) -> torch.Tensor:
    """a [S, K], b [S, N] bf16 sorted by expert; ends [E] int32 (cumulative counts, ends[-1] = S) ->
    out [E, K, N] bf16, out[e] = a[ends[e-1]:ends[e]]^T b[ends[e-1]:ends[e]] in fp32 accumulation.
    One launch, no host synchronisation (none where there is nothing to reduce: out is zeroed).
    Hopper only (Gluon's warp groups and TMA). stages: the ring's depth (48 KB each, at least 2: a
    stage is released once the next step's products are issued, so one would deadlock); out_bufs:
    each consumer's output buffers (32 KB each), so that a consumer writes one while its last store
    drains (more than one only where N is a multiple of 2 BN: a half past N stores nothing, and the
    kernel counts a buffer's turn by tiles, not stores). A row of the next expert that holds inf or
    NaN in b turns this expert's sums NaN (its a row is zeroed, and 0 * inf is NaN)."""
    check_wgrad(a, b, ends)
    E, K, N = ends.shape[0], a.shape[1], b.shape[1]
    if stages < 2 or out_bufs < 1 or (out_bufs > 1 and N % (2 * BN)):
        raise ValueError(f"expert_wgrad: stages={stages} must be at least 2 and out_bufs={out_bufs} at least 1, "
                         f"and 1 unless b's width {N} is a multiple of {2 * BN}")
    if out is None:
        out = torch.empty(E, K, N, dtype=a.dtype, device=a.device)
    elif (out.shape != (E, K, N) or out.dtype != a.dtype or not out.is_contiguous() or out.device != a.device
          or out.data_ptr() % 16):
        raise ValueError(f"expert_wgrad: out must be a contiguous [{E}, {K}, {N}] {a.dtype} tensor on {a.device} "
                         "at a 16-byte aligned address")
    if a.shape[0] == 0 or out.numel() == 0:  # TMA descriptors need positive sizes
        return out.zero_()
    from ._expert_wgrad_gluon import launch  # Gluon: imported only where it runs
    launch(a, b, ends, out, stages, out_bufs, (BM, BN, BR))
    return out
