"""The router kernel (kernels/router.py) against float64 routing: the same experts in the same
order, and the same weights. On a GPU, or in the Triton interpreter on the CPU (fp32 only there:
the interpreter's bf16 dot returns garbage, so bf16 cases carry the `gpu` marker)."""

import os
import random

import pytest
import torch
import triton
from decided import decided_choice
from grad_reference import rel_err

from flashmoe_py import MoEConfig
from flashmoe_py.kernels.router import router_topk
from flashmoe_py.reference import reference_routing
from flashmoe_py.routing import route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or the Triton interpreter")


def decided_rows(x, w, top_k, margin=1e-3):
    """Rows whose k+1 largest float64 logits are more than margin apart: no summation order can
    change their top-k experts or the order of them."""
    logits = (x.double() @ w.double().t()).sort(dim=1, descending=True).values[:, :top_k + 1]
    return (logits[:, :-1] - logits[:, 1:]).min(dim=1).values > margin


def decided_draws(tokens: int, experts: int, hidden: int, top_k: int, dtype: torch.dtype = torch.float32):
    """x [tokens, hidden], w [experts, hidden] (in dtype, on DEVICE) from a fresh seed, x drawn
    again until most tokens' top-k is decided (a single token: until it is) -> (x, w, decided
    rows [tokens] bool, on the CPU)."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    w = (torch.randn(experts, hidden, generator=gen) / hidden**0.5).to(dtype)
    for _ in range(20):
        x = torch.randn(tokens, hidden, generator=gen).to(dtype)
        rows = decided_rows(x, w, top_k)
        if rows.float().mean() > 0.5:
            break
    assert rows.float().mean() > 0.5
    return x.to(DEVICE), w.to(DEVICE), rows


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [pytest.param("bfloat16", marks=pytest.mark.gpu), "float32"])
@pytest.mark.parametrize("experts,top_k,renormalize", [(8, 2, True), (60, 4, False), (256, 8, True),
                                                       (16, 1, True), (3, 3, False)])
def test_router_matches_float64_routing(dtype, experts, top_k, renormalize, split):
    cfg = MoEConfig(hidden_size=96, ffn_size=32, num_experts=experts, top_k=top_k, dtype=dtype,
                    renormalize=renormalize)
    tokens = random.choice([1, 37, 100, 1000])
    x, w, rows = decided_draws(tokens, experts, cfg.hidden_size, top_k, cfg.torch_dtype)
    weights, chosen = (t.cpu() for t in router_topk(x, w, top_k, renormalize, split=split))
    ref_w, ref_e, _ = reference_routing(x.cpu(), w.cpu(), cfg, torch.float64)
    assert weights.dtype == torch.float32 and chosen.dtype == torch.int64
    assert weights.shape == chosen.shape == (tokens, top_k)
    assert torch.equal(chosen[rows], ref_e[rows])
    torch.testing.assert_close(weights[rows].double(), ref_w[rows].double(), rtol=1e-5, atol=1e-6)
    if renormalize:
        torch.testing.assert_close(weights.sum(1), torch.ones(tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_route_on_a_gpu_agrees_with_float32_routing():
    cfg = MoEConfig(hidden_size=512, ffn_size=64, num_experts=64, top_k=6, dtype="bfloat16")
    x = torch.randn(4096, 512, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(64, 512, device=DEVICE, dtype=torch.bfloat16) / 512**0.5
    r = route(x, w, cfg)
    ref_w, ref_e, _ = reference_routing(x.cpu(), w.cpu(), cfg, torch.float32)
    rows = decided_rows(x.cpu(), w.cpu(), cfg.top_k)
    assert torch.equal(r.experts.cpu()[rows], ref_e[rows]) and r.kept is None
    torch.testing.assert_close(r.weights.cpu()[rows], ref_w[rows], rtol=1e-5, atol=1e-6)


def test_router_takes_a_block_of_tokens_per_program_and_zero_tokens():
    x = torch.randn(70, 64, device=DEVICE)
    w = torch.randn(32, 64, device=DEVICE) / 8
    full = router_topk(x, w, 4, True)
    for block_t in (16, 128):
        got = router_topk(x, w, 4, True, block_t=block_t)
        assert torch.equal(got[1], full[1]) and torch.allclose(got[0], full[0])
    weights, chosen = router_topk(x[:0], w, 4, True)
    assert weights.shape == chosen.shape == (0, 4)


@pytest.mark.parametrize("split", [False, True])
def test_the_router_reads_x_at_the_address_its_word_holds(split):
    """x_at (a CUDA graph replayed on new tokens): the kernels read the rows at the address the
    word holds, x only standing in for their shape, dtype and alignment (here NaN, never read):
    the choice, weights and logits of those rows, as routing them directly gives (split: the dot
    in 4 chunks of 64)."""
    x = torch.randn(70, 256, device=DEVICE)
    w = torch.randn(32, 256, device=DEVICE) / 16
    stand_in = torch.full_like(x, float("nan"))
    x_at = torch.tensor([x.data_ptr()], device=DEVICE)
    logits, want_logits = (torch.empty(70, 32, device=DEVICE) for _ in range(2))
    got = router_topk(stand_in, w, 4, True, split=split, logits_out=logits, x_at=x_at)
    want = router_topk(x, w, 4, True, split=split, logits_out=want_logits)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]) and torch.equal(logits, want_logits)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=pytest.mark.gpu), torch.float32])
def test_non_finite_tokens_get_k_distinct_experts_with_nan_weights(dtype, split):
    """A token whose logits are not all finite (NaN or Inf in its activations, or in a router
    row) gets NaN weights, as under torch's softmax, on k distinct experts that exist, and every
    other token is routed as without it; with the dot split over K chunks too (hidden 200)."""
    x = torch.randn(40, 200, device=DEVICE).to(dtype)
    w = (torch.randn(12, 200, device=DEVICE) / 200**0.5).to(dtype)
    clean = router_topk(x, w, 3, True, split=split)
    x[3, 5], x[7, 0] = float("nan"), float("inf")
    weights, chosen = router_topk(x, w, 3, True, split=split)
    bad = torch.zeros(40, dtype=torch.bool, device=DEVICE)
    bad[[3, 7]] = True
    assert not weights[bad].isfinite().any()
    assert torch.equal(chosen[~bad], clean[1][~bad]) and torch.equal(weights[~bad], clean[0][~bad])
    w[0] = float("inf")
    weights, chosen = router_topk(x, w, 3, True, split=split)
    assert not weights.isfinite().any()
    assert 0 <= int(chosen.min()) and int(chosen.max()) < 12
    assert all(len(set(row)) == 3 for row in chosen.tolist())


@pytest.mark.parametrize("bad,match", [
    (lambda x, w: router_topk(x, w.t().contiguous(), 2, True), "router_weight"),
    (lambda x, w: router_topk(x, w.double(), 2, True), "router_weight"),
    (lambda x, w: router_topk(x, w.to("meta"), 2, True), "router_weight.* on meta"),
    (lambda x, w: router_topk(x.t(), w, 2, True), "x: expected"),
    (lambda x, w: router_topk(x, w, 17, True), "top_k=17"),
    (lambda x, w: router_topk(x, torch.zeros(600, 64, device=x.device), 2, True), "600 experts"),
    (lambda x, w: router_topk(x, w, 2, True, block_t=24), "block_t=24"),
    (lambda x, w: router_topk(x, w, 2, True, x_at=torch.zeros(1, device=x.device)), "x_at"),
    (lambda x, w: router_topk(x, w, 2, True, logits_out=torch.empty(8, 15, device=x.device)), "logits_out"),
    (lambda x, w: router_topk(x, w, 2, True, logits_out=torch.empty(8, 16, device=x.device).half()), "logits_out"),
    (lambda x, w: router_topk(x, w, 2, True, routing="sigmoid_grouped", n_group=16, topk_group=4,  # one an expert:
                              correction_bias=torch.zeros(16, device=x.device)), "at least 2 experts a group"),
])
def test_router_rejects_bad_arguments_by_name(bad, match):
    x, w = torch.randn(8, 64, device=DEVICE), torch.randn(16, 64, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        bad(x, w)


ROUTINGS = [  # (config fields, whether the router has a bias, an fp32 router in a bf16 model)
    (dict(routing="topk_softmax", router_bias=True), True),
    (dict(routing="topk_sigmoid", renormalize=False), False),
    (dict(routing="topk_sigmoid", renormalize=True, routed_scaling_factor=2.5), False),
    (dict(routing="sigmoid_grouped", n_group=8, topk_group=4, routed_scaling_factor=2.5), False),
    (dict(routing="sigmoid_grouped", n_group=4, topk_group=4, renormalize=False), False),
    (dict(routing="softmax_topk", routed_scaling_factor=0.5), False),
]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("fields,bias", ROUTINGS)
@pytest.mark.parametrize("experts,top_k", [(64, 8), (32, 3), (512, 10)])
def test_every_routing_matches_the_reference(fields, bias, experts, top_k, split):
    """fp32 (the interpreter's dot): the kernel's experts and weights are the reference's on every
    token whose choice no rounding can change (biased scores and group scores well apart), with
    the dot split over K chunks (hidden 160: 3 chunks, the last one short, or 10) or not."""
    cfg = MoEConfig(hidden_size=160, ffn_size=32, num_experts=experts, top_k=top_k, dtype="float32", **fields)
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    x = torch.randn(70, 160, generator=gen)
    w = torch.randn(experts, 160, generator=gen) / 160**0.5
    router_bias = torch.randn(experts, generator=gen) / 4 if bias else None
    correction = torch.rand(experts, generator=gen) / 4 if cfg.routing == "sigmoid_grouped" else None
    extra = {"router_bias": router_bias, "e_score_correction_bias": correction}
    ref_w, ref_e, _ = reference_routing(x, w, cfg, torch.float64, **extra)
    got_w, got_e = (t.cpu() for t in router_topk(
        x.to(DEVICE), w.to(DEVICE), top_k, cfg.renormalize, routing=cfg.routing,
        router_bias=None if router_bias is None else router_bias.to(DEVICE),
        correction_bias=None if correction is None else correction.to(DEVICE), n_group=cfg.n_group,
        topk_group=cfg.topk_group, scaling=cfg.routed_scaling_factor, split=split))
    rows = decided_rows(x, w, top_k) if cfg.routing != "sigmoid_grouped" else torch.ones(70, dtype=torch.bool)
    if bias or correction is not None:  # the choice is on biased values: compare where it is clear
        rows = decided_choice(x, w, cfg, router_bias, correction)
    assert rows.float().mean() > 0.3
    assert torch.equal(got_e[rows], ref_e[rows])
    torch.testing.assert_close(got_w[rows].double(), ref_w[rows].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True])
def test_an_fp32_router_in_a_bf16_layer_takes_the_exact_dot_on_upcast_activations(split):
    """DeepSeek-V3's router stays fp32 in a bf16 model: its logits are the fp32 product of the
    upcast activations, so the picks match float64 routing on every decided token (split over K
    chunks too, as its 7.3 MB fp32 router is up to 512 tokens)."""
    cfg = MoEConfig(hidden_size=512, ffn_size=64, num_experts=256, top_k=8, routing="sigmoid_grouped",
                    n_group=8, topk_group=4, routed_scaling_factor=2.5, router_dtype="float32")
    x = torch.randn(2048, 512, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(256, 512, device=DEVICE) / 512**0.5
    correction = torch.rand(256, device=DEVICE) / 4
    got_w, got_e = router_topk(x, w, 8, True, routing="sigmoid_grouped", correction_bias=correction, n_group=8,
                               topk_group=4, scaling=2.5, split=split)
    ref_w, ref_e, _ = reference_routing(x.cpu(), w.cpu(), cfg, torch.float64,
                                        e_score_correction_bias=correction.cpu())
    rows = decided_choice(x.cpu(), w.cpu(), cfg, None, correction.cpu())
    assert rows.float().mean() > 0.5 and torch.equal(got_e.cpu()[rows], ref_e[rows])
    torch.testing.assert_close(got_w.cpu()[rows].double(), ref_w[rows].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("fields,bias", ROUTINGS)
def test_the_router_writes_the_logits_it_chose_from_and_chooses_the_same(fields, bias, split):
    """logits_out (NaN before the kernel) holds x @ w^T + bias, every token and expert; asking for
    it changes no weight and no expert. Split: two K chunks, the second 16 wide."""
    experts, top_k = 40, 4
    cfg = MoEConfig(hidden_size=80, ffn_size=32, num_experts=experts, top_k=top_k, dtype="float32", **fields)
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    x, w = torch.randn(70, 80, generator=gen), torch.randn(experts, 80, generator=gen) / 8
    router_bias = torch.randn(experts, generator=gen) if bias else None
    correction = torch.rand(experts, generator=gen) / 4 if cfg.routing == "sigmoid_grouped" else None
    kwargs = dict(routing=cfg.routing, router_bias=None if router_bias is None else router_bias.to(DEVICE),
                  correction_bias=None if correction is None else correction.to(DEVICE), n_group=cfg.n_group,
                  topk_group=cfg.topk_group, scaling=cfg.routed_scaling_factor, split=split)
    logits = torch.full((70, experts), float("nan"), device=DEVICE)
    with_logits = router_topk(x.to(DEVICE), w.to(DEVICE), top_k, cfg.renormalize, logits_out=logits, **kwargs)
    without = router_topk(x.to(DEVICE), w.to(DEVICE), top_k, cfg.renormalize, **kwargs)
    want = x.double() @ w.double().t() + (0 if router_bias is None else router_bias.double())
    assert rel_err(logits.cpu(), want) <= 1e-6
    assert torch.equal(with_logits[1], without[1]) and torch.equal(with_logits[0], without[0])


class LaunchSpy:
    """Records the grids a kernel is launched with and each launch's compile-time settings
    (variants: its last positional argument, a NamedTuple of constexprs, and num_warps), and
    launches it unless run is False; then calls after(args) with the launch's arguments, if given."""

    def __init__(self, kernel, after=None, run=True):
        self.kernel, self.after, self.run, self.grids, self.variants = kernel, after, run, [], set()

    def __getitem__(self, grid):
        self.grids.append(grid)

        def launch(*args, **kwargs):
            self.variants.add((tuple(getattr(v, "value", v) for v in args[-1]), kwargs.get("num_warps")))
            if self.run:
                self.kernel[grid](*args, **kwargs)
            if self.after is not None:
                self.after(args)
        return launch


@pytest.mark.parametrize("tokens", [1, 37])
def test_the_split_dot_gives_the_unsplit_choice_and_logits(monkeypatch, tokens):
    """Split over K chunks (hidden 200 in 7 chunks of 32, the last 8; 256 experts, fp32), the
    router picks the experts it picks unsplit on every decided token, and its logits are the same
    sums added in another order: equal to fp32 rounding."""
    from flashmoe_py.kernels import router

    spy = LaunchSpy(router.router_partial_kernel)
    monkeypatch.setattr(router, "router_partial_kernel", spy)
    x, w, rows = decided_draws(tokens, 256, 200, 8)
    got, want = (torch.full((tokens, 256), float("nan"), device=DEVICE) for _ in range(2))
    split = router_topk(x, w, 8, True, logits_out=got, split=True)
    whole = router_topk(x, w, 8, True, logits_out=want, split=False)
    assert spy.grids == [(triton.cdiv(tokens, router.SMALL_BT), 7)]
    assert rel_err(got.cpu(), want.cpu().double()) <= 1e-6
    assert torch.equal(split[1].cpu()[rows], whole[1].cpu()[rows])
    torch.testing.assert_close(split[0].cpu()[rows], whole[0].cpu()[rows], rtol=1e-5, atol=1e-6)


def test_a_split_router_chooses_from_the_chunk_sums(monkeypatch):
    """The router kernel's logits are the partial kernel's sums, not a dot of its own: one added to
    every sum of chunk 0 after the partial kernel ran comes out in every logit."""
    from flashmoe_py.kernels import router

    def add_one_to_chunk_0(args):
        args[3][0] += 1.0  # partial [chunks, T, E]

    monkeypatch.setattr(router, "router_partial_kernel", LaunchSpy(router.router_partial_kernel, add_one_to_chunk_0))
    x, w, _ = decided_draws(5, 40, 200, 4)
    got, want = (torch.empty(5, 40, device=DEVICE) for _ in range(2))
    router_topk(x, w, 4, True, logits_out=got, split=True)
    router_topk(x, w, 4, True, logits_out=want, split=False)
    torch.testing.assert_close(got, want + 1.0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tokens,hidden,chunks,block_t", [
    (1, 1024, 16, 16),  # fp32 router, 128 experts (512 KiB): K steps of 64; up to 128 tokens one a chunk
    (128, 1024, 16, 16),
    (129, 1024, 8, 16),  # past 128 tokens, at most 8 chunks: two K steps a chunk
    (512, 1024, 8, 16),
    (513, 1024, None, 16),  # past SPLIT_TOKENS: no split, one dot a block of 16 tokens
    (2048, 256, None, 16),
    (2049, 256, None, 64),  # past SMALL_BT_TOKENS: 64 tokens a program (up to 128 experts)
    (1, 1088, 9, 16),  # 17 K steps: two a chunk, so no more than 16 chunks
    (1, 1008, None, 16),  # a router weight under SPLIT_MIN_BYTES
])
def test_the_router_splits_its_dot_and_takes_16_tokens_a_program_by_token_count(monkeypatch, tokens, hidden, chunks,
                                                                                 block_t):
    """Up to SPLIT_TOKENS tokens a router weight of SPLIT_MIN_BYTES or more has its dot split into
    K chunks first (at most MAX_CHUNKS up to WIDE_SPLIT_TOKENS tokens, half as many past them); up
    to SMALL_BT_TOKENS tokens the router kernel takes 16 tokens a program, past them 64 for up to
    128 experts; either way the same experts on every decided token."""
    from flashmoe_py.kernels import router

    partials, routers = LaunchSpy(router.router_partial_kernel), LaunchSpy(router.router_kernel)
    monkeypatch.setattr(router, "router_partial_kernel", partials)
    monkeypatch.setattr(router, "router_kernel", routers)
    x, w, rows = decided_draws(tokens, 128, hidden, 2)
    weights, chosen = router_topk(x, w, 2, True)
    assert partials.grids == ([] if chunks is None else [(triton.cdiv(tokens, router.SMALL_BT), chunks)])
    assert routers.grids == [(triton.cdiv(tokens, block_t),)]
    other = router_topk(x, w, 2, True, split=chunks is None)[1]  # no other choice
    assert torch.equal(chosen.cpu()[rows], other.cpu()[rows])


def test_a_hidden_size_of_one_k_step_is_never_split(monkeypatch):
    """Asked to split (or over SPLIT_MIN_BYTES), a router of one K step (64 hidden, fp32, 128
    experts) has no chunks to split into: no partial-sum launch, the same experts."""
    from flashmoe_py.kernels import router

    partials = LaunchSpy(router.router_partial_kernel)
    monkeypatch.setattr(router, "router_partial_kernel", partials)
    monkeypatch.setattr(router, "SPLIT_MIN_BYTES", 0)
    x, w, rows = decided_draws(5, 128, 64, 2)
    chosen = router_topk(x, w, 2, True)[1]
    assert partials.grids == [] and torch.equal(router_topk(x, w, 2, True, split=True)[1], chosen)


@pytest.mark.parametrize("max_tokens,counts", [(1, [1]), (512, [1]), (513, [1, 513]), (2048, [1, 513]),
                                               (2049, [1, 513, 2049]), (4096, [1, 513, 2049])])
@pytest.mark.parametrize("hidden", [1024, 256])  # a router of 512 KiB (split up to 512 tokens), one of 128 KiB
def test_router_launch_tokens_names_a_count_of_each_launch_up_to_the_layer_s_most(monkeypatch, max_tokens, counts,
                                                                                  hidden):
    """One token count for each launch router_topk takes by default (split, 16 tokens a program
    unsplit, tokens a program by the expert count), fewest first, none past max_tokens: routed at
    those counts (as compile_variants does), the router launches every kernel variant that a call
    of any count up to max_tokens launches (here at each boundary)."""
    from flashmoe_py.kernels import router

    assert router.router_launch_tokens(max_tokens) == counts
    spies = {name: LaunchSpy(getattr(router, name), run=False) for name in ("router_partial_kernel", "router_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(router, name, spy)
    w = torch.randn(128, hidden, device=DEVICE)

    def launched(token_counts):
        for spy in spies.values():
            spy.variants.clear()
        for tokens in token_counts:
            x = torch.randn(tokens, hidden, device=DEVICE)
            router_topk(x, w, 2, True)
            router_topk(x, w, 2, True, logits_out=torch.empty(tokens, 128, device=DEVICE))
        return {(name, variant) for name, spy in spies.items() for variant in spy.variants}

    edges = [t for t in (1, 16, 128, 129, 512, 513, 2048, 2049, max_tokens) if t <= max_tokens]
    assert launched(edges) <= launched(router.router_launch_tokens(max_tokens))
