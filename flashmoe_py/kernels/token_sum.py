"""The explicit backward's last step on x's gradient in one pass (backends/explicit_backward.py):
each token's kept slots' row gradients summed, plus the router's term, written once.

    dx[t] = sum_j rows[where[t, j]]  +  d_logits[t] @ router_weight      [T, H] fp32

where[t, j] is the row of token t's j-th slot among `rows` (0 <= where < S, rows' count), or S or
more for a slot with no row (capacity-dropped): it adds nothing. The k rows are added in slot
order (the same bits every run); the router term is a tensor-core product a tile at fp32's
accuracy (a bf16 router: kernels/split_dot.py; otherwise tf32x3 on a GPU).
In torch ops the same step gathered the rows into slot order ([T * k, H], written and read
again), summed them and added a separate GEMM's output (bench/NOTES.md item 62)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .split_dot import dot_modes, fp32_dot

BLOCK_TOKENS = 32
BLOCK_TOKENS_MANY_EXPERTS = 64
MANY_EXPERTS = 64
BLOCK_COLS = 128
BLOCK_EXPERTS = 32
NUM_WARPS = 4


@triton.jit
def token_sum_kernel(rows_ptr, row_stride, where_ptr, S, d_logits_ptr, router_ptr, out_ptr, T, H,
                     E: tl.constexpr, K: tl.constexpr, ROUTER: tl.constexpr, SPLIT: tl.constexpr,
                     F32_DOTS: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
                     BE: tl.constexpr, E_BLOCKS: tl.constexpr):
    """rows: [S, H] (row stride row_stride, columns contiguous); where: [T, K] int64;
    d_logits: [T, E] fp32 and router: [E, H] when ROUTER -> out [T, H] fp32, one [BT, BH] tile.
    The router term by fp32_dot (SPLIT, F32_DOTS, PRECISION: split_dot.dot_modes of the router).
    E and E_BLOCKS (E's blocks of BE) are constexprs from the launcher (a loop to a runtime E fails
    in Triton 3.6's interpreter), the loop over E_BLOCKS not unrolled: unrolled, the sm_90 build
    kept every block's tiles live and spilled (deepseek_v3's fp32 router at 64 tokens: a 976-byte
    stack; as a loop: none, and its loads pipelined)."""
    t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    t_in, h_in = t < T, h < H
    acc = tl.zeros((BT, BH), dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(where_ptr + t * K + j, mask=t_in, other=S)
        has = (row < S)[:, None] & h_in[None, :]
        acc += tl.load(rows_ptr + row[:, None] * row_stride + h[None, :], mask=has, other=0.0).to(tl.float32)
    if ROUTER:
        for b in range(E_BLOCKS):
            e = b * BE + tl.arange(0, BE)
            d = tl.load(d_logits_ptr + t[:, None] * E + e[None, :], mask=t_in[:, None] & (e < E)[None, :], other=0.0)
            w = tl.load(router_ptr + e.to(tl.int64)[:, None] * H + h[None, :], mask=(e < E)[:, None] & h_in[None, :],
                        other=0.0)
            acc = fp32_dot(d, w, acc, SPLIT, F32_DOTS, PRECISION)
    tl.store(out_ptr + t[:, None] * H + h[None, :], acc, mask=t_in[:, None] & h_in[None, :])


def block_tokens(E: int) -> int:
    """Tokens a program sums, by the router term's experts E: more with many experts, whose d_logits
    and router tiles then take most of a program's loads. On one H200 at 4,096 tokens, 64 tokens
    took qwen3's sum (E = 128) from 128.5 to 108.5 us, deepseek_v3's (E = 256) from 500 to 370-420;
    mixtral's (E = 8) was 80 us either way, and stays at 32 (bench/backward_kernels.py, bench/NOTES.md
    item 63: kernel times there move 10-30% between calls)."""
    return BLOCK_TOKENS_MANY_EXPERTS if E >= MANY_EXPERTS else BLOCK_TOKENS


def token_sum(rows: torch.Tensor, where: torch.Tensor, d_logits: torch.Tensor | None = None,
              router_weight: torch.Tensor | None = None, *, tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """rows: [S, H], a float dtype, columns contiguous; where: [T, k] int64, each slot's row
    (S or more: none); d_logits: [T, E] fp32 with router_weight: [E, H] (a float dtype), or both
    None; all on one device -> dx [T, H] fp32, as the module docstring says. tile: (tokens,
    columns, warps) a program, or None for the module's own (block_tokens(E), BLOCK_COLS,
    NUM_WARPS); bench/backward_kernels.py compares others."""
    if where.dim() != 2 or where.dtype != torch.int64 or not where.is_contiguous():
        raise ValueError(f"token_sum: where is {where.dtype} {tuple(where.shape)}; expected a contiguous [T, k] int64")
    if rows.dim() != 2 or rows.stride(1) != 1 or not rows.is_floating_point():
        raise ValueError(f"token_sum: rows {rows.dtype} {tuple(rows.shape)} with strides {rows.stride()}; expected "
                         "a float [S, H] with contiguous columns")
    (S, H), T = rows.shape, where.shape[0]
    if (d_logits is None) != (router_weight is None):
        given, missing = ("d_logits", "router_weight") if router_weight is None else ("router_weight", "d_logits")
        raise ValueError(f"token_sum: {given} without {missing}: the router term needs both")
    devices = {t.device for t in (rows, where, d_logits, router_weight) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"token_sum: rows, where, d_logits and router_weight on {sorted(map(str, devices))}; "
                         "expected one device")
    E = 0
    if d_logits is not None:
        E = d_logits.shape[1]
        if (d_logits.shape != (T, E) or d_logits.dtype != torch.float32 or not d_logits.is_contiguous()
                or router_weight.shape != (E, H) or not router_weight.is_contiguous()
                or not router_weight.is_floating_point()):
            raise ValueError(f"token_sum: d_logits {d_logits.dtype} {tuple(d_logits.shape)} and router_weight "
                             f"{router_weight.dtype} {tuple(router_weight.shape)}; expected contiguous [{T}, E] "
                             f"float32 and a float [E, {H}]")
    out = torch.empty(T, H, dtype=torch.float32, device=rows.device)
    if T and H:
        bt, bh, warps = tile or (block_tokens(E), BLOCK_COLS, NUM_WARPS)
        grid = (triton.cdiv(T, bt), triton.cdiv(H, bh))
        token_sum_kernel[grid](rows, rows.stride(0), where, S, d_logits if E else out, router_weight if E else out,
                               out, T, H, E, K=where.shape[1], ROUTER=E > 0,
                               # no router term (E == 0): any dtype, the dot is not traced (ROUTER False)
                               **dot_modes(router_weight.dtype if E else torch.float32, rows.is_cuda),
                               BT=bt, BH=bh, BE=BLOCK_EXPERTS,
                               E_BLOCKS=triton.cdiv(E, BLOCK_EXPERTS), num_warps=warps)
    return out
