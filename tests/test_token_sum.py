"""The backward's per-token sum (kernels/token_sum.py) in the Triton interpreter, against float64
sums of the same rows and the router's product, on fresh random rows and slots."""

import os

import pytest
import torch

from flashmoe_py.kernels.token_sum import token_sum
from seeds import fresh_seed

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter test (the GPU backward check runs the kernel for real)")


def rel_err(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


def slots(gen, T, k, S, dropped):
    """[T, k] int64: a permutation of the S rows over the first S slots' places, the rest
    (dropped slots) S or more."""
    where = torch.full((T * k,), S, dtype=torch.int64)
    where[torch.randperm(T * k, generator=gen)[:S]] = torch.randperm(S, generator=gen)
    where[where == S] += torch.randint(0, 3, ((where == S).sum(),), generator=gen)  # S, S + 1, S + 2: none
    assert S == T * k - dropped
    return where.view(T, k)


@pytest.mark.parametrize("router", [True, False])
@pytest.mark.parametrize("T,k,H,E,dropped", [(45, 3, 200, 40, 7), (32, 1, 128, 8, 0), (5, 8, 72, 33, 40)])
def test_each_token_sums_its_rows_and_the_router_term(router, T, k, H, E, dropped):
    """45 tokens, 200 columns: partial token and column tiles; 40 experts: two expert blocks; 5
    tokens of top-8 with 40 dropped slots: every slot of the batch dropped, the router term only;
    rows taken with a row stride wider than H, as the combine's [S, H + 1] rows at world > 1."""
    gen = torch.Generator().manual_seed(fresh_seed())
    S = T * k - dropped
    rows = torch.randn(S, H + 1, generator=gen)[:, :H]
    where = slots(gen, T, k, S, dropped)
    d_logits, weight = torch.randn(T, E, generator=gen), torch.randn(E, H, generator=gen)
    got = token_sum(rows, where, *((d_logits, weight) if router else ()))
    padded = torch.cat([rows.double(), torch.zeros(3, H, dtype=torch.float64)])
    want = padded[where].sum(1)
    if router:
        want += d_logits.double() @ weight.double()
    assert got.dtype == torch.float32 and got.shape == (T, H)
    if want.any():
        assert rel_err(got, want) <= 1e-6
    else:  # no row and no router term: zeros written, not left as allocated
        assert torch.equal(got, torch.zeros_like(got))


def test_bad_arguments_are_named():
    rows, where = torch.randn(6, 16), torch.zeros(3, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="where"):
        token_sum(rows, where.int())
    with pytest.raises(ValueError, match="rows"):
        token_sum(rows.t(), where)
    with pytest.raises(ValueError, match="rows"):
        token_sum(rows[0], where)
    with pytest.raises(ValueError, match="together"):
        token_sum(rows, where, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="router_weight"):
        token_sum(rows, where, torch.zeros(3, 4), torch.zeros(4, 8))
