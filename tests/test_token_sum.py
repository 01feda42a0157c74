"""The backward's per-token sum (kernels/token_sum.py) in the Triton interpreter, against float64
sums of the same rows and the router's product, and against the torch steps the CPU backward
takes (explicit_backward._per_token), on fresh random rows and slots."""

import os

import pytest
import torch
from grad_reference import rel_err

from flashmoe_py.backends.explicit_backward import _per_token
from flashmoe_py.kernels.token_sum import BLOCK_TOKENS, BLOCK_TOKENS_MANY_EXPERTS, MANY_EXPERTS, block_tokens, token_sum
from seeds import fresh_seed

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter test (the GPU backward check runs the kernel for real)")


def slots(gen, T, k, S):
    """-> (where [T, k] int64: the S rows spread over random slot places, every other slot S,
    S + 1 or S + 2 (no row); slot [S] int64: row i's place token * k + choice)."""
    where = torch.full((T * k,), S, dtype=torch.int64)
    places = torch.randperm(T * k, generator=gen)[:S]
    where[places] = torch.arange(S)
    where[where == S] += torch.randint(0, 3, (int((where == S).sum()),), generator=gen)
    return where.view(T, k), places


CASES = {  # T, k, H, E, dropped slots, rows' stride wider than H
    "partial tiles, 2 expert blocks, strided rows": (45, 3, 200, 40, 7, True),
    "contiguous rows, top-1, 8 experts": (32, 1, 128, 8, 0, False),
    "every slot dropped": (5, 8, 72, 33, 40, True),
    "top-16": (9, 16, 64, 5, 20, False),
    "no tokens": (0, 2, 64, 8, 0, False),
    "72 experts: the many-expert tile": (100, 4, 136, 72, 9, False),
}


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float32)], ids=["fp32", "bf16", "fp16 rows, fp32 router"])
@pytest.mark.parametrize("router", [True, False], ids=["router", "no router"])
@pytest.mark.parametrize("case", CASES)
def test_each_token_sums_its_rows_and_the_router_term(case, router, dtypes):
    """Strided rows: as the combine's [S, H + 1] rows at world > 1."""
    T, k, H, E, dropped, strided = CASES[case]
    rows_dtype, router_dtype = dtypes
    gen = torch.Generator().manual_seed(fresh_seed())
    S = T * k - dropped
    rows = torch.randn(S, H + 1 if strided else H, generator=gen).to(rows_dtype)[:, :H]
    where, places = slots(gen, T, k, S)
    d_logits, weight = torch.randn(T, E, generator=gen), torch.randn(E, H, generator=gen).to(router_dtype)
    got = token_sum(rows, where, *((d_logits, weight) if router else ()))
    want = torch.cat([rows.double(), torch.zeros(3, H, dtype=torch.float64)])[where].sum(1)
    if router:
        want += d_logits.double() @ weight.double()
    assert got.dtype == torch.float32 and got.shape == (T, H)
    if want.any():
        assert rel_err(got, want) <= 1e-6
    else:  # no row and no router term: zeros written, not left as allocated
        assert torch.equal(got, torch.zeros_like(got))
    if router:  # the CPU backward's torch steps give the same sums
        cpu = _per_token(rows, places, T, k, d_logits, weight)
        assert cpu.shape == (T, H) and (T == 0 or rel_err(got, cpu) <= 1e-6)


def test_bad_arguments_are_named():
    rows, where = torch.randn(6, 16), torch.zeros(3, 2, dtype=torch.int64)
    d_logits, weight = torch.zeros(3, 4), torch.zeros(4, 16)
    with pytest.raises(ValueError, match="where"):
        token_sum(rows, where.int())
    with pytest.raises(ValueError, match="rows"):
        token_sum(rows.t(), where)
    with pytest.raises(ValueError, match="rows"):
        token_sum(rows[0], where)
    with pytest.raises(ValueError, match="rows"):
        token_sum(rows.long(), where)
    with pytest.raises(ValueError, match="d_logits without router_weight"):
        token_sum(rows, where, d_logits)
    with pytest.raises(ValueError, match="router_weight without d_logits"):
        token_sum(rows, where, None, weight)
    with pytest.raises(ValueError, match="d_logits torch.float64"):
        token_sum(rows, where, d_logits.double(), weight)
    with pytest.raises(ValueError, match="router_weight torch.float32 \\(4, 8\\)"):
        token_sum(rows, where, d_logits, torch.zeros(4, 8))
    with pytest.raises(ValueError, match="one device"):
        token_sum(rows, where.to("meta"))


def test_many_experts_take_the_taller_tile():
    assert block_tokens(0) == block_tokens(MANY_EXPERTS - 1) == BLOCK_TOKENS
    assert block_tokens(MANY_EXPERTS) == block_tokens(512) == BLOCK_TOKENS_MANY_EXPERTS > BLOCK_TOKENS
