"""The pieces of tests/gpu/check_ranks_on_one_gpu.py that run on a CPU: every rank's symmetric
buffers (one_rank.symmetric_copies, RankBuffers), the reference it compares each rank's output
with (reference.routed_sum with that rank's routing), and the harness itself in the interpreter."""

import os

import pytest
import torch
from one_rank import RankBuffers, draw_weights, symmetric_copies
from ranks_on_one_gpu import Ranks

from flashmoe_py import MoEConfig, reference_forward
from flashmoe_py.kernels.layout import Geometry
from flashmoe_py.kernels.workspace import Workspace
from flashmoe_py.reference import reference_routing, routed_sum


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_s_peer_table_names_the_other_ranks_own_buffers(world):
    cfg = MoEConfig(hidden_size=32, ffn_size=48, num_experts=8, top_k=2, dtype="float32")
    geo = Geometry.for_config(cfg, world, 16)
    copies = symmetric_copies(geo, torch.float32)
    spaces = [Workspace.allocate(geo, torch.float32, "p2p", "cpu", RankBuffers(copies, r)) for r in range(world)]
    for name in ("recv_x", "combine_y", "count_words", "chunk_flags", "combine_counts"):
        owns = [getattr(ws.sym, name).local.data_ptr() for ws in spaces]
        assert len(set(owns)) == world  # a copy a rank
        for ws in spaces:
            assert getattr(ws.sym, name).peers.tolist() == owns, name


EXTRAS = {  # config fields beyond plain experts, each covered by the reference and the world-W runs
    "plain": {},
    "expert biases, gated shared expert": dict(expert_bias=True, shared_experts=1, shared_expert_gate=True),
    "weight on input, grouped sigmoid routing": dict(weight_on_input=True, routing="sigmoid_grouped", n_group=4,
                                                     topk_group=2, routed_scaling_factor=2.5),
}


@pytest.mark.parametrize("extra", list(EXTRAS))
@pytest.mark.parametrize("activation, top_k", [("swiglu", 2), ("gelu", 4)])
def test_the_sum_with_a_given_routing_is_the_reference_with_its_own(activation, top_k, extra):
    cfg = MoEConfig(hidden_size=32, ffn_size=48, num_experts=8, top_k=top_k, activation=activation,
                    dtype="float32", **EXTRAS[extra])
    full = draw_weights(cfg, torch.Generator().manual_seed(1), "cpu")
    x = torch.randn(40, cfg.hidden_size)
    extras = {n: full[n] for n in ("router_bias", "e_score_correction_bias") if n in full}
    weights, experts, _ = reference_routing(x, full["router_weight"], cfg, torch.float32, **extras)
    layer_weights = {n: full[n] for n in ("bias_in", "bias_out", "shared_w_in", "shared_w_out", "shared_gate_weight")
                     if n in full}
    got = routed_sum(x, weights, experts, None, full["w_in"], full["w_out"], cfg, **layer_weights)
    want = reference_forward(x, config=cfg, **full)
    assert (got - want).norm() / want.norm() <= 1e-6
    other = routed_sum(x, weights, experts.roll(1, dims=0), None, full["w_in"], full["w_out"], cfg, **layer_weights)
    assert (other - want).norm() / want.norm() > 1e-2  # the routing given is the one used


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the fused kernel in the interpreter")
@pytest.mark.parametrize("world, activation, extra", [
    (1, "swiglu", "plain"), (2, "gelu", "expert biases, gated shared expert"), (8, "swiglu", "plain")])
def test_every_rank_s_output_matches_the_reference(world, activation, extra):
    """The harness of check_ranks_on_one_gpu.py in the interpreter, each rank's kernel in a thread
    (the kernel's protocol itself is test_fused_kernel.py's, ranks in processes): uneven token
    counts over several dispatch chunks, the last rank with none, two calls (the epochs' parity
    slots both used), float32 (the interpreter's bf16 products are wrong)."""
    cfg = MoEConfig(hidden_size=32, ffn_size=48, num_experts=32, top_k=4, activation=activation, dtype="float32",
                    **EXTRAS[extra])
    ranks = Ranks(cfg, world, 100, device="cpu")
    for tokens in ([100, 37, 9, 1, 64, 70, 2][:world - 1] + [0 if world > 1 else 50],
                   [1, 100, 33, 17, 0, 8, 99][:world - 1] + [0 if world > 1 else 3]):
        got = ranks.call(tokens)
        assert got["timeouts"] == [None] * world and got["rel_err"] <= 1e-5, (tokens, got)
