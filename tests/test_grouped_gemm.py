"""The backward's per-expert GEMMs (kernels/grouped_gemm.py) in the Triton interpreter, in fp32
against a float64 loop over experts: uneven row counts (an expert with none, one with fewer rows
than a tile, one over several tiles), sizes that are not multiples of the tiles."""

import os
import random

import pytest
import torch

from flashmoe_py.kernels.grouped_gemm import outer, rows_times

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
