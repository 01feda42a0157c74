"""The expert FFN's activation backward in one pass over its rows (the explicit backward's
elementwise step, backends/expert_grad.py): from GEMM1's output before the activation, the
gradient g of the expert's output (before its routing weight: scale) and that weight, the
activation scaled by it (dW_out = (scale h)^T dy), the gradient of GEMM1's output, and each row's
<h, g> (the router's gradient), each element read and written once.

    sh    = scale * act(pre)         [N, F]     in pre's dtype
    d_pre = act'(pre) * (scale g)    [N, F_in]  in pre's dtype (gated: gate/up pairs, as pre)
    dot   = sum_f act(pre) * g       [N]        fp32

The grid is (row blocks, column blocks): each program writes its columns' part of dot into a row
of partial sums, summed after the launch in a fixed order (no atomics: the same bits every run).
activation_input_grad is d_pre alone, with no scale (autograd's backward of the activation,
lean_autograd.py on GPUs): the same kernel, storing neither sh nor dot."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import MoEConfig
from ..gate_up import pair_width
from .layout import ACT_CODES

BLOCK_ROWS = 32
BLOCK_COLS = 128


@triton.jit
def activation_backward_tile(pre_ptr, d_pre_ptr, r, f, m, g, scale, F, ACT: tl.constexpr, GATED: tl.constexpr,
                             PAIR: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr):
    """One tile of rows r ([BR, 1] int64) and FFN columns f ([BC]) where m ([BR, BC]): from pre
    ([N, F_in], gated: gate/up pairs of PAIR), the gradient g of h ([BR, BC] fp32) and the rows'
    scale ([BR, 1] fp32), stores d_pre = act'(pre) * (scale g) into d_pre_ptr (pre's layout) and
    -> h = act(pre) [BR, BC] fp32."""
    sg = g * scale
    if GATED:
        gate_at = pre_ptr + r * (2 * F) + (2 * PAIR * (f // PAIR) + f % PAIR)[None, :]
        gate = tl.load(gate_at, mask=m, other=0.0).to(tl.float32)
        up = tl.load(gate_at + PAIR, mask=m, other=0.0).to(tl.float32)
        if ACT == 0:  # swiglu: h = silu(gate) up
            sig = tl.sigmoid(gate)
            silu = gate * sig
            h = silu * up
            d_gate = sg * up * sig * (1.0 + gate * (1.0 - sig))
            d_up = sg * silu
        else:  # clamped_swiglu (gpt-oss): gate <= limit, |up| <= limit, gate sigmoid(alpha gate) (up + 1)
            g_c = tl.minimum(gate, LIMIT)
            u_c = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
            sig = tl.sigmoid(ALPHA * g_c)
            glu = g_c * sig
            h = glu * (u_c + 1.0)
            d_gate = tl.where(gate <= LIMIT, sg * (u_c + 1.0) * sig * (1.0 + ALPHA * g_c * (1.0 - sig)), 0.0)
            d_up = tl.where((up >= -LIMIT) & (up <= LIMIT), sg * glu, 0.0)
        d_gate_at = d_pre_ptr + r * (2 * F) + (2 * PAIR * (f // PAIR) + f % PAIR)[None, :]
        tl.store(d_gate_at, d_gate.to(d_pre_ptr.dtype.element_ty), mask=m)
        tl.store(d_gate_at + PAIR, d_up.to(d_pre_ptr.dtype.element_ty), mask=m)
    else:
        pre = tl.load(pre_ptr + r * F + f[None, :], mask=m, other=0.0).to(tl.float32)
        if ACT == 1:  # gelu, exact erf form
            cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
            h = pre * cdf
            d = sg * (cdf + pre * tl.exp(-0.5 * pre * pre) * 0.3989422804014327)
        else:  # relu
            h = tl.maximum(pre, 0.0)
            d = tl.where(pre > 0, sg, 0.0)
        tl.store(d_pre_ptr + r * F + f[None, :], d.to(d_pre_ptr.dtype.element_ty), mask=m)
    return h


@triton.jit
def activation_grad_kernel(pre_ptr, g_ptr, scale_ptr, h_ptr, d_pre_ptr, dot_ptr, N, F,
                           ACT: tl.constexpr, GATED: tl.constexpr, PAIR: tl.constexpr,
                           ALPHA: tl.constexpr, LIMIT: tl.constexpr, WITH_H: tl.constexpr,
                           BR: tl.constexpr, BC: tl.constexpr):
    """pre: [N, F_in]; g: [N, F]; scale: [N] fp32 -> sh [N, F], d_pre [N, F_in] (pre's dtype) and
    dot: [column blocks, N] fp32, this block's partial sums of h * g. WITH_H false: d_pre alone,
    as if scale were 1 (scale_ptr, h_ptr and dot_ptr are not read or written)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    f = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (rows < N)[:, None] & (f < F)[None, :]
    r = rows.to(tl.int64)[:, None]
    g = tl.load(g_ptr + r * F + f[None, :], mask=m, other=0.0).to(tl.float32)
    if WITH_H:
        scale = tl.load(scale_ptr + rows, mask=rows < N, other=0.0)[:, None]
        h = activation_backward_tile(pre_ptr, d_pre_ptr, r, f, m, g, scale, F, ACT, GATED, PAIR, ALPHA, LIMIT)
        tl.store(h_ptr + r * F + f[None, :], (scale * h).to(h_ptr.dtype.element_ty), mask=m)
        tl.store(dot_ptr + tl.program_id(1).to(tl.int64) * N + rows, tl.sum(tl.where(m, h * g, 0.0), axis=1),
                 mask=rows < N)
    else:
        activation_backward_tile(pre_ptr, d_pre_ptr, r, f, m, g, 1.0, F, ACT, GATED, PAIR, ALPHA, LIMIT)


def activation_grad(pre: torch.Tensor, g: torch.Tensor, scale: torch.Tensor,
                    config: MoEConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pre: [N, F_in] (gated: the layer's gate/up pairs) and g: [N, F] in one dtype, contiguous;
    scale: [N] fp32 -> (sh [N, F], d_pre [N, F_in] in pre's dtype, dot [N] fp32), as the module
    docstring says; math in fp32."""
    N, F = _checked("activation_grad", pre, g, scale, config)
    sh = torch.empty_like(g)
    d_pre = torch.empty_like(pre)
    blocks = (triton.cdiv(N, BLOCK_ROWS), triton.cdiv(F, BLOCK_COLS))
    partial = torch.empty(blocks[1], N, dtype=torch.float32, device=g.device)
    _launch(blocks, pre, g, scale, sh, d_pre, partial, config, with_h=True)
    return sh, d_pre, partial.sum(0)


def activation_input_grad(pre: torch.Tensor, g: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    """pre: [N, F_in] (gated: the layer's gate/up pairs) and g: [N, F], the gradient of act(pre),
    in one dtype, contiguous -> d_pre = act'(pre) * g [N, F_in] in pre's dtype; math in fp32."""
    N, F = _checked("activation_input_grad", pre, g, None, config)
    d_pre = torch.empty_like(pre)
    _launch((triton.cdiv(N, BLOCK_ROWS), triton.cdiv(F, BLOCK_COLS)), pre, g, d_pre, d_pre, d_pre, d_pre, config,
            with_h=False)  # d_pre stands in for the pointers WITH_H=False leaves alone
    return d_pre


def _checked(name: str, pre: torch.Tensor, g: torch.Tensor, scale: torch.Tensor | None,
             config: MoEConfig) -> tuple[int, int]:
    """-> (N, F) of a launch's operands, after checking them; scale None: none taken."""
    if g.dim() != 2:
        raise ValueError(f"{name}: g must be [N, F], got {tuple(g.shape)}")
    N, F = g.shape
    f_in = 2 * F if config.gated else F
    if pre.shape != (N, f_in) or pre.dtype != g.dtype:
        raise ValueError(f"{name}: pre {pre.dtype} {tuple(pre.shape)} and g {g.dtype} {tuple(g.shape)}; "
                         f"expected pre [N, {f_in}] in g's dtype")
    if scale is not None and (scale.shape != (N,) or scale.dtype != torch.float32):
        raise ValueError(f"{name}: scale {scale.dtype} {tuple(scale.shape)}; expected [N={N}] float32")
    given = [t for t in (pre, g, scale) if t is not None]
    names = "pre, g and scale" if scale is not None else "pre and g"
    if not all(t.is_contiguous() for t in given):
        raise ValueError(f"{name}: {names} must be contiguous")
    if any(t.device != g.device for t in given):
        raise ValueError(f"{name}: {names} must be on one device, got {', '.join(str(t.device) for t in given)}")
    return N, F


def _launch(blocks, pre, g, scale, sh, d_pre, partial, config: MoEConfig, with_h: bool) -> None:
    N, F = g.shape
    if N and F:
        activation_grad_kernel[blocks](pre, g, scale, sh, d_pre, partial, N, F, ACT=ACT_CODES[config.activation],
                                       GATED=config.gated, PAIR=pair_width(F) if config.gated else 1,
                                       ALPHA=float(config.swiglu_alpha), LIMIT=float(config.swiglu_limit),
                                       WITH_H=with_h, BR=BLOCK_ROWS, BC=BLOCK_COLS)
