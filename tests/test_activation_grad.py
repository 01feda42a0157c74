"""The activation backward's kernel (kernels/activation_grad.py) in the Triton interpreter,
against the torch steps the CPU backward takes (lean_autograd.activation_backward) and
against autograd of the reference activation, on fresh random rows and routing weights."""

import os

import pytest
import torch

from flashmoe_py import MoEConfig
from flashmoe_py.lean_autograd import activation_backward
from flashmoe_py.gate_up import to_halves
from flashmoe_py.kernels.activation_grad import activation_grad, activation_input_grad
from flashmoe_py.reference import activate
from seeds import fresh_seed

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter test (the GPU backward check runs the kernel for real)")


def rel_err(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu", "gelu", "relu"])
@pytest.mark.parametrize("rows,ffn", [(45, 200), (3, 136), (70, 48)])
def test_one_pass_matches_the_activations_derivatives(activation, rows, ffn):
    """ffn 200 and 136: gate/up pairs of 8 across column blocks of 128 and a partial last block;
    70 rows: a partial row block. A small clamp limit, so that clamped_swiglu's clamps are hit."""
    clamp = {"swiglu_limit": 0.8} if activation == "clamped_swiglu" else {}
    cfg = MoEConfig(hidden_size=32, ffn_size=ffn, num_experts=2, top_k=1, activation=activation, dtype="float32",
                    **clamp)
    gen = torch.Generator().manual_seed(fresh_seed())  # printed: a failure replays
    f_in = 2 * ffn if cfg.gated else ffn
    pre = torch.randn(rows, f_in, generator=gen)
    g = torch.randn(rows, ffn, generator=gen)
    scale = torch.rand(rows, generator=gen) + 0.5
    sh, d_pre, dot = activation_grad(pre, g, scale, cfg)

    leaf = pre.double().requires_grad_()
    want_h = activate(leaf, activation, cfg.swiglu_alpha, cfg.swiglu_limit, paired=True)
    (want_h * (g.double() * scale.double()[:, None])).sum().backward()
    assert rel_err(sh, scale.double()[:, None] * want_h) <= 1e-6
    assert rel_err(d_pre, leaf.grad) <= 1e-6
    terms = want_h * g.double()  # dot sums F of them, which cancel: its fp32 rounding grows with their
    # sizes, not with the sum (seed 1821046017, 3 rows of 136: dots ~0.3 of terms summing to ~25
    # in size; the kernel 1.9e-6 from float64 by the sums' norm, torch's fp32 sum 5.4e-7)
    assert float((dot.double() - terms.sum(1)).norm() / terms.abs().sum(1).norm()) <= 1e-6
    # The torch steps on one thread. With two, in 3 of 31 runs of this file, torch's fp32 erf came
    # back up to 1.5e-4 off over the second thread's half of the [45, 200] gelu call, and right
    # when called again at once; on one thread, 0 of 25 (bench/NOTES.md item 114 e).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch_h, torch_d_pre = activation_backward(pre, g * scale[:, None], cfg)
    finally:
        torch.set_num_threads(threads)
    assert rel_err(d_pre, torch_d_pre) <= 1e-6 and rel_err(sh, scale[:, None] * torch_h) <= 1e-6
    if cfg.gated:  # the pairs, not halves: the up gradient of gate column f sits PAIR columns on
        assert rel_err(to_halves(d_pre), to_halves(leaf.grad)) <= 1e-6


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu", "gelu", "relu"])
@pytest.mark.parametrize("rows,ffn", [(45, 200), (70, 48), (0, 48)])
def test_the_input_gradient_alone_is_the_torch_steps(activation, rows, ffn):
    """activation_input_grad (autograd's backward of the activation on GPUs, lean_autograd.py):
    d_pre alone, unscaled, as the torch steps give it, and no more written than d_pre."""
    clamp = {"swiglu_limit": 0.8} if activation == "clamped_swiglu" else {}
    cfg = MoEConfig(hidden_size=32, ffn_size=ffn, num_experts=2, top_k=1, activation=activation, dtype="float32",
                    **clamp)
    gen = torch.Generator().manual_seed(fresh_seed())  # printed: a failure replays
    pre = torch.randn(rows, 2 * ffn if cfg.gated else ffn, generator=gen)
    g = torch.randn(rows, ffn, generator=gen)
    before = (pre.clone(), g.clone())
    d_pre = activation_input_grad(pre, g, cfg)
    _, want = activation_backward(pre.double(), g.double(), cfg)
    assert d_pre.shape == pre.shape and d_pre.dtype == torch.float32
    if rows:
        assert rel_err(d_pre, want) <= 1e-6
    assert torch.equal(pre, before[0]) and torch.equal(g, before[1])
    with pytest.raises(ValueError, match="expected pre"):
        activation_input_grad(pre[:, :ffn // 2], g, cfg)


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu", "gelu", "relu"])
@pytest.mark.parametrize("bias", ["none", "one expert", "every expert"])
def test_autograds_one_pass_backward_is_the_torch_steps(monkeypatch, activation, bias):
    """lean_autograd.activated's first-order backward as GPUs take it (the kernel, here in the
    interpreter; with a bias on h + bias in fp32) gives the gradients of h and of the bias that
    its torch steps give, float32 layers, 37 rows in experts of 11, 0 and 26."""
    from flashmoe_py import lean_autograd
    cfg = MoEConfig(hidden_size=32, ffn_size=136, num_experts=3, top_k=1, activation=activation, dtype="float32",
                    **({"swiglu_limit": 0.8} if activation == "clamped_swiglu" else {}))
    gen = torch.Generator().manual_seed(fresh_seed())  # printed: a failure replays
    h = torch.randn(37, cfg.ffn_in_size, generator=gen)
    dy = torch.randn(37, cfg.ffn_size, generator=gen)
    counts = torch.tensor([11, 0, 26]) if bias == "every expert" else None
    b = {"none": None, "one expert": torch.randn(cfg.ffn_in_size, generator=gen),
         "every expert": torch.randn(3, cfg.ffn_in_size, generator=gen)}[bias]

    def grads(one_pass: bool):
        monkeypatch.setattr(lean_autograd, "_one_pass", lambda t: one_pass)
        leaves = [t.clone().requires_grad_() for t in (h, b) if t is not None]
        lean_autograd.activated(leaves[0], leaves[1] if b is not None else None, counts, cfg).backward(dy)
        return [t.grad for t in leaves]

    for got, want in zip(grads(True), grads(False), strict=True):
        assert rel_err(got, want) <= 1e-6


def test_shapes_and_dtypes_are_checked():
    cfg = MoEConfig(hidden_size=32, ffn_size=16, num_experts=2, top_k=1, dtype="float32")
    with pytest.raises(ValueError, match="pre"):
        activation_grad(torch.randn(4, 16), torch.randn(4, 16), torch.ones(4), cfg)  # gated: 32 columns
    with pytest.raises(ValueError, match="scale"):
        activation_grad(torch.randn(4, 32), torch.randn(4, 16), torch.ones(4, dtype=torch.float64), cfg)
    with pytest.raises(ValueError, match=r"g must be \[N, F\]"):
        activation_grad(torch.randn(4, 32), torch.randn(64), torch.ones(4), cfg)
    with pytest.raises(ValueError, match="one device"):
        activation_grad(torch.randn(4, 32), torch.randn(4, 16), torch.ones(4, device="meta"), cfg)


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu", "gelu", "relu"])
@pytest.mark.parametrize("rows", [0, 1, 7, 20])
def test_the_cpu_backward_in_row_chunks_is_the_one_pass(monkeypatch, activation, rows):
    """On the CPU the activation's backward runs CPU_CHUNK_ROWS rows at a time (its fp32
    temporaries held for one chunk: 53.9 -> 28.8 KB a token at the peak of a bf16 training step,
    bench/NOTES.md item 99): as over every row at once, chunks of 7 rows here, to float32's
    rounding (a vectorised exp and its scalar tail may round a last bit apart)."""
    from flashmoe_py.backends import expert_grad
    monkeypatch.setattr(expert_grad, "CPU_CHUNK_ROWS", 7)
    cfg = MoEConfig(hidden_size=64, ffn_size=48, num_experts=4, top_k=2, activation=activation)
    gen = torch.Generator().manual_seed(rows)
    pre = torch.randn(rows, cfg.ffn_in_size, generator=gen).bfloat16()
    g, scale = torch.randn(rows, 48, generator=gen).bfloat16(), torch.rand(rows, generator=gen)
    h, d_pre = activation_backward(pre.float(), g.float() * scale[:, None], cfg)
    want = (h * scale[:, None], d_pre, (h * g.float()).sum(1))
    got = expert_grad._activation_grad(pre, g, scale, cfg)
    for a, b, size in zip(got, want, (1.0, 1.0, (h * g.float()).abs().sum(1))):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert ((a - b).abs() <= 1e-6 * (b.abs() + size)).all()  # <h, g>'s sum: to its terms' rounding
