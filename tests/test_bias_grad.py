"""The expert biases' gradients in one pass (kernels/bias_grad.py): each expert's column sums of
d_pre and of scale * dy, and each row's <dy, bias_out[e]>, for rows sorted by expert. In the Triton
interpreter (float32) and on a GPU (bf16 and float32) against float64 sums on fresh random inputs:
an expert without rows, one with one row, widths that are not a multiple of the column block, row
counts that are not a multiple of the row block, rows of no expert; on a GPU the same bits on a
second run; the launcher's argument checks."""

import os

import pytest
import torch
from grad_reference import rel_err

from flashmoe_py import MoEConfig
from flashmoe_py.backends.expert_grad import expert_ffn_backward
from flashmoe_py.kernels.bias_grad import BLOCK_COLS, BLOCK_ROWS, bias_grads
from seeds import fresh_seed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

CASES = {  # counts of rows an expert, F_in, H
    "uneven counts, an empty expert, one row": ([70, 0, 1, 129, 64, 33], 200, 96),
    "one expert": ([50], 2 * BLOCK_COLS, BLOCK_COLS),
    "every expert empty but the last": ([0, 0, 0, 45], 64, 160),
    "many experts, few rows": ([3, 17, 0, BLOCK_ROWS, BLOCK_ROWS + 1, 1, 31, 2] * 3, 48, 136),
}


def reference(d_pre, dy, scale, bias_out, counts):
    """float64 sums, expert by expert."""
    ends = torch.tensor(counts).cumsum(0).tolist()
    d_pre, dy, scale, bias_out = (t.double() for t in (d_pre, dy, scale, bias_out))
    db_in, db_out, dot = [], [], []
    for e, (n, end) in enumerate(zip(counts, ends)):
        rows = slice(end - n, end)
        db_in.append(d_pre[rows].sum(0))
        db_out.append((scale[rows, None] * dy[rows]).sum(0))
        dot.append(dy[rows] @ bias_out[e])
    return torch.stack(db_in), torch.stack(db_out), torch.cat(dot)


def draw(counts, F_in, H, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(fresh_seed())
    N, L = sum(counts), len(counts)
    d_pre = torch.randn(N, F_in, device=DEVICE, generator=g).to(dtype)
    dy = torch.randn(N, H, device=DEVICE, generator=g).to(dtype)
    scale = torch.rand(N, device=DEVICE, generator=g) + 0.5
    bias_out = torch.randn(L, H, device=DEVICE, generator=g).to(dtype)
    return d_pre, dy, scale, bias_out, torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)


@pytest.mark.skipif(not RUNS, reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("case", CASES)
def test_sums_match_float64_expert_by_expert(case, dtype):
    counts, F_in, H = CASES[case]
    inputs = draw(counts, F_in, H, dtype)
    got = bias_grads(*inputs)
    for name, g, want in zip(("db_in", "db_out", "dot_b"), got, reference(*inputs[:4], counts)):
        assert g.dtype == torch.float32 and g.shape == want.shape, name
        assert rel_err(g, want) <= 1e-5, (name, rel_err(g, want))
        if case == "uneven counts, an empty expert, one row" and name != "dot_b":
            assert torch.equal(g[1].cpu(), torch.zeros(g.shape[1])), f"{name}: the expert without rows sums to zero"


@pytest.mark.skipif(not RUNS, reason="needs a GPU or the Triton interpreter")
def test_rows_past_the_experts_belong_to_none():
    """counts summing to less than N: the last rows enter no sum and get dot_b 0; no experts at all:
    zeros everywhere."""
    counts, F_in, H = [5, 0, 40], 64, 96
    d_pre, dy, scale, bias_out, _ = draw(counts + [7], F_in, H, torch.float32)
    ends = torch.tensor(counts, device=DEVICE).cumsum(0)
    db_in, db_out, dot_b = bias_grads(d_pre, dy, scale, bias_out[:3], ends)
    want = reference(d_pre[:45], dy[:45], scale[:45], bias_out[:3], counts)
    assert rel_err(db_in, want[0]) <= 1e-5 and rel_err(db_out, want[1]) <= 1e-5
    assert rel_err(dot_b[:45], want[2]) <= 1e-5 and not dot_b[45:].any()
    none = bias_grads(d_pre, dy, scale, bias_out[:0], torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert [tuple(t.shape) for t in none] == [(0, F_in), (0, H), (52,)] and not none[2].any()


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter runs programs in order: it cannot tell")
def test_the_same_bits_every_run():
    counts, F_in, H = CASES["uneven counts, an empty expert, one row"]
    inputs = draw(counts, F_in, H, torch.float32)
    for first, second in zip(bias_grads(*inputs), bias_grads(*inputs)):
        assert torch.equal(first, second)


def test_bad_arguments_are_refused_by_name():
    d_pre, dy, scale, bias_out, ends = (torch.randn(6, 8), torch.randn(6, 4), torch.ones(6), torch.randn(2, 4),
                                     torch.tensor([2, 6]))
    with pytest.raises(ValueError, match="d_pre"):
        bias_grads(d_pre[:5], dy, scale, bias_out, ends)
    with pytest.raises(ValueError, match="scale"):
        bias_grads(d_pre, dy, scale.double(), bias_out, ends)
    with pytest.raises(ValueError, match="bias_out"):
        bias_grads(d_pre, dy, scale, bias_out[:, :3], ends)
    with pytest.raises(ValueError, match="ends"):
        bias_grads(d_pre, dy, scale, bias_out, ends.float())
    with pytest.raises(ValueError, match="contiguous"):
        bias_grads(d_pre, torch.randn(4, 6).t(), scale, bias_out, ends)
    with pytest.raises(ValueError, match=r"dy must be \[N, H\]"):
        bias_grads(d_pre, dy.reshape(-1), scale, bias_out, ends)


def test_the_experts_backward_refuses_one_bias_without_the_other():
    cfg = MoEConfig(hidden_size=8, ffn_size=8, num_experts=2, top_k=1, dtype="float32", activation="relu")
    rows, counts = torch.randn(4, 8), torch.tensor([1, 3])
    weights = {"w_in": torch.randn(2, 8, 8), "w_out": torch.randn(2, 8, 8), "bias_in": torch.randn(2, 8),
               "bias_out": None}
    with pytest.raises(ValueError, match="bias_in and bias_out"):
        expert_ffn_backward(rows, torch.randn(4, 8), torch.ones(4), counts, weights, cfg)
