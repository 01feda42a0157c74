"""The per-expert weight-gradient kernel (kernels/expert_wgrad.py): out[e] = a_e^T b_e over each
expert's rows. On a Hopper GPU against float64 products on fresh random inputs (experts without
rows, with one row, with rows not a multiple of the 64-row step, output rows and columns not a
multiple of the tile), the output poisoned first; everywhere, the launcher's argument checks."""

import pytest
import torch
from grad_reference import rel_err

from flashmoe_py.kernels.expert_wgrad import BM, MAX_MEAN_ROWS, check_wgrad, expert_wgrad, suits
from seeds import fresh_seed

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)

CASES = {  # counts of rows an expert, K, N
    "uneven counts, an empty expert, one row": ([70, 0, 1, 129, 64, 200], 256, 384),
    "partial column tile": ([33, 95, 128], 128, 200),
    "many experts, few rows": ([3, 17, 0, 64, 65, 1, 127, 2] * 8, 384, 256),
    "every expert empty but the last": ([0, 0, 0, 300], 128, 128),
    "K not a multiple of the tile (gpt_oss_120b's 2,880 is 22.5)": ([40, 130, 0, 70], 192, 200),
}


def reference(a, b, counts):
    ends = torch.tensor(counts).cumsum(0).tolist()
    return torch.stack([a[end - n:end].double().t() @ b[end - n:end].double() for n, end in zip(counts, ends)])


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="Gluon kernel for sm_90")
@pytest.mark.parametrize("case", CASES)
def test_each_expert_gets_its_rows_products(case):
    """Within bf16's bar of float64, every expert (zeros without rows); nothing left poisoned."""
    counts, K, N = CASES[case]
    g = torch.Generator(device="cuda").manual_seed(fresh_seed())
    S = sum(counts)
    a = torch.randn(S, K, device="cuda", generator=g).to(torch.bfloat16)
    b = torch.randn(S, N, device="cuda", generator=g).to(torch.bfloat16)
    ends = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    out = torch.full((len(counts), K, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    expert_wgrad(a, b, ends, out)
    want = reference(a, b, counts)
    assert not out.isnan().any()
    for e, n in enumerate(counts):
        if n == 0:
            assert not out[e].any(), f"expert {e} has no rows: its gradient must be zeros"
        else:
            assert rel_err(out[e], want[e]) <= 1e-2, f"expert {e} ({n} rows)"


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="Gluon kernel for sm_90")
def test_rows_of_the_next_expert_do_not_leak():
    """An expert whose last step reaches into the next one's rows: those rows hold large values
    that would dominate its product if they were not zeroed."""
    a = torch.randn(130, BM, device="cuda").to(torch.bfloat16)
    b = torch.randn(130, 128, device="cuda").to(torch.bfloat16)
    a[10:], b[10:] = a[10:] * 1000, b[10:] * 1000
    ends = torch.tensor([10, 130], device="cuda", dtype=torch.int32)
    out = expert_wgrad(a, b, ends)
    assert rel_err(out[0], a[:10].double().t() @ b[:10].double()) <= 1e-2


def _ok():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return (torch.zeros(4, BM, dtype=torch.bfloat16, device=dev), torch.zeros(4, 64, dtype=torch.bfloat16, device=dev),
            torch.tensor([4], dtype=torch.int32, device=dev))


@pytest.mark.parametrize("bad, match", [
    (lambda a, b, e: (a.float(), b, e), "bfloat16"),
    (lambda a, b, e: (a, b[:3], e), "share S"),
    (lambda a, b, e: (a[:, :100].contiguous(), b, e), "multiples of 8"),
    (lambda a, b, e: (a, b[:, :60].contiguous(), e), "of 8"),
    (lambda a, b, e: (a, b[:, ::2], e), "contiguous"),
    (lambda a, b, e: (a, b, e.long()), "int32"),
    (lambda a, b, e: (a, b, torch.tensor([2, 0, 4, 0], dtype=torch.int32, device=e.device)[::2]), "contiguous"),
    (lambda a, b, e: (torch.zeros(a.numel() + 1, dtype=a.dtype, device=a.device)[1:].view(a.shape), b, e),
     "16-byte aligned"),
])
def test_bad_operands_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        check_wgrad(*bad(*_ok()))


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="Gluon kernel for sm_90")
@pytest.mark.parametrize("settings, match", [(dict(stages=1), "stages"), (dict(out_bufs=0), "out_bufs"),
                                             (dict(out_bufs=2), "multiple of 256")])
def test_settings_that_would_hang_or_race_are_refused(settings, match):
    a, b, e = _ok()  # b 64 wide: a second output buffer could be overwritten while its store reads it
    with pytest.raises(ValueError, match=match):
        expert_wgrad(a, b, e, **settings)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="Gluon kernel for sm_90")
def test_no_rows_give_zeros():
    a = torch.empty(0, BM, dtype=torch.bfloat16, device="cuda")
    b = torch.empty(0, 64, dtype=torch.bfloat16, device="cuda")
    out = expert_wgrad(a, b, torch.zeros(3, dtype=torch.int32, device="cuda"))
    assert out.shape == (3, BM, 64) and not out.any()


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="Gluon kernel for sm_90")
def test_two_output_buffers_and_two_stages():
    """The setting the probe also times (bench/wgrad_probe.py's s2o2), against float64."""
    counts = [70, 0, 129, 64, 200, 1]
    a = torch.randn(sum(counts), 256, device="cuda").to(torch.bfloat16)
    b = torch.randn(sum(counts), 512, device="cuda").to(torch.bfloat16)
    ends = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    assert rel_err(expert_wgrad(a, b, ends, stages=2, out_bufs=2), reference(a, b, counts)) <= 1e-2


def test_cpu_tensors_are_refused():
    a, b, e = (t.cpu() for t in _ok())
    with pytest.raises(ValueError, match="one CUDA device"):
        check_wgrad(a, b, e)


def test_cpu_operands_do_not_suit():
    a, b, _ = (t.cpu() for t in _ok())
    assert not suits(a, b, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="Gluon kernel for sm_90")
def test_the_kernel_suits_few_rows_an_expert_only():
    """backends/expert_grad.py takes it where it was measured faster than torch._grouped_mm: up to
    MAX_MEAN_ROWS rows an expert on average, bf16, widths it can tile."""
    def ops(S, K=256, N=128, dtype=torch.bfloat16):
        return torch.zeros(S, K, dtype=dtype, device="cuda"), torch.zeros(S, N, dtype=dtype, device="cuda")
    assert suits(*ops(16 * MAX_MEAN_ROWS), 16)
    assert not suits(*ops(16 * MAX_MEAN_ROWS + 1), 16)
    assert suits(*ops(64, K=200), 16)  # rows of out past K are not stored (a 3-D TMA box)
    assert not suits(*ops(64, K=196), 16)  # a's rows not whole 16 bytes for TMA
    assert not suits(*ops(64, dtype=torch.float16), 16)
