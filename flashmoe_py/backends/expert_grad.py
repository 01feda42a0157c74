"""The routed experts' backward in explicit steps, from GEMM1's outputs the forward saved
(backward="saved") or with GEMM1 run again on the rows (backward="recompute").

Rows are sorted by local expert, counts[e] of them for expert e. For a row r of expert e:
pre = r w_in[e] (+ bias_in[e]), h = act(pre), y = h w_out[e] (+ bias_out[e]); the row enters the layer's
output as scale * y (scale: the slot's routing weight, or 1 where the weight went into r). With dy
the gradient of the layer's output at the row's token:

    g      = dy w_out[e]^T                      [N, F]       (GEMM2 transposed)
    dot    = <dy, y> = sum(h * g) + <dy, bias_out>  [N]          (y is not recomputed)
    d_pre  = act'(pre) (scale * g)              [N, F_in]
    d_rows = d_pre w_in[e]^T                    [N, H]
    dw_in[e] = r_e^T d_pre_e,  dw_out[e] = (scale h)_e^T dy_e,  db_in, db_out: the column sums of
    d_pre and scale dy.

dot is the gradient of the slot's scale; d_rows that of its row. GEMM2 never runs again; GEMM1
(pre) does only when the forward did not save it."""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass

import torch

from ..config import MoEConfig
from ..kernels import expert_dgrad, expert_wgrad
from ..kernels.activation_grad import activation_grad
from ..kernels.bias_grad import bias_grads
from . import capture, torch_ep
from ..lean_autograd import CPU_CHUNK_ROWS, activation_backward


ALL_WEIGHTS = frozenset(("w_in", "w_out", "bias_in", "bias_out"))


@dataclass
class ExpertGrads:
    """d_rows: [N, H] in the rows' dtype; dot: [N] fp32; params: {w_in, w_out[, bias_in, bias_out]}
    gradients, in the weights' shapes and dtypes (gated w_in and bias_in in the layer's gate/up
    pairs), of those wanted."""

    d_rows: torch.Tensor
    dot: torch.Tensor
    params: dict[str, torch.Tensor]


def expert_ffn_backward(rows: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor, counts: torch.Tensor,
                        weights: dict[str, torch.Tensor | None], config: MoEConfig,
                        pre: torch.Tensor | None = None, want: Collection[str] = ALL_WEIGHTS) -> ExpertGrads:
    """rows, dy: [N, H] in the layer's dtype, sorted by local expert; scale: [N] fp32;
    counts: [L] int64 (sum N); weights: the layer's w_in [L, H, F_in], w_out [L, F, H] and bias_in
    [L, F_in], bias_out [L, H] or None; pre: [N, F_in], GEMM1's output with bias_in as the forward saved
    it, or None to compute it; want: the weights whose gradients to return (a frozen expert's
    weight-gradient GEMMs are not run). Activation math in fp32, GEMMs in the rows' dtype."""
    w_in, w_out, bias_in, bias_out = (weights.get(n) for n in ("w_in", "w_out", "bias_in", "bias_out"))
    if (bias_in is None) != (bias_out is None):
        raise ValueError("expert_ffn_backward: weights must hold both bias_in and bias_out or neither")
    groups = _Groups(counts, rows, w_out)
    dtype = rows.dtype
    if pre is None:
        pre = groups.rows_times(rows, w_in)
        if bias_in is not None:  # in fp32, rounded once, as (pre.float() + b.float()).to(dtype)
            pre = (pre + groups.per_row(bias_in)).to(dtype)
    g = groups.rows_times_t(dy, w_out)
    sh, d_pre, dot = _activation_grad(pre, g, scale, config)
    d_pre_low = d_pre.to(dtype)
    params = {}
    if "w_in" in want:
        params["w_in"] = groups.outer(rows, d_pre_low)
    if "w_out" in want:
        params["w_out"] = groups.outer(sh.to(dtype), dy)
    if bias_in is not None:  # one pass gives both column sums and <dy, bias_out>, which dot needs
        db_in, db_out, dot_b = _bias_grads(d_pre, dy, scale, bias_out, groups)
        dot = dot + dot_b
        params |= {n: d.to(b.dtype) for n, d, b in (("bias_in", db_in, bias_in), ("bias_out", db_out, bias_out))
                   if n in want}
    return ExpertGrads(groups.rows_times_t(d_pre_low, w_in), dot, params)


def _bias_grads(d_pre: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor, bias_out: torch.Tensor,
                groups: _Groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d_pre: [N, F_in], dy: [N, H], scale: [N] fp32, bias_out: [L, H] -> (db_in [L, F_in], db_out
    [L, H], <dy, bias_out> per row [N]), fp32: one kernel pass on GPUs (kernels/bias_grad.py), torch
    ops in fp32 elsewhere."""
    if dy.is_cuda:
        return bias_grads(d_pre.contiguous(), dy.contiguous(), scale.contiguous(), bias_out.contiguous(), groups.offs)
    dy = dy.float()
    return (groups.column_sums(d_pre.float()), groups.column_sums(dy * scale[:, None]),
            (dy * groups.per_row(bias_out).float()).sum(1))


def _activation_grad(pre: torch.Tensor, g: torch.Tensor, scale: torch.Tensor,
                     config: MoEConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pre: [N, F_in], g = dy w_out^T: [N, F], scale: [N] fp32 -> (scale * act(pre) [N, F], d_pre
    [N, F_in], <act(pre), g> [N] fp32): one kernel pass on GPUs (kernels/activation_grad.py),
    torch ops in fp32 elsewhere, CPU_CHUNK_ROWS rows at a time (their fp32 temporaries, several of
    [rows, F] at once, held for one chunk: on the whole step's rows they peaked at 1.7-1.9x
    autograd's whole training step)."""
    if pre.is_cuda:
        return activation_grad(pre.contiguous(), g.contiguous(), scale.contiguous(), config)
    N, F = g.shape
    sh = torch.empty(N, F, dtype=torch.float32, device=pre.device)
    d_pre = torch.empty(pre.shape, dtype=torch.float32, device=pre.device)
    dot = torch.empty(N, dtype=torch.float32, device=pre.device)
    for lo in range(0, N, CPU_CHUNK_ROWS):
        rows = slice(lo, lo + CPU_CHUNK_ROWS)
        g_c, s_c = g[rows].float(), scale[rows, None]
        h, d_pre[rows] = activation_backward(pre[rows].float(), g_c * s_c, config)
        torch.mul(h, s_c, out=sh[rows])
        torch.sum(h * g_c, 1, out=dot[rows])
    return sh, d_pre, dot


class _Groups:
    """Per-expert products over rows sorted by expert: torch._grouped_mm where it runs and is right
    for these sizes, else a loop over experts (one host synchronisation, for the row counts)."""

    def __init__(self, counts: torch.Tensor, rows: torch.Tensor, w_out: torch.Tensor):
        self.counts, self.n = counts, rows.shape[0]
        self.offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [L], each expert's end row
        self.grouped = (torch_ep.grouped_mm_works(rows.device.type, rows.dtype)
                        and torch_ep.grouped_mm_aligned(rows, w_out)
                        and _grouped_outer_works(rows.device.type, rows.dtype))
        if capture.capturing(rows) and not (self.grouped and rows.dtype == torch.bfloat16):
            capture.refuse_products(rows.dtype)
        if self.grouped:
            self.row_tiles: expert_dgrad.RowTiles | None = None
        else:
            self.slices = [slice(end - int(n), end) for n, end in zip(counts.tolist(), self.offs.tolist())]

    def rows_times(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a: [N, K]; b: [L, K, M] -> [N, M], each expert's rows times its b:
        kernels/expert_dgrad.py where it suits (b contiguous), else torch._grouped_mm or a loop."""
        if self.grouped and expert_dgrad.suits(a, b, self.counts.shape[0], w_kn=True):
            return expert_dgrad.expert_dgrad(a, b, self.offs, self._row_tiles(), w_kn=True)
        return self._grouped_or_loop(a, b)

    def rows_times_t(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """a: [N, K]; w: [L, M, K] -> [N, M], each expert's rows times its w^T:
        kernels/expert_dgrad.py where it suits (Hopper, bf16, few rows an expert), else
        torch._grouped_mm or a loop on w's transposed view."""
        if self.grouped and expert_dgrad.suits(a, w, self.counts.shape[0]):
            return expert_dgrad.expert_dgrad(a, w, self.offs, self._row_tiles())
        return self._grouped_or_loop(a, w.transpose(1, 2))

    def _grouped_or_loop(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a: [N, K]; b: [L, K, M] (any strides) -> [N, M], each expert's rows times its b:
        torch._grouped_mm where it runs, else a loop over experts."""
        if self.grouped:
            return torch._grouped_mm(a, b, offs=self.offs)
        out = a.new_empty(self.n, b.shape[-1])
        for e, s in enumerate(self.slices):
            out[s] = a[s] @ b[e]
        return out

    def _row_tiles(self) -> expert_dgrad.RowTiles:
        """expert_dgrad's row tiles, made once a backward for all its products."""
        if self.row_tiles is None:
            self.row_tiles = expert_dgrad.RowTiles.of(self.offs, self.n, expert_dgrad.TILES.block_m,
                                                      expert_dgrad.TILES.wide_last)
        return self.row_tiles

    def outer(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a: [N, K]; b: [N, M] -> [L, K, M], each expert's a^T b over its rows (zero without rows):
        kernels/expert_wgrad.py where it suits (Hopper, bf16, few rows an expert), else
        torch._grouped_mm where it runs, else a loop."""
        if self.grouped and expert_wgrad.suits(a, b, self.counts.shape[0]):
            return expert_wgrad.expert_wgrad(a, b, self.offs)
        if self.grouped:
            return torch._grouped_mm(a.t(), b, offs=self.offs)
        out = a.new_zeros(len(self.slices), a.shape[1], b.shape[1])
        for e, s in enumerate(self.slices):
            if s.stop > s.start:
                out[e] = a[s].t() @ b[s]
        return out

    @functools.cached_property
    def row_expert(self) -> torch.Tensor:
        """[N] int64, each row's expert: made where asked (the CPU steps, recompute's bias_in), never on
        a GPU backward without biases."""
        experts = torch.arange(self.counts.shape[0], device=self.counts.device)
        return experts.repeat_interleave(self.counts, output_size=self.n)

    def column_sums(self, a: torch.Tensor) -> torch.Tensor:
        """a: [N, M] fp32 -> [L, M], each expert's rows summed."""
        return a.new_zeros(self.counts.shape[0], a.shape[1]).index_add_(0, self.row_expert, a)

    def per_row(self, t: torch.Tensor) -> torch.Tensor:
        """t: [L, M] -> [N, M], each row its expert's."""
        return t[self.row_expert]


@functools.cache
def _grouped_outer_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm takes groups along K (a [K_total, M]^T with b [K_total, N]), as the
    weight gradients need, and is right for this device and dtype (probed once, never inside a
    CUDA graph capture; the reference is the CPU's, as in torch_ep.grouped_mm_works)."""
    if capture.capturing(device_type):
        capture.refuse_probe("torch._grouped_mm's grouped weight gradients")
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(48, 32, generator=g).to(dtype)
        b = torch.randn(48, 16, generator=g).to(dtype)
        offs = torch.tensor([16, 16, 48], dtype=torch.int32, device=device_type)
        got = torch._grouped_mm(a.to(device_type).t(), b.to(device_type), offs=offs).cpu().double()
        want = torch.stack([a[:16].double().t() @ b[:16].double(), torch.zeros(32, 16, dtype=torch.float64),
                            a[16:].double().t() @ b[16:].double()])
        return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-1))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
