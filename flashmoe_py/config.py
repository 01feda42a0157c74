"""The MoE layer configuration: one frozen, validated dataclass and the named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

ACTIVATIONS = ("swiglu", "gelu", "relu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_TOP_K = 8


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field."""


def _fail(field: str, value, allowed: str) -> None:
    raise ConfigError(f"MoEConfig.{field}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class MoEConfig:
    """What defines an MoE layer, independent of how many ranks run it.

    hidden_size:     token width H.
    ffn_size:        expert FFN width F (for swiglu: the width of each of the gate and up projections).
    num_experts:     E, global expert count.
    top_k:           experts per token, 1 <= top_k <= min(8, E).
    activation:      'swiglu' (silu(x W_gate) * (x W_up)), 'gelu' (exact erf form) or 'relu'.
    dtype:           parameter and activation dtype, 'bfloat16' or 'float32'.
    renormalize:     after softmax over all E experts and top-k, rescale the k weights to sum to 1.
    capacity_factor: None = dropless. Otherwise each source rank keeps, per expert, at most
                     ceil(capacity_factor * tokens * top_k / num_experts) token-slots, in order of
                     (choice rank k, token index); the rest are dropped and counted.
    """

    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int
    activation: str = "swiglu"
    dtype: str = "bfloat16"
    renormalize: bool = True
    capacity_factor: float | None = None

    def __post_init__(self) -> None:
        for field in ("hidden_size", "ffn_size", "num_experts", "top_k"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(field, value, "must be a positive int")
        if self.top_k > min(MAX_TOP_K, self.num_experts):
            _fail("top_k", self.top_k,
                  f"must be <= min({MAX_TOP_K}, num_experts={self.num_experts})")
        if self.activation not in ACTIVATIONS:
            _fail("activation", self.activation, f"must be one of {ACTIVATIONS}")
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"must be one of {tuple(DTYPES)}")
        if not isinstance(self.renormalize, bool):
            _fail("renormalize", self.renormalize, "must be a bool")
        cf = self.capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float))
                               or not math.isfinite(cf) or cf <= 0):
            _fail("capacity_factor", cf, "must be None (dropless) or a finite number > 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def gated(self) -> bool:
        """True when the first projection has two halves (gate | up)."""
        return self.activation == "swiglu"

    @property
    def ffn_in_size(self) -> int:
        """Columns of the first expert weight: 2F for swiglu (gate then up), F otherwise."""
        return 2 * self.ffn_size if self.gated else self.ffn_size

    def local_experts(self, world_size: int) -> int:
        """Experts per rank; raises unless num_experts divides evenly over world_size."""
        if not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world_size={world_size!r} must be a positive int")
        if self.num_experts % world_size:
            raise ConfigError(
                f"MoEConfig.num_experts={self.num_experts} is not divisible by "
                f"world_size={world_size}: every rank must hold the same number of experts")
        return self.num_experts // world_size

    def capacity(self, tokens: int) -> int | None:
        """Token-slots kept per expert on a rank that routes `tokens` tokens (None = dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * tokens * self.top_k / self.num_experts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MoEConfig:
        return cls(**d)

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, MoEConfig] = {
    "mixtral_8x7b": MoEConfig(hidden_size=4096, ffn_size=14336, num_experts=8, top_k=2),
    "qwen3_30b_a3b": MoEConfig(hidden_size=2048, ffn_size=768, num_experts=128, top_k=8),
    "deepseek_v3": MoEConfig(hidden_size=7168, ffn_size=2048, num_experts=256, top_k=8),
    # Small enough for a 2-core CPU: the fresh-machine benchmark and smoke tests.
    "tiny": MoEConfig(hidden_size=256, ffn_size=512, num_experts=8, top_k=2, dtype="float32"),
}


def preset(name: str, **overrides) -> MoEConfig:
    """A named preset, optionally with fields overridden (e.g. dtype='float32')."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
