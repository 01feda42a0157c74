"""The layer's gate/up layout (flashmoe_py/gate_up.py): pairs of g gate columns and their g up
columns, g the largest power of two up to 128 dividing the FFN width, and its conversions."""

import pytest
import torch

from flashmoe_py import MoEConfig, MoELayer, reference_forward
from flashmoe_py.gate_up import HALVES_VERSION, gate_and_up, pair_width, to_halves, to_interleaved, to_pairs
from flashmoe_py.reference import activate


@pytest.mark.parametrize("ffn,g", [(14336, 128), (768, 128), (2880, 64), (48, 16), (40, 8), (7, 1)])
def test_pair_width_is_the_largest_power_of_two_up_to_128_dividing_the_ffn(ffn, g):
    assert pair_width(ffn) == g


@pytest.mark.parametrize("ffn", [2880, 48, 7])
def test_gate_column_f_sits_at_2g_f_div_g_plus_f_mod_g_and_its_up_column_g_further(ffn):
    halves = torch.arange(2 * ffn).repeat(3, 1)  # value = the column's index in halves
    pairs = to_pairs(halves)
    g = pair_width(ffn)
    for f in (0, 1, g - 1, g, ffn - 1):
        assert pairs[0, 2 * g * (f // g) + f % g] == f and pairs[0, 2 * g * (f // g) + f % g + g] == ffn + f
    assert torch.equal(to_halves(pairs), halves)
    interleaved = torch.stack([halves[:, :ffn], halves[:, ffn:]], dim=-1).flatten(-2)
    assert torch.equal(to_pairs(interleaved, "interleaved"), pairs)
    assert torch.equal(to_interleaved(pairs), interleaved)
    gate, up = gate_and_up(pairs)
    assert torch.equal(gate.flatten(-2), halves[:, :ffn]) and torch.equal(up.flatten(-2), halves[:, ffn:])


def test_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="gate_up_layout='gate_first'"):
        to_pairs(torch.zeros(2, 8), "gate_first")


@pytest.mark.parametrize("activation", ["swiglu", "clamped_swiglu"])
def test_the_paired_activation_is_the_halves_activation(activation):
    h = torch.randn(5, 2 * 2880) * 4
    assert torch.equal(activate(to_pairs(h), activation, paired=True), activate(h, activation))


def test_the_layer_keeps_pairs_and_speaks_halves():
    cfg = MoEConfig(hidden_size=16, ffn_size=48, num_experts=2, top_k=1, expert_bias=True, shared_experts=1,
                    shared_ffn_size=40, dtype="float32")
    layer = MoELayer(cfg, seed=5)
    full = layer.full_weight_dict()
    for name in ("w_in", "bias_in", "shared_w_in"):
        assert torch.equal(getattr(layer, name).detach(), to_pairs(full[name]))
    inter = layer.full_weight_dict("interleaved")  # as gpt-oss lays them out
    for name in ("w_in", "bias_in", "shared_w_in"):
        assert torch.equal(to_pairs(inter[name], "interleaved"), getattr(layer, name).detach())
    with pytest.raises(ValueError, match="gate_up_layout='pairs'"):
        layer.full_weight_dict("pairs")
    x = torch.randn(7, 16)
    with torch.no_grad():
        ref = reference_forward(x, config=cfg, compute_dtype=torch.float64, **full)
        assert float((layer(x).double() - ref).norm() / ref.norm()) <= 1e-6


def test_a_state_dict_of_halves_marked_so_loads_converted():
    cfg = MoEConfig(hidden_size=16, ffn_size=48, num_experts=2, top_k=1, expert_bias=True, dtype="float32")
    saved = MoELayer(cfg, seed=1)
    state = saved.state_dict()
    assert int(state["gate_up_pairs"]) == 1
    for current in (state, dict(state)):  # a plain dict (safetensors, dcp) has no _metadata: the same
        fresh = MoELayer(cfg, seed=2)
        fresh.load_state_dict(current)
        assert torch.equal(fresh.w_in, saved.w_in) and torch.equal(fresh.bias_in, saved.bias_in)
    old = {n: (to_halves(t) if n in ("w_in", "bias_in") else t) for n, t in state.items() if n != "gate_up_pairs"}
    older = MoELayer(cfg, seed=3)
    older.load_state_dict({**old, "gate_up_pairs": torch.tensor(HALVES_VERSION)})  # a checkpoint marked by hand
    assert torch.equal(older.w_in, saved.w_in) and torch.equal(older.bias_in, saved.bias_in)
    unknown = {**state, "gate_up_pairs": torch.tensor(7)}
    with pytest.raises(RuntimeError, match='Missing key.*"gate_up_pairs"'):
        MoELayer(cfg).load_state_dict(old)
    with pytest.raises(RuntimeError, match="gate_up_pairs=7"):
        MoELayer(cfg).load_state_dict(unknown)


def test_a_gated_state_dict_without_its_layout_entry_is_refused_not_guessed():
    """A parameters-only dict of a current layer and an old checkpoint of halves look alike: strict
    loading refuses it (the entry is a missing key) instead of converting pairs as if they were
    halves; strict=False takes the layer's own layout and lists the entry as missing."""
    cfg = MoEConfig(hidden_size=16, ffn_size=48, num_experts=2, top_k=1, dtype="float32")
    source = MoELayer(cfg, seed=1)
    params = {n: p.detach().clone() for n, p in source.named_parameters()}
    with pytest.raises(RuntimeError, match='Missing key.*"gate_up_pairs"'):
        MoELayer(cfg, seed=2).load_state_dict(params)
    loose = MoELayer(cfg, seed=2)
    assert loose.load_state_dict(params, strict=False).missing_keys == ["gate_up_pairs"]
    assert torch.equal(loose.w_in, source.w_in)
    plain = MoEConfig(hidden_size=16, ffn_size=48, num_experts=2, top_k=1, activation="gelu", dtype="float32")
    ungated, other = MoELayer(plain, seed=3), MoELayer(plain, seed=4)
    ungated.load_state_dict({n: p.detach() for n, p in other.named_parameters()})  # no layout
    assert torch.equal(ungated.w_in, other.w_in) and not torch.equal(ungated.w_in, MoELayer(plain, seed=3).w_in)


def test_a_layer_without_a_gate_loads_a_state_dict_marked_halves_unchanged():
    """gate_up_pairs=0 says "halves" of a gated layer's weights; an ungated layer has one F-wide
    block, nothing to convert (a mixed model's old checkpoint is marked once for every layer)."""
    cfg = MoEConfig(hidden_size=16, ffn_size=48, num_experts=2, top_k=1, activation="gelu", dtype="float32")
    saved = MoELayer(cfg, seed=1)
    fresh = MoELayer(cfg, seed=2)
    fresh.load_state_dict({**saved.state_dict(), "gate_up_pairs": torch.tensor(HALVES_VERSION)})
    assert torch.equal(fresh.w_in, saved.w_in)
