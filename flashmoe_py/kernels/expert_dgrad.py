"""Per-expert products with transposed weights, out[r] = a[r] w[e(r)]^T for rows sorted by expert
(the backward's g = dy w_out[e]^T and d_rows = d_pre w_in[e]^T), as one Triton kernel whose weight
tiles and row tiles come through TMA.

    a [S, K] bf16, rows sorted by expert; w [E, N, K] bf16 (K contiguous: w_out as stored, or
    w_in [E, H, F_in] as stored, N = H); ends [E] int32, the cumulative row counts (the offs of
    torch._grouped_mm); out [S, N] bf16.

With w_kn, w is [E, K, N] (N contiguous) and out[r] = a[r] w[e(r)], untransposed: backward=
"recompute"'s GEMM1, pre = rows w_in[e] with w_in [E, H, F_in] as stored. Its boxes come through a
3-D descriptor, [1, BK, BN] a box, so rows past an expert's K arrive as zeros, never the next
expert's.

Where experts are many and their rows few (deepseek_v3 at 4,096 tokens: 128 rows an expert) each
expert's weights are read once and used by few rows, so the products stream weights: one program a
[BM, BN] tile of one expert, its K loop pipelined through TMA boxes of a's rows and w's rows (w read
as stored; without w_kn its box is read transposed from shared memory by the tensor cores). A row
tile that reaches past
its expert reads the next expert's rows (TMA fills rows past S with zeros); their products land in
output rows that are not stored. Tiles are numbered row tile major, column tile minor, so the
programs that run together share a row tile's a in L2 and read distinct weight tiles.

The row tiles come from `RowTiles` (on the GPU, no host synchronisation), made once per routing and
shared by every product over the same rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@dataclass(frozen=True)
class DgradTiles:
    """A launch's tile shape: block_m rows by block_n columns, block_k deep a step, `stages` steps
    in flight, `warps` warps a program. The defaults are the measured tile (TILES)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    stages: int = 5
    warps: int = 8
    wide_last: bool = True  # an expert's last block_m + block_m / 2 rows in one tile (RowTiles)


# Where it is used in place of torch._grouped_mm (backends/expert_grad.py): up to this many rows an
# expert on average. Measured on one H200 (bench/dgrad_probe.py, uniform and skewed routing,
# bench/results/2026-12-04e-h200x1-dgrad-wide-last/), TILES against torch's time: 0.73-0.86x at 64
# rows an expert (deepseek_v3, gpt_oss_120b at 2,048 tokens), 0.63-0.82x at 128 (those at 4,096,
# qwen3_30b_a3b at 2,048), 0.79-0.99x at 256 (those at 8,192, qwen3_30b_a3b at 4,096; 0.83-1.08x
# without wide last tiles), 0.99-1.05x at 512 (qwen3_30b_a3b at 8,192). Not taken at 256 yet:
# qwen3_30b_a3b's training step at 4,096 tokens, whose host time is close to its GPU time, went
# from 2,785 / 2,801 us to 2,839 / 3,254 with it (in turn, one call), host-bound. Most of that host
# time was the row-tile table in ~20 torch ops (~400 us a backward), since made one kernel (~35-60
# us); 256 has not been timed again since (bench/NOTES.md item 70).
MAX_MEAN_ROWS = 128
# The measured tile: of eleven shapes and a persistent loop, none was more than 4% faster than
# 128 x 128 with 5 stages at any point up to 128 rows an expert (bench/results/2026-12-04c-h200x1-
# expert-dgrad/). Wide last tiles (RowTiles): where about half the experts have a few rows past
# 128 (128 +- 11 rows an expert under uniform routing), a second 128-row tile re-read their weights
# and computed 128 rows for a handful; one 192-row tile instead takes 13-17% off deepseek_v3's and
# gpt_oss_120b's products at 4,096 tokens (uniform; 1-4% skewed), and where no tile is wide (2,048
# tokens) it runs 5% faster to 4% slower. 4 stages with them: 1-11% slower than 5.
TILES = DgradTiles()


def suits(a: torch.Tensor, w: torch.Tensor, num_experts: int, w_kn: bool = False) -> bool:
    """Whether expert_dgrad takes these operands (check_dgrad's conditions, bf16, a Hopper GPU) and
    is the faster choice for them (at most MAX_MEAN_ROWS rows an expert on average)."""
    if a.shape[0] > MAX_MEAN_ROWS * num_experts or not (a.is_cuda and a.dtype == torch.bfloat16):
        return False  # the cheap tests first: this runs for every product of a backward
    return torch.cuda.get_device_capability(a.device) == (9, 0) and _operand_problem(a, w, w_kn) is None


@dataclass(frozen=True)
class RowTiles:
    """Each row tile's expert and first row, for tiles that do not cross experts: block_m rows, or
    with wide_last, where an expert's rows past its last whole block_m are at most block_m / 2, its
    last tile takes those with the block_m before them (block_m + block_m / 2 rows, its weights read
    once and no tile computed for a handful of rows).

    expert [T] int32 (E where the tile is past the last: the bound T = S // block_m + E holds every
    routing's tiles); first [T] int32 (meaningless past the last tile); wide [T] int32, 1 for a wide
    last tile; ends [E] int32, the cumulative counts."""

    expert: torch.Tensor
    first: torch.Tensor
    wide: torch.Tensor
    ends: torch.Tensor
    block_m: int
    wide_last: bool = False

    @staticmethod
    def of(ends: torch.Tensor, rows: int, block_m: int, wide_last: bool = False) -> RowTiles:
        """ends [E] int32 cumulative row counts, contiguous (ends[-1] = rows) -> the row tiles, on
        ends' device: one small kernel (_row_tiles_kernel), no host synchronisation. In torch ops
        the table took ~20 of them, ~400 us of host time a backward on the H200 machine
        (bench/NOTES.md item 70)."""
        if ends.dim() != 1 or ends.dtype != torch.int32 or not ends.is_contiguous() or ends.shape[0] == 0:
            raise ValueError(f"RowTiles.of: ends must be a contiguous, non-empty [E] int32 tensor, got "
                             f"{tuple(ends.shape)} {ends.dtype}")
        E, T = ends.shape[0], ends.shape[0] + rows // block_m
        table = torch.empty(3, T, dtype=torch.int32, device=ends.device)
        e_pow2 = triton.next_power_of_2(E)
        block_t = max(1, min(128, 4096 // e_pow2))
        _row_tiles_kernel[(triton.cdiv(T, block_t),)](ends, table[0], table[1], table[2], E, T, BM=block_m,
                                                      WIDE_LAST=wide_last, E_POW2=e_pow2, BLOCK_T=block_t)
        return RowTiles(table[0], table[1], table[2], ends, block_m, wide_last)


@triton.jit
def _row_tiles_kernel(ends_ptr, expert_ptr, first_ptr, wide_ptr, num_experts, num_tiles,
                      BM: tl.constexpr, WIDE_LAST: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr):
    """RowTiles' table for tiles t of this program's BLOCK_T: every expert's tile count from ends
    (one scan), then each tile's expert (the experts whose tiles end at or before t) and its place
    among that expert's tiles."""
    es = tl.arange(0, E_POW2)
    live = es < num_experts
    ends = tl.load(ends_ptr + es, mask=live, other=0)
    starts = tl.load(ends_ptr + es - 1, mask=live & (es > 0), other=0)
    counts = ends - starts
    tiles = (counts + BM - 1) // BM
    wide_e = (counts > BM) & (counts % BM > 0) & (counts % BM <= BM // 2) & WIDE_LAST
    tiles -= wide_e.to(tl.int32)
    tile_ends = tl.cumsum(tiles, 0)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.sum(((tile_ends[None, :] <= t[:, None]) & live[None, :]).to(tl.int32), 1)  # E past the last
    mine = es[None, :] == e[:, None]  # the tile's expert, one-hot (none past the last tile)
    i = t - tl.sum(tl.where(mine, (tile_ends - tiles)[None, :], 0), 1)
    first = tl.sum(tl.where(mine, starts[None, :], 0), 1) + i * BM
    last = i == tl.sum(tl.where(mine, tiles[None, :], 0), 1) - 1
    wide = tl.sum(tl.where(mine, wide_e.to(tl.int32)[None, :], 0), 1) * last.to(tl.int32)
    stored = t < num_tiles
    tl.store(expert_ptr + t, e, mask=stored)
    tl.store(first_ptr + t, first, mask=stored)
    tl.store(wide_ptr + t, wide, mask=stored)


@triton.jit
def _tile_product(a_desc, a_tail_desc, w_desc, out_ptr, e, first, end, nt, N, K, stride_out,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                  W_KN: tl.constexpr, TAIL: tl.constexpr):
    """out[first:first + BM (+ BM / 2 with TAIL), n-tile nt] of expert e (rows from end on not
    stored): each step's weight box feeds the BM rows' product and, with TAIL, the next BM / 2's."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if TAIL:
        acc_tail = tl.zeros((BM // 2, BN), dtype=tl.float32)
    for k in tl.range(0, K, BK, num_stages=STAGES):
        a = a_desc.load([first, k])
        if W_KN:  # w [E, K, N]: a box of this expert only (rows past K are zeros)
            w = w_desc.load([e, k, nt * BN]).reshape([BK, BN])
        else:
            w = w_desc.load([e * N + nt * BN, k]).T
        acc = tl.dot(a, w, acc)
        if TAIL:
            acc_tail = tl.dot(a_tail_desc.load([first + BM, k]), w, acc_tail)
    _store_rows(out_ptr, acc, first, end, nt, N, stride_out)
    if TAIL:
        _store_rows(out_ptr, acc_tail, first + BM, end, nt, N, stride_out)


@triton.jit
def _store_rows(out_ptr, acc, first, end, nt, N, stride_out):
    """out[first:first + acc's rows, n-tile nt] = acc in out's dtype, rows from end on and columns
    from N on not stored."""
    BM: tl.constexpr = acc.shape[0]
    BN: tl.constexpr = acc.shape[1]
    rows = first + tl.arange(0, BM)
    cols = nt * BN + tl.arange(0, BN)
    mask = (rows < end)[:, None] & (cols < N)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _expert_dgrad_kernel(a_desc, a_tail_desc, w_desc, out_ptr, tile_expert_ptr, tile_first_ptr, tile_wide_ptr,
                         ends_ptr, N, K, stride_out, n_tiles_n, num_experts,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
                         W_KN: tl.constexpr, WIDE_LAST: tl.constexpr):
    pid = tl.program_id(0)
    mt = pid // n_tiles_n
    nt = pid % n_tiles_n
    e = tl.load(tile_expert_ptr + mt)
    if e < num_experts:
        first = tl.load(tile_first_ptr + mt)
        end = tl.load(ends_ptr + e)
        if WIDE_LAST and tl.load(tile_wide_ptr + mt) != 0:
            _tile_product(a_desc, a_tail_desc, w_desc, out_ptr, e, first, end, nt, N, K, stride_out,
                          BM, BN, BK, STAGES, W_KN, True)
        else:
            _tile_product(a_desc, a_tail_desc, w_desc, out_ptr, e, first, end, nt, N, K, stride_out,
                          BM, BN, BK, STAGES, W_KN, False)


def _operand_problem(a: torch.Tensor, w: torch.Tensor, w_kn: bool = False) -> str | None:
    """What keeps a and w from the kernel (one dtype: bf16 on a GPU, fp32 only on the CPU, the
    interpreter's; a [S, K] and w [E, N, K] contiguous and 16-byte aligned, K a whole number of 16
    bytes: TMA rows), or None."""
    if a.dtype not in (torch.bfloat16, torch.float32) or w.dtype != a.dtype:
        return f"a and w must share a dtype (bfloat16, or float32 for the interpreter), got {a.dtype} and {w.dtype}"
    if a.is_cuda and a.dtype == torch.float32:
        return "float32 runs only in the interpreter (its tiles do not fit a GPU's shared memory): use bfloat16"
    if a.dim() != 2 or w.dim() != 3 or w.shape[1 if w_kn else 2] != a.shape[1]:
        return (f"a [S, K] and w [E, {'K, N' if w_kn else 'N, K'}] must share K, got {tuple(a.shape)} and "
                f"{tuple(w.shape)}")
    if not (a.is_contiguous() and w.is_contiguous()):
        return f"a and w must be contiguous (w's {'N' if w_kn else 'K'} innermost)"
    if w_kn and (w.shape[2] * w.element_size()) % 16:
        return f"w's rows ({w.shape[2]} wide) must be whole 16-byte units for TMA"
    if (a.shape[1] * a.element_size()) % 16:
        return f"a's rows ({a.shape[1]} wide) must be whole 16-byte units for TMA"
    if a.data_ptr() % 16 or w.data_ptr() % 16:
        return "a and w must start at 16-byte aligned addresses for TMA"
    return None


def check_dgrad(a: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, w_kn: bool = False) -> None:
    """Raise ValueError (naming the argument) unless expert_dgrad takes these operands."""
    problem = _operand_problem(a, w, w_kn)
    if problem:
        raise ValueError(f"expert_dgrad: {problem}")
    if ends.dim() != 1 or ends.dtype != torch.int32 or ends.shape[0] != w.shape[0] or not ends.is_contiguous():
        raise ValueError(f"expert_dgrad: ends must be a contiguous [E] int32 tensor with E = w.shape[0] = "
                         f"{w.shape[0]}, got {tuple(ends.shape)} {ends.dtype}")
    if not (a.device == w.device == ends.device):
        raise ValueError(f"expert_dgrad: a, w and ends must be on one device, got {a.device}, {w.device}, "
                         f"{ends.device}")


def expert_dgrad(a: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, tiles: RowTiles | None = None,
                 shape: DgradTiles | None = None, out: torch.Tensor | None = None, w_kn: bool = False) -> torch.Tensor:
    """a [S, K], w [E, N, K], ends [E] int32 (ends[-1] = S) -> out [S, N] in a's dtype, each row
    times its expert's w^T in fp32 accumulation; with w_kn, w [E, K, N] and each row times its
    expert's w (backward="recompute"'s GEMM1, rows w_in[e]). shape: TILES unless given; tiles:
    RowTiles.of(ends, S, shape.block_m, shape.wide_last), made once per routing and reused (made
    here otherwise). ends[-1] must be S (not checked: that would synchronise). Every argument is
    checked before anything is launched; then one launch (two where the tiles are made here), no
    host synchronisation."""
    check_dgrad(a, w, ends, w_kn)
    S, K = a.shape
    E, N = w.shape[0], w.shape[2 if w_kn else 1]
    shape = shape or TILES
    if shape.wide_last and shape.block_m < 32:
        raise ValueError(f"expert_dgrad: wide last tiles need block_m >= 32 (their tail of block_m / 2 rows is a "
                         f"product of at least 16), got shape.block_m={shape.block_m}")
    if tiles is not None and ((tiles.block_m, tiles.wide_last) != (shape.block_m, shape.wide_last)
                              or tiles.ends is not ends or tiles.expert.numel() != E + S // shape.block_m):
        raise ValueError(f"expert_dgrad: tiles were made for block_m={tiles.block_m}, wide_last={tiles.wide_last}"
                         f"{'' if tiles.ends is ends else ' and other ends'}, {tiles.expert.numel()} tiles; this "
                         f"launch has block_m={shape.block_m}, wide_last={shape.wide_last} and {S} rows "
                         f"({E + S // shape.block_m} tiles: RowTiles.of(ends, {S}, ...))")
    if out is not None and (out.shape != (S, N) or out.dtype != a.dtype or out.stride(1) != 1):
        raise ValueError(f"expert_dgrad: out must be [{S}, {N}] {a.dtype} with unit column stride")
    if out is None:
        out = torch.empty(S, N, dtype=a.dtype, device=a.device)
    if tiles is None:
        tiles = RowTiles.of(ends, S, shape.block_m, shape.wide_last)
    if S == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    BM, BN, BK = shape.block_m, shape.block_n, shape.block_k
    a_desc = TensorDescriptor.from_tensor(a, [BM, BK])
    a_tail_desc = TensorDescriptor.from_tensor(a, [BM // 2, BK])
    w_desc = (TensorDescriptor.from_tensor(w, [1, BK, BN]) if w_kn
              else TensorDescriptor.from_tensor(w.view(E * N, K), [BN, BK]))
    n_tiles_n = triton.cdiv(N, BN)
    grid = (tiles.expert.shape[0] * n_tiles_n,)
    _expert_dgrad_kernel[grid](a_desc, a_tail_desc, w_desc, out, tiles.expert, tiles.first, tiles.wide, ends, N, K,
                               out.stride(0), n_tiles_n, E, BM=BM, BN=BN, BK=BK, STAGES=shape.stages, W_KN=w_kn,
                               WIDE_LAST=shape.wide_last, num_warps=shape.warps)
    return out
