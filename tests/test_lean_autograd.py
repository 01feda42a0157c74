"""Autograd steps with written-out derivatives (lean_autograd.py): their first- and second-order
gradients are autograd's through the same ops (torch's gradcheck in float64), over every
activation, every form of bias, and rows taken a few at a time."""

import pytest
import torch
from seeds import fresh_seed

from flashmoe_py import MoEConfig
from flashmoe_py import lean_autograd
from flashmoe_py.lean_autograd import activated, fp32_product, scaled_rows, weighted_sum

L, F = 3, 4


def config(activation: str) -> MoEConfig:
    return MoEConfig(hidden_size=8, ffn_size=F, num_experts=L, top_k=2, activation=activation)


def bias_of(form: str, g: torch.Generator, ffn_in: int):
    """(bias, counts) of a form: none, one expert's [ffn_in], or every expert's [L, ffn_in] with
    their rows' counts (one expert with none)."""
    if form == "none":
        return None, None
    if form == "one expert":
        return torch.randn(ffn_in, generator=g, dtype=torch.float64, requires_grad=True), None
    return (torch.randn(L, ffn_in, generator=g, dtype=torch.float64, requires_grad=True),
            torch.tensor([5, 0, 6]))


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu", "gelu", "relu"])
@pytest.mark.parametrize("form", ["none", "one expert", "every expert"])
def test_the_activation_has_autograd_gradients_of_both_orders(activation, form, monkeypatch):
    monkeypatch.setattr(lean_autograd, "CPU_CHUNK_ROWS", 4)  # 11 rows: three chunks, the last short
    cfg = config(activation)
    g = torch.Generator().manual_seed(fresh_seed())
    h = (3 * torch.randn(11, cfg.ffn_in_size, generator=g, dtype=torch.float64)).requires_grad_()
    bias, counts = bias_of(form, g, cfg.ffn_in_size)
    inputs = (h,) if bias is None else (h, bias)

    def f(h, bias=None):
        return activated(h, bias, counts, cfg)

    # away from the kinks (relu's 0, clamped_swiglu's limits), where finite differences mislead
    pre = h.detach() + (0 if bias is None else (bias.detach() if counts is None
                                                  else bias.detach().repeat_interleave(counts, 0)))
    for kink in ([0.0] if activation == "relu" else [-cfg.swiglu_limit, cfg.swiglu_limit]
                 if activation == "clamped_swiglu" else []):
        with torch.no_grad():
            h += 0.1 * ((pre - kink).abs() < 0.05)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("weighted", [True, False])
def test_the_weighted_sum_has_autograd_gradients_of_both_orders(weighted):
    g = torch.Generator().manual_seed(fresh_seed())
    y = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    slot_w = torch.rand(9, generator=g, dtype=torch.float64).requires_grad_()
    slot_tok = torch.tensor([0, 0, 1, 3, 3, 3, 5, 1, 0])  # token 2 and 4 get no slot

    def f(y, slot_w=None):
        return weighted_sum(y, slot_w, slot_tok, 6)

    inputs = (y, slot_w) if weighted else (y,)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    out = weighted_sum(y.detach().bfloat16(), slot_w.detach().float() if weighted else None, slot_tok, 6)
    assert out.dtype == torch.float32 and not out[[2, 4]].any()  # bf16 rows summed in fp32


def test_scaled_rows_and_the_fp32_product_have_autograd_gradients_of_both_orders():
    g = torch.Generator().manual_seed(fresh_seed())
    y = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.rand(7, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for f, inputs in ((scaled_rows, (y, s)), (fp32_product, (y, w))):
        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck(f, inputs)
    assert fp32_product(y.detach().bfloat16(), w.detach().bfloat16()).dtype == torch.float32
    assert fp32_product(y.detach(), w.detach().float()).dtype == torch.float64  # mixed: the wider
    assert scaled_rows(y.detach().bfloat16(), s.detach().float()).dtype == torch.float32
