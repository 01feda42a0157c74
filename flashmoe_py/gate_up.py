"""Where a gated expert's gate and up columns sit in w_in, bias_in and shared_w_in: the layer's own
layout, and the conversions at its edges.

The layer keeps them in pairs: the last dimension, 2F wide, is F / g pairs of g gate columns
followed by the same g up columns (gate column f is column 2 g (f // g) + f % g, its up column g
further), with g = pair_width(F), the largest power of two up to PAIR_MAX that divides F. The
fused kernel's GEMM1 then loads a tile of gate columns and their up columns as one TMA box, and
one tensor-core product carries both: in every thread's accumulator registers, each gate value
sits beside its up value (bench/NOTES.md, item 29).

Callers speak halves (every gate column, then every up column: full_weight_dict,
reference_forward, load_full_weights by default) or gpt-oss's interleaved columns (g = 1);
to_pairs, to_halves and to_interleaved convert. Non-gated activations have one F-wide block: nothing to convert."""

from __future__ import annotations

import torch

PAIR_MAX = 128  # the fused kernel's GEMM1 tile width (kernels/layout.Geometry.block_f) divides by it
LAYOUTS = ("halves", "interleaved")
WEIGHTS = ("w_in", "bias_in", "shared_w_in")  # gated: their last dimension holds gate and up columns
# A layer's state_dict entry saying how its gated weights lay out gate and up: PAIRS_VERSION
# (pairs, what MoELayer.state_dict() writes) or HALVES_VERSION (gate | up halves: a checkpoint
# from before the pairs, which has no entry, marked so by hand to be converted when loaded).
STATE_DICT_MARKER = "gate_up_pairs"
PAIRS_VERSION, HALVES_VERSION = 1, 0


def pair_width(ffn: int) -> int:
    """g for an expert FFN of width `ffn`: the largest power of two <= PAIR_MAX dividing it."""
    g = PAIR_MAX
    while ffn % g:
        g //= 2
    return g


def check_layout(layout: str) -> None:
    """layout, one of LAYOUTS (ValueError naming gate_up_layout otherwise)."""
    if layout not in LAYOUTS:
        raise ValueError(f"gate_up_layout={layout!r}; choose one of {LAYOUTS}")


def to_pairs(t: torch.Tensor, layout: str = "halves") -> torch.Tensor:
    """t [..., 2F], gate and up columns in `layout` (LAYOUTS) -> [..., 2F] in pairs (a new tensor)."""
    check_layout(layout)
    F = t.shape[-1] // 2
    if layout == "interleaved":
        t = t.unflatten(-1, (F, 2)).transpose(-2, -1).flatten(-2)
    g = pair_width(F)
    return t.unflatten(-1, (2, F // g, g)).transpose(-3, -2).flatten(-3)


def to_halves(t: torch.Tensor) -> torch.Tensor:
    """t [..., 2F] in pairs -> [..., 2F] as (gate | up) halves (a new tensor)."""
    F = t.shape[-1] // 2
    g = pair_width(F)
    return t.unflatten(-1, (F // g, 2, g)).transpose(-3, -2).flatten(-3)


def to_interleaved(t: torch.Tensor) -> torch.Tensor:
    """t [..., 2F] in pairs -> [..., 2F] with gate and up interleaved column by column (gate column f
    at 2f, its up column at 2f + 1: gpt-oss's layout; a new tensor)."""
    F = t.shape[-1] // 2
    g = pair_width(F)
    return t.unflatten(-1, (F // g, 2, g)).transpose(-2, -1).flatten(-3)


def gate_and_up(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h [..., 2F] in pairs -> (gate, up), views of shape [..., F // g, g]: an elementwise function
    of the two, flattened over its last two dimensions, is [..., F] in column order."""
    F = h.shape[-1] // 2
    g = pair_width(F)
    v = h.unflatten(-1, (F // g, 2, g))
    return v[..., 0, :], v[..., 1, :]
