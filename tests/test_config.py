"""MoEConfig validation: every invalid value is a ConfigError that names its field."""

import json

import numpy as np
import pytest
import torch

from flashmoe_py import PRESETS, ConfigError, MoEConfig, preset
from flashmoe_py.options import FusedOptions

GOOD = dict(hidden_size=64, ffn_size=128, num_experts=8, top_k=2)


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 0), ("hidden_size", 3.0), ("ffn_size", -1), ("num_experts", True),
    ("top_k", 0), ("top_k", 17), ("activation", "tanh"), ("dtype", "float16"), ("dtype", ["float32"]),
    ("renormalize", 1), ("capacity_factor", 0.0), ("capacity_factor", float("inf")),
])
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"MoEConfig.{field}="):
        MoEConfig(**{**GOOD, field: value})


def test_top_k_above_num_experts_is_refused():
    with pytest.raises(ConfigError, match="top_k.*num_experts=4"):
        MoEConfig(**{**GOOD, "num_experts": 4, "top_k": 5})


def test_local_experts_needs_divisibility():
    assert MoEConfig(**GOOD).local_experts(4) == 2
    with pytest.raises(ConfigError, match="num_experts=8 is not divisible by world_size=3"):
        MoEConfig(**GOOD).local_experts(3)


def test_capacity_rounds_up_and_dropless_is_none():
    assert MoEConfig(**GOOD).capacity(100) is None
    assert MoEConfig(**GOOD, capacity_factor=1.0).capacity(10) == 3  # ceil(10 * 2 / 8)


@pytest.mark.parametrize("value", [1e300, 10**400, 8.001, float("nan"), -0.5])
def test_capacity_factor_is_finite_positive_and_at_most_num_experts(value):
    """From num_experts / top_k on every slot is kept; num_experts bounds it, so capacity() stays a
    sane int (1e300 overflowed in every forward; 10**400 inside validation)."""
    with pytest.raises(ConfigError, match="MoEConfig.capacity_factor=.*finite number in \\(0, num_experts=8\\]"):
        MoEConfig(**GOOD, capacity_factor=value)
    assert MoEConfig(**GOOD, capacity_factor=8).capacity(10) == 20  # every slot: tokens * top_k
    assert MoEConfig(**GOOD, capacity_factor=4.0).capacity(10) == 10  # num_experts / top_k: tokens


def test_roundtrip_and_presets():
    cfg = MoEConfig(**GOOD, activation="gelu", capacity_factor=1.25)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert preset("qwen3_30b_a3b").num_experts == 128
    assert preset("mixtral_8x7b", dtype="float32").dtype == "float32"
    assert {"mixtral_8x7b", "qwen3_30b_a3b", "deepseek_v3"} <= set(PRESETS)
    for name in ("gpt5", ["mixtral_8x7b"]):  # a list was a bare TypeError (unhashable)
        with pytest.raises(ConfigError, match="unknown preset"):
            preset(name)


def test_ffn_in_size_doubles_for_swiglu():
    assert MoEConfig(**GOOD).ffn_in_size == 256
    assert MoEConfig(**GOOD, activation="relu").ffn_in_size == 128


ROUTED = dict(GOOD, routing="sigmoid_grouped", n_group=4, topk_group=2)


@pytest.mark.parametrize("field,value,match", [
    ("routing", "sparsemixer", "must be one of"),
    ("router_bias", 1, "must be a bool"),
    ("n_group", 3, "must divide num_experts=8"),
    ("n_group", 8, "needs >= 2 experts per group"),
    ("n_group", 0, "must be a positive int"),
    ("topk_group", 5, "must be <= n_group=4"),
    ("routed_scaling_factor", 0.0, "a number in \\[1.175e-38, 3.403e\\+38\\]"),
    ("routed_scaling_factor", float("nan"), "a number in"),
    ("routed_scaling_factor", 1e39, "the routing weights are float32"),  # every token's output inf
    ("routed_scaling_factor", 1e-46, "the routing weights are float32"),  # flushed to 0: every output 0
    ("router_dtype", "float16", "None \\(= dtype\\) or one of"),
    ("router_dtype", ["float32"], "None \\(= dtype\\) or one of"),  # was torch's "unhashable type"
])
def test_invalid_routing_value_names_the_field(field, value, match):
    with pytest.raises(ConfigError, match=f"MoEConfig.{field}=.*{match}"):
        MoEConfig(**{**ROUTED, field: value})


def test_groups_belong_to_grouped_sigmoid_routing_only():
    with pytest.raises(ConfigError, match="MoEConfig.n_group=2 .*only routing='sigmoid_grouped'"):
        MoEConfig(**GOOD, n_group=2)
    with pytest.raises(ConfigError, match="MoEConfig.topk_group=2 .*only routing='sigmoid_grouped'"):
        MoEConfig(**GOOD, routing="topk_sigmoid", topk_group=2)


def test_top_k_must_fit_the_kept_groups():
    """Two kept groups of 2 experts each leave 4 experts to pick from."""
    with pytest.raises(ConfigError, match="MoEConfig.top_k=5 .*topk_group \\* num_experts / n_group = 4"):
        MoEConfig(**{**ROUTED, "top_k": 5})


def test_limits_are_16_per_token_and_512_experts():
    assert MoEConfig(hidden_size=8, ffn_size=8, num_experts=512, top_k=16).top_k == 16
    with pytest.raises(ConfigError, match="MoEConfig.top_k=17 .*min\\(16, num_experts=512\\)"):
        MoEConfig(hidden_size=8, ffn_size=8, num_experts=512, top_k=17)
    with pytest.raises(ConfigError, match="MoEConfig.num_experts=513 .*<= 512"):
        MoEConfig(hidden_size=8, ffn_size=8, num_experts=513, top_k=2)


@pytest.mark.parametrize("field,value,match", [
    ("expert_bias", "yes", "must be a bool"),
    ("weight_on_input", None, "must be a bool"),
    ("swiglu_limit", 5.0, "only activation='clamped_swiglu' uses it"),
    ("swiglu_alpha", 1.0, "only activation='clamped_swiglu' uses it"),
    ("shared_experts", -1, "int >= 0"),
    ("shared_ffn_size", 16, "needs shared_experts >= 1"),
    ("shared_expert_gate", True, "needs shared_experts >= 1"),
])
def test_invalid_expert_value_names_the_field(field, value, match):
    with pytest.raises(ConfigError, match=f"MoEConfig.{field}=.*{match}"):
        MoEConfig(**{**GOOD, field: value})


@pytest.mark.parametrize("field", ["swiglu_alpha", "swiglu_limit"])
@pytest.mark.parametrize("value", [0, -1.0, float("inf"), True, 1e39, 1e-46])
def test_clamped_swiglu_constants_are_positive_and_float32_normal(field, value):
    """1e39 became inf in the float32 activation (a zero token's output NaN), 1e-46 zero."""
    with pytest.raises(ConfigError, match=f"MoEConfig.{field}=.*a number in .*computes in float32"):
        MoEConfig(**GOOD, activation="clamped_swiglu", **{field: value})


def test_shared_ffn_size_must_be_positive():
    with pytest.raises(ConfigError, match="MoEConfig.shared_ffn_size=0 .*positive int"):
        MoEConfig(**GOOD, shared_experts=1, shared_ffn_size=0)


def test_weight_shapes_name_every_weight_of_the_config():
    cfg = MoEConfig(**ROUTED, activation="clamped_swiglu", router_bias=True, expert_bias=True,
                    shared_experts=2, shared_ffn_size=16, shared_expert_gate=True)
    assert cfg.weight_shapes(experts=2) == {
        "router_weight": (8, 64), "w_in": (2, 64, 256), "w_out": (2, 128, 64), "router_bias": (8,),
        "e_score_correction_bias": (8,), "bias_in": (2, 256), "bias_out": (2, 64),
        "shared_w_in": (64, 64), "shared_w_out": (32, 64), "shared_gate_weight": (1, 64)}
    assert list(MoEConfig(**GOOD).weight_shapes()) == ["router_weight", "w_in", "w_out"]


def test_check_weights_names_the_weight():
    cfg = MoEConfig(**GOOD, router_bias=True)
    with pytest.raises(ValueError, match="router_bias is missing: this config has router_bias=True"):
        cfg.check_weights({"router_bias": None})
    with pytest.raises(ValueError, match="bias_in was given, but only a layer with expert_bias=True has it"):
        cfg.check_weights({"bias_in": torch.zeros(8, 256)})
    with pytest.raises(TypeError, match="router_bias must be a torch.Tensor, got ndarray .*torch.from_numpy"):
        cfg.check_weights({"router_bias": np.zeros(8)})
    with pytest.raises(ValueError, match="router_bias has shape \\(9,\\), expected \\(8,\\)"):
        cfg.check_weights({"router_bias": torch.zeros(9)})


def test_new_fields_roundtrip():
    cfg = MoEConfig(**ROUTED, routed_scaling_factor=2.5, shared_experts=1, router_dtype="float32")
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg


def test_presets_carry_the_models_routing():
    ds = preset("deepseek_v3")
    assert (ds.routing, ds.n_group, ds.topk_group, ds.top_k, ds.routed_scaling_factor, ds.shared_experts,
            ds.renormalize) == ("sigmoid_grouped", 8, 4, 8, 2.5, 1, True)
    assert (ds.hidden_size, ds.ffn_size, ds.num_experts) == (7168, 2048, 256)
    kimi = preset("kimi_k2")
    assert (kimi.num_experts, kimi.n_group, kimi.routed_scaling_factor) == (384, 1, 2.827)
    glm = preset("glm45")
    assert (glm.hidden_size, glm.ffn_size, glm.num_experts, glm.routed_scaling_factor) == (5120, 1536, 160, 2.5)
    oss = preset("gpt_oss_120b")
    assert (oss.routing, oss.router_bias, oss.expert_bias, oss.activation, oss.swiglu_alpha,
            oss.swiglu_limit, oss.num_experts, oss.top_k) == ("topk_softmax", True, True, "clamped_swiglu",
                                                              1.702, 7.0, 128, 4)
    scout = preset("llama4_scout")
    assert (scout.routing, scout.top_k, scout.weight_on_input, scout.renormalize, scout.shared_width) == (
        "topk_sigmoid", 1, True, False, 8192)
    nxt = preset("qwen3_next")
    assert (nxt.num_experts, nxt.top_k, nxt.shared_width, nxt.shared_expert_gate) == (512, 10, 512, True)


@pytest.mark.parametrize("real", [np.float32, np.float64])
def test_numpy_floats_are_taken_as_the_floats_they_are(real):
    """np.float32 was refused ("must be a finite number") where np.float64 was taken, and stored as
    np.float64; both are plain floats now (to_dict stays JSON, the ranks compare plain values)."""
    cfg = MoEConfig(hidden_size=32, ffn_size=48, num_experts=8, top_k=2, capacity_factor=real(1.5),
                    routed_scaling_factor=real(2.5))
    assert type(cfg.capacity_factor) is float and cfg.capacity_factor == 1.5 and cfg.routed_scaling_factor == 2.5
    json.dumps(cfg.to_dict())
    assert type(FusedOptions(timeout_s=real(3.0)).timeout_s) is float


def test_numpy_integers_are_taken_as_the_ints_they_are():
    """As placements take them: sizes read from an array are numpy integers. Stored as ints, so
    to_dict stays JSON and the ranks' comparison sees the same values."""
    cfg = MoEConfig(hidden_size=np.int64(32), ffn_size=np.int32(48), num_experts=np.int64(8), top_k=np.int64(2),
                    shared_experts=np.int64(1), shared_ffn_size=np.int64(16))
    assert cfg == MoEConfig(hidden_size=32, ffn_size=48, num_experts=8, top_k=2, shared_experts=1,
                            shared_ffn_size=16)
    assert all(type(v) is int for v in (cfg.hidden_size, cfg.ffn_size, cfg.num_experts, cfg.top_k))
    json.dumps(cfg.to_dict())
    assert cfg.local_experts(np.int64(2)) == 4
    with pytest.raises(ConfigError, match="top_k=True"):
        MoEConfig(hidden_size=32, ffn_size=48, num_experts=8, top_k=True)
