"""The router weight's gradient kernel (kernels/router_grad.py) on a GPU, or in the Triton
interpreter on the CPU, against float64 products d_logits^T @ x, on fresh random inputs: partial
tiles, several token runs, one expert and many, x in each float dtype, no tokens, and the
launcher's argument checks."""

import os

import pytest
import torch
import triton
from grad_reference import rel_err

from flashmoe_py.kernels import router_grad
from flashmoe_py.kernels.router_grad import (BLOCK_COLS, BLOCK_TOKENS, MAX_RUN_TOKENS, MAX_RUNS, TARGET_PROGRAMS,
                                             block_experts, router_weight_grad, token_runs)
from seeds import fresh_seed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or the Triton interpreter")
TOL = 1e-6 if DEVICE == "cpu" else 1e-5  # the interpreter's ieee fp32 dots; tensor cores on a GPU

CASES = {  # T, E, H
    "partial tiles in every dimension": (45, 40, 200),
    "several runs, the last partial": (1300, 24, 136),
    "one expert": (70, 1, 64),
    "256 experts, 4 expert blocks": (40, 256, 72),
    "exactly one block of tokens": (BLOCK_TOKENS, 16, 128),
}


def runs_for(T, E, H):
    return token_runs(T, triton.cdiv(E, block_experts(E)) * triton.cdiv(H, BLOCK_COLS))[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES)
def test_gradient_is_d_logits_transposed_times_x(case, dtype):
    """fp32's accuracy: within TOL of the float64 product (bf16 x: of d_logits' three bf16 parts,
    each part's rounding would show at this bar; fp32 d_logits has all 24 bits significant)."""
    T, E, H = CASES[case]
    gen = torch.Generator().manual_seed(fresh_seed())
    d_logits, x = torch.randn(T, E, generator=gen), torch.randn(T, H, generator=gen).to(dtype)
    got = router_weight_grad(d_logits.to(DEVICE), x.to(DEVICE)).cpu()
    assert got.dtype == torch.float32 and got.shape == (E, H) and got.is_contiguous()
    assert rel_err(got, d_logits.double().t() @ x.double()) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,H", [(4096, 256, 7168), (16384, 256, 7168), (69632, 256, 7168), (16384, 128, 2048),
                                   (4096, 8, 4096)],
                         ids=["deepseek_v3", "deepseek_v3 at 16384 tokens", "deepseek_v3 in two launches",
                              "qwen3 at 16384 tokens", "mixtral"])
def test_the_presets_gradient_on_a_gpu_keeps_fp32_accuracy(T, E, H):
    """bf16 x (split_dot's products) over several runs: within 1e-5 of float64 at the presets'
    sizes."""
    gen = torch.Generator().manual_seed(fresh_seed())
    d_logits, x = torch.randn(T, E, generator=gen) / 64, torch.randn(T, H, generator=gen).to(torch.bfloat16)
    got = router_weight_grad(d_logits.to(DEVICE), x.to(DEVICE)).cpu()
    assert rel_err(got, d_logits.double().t() @ x.double()) <= 1e-5


def test_each_run_adds_only_its_own_tokens():
    """Runs' sums kept apart: one token's gradient alone, placed in each run in turn (its first and
    last token, and the partial last run's last), shows up once: its outer product (exactly, in
    the interpreter)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    T, E, H = 1100, 3, 40
    run, runs = token_runs(T, 1)
    assert runs > 2 and run * (runs - 1) < T - 1
    x = torch.randn(T, H, generator=gen)
    for t in (0, run - 1, run, 2 * run - 1, run * (runs - 1), T - 1):
        d_logits = torch.zeros(T, E)
        d_logits[t] = torch.randn(E, generator=gen)
        got, want = router_weight_grad(d_logits.to(DEVICE), x.to(DEVICE)).cpu(), d_logits[t, :, None] * x[t]
        assert torch.equal(got, want) if DEVICE == "cpu" else rel_err(got, want) <= TOL


def test_runs_beyond_the_partial_sum_s_depth_are_launched_in_turn(monkeypatch):
    """More capped runs than MAX_PARTIALS: several launches over consecutive tokens, each one's
    sum added to the output, still d_logits^T @ x (here runs of 64 tokens, 4 a launch)."""
    monkeypatch.setattr(router_grad, "MAX_RUN_TOKENS", BLOCK_TOKENS)
    monkeypatch.setattr(router_grad, "MAX_PARTIALS", 4)
    T, E, H = 1300, 24, 136
    assert runs_for(T, E, H) == 21  # six launches, the last of one partial run (20 tokens)
    gen = torch.Generator().manual_seed(fresh_seed())
    d_logits, x = torch.randn(T, E, generator=gen), torch.randn(T, H, generator=gen)
    got = router_weight_grad(d_logits.to(DEVICE), x.to(DEVICE)).cpu()
    assert rel_err(got, d_logits.double().t() @ x.double()) <= TOL


def test_launches_of_one_run_each_do_not_sum_into_the_buffer_they_reuse(monkeypatch):
    """With one run a launch, the first launch's sum is partials[0], which the next launch writes
    again: the output was that last part twice (0.997 off)."""
    monkeypatch.setattr(router_grad, "MAX_RUN_TOKENS", BLOCK_TOKENS)
    monkeypatch.setattr(router_grad, "MAX_PARTIALS", 1)
    T, E, H = 200, 16, 128
    gen = torch.Generator().manual_seed(fresh_seed())
    d_logits, x = torch.randn(T, E, generator=gen), torch.randn(T, H, generator=gen)
    got = router_weight_grad(d_logits.to(DEVICE), x.to(DEVICE)).cpu()
    assert rel_err(got, d_logits.double().t() @ x.double()) <= TOL


def test_no_tokens_give_exact_zeros():
    got = router_weight_grad(torch.zeros(0, 7), torch.zeros(0, 33, dtype=torch.bfloat16))
    assert got.dtype == torch.float32 and got.shape == (7, 33) and torch.equal(got, torch.zeros(7, 33))


@pytest.mark.parametrize("T", [1, 63, 64, 65, 1300, 8192, 8193, 65536, 70000, 10**6])
@pytest.mark.parametrize("tiles", [1, 7, 32, 224, 1000])
def test_token_runs_are_bounded_powers_of_two_enough_for_the_target_programs(T, tiles):
    run, runs = token_runs(T, tiles)
    want = min(MAX_RUNS, max(1, triton.cdiv(TARGET_PROGRAMS, tiles)))
    assert BLOCK_TOKENS <= run <= MAX_RUN_TOKENS and run & (run - 1) == 0
    assert 1 <= runs and (runs <= want or run == MAX_RUN_TOKENS)  # more runs only when they are capped
    assert run * runs >= T > run * (runs - 1)  # every token in a run, no run empty
    assert run == BLOCK_TOKENS or triton.cdiv(T, run // 2) > want  # the smallest such run


def test_no_tokens_take_no_runs():
    assert token_runs(0, 4)[1] == 0


def test_bad_arguments_are_named():
    d_logits, x = torch.zeros(3, 4), torch.zeros(3, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="d_logits is torch.float64"):
        router_weight_grad(d_logits.double(), x)
    with pytest.raises(ValueError, match="d_logits is torch.float32 \\(4, 3\\)"):
        router_weight_grad(d_logits.t(), x)
    with pytest.raises(ValueError, match="d_logits is torch.float32 \\(12,\\)"):
        router_weight_grad(d_logits.view(-1), x)
    with pytest.raises(ValueError, match="x has 5 tokens \\(rows\\), d_logits 3"):
        router_weight_grad(d_logits, torch.zeros(5, 16))
    with pytest.raises(ValueError, match="x is torch.bfloat16 \\(3, 8\\) with strides \\(16, 2\\)"):
        router_weight_grad(d_logits, x[:, ::2])
    with pytest.raises(ValueError, match="x is torch.int64"):
        router_weight_grad(d_logits, x.long())
    with pytest.raises(ValueError, match="x is torch.float64"):
        router_weight_grad(d_logits, x.double())
    with pytest.raises(ValueError, match="one device"):
        router_weight_grad(d_logits, x.to("meta"))
