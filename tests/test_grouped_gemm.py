"""The backward's per-expert GEMMs (kernels/grouped_gemm.py) in the Triton interpreter, in fp32
against a float64 loop over experts: uneven row counts (an expert with none, one with fewer rows
than a tile, one over several tiles), sizes that are not multiples of the tiles."""

import os
import random

import pytest
import torch

from flashmoe_py import MoEConfig
from flashmoe_py.backends.expert_grad import activation_backward
from flashmoe_py.kernels.grouped_gemm import dgrad_activation, outer, rows_times

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter test (bench/backward_gemms.py runs the kernels on a GPU)")


def rel_err(got, want):
    return float((got.double() - want).norm() / want.norm())


def split(counts):
    ends = torch.cumsum(counts, 0).tolist()
    return [slice(end - int(n), end) for n, end in zip(counts.tolist(), ends)]


@pytest.mark.parametrize("counts", [[5, 0, 150, 1], [0, 0, 3], [129]])
@pytest.mark.parametrize("transpose", [False, True])
def test_rows_times_each_experts_rows_by_its_weight(counts, transpose):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    counts = torch.tensor(counts)
    N, K, M, L = int(counts.sum()), 72, 136, counts.shape[0]
    a = torch.randn(N, K, generator=gen)
    w = torch.randn(L, M, K, generator=gen) if transpose else torch.randn(L, K, M, generator=gen)
    got = rows_times(a, w, counts, transpose=transpose, out=torch.full((N, M), float("nan")))
    want = torch.empty(N, M, dtype=torch.float64)
    for e, s in enumerate(split(counts)):
        we = w[e].double()
        want[s] = a[s].double() @ (we.t() if transpose else we)
    assert rel_err(got, want) <= 1e-5


def test_rows_times_names_a_weight_that_does_not_fit():
    with pytest.raises(ValueError, match="rows_times"):
        rows_times(torch.randn(4, 8), torch.randn(2, 9, 5), torch.tensor([1, 3]))


@pytest.mark.parametrize("counts", [[5, 0, 150, 1], [200]])
def test_outer_sums_each_experts_rows_and_zeros_an_expert_without_rows(counts):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    counts = torch.tensor(counts)
    N, K, M = int(counts.sum()), 136, 72
    a, b = torch.randn(N, K, generator=gen), torch.randn(N, M, generator=gen)
    got = outer(a, b, counts, out=torch.full((counts.shape[0], K, M), float("nan")))
    want = torch.zeros(counts.shape[0], K, M, dtype=torch.float64)
    for e, s in enumerate(split(counts)):
        want[e] = a[s].double().t() @ b[s].double()
    assert rel_err(got, want) <= 1e-5
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            assert torch.equal(got[e], torch.zeros(K, M))


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu", "gelu", "relu"])
def test_dgrad_with_the_activation_backward_in_its_epilogue(activation):
    """g = dy w_out[e]^T is never stored: sh = scale act(pre), d_pre and <act(pre), g> come out of
    the GEMM's epilogue, against float64 g through the torch steps of the CPU backward; FFN 200
    (gate/up pairs of 8 across column tiles of 64, a partial last one), a small clamp limit so
    that clamped_swiglu's clamps are hit."""
    clamp = {"swiglu_limit": 0.8} if activation == "clamped_swiglu" else {}
    cfg = MoEConfig(hidden_size=72, ffn_size=200, num_experts=3, top_k=1, activation=activation, dtype="float32",
                    **clamp)
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    counts = torch.tensor([5, 0, 150])
    N, H, F = int(counts.sum()), cfg.hidden_size, cfg.ffn_size
    dy = torch.randn(N, H, generator=gen)
    w_out = torch.randn(3, F, H, generator=gen) / H ** 0.5
    pre = torch.randn(N, cfg.ffn_in_size, generator=gen)
    scale = torch.rand(N, generator=gen) + 0.5
    sh, d_pre, dot = dgrad_activation(dy, w_out, pre, scale, counts, cfg)
    g = torch.empty(N, F, dtype=torch.float64)
    for e, s in enumerate(split(counts)):
        g[s] = dy[s].double() @ w_out[e].double().t()
    h, want_d_pre = activation_backward(pre.double(), g * scale.double()[:, None], cfg)
    assert rel_err(sh, scale.double()[:, None] * h) <= 1e-5
    assert rel_err(d_pre, want_d_pre) <= 1e-5
    assert rel_err(dot, (h * g).sum(1)) <= 1e-5


def test_dgrad_names_a_saved_pre_of_the_wrong_width():
    cfg = MoEConfig(hidden_size=16, ffn_size=8, num_experts=2, top_k=1, dtype="float32")
    with pytest.raises(ValueError, match="dgrad_activation.*pre"):
        dgrad_activation(torch.randn(4, 16), torch.randn(2, 8, 16), torch.randn(4, 8), torch.ones(4),
                         torch.tensor([1, 3]), cfg)
