"""MoEConfig validation: every invalid value is a ConfigError that names its field."""

import pytest

from flashmoe_py import PRESETS, ConfigError, MoEConfig, preset

GOOD = dict(hidden_size=64, ffn_size=128, num_experts=8, top_k=2)


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 0), ("hidden_size", 3.0), ("ffn_size", -1), ("num_experts", True),
    ("top_k", 0), ("top_k", 9), ("activation", "tanh"), ("dtype", "float16"),
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


def test_roundtrip_and_presets():
    cfg = MoEConfig(**GOOD, activation="gelu", capacity_factor=1.25)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert preset("qwen3_30b_a3b").num_experts == 128
    assert preset("mixtral_8x7b", dtype="float32").dtype == "float32"
    assert {"mixtral_8x7b", "qwen3_30b_a3b", "deepseek_v3"} <= set(PRESETS)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("gpt5")


def test_ffn_in_size_doubles_for_swiglu():
    assert MoEConfig(**GOOD).ffn_in_size == 256
    assert MoEConfig(**GOOD, activation="relu").ffn_in_size == 128
