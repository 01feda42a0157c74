"""The MoE layer configuration: one frozen, validated dataclass and the named presets."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

ACTIVATIONS = ("swiglu", "gelu", "relu", "clamped_swiglu")
GATED_ACTIVATIONS = ("swiglu", "clamped_swiglu")
ROUTINGS = ("softmax_topk", "topk_softmax", "sigmoid_grouped", "topk_sigmoid")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOP_K_LIMIT = 16          # Qwen3-Next routes every token to 10 experts
NUM_EXPERTS_LIMIT = 512   # Qwen3-Next has 512 experts, Kimi-K2 384
GPT_OSS_SWIGLU_ALPHA = 1.702  # gpt-oss's clamped SwiGLU (transformers' GptOssConfig defaults)
GPT_OSS_SWIGLU_LIMIT = 7.0

# The weights every layer has, then the optional ones a config may add, by name; the per-expert
# ones (sharded over ranks along dim 0) are EXPERT_WEIGHTS, the others are replicated on every rank.
WEIGHTS = ("router_weight", "w_in", "w_out")
OPTIONAL_WEIGHTS = ("router_bias", "e_score_correction_bias", "bias_in", "bias_out", "shared_w_in",
                    "shared_w_out", "shared_gate_weight")
EXPERT_WEIGHTS = ("w_in", "w_out", "bias_in", "bias_out")
# names a state_dict written before 2026-12-06 has for weights renamed since (load_state_dict takes them)
RENAMED_WEIGHTS = {"b_in": "bias_in", "b_out": "bias_out"}
# what a config needs to have each weight (named in errors)
WEIGHT_NEEDS = {"router_weight": "a router", "w_in": "experts", "w_out": "experts",
                "router_bias": "router_bias=True", "e_score_correction_bias": "routing='sigmoid_grouped'",
                "bias_in": "expert_bias=True", "bias_out": "expert_bias=True", "shared_w_in": "shared_experts >= 1",
                "shared_w_out": "shared_experts >= 1", "shared_gate_weight": "shared_expert_gate=True"}


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field."""


def _fail(field: str, value, allowed: str) -> None:
    raise ConfigError(f"MoEConfig.{field}={value!r} is invalid: {allowed}")


def is_int(value) -> bool:
    """An int or a numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_int(value):
    """value as a plain int where it is an integer (a numpy integer too, not a bool), else as it
    is (for the caller's check to refuse): sizes read from arrays keep to_dict JSON and the ranks'
    comparisons plain."""
    return int(value) if is_int(value) else value


def as_number(value):
    """value as a plain int or float where it is a real number (numpy's too, not a bool), else as
    it is (for the caller's check to refuse): np.float32(1.0) is taken as np.float64's is."""
    if is_int(value):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


INT_FIELDS = ("hidden_size", "ffn_size", "num_experts", "top_k", "n_group", "topk_group", "shared_experts",
              "shared_ffn_size")


FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32: below, a factor flushes to 0


def is_positive_number(value) -> bool:
    """A real number > 0 that a finite float holds (an int too large for a float, e.g. 10**400, is
    not: math.isfinite would raise OverflowError on it)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:
        return False


def x_shape_problem(x: torch.Tensor, hidden_size: int) -> str | None:
    """What is wrong with x's shape for a layer of hidden_size ([tokens, H] or [batch, seq, H]), or None."""
    if x.is_nested:  # (strided or jagged: a nested tensor has no sizes to read)
        return (f"x is a nested tensor; expected a dense [tokens, {hidden_size}] or [batch, seq, {hidden_size}] "
                "one (torch.cat of its sequences)")
    if x.dim() not in (2, 3) or x.shape[-1] != hidden_size:
        return (f"x has shape {tuple(x.shape)}; expected [tokens, {hidden_size}] or [batch, seq, {hidden_size}] "
                f"(hidden_size={hidden_size})")
    return None


def rows_of(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as contiguous [rows, width] rows, with the row-major strides an empty one too gets (torch
    takes any empty tensor for contiguous, so .contiguous() keeps odd strides that grouped GEMMs
    refuse)."""
    t = t.reshape(-1, width)
    return t.contiguous() if t.numel() else t.clone(memory_format=torch.contiguous_format)


def _float32_factor(value) -> bool:
    """A positive number that float32 holds as a normal number (neither inf nor flushed to 0)."""
    return is_positive_number(value) and FLOAT32_TINY <= value <= FLOAT32_MAX


@dataclass(frozen=True)
class MoEConfig:
    """What defines an MoE layer, independent of how many ranks run it. Names follow the models'
    own configs where they have one (transformers' name in brackets).

    hidden_size:     token width H.
    ffn_size:        expert FFN width F (gated activations: the width of each of the gate and up
                     projections) [moe_intermediate_size, intermediate_size].
    num_experts:     E, global routed-expert count, 1..512 [num_local_experts, n_routed_experts].
    top_k:           experts per token, 1 <= top_k <= min(16, E) [num_experts_per_tok].
    activation:      'swiglu' (silu(x W_gate) * (x W_up)), 'gelu' (exact erf form), 'relu', or
                     'clamped_swiglu' (gpt-oss: gate clamped to <= swiglu_limit, up to
                     +-swiglu_limit, gate * sigmoid(swiglu_alpha * gate) * (up + 1)).
    dtype:           parameter and activation dtype, 'bfloat16' or 'float32'.
    renormalize:     rescale the k routing weights to sum to 1 [norm_topk_prob]: by their sum for
                     'softmax_topk', by their sum + 1e-20 for the sigmoid routings; a no-op for
                     'topk_softmax', whose weights always sum to 1.
    capacity_factor: None = dropless. Otherwise each source rank keeps, per expert, at most
                     ceil(capacity_factor * tokens * top_k / num_experts) token-slots, in order of
                     (choice rank k, token index); the rest are dropped and counted. At most
                     num_experts: from num_experts / top_k on, every slot is kept.

    Routing (logits = x @ router_weight^T [+ router_bias], in fp32):
    routing:         'softmax_topk': softmax over all E experts, the k largest (Mixtral, Qwen, OLMoE);
                     'topk_softmax': the k largest logits, softmax over those k (gpt-oss);
                     'sigmoid_grouped': scores = sigmoid(logits); the k experts with the largest
                        scores + e_score_correction_bias (a per-expert buffer that only steers the
                        choice), among the topk_group best of n_group equal groups (a group scores
                        the sum of its two largest biased scores); weights = the picked experts'
                        unbiased scores (DeepSeek-V3, GLM-4.5, Kimi-K2);
                     'topk_sigmoid': the k largest logits, sigmoid of each (Llama-4).
    router_bias:     logits get a learned per-expert bias (gpt-oss).
    n_group, topk_group: 'sigmoid_grouped' only; E divisible by n_group, 1 <= topk_group <= n_group.
    routed_scaling_factor: the k weights are multiplied by it, after any renormalisation.
    router_dtype:    dtype of router_weight and router_bias; None = dtype. DeepSeek-V3 and GLM-4.5
                     keep their router in 'float32' in bf16 models.

    Experts:
    expert_bias:     both projections have a bias, bias_in [E, F_in] and bias_out [E, H] (gpt-oss).
    swiglu_alpha, swiglu_limit: 'clamped_swiglu' only (gpt-oss: 1.702 and 7.0).
    weight_on_input: the routing weight scales the expert's input, not its output (Llama-4):
                     expert(w * x) instead of w * expert(x).

    Shared experts (dense experts every token goes through, added to the routed output):
    shared_experts:  how many [n_shared_experts]; 0 = none.
    shared_ffn_size: the width of each; None = ffn_size [shared_expert_intermediate_size].
                     They run as one FFN of width shared_experts * shared_ffn_size, with the
                     routed experts' activation and no biases.
    shared_expert_gate: the shared output is scaled by sigmoid(x @ shared_gate_weight^T), a
                     learned scalar per token (Qwen2-MoE, Qwen3-Next).
    """

    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int
    activation: str = "swiglu"
    dtype: str = "bfloat16"
    renormalize: bool = True
    capacity_factor: float | None = None
    routing: str = "softmax_topk"
    router_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_dtype: str | None = None
    expert_bias: bool = False
    swiglu_alpha: float = GPT_OSS_SWIGLU_ALPHA
    swiglu_limit: float = GPT_OSS_SWIGLU_LIMIT
    weight_on_input: bool = False
    shared_experts: int = 0
    shared_ffn_size: int | None = None
    shared_expert_gate: bool = False

    def __post_init__(self) -> None:
        for field in INT_FIELDS:
            object.__setattr__(self, field, as_int(getattr(self, field)))
        for field in ("capacity_factor", "routed_scaling_factor", "swiglu_alpha", "swiglu_limit"):
            object.__setattr__(self, field, as_number(getattr(self, field)))
        for field in ("hidden_size", "ffn_size", "num_experts", "top_k"):
            value = getattr(self, field)
            if not is_int(value) or value < 1:
                _fail(field, value, "must be a positive int")
        if self.num_experts > NUM_EXPERTS_LIMIT:
            _fail("num_experts", self.num_experts, f"must be <= {NUM_EXPERTS_LIMIT}")
        if self.top_k > min(TOP_K_LIMIT, self.num_experts):
            _fail("top_k", self.top_k,
                  f"must be <= min({TOP_K_LIMIT}, num_experts={self.num_experts})")
        if self.activation not in ACTIVATIONS:
            _fail("activation", self.activation, f"must be one of {ACTIVATIONS}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"must be one of {tuple(DTYPES)}")
        router_dtype = self.router_dtype
        if router_dtype is not None and (not isinstance(router_dtype, str) or router_dtype not in DTYPES):
            _fail("router_dtype", self.router_dtype, f"must be None (= dtype) or one of {tuple(DTYPES)}")
        for field in ("renormalize", "router_bias", "expert_bias", "weight_on_input", "shared_expert_gate"):
            if not isinstance(getattr(self, field), bool):
                _fail(field, getattr(self, field), "must be a bool")
        cf = self.capacity_factor
        # Upper bound num_experts: a rank sends an expert at most one slot per token, so a capacity of
        # `tokens` (capacity_factor >= num_experts / top_k) already keeps every slot; anything above
        # changes nothing. num_experts (>= num_experts / top_k) admits every value that matters, with
        # headroom for round numbers, and bounds capacity() by tokens * top_k, a sane int (1e300 would
        # overflow math.ceil in every forward).
        if cf is not None and not (is_positive_number(cf) and cf <= self.num_experts):
            _fail("capacity_factor", cf, "must be None (dropless) or a finite number in "
                                         f"(0, num_experts={self.num_experts}]; any value >= "
                                         "num_experts / top_k already keeps every slot")
        self._check_routing()
        self._check_clamped_swiglu()
        self._check_shared_experts()

    def _check_routing(self) -> None:
        if self.routing not in ROUTINGS:
            _fail("routing", self.routing, f"must be one of {ROUTINGS}")
        for field in ("n_group", "topk_group"):
            value = getattr(self, field)
            if not is_int(value) or value < 1:
                _fail(field, value, "must be a positive int")
            if value != 1 and self.routing != "sigmoid_grouped":
                _fail(field, value, "only routing='sigmoid_grouped' has expert groups "
                                    f"(routing={self.routing!r}); leave it at 1")
        if self.num_experts % self.n_group:
            _fail("n_group", self.n_group, f"must divide num_experts={self.num_experts}")
        per_group = self.num_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            _fail("n_group", self.n_group, "a group scores its two best experts: it needs >= 2 experts "
                                           f"per group (num_experts={self.num_experts})")
        if self.topk_group > self.n_group:
            _fail("topk_group", self.topk_group, f"must be <= n_group={self.n_group}")
        if self.top_k > self.topk_group * per_group:
            _fail("top_k", self.top_k, f"must be <= topk_group * num_experts / n_group = "
                                       f"{self.topk_group * per_group}: the experts of the kept groups")
        if not _float32_factor(self.routed_scaling_factor):
            _fail("routed_scaling_factor", self.routed_scaling_factor,
                  f"must be a number in [{FLOAT32_TINY:.4g}, {FLOAT32_MAX:.4g}] (the routing weights are float32)")

    def _check_clamped_swiglu(self) -> None:
        defaults = {"swiglu_alpha": GPT_OSS_SWIGLU_ALPHA, "swiglu_limit": GPT_OSS_SWIGLU_LIMIT}
        for field, default in defaults.items():
            value = getattr(self, field)
            if not _float32_factor(value):
                _fail(field, value, f"must be a number in [{FLOAT32_TINY:.4g}, {FLOAT32_MAX:.4g}] (the activation "
                                    "computes in float32)")
            if value != default and self.activation != "clamped_swiglu":
                _fail(field, value, "only activation='clamped_swiglu' uses it "
                                    f"(activation={self.activation!r})")

    def _check_shared_experts(self) -> None:
        if not is_int(self.shared_experts) or self.shared_experts < 0:
            _fail("shared_experts", self.shared_experts, "must be an int >= 0")
        size = self.shared_ffn_size
        if size is not None and (not is_int(size) or size < 1):
            _fail("shared_ffn_size", size, "must be None (= ffn_size) or a positive int")
        if self.shared_experts == 0:
            for field, unset in (("shared_ffn_size", None), ("shared_expert_gate", False)):
                if getattr(self, field) != unset:
                    _fail(field, getattr(self, field), "needs shared_experts >= 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def router_torch_dtype(self) -> torch.dtype:
        return DTYPES[self.router_dtype or self.dtype]

    @property
    def gated(self) -> bool:
        """True when the first projection has two halves (gate | up)."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def ffn_in_size(self) -> int:
        """Columns of the first expert weight: 2F for gated activations (gate then up), F otherwise."""
        return 2 * self.ffn_size if self.gated else self.ffn_size

    @property
    def shared_width(self) -> int:
        """F_s: the width of the shared FFN, all shared experts side by side (0 when none)."""
        return self.shared_experts * (self.shared_ffn_size or self.ffn_size)

    @property
    def shared_ffn_in_size(self) -> int:
        """Columns of shared_w_in: 2 F_s for gated activations (gate/up pairs), F_s otherwise."""
        return 2 * self.shared_width if self.gated else self.shared_width

    def weight_shapes(self, experts: int | None = None) -> dict[str, tuple[int, ...]]:
        """Every weight of a layer with this config, by name, in order: WEIGHTS, then the
        OPTIONAL_WEIGHTS this config has. experts: how many experts the per-expert ones
        (EXPERT_WEIGHTS) hold; default num_experts, the full (unsharded) layer.

        router_weight [E, H]; w_in [E, H, F_in]; w_out [E, F, H]; router_bias [E];
        e_score_correction_bias [E] ('sigmoid_grouped'); bias_in [E, F_in] and bias_out [E, H]
        (expert_bias); shared_w_in [H, F_s_in] and shared_w_out [F_s, H] (shared experts);
        shared_gate_weight [1, H]. Gated, the last dimension of w_in, bias_in and shared_w_in holds
        gate and up columns: as halves in full weights (reference_forward, load_full_weights),
        in pairs in a layer's own parameters (gate_up.py)."""
        E, H, F = self.num_experts, self.hidden_size, self.ffn_size
        L = E if experts is None else experts
        Fs = self.shared_width
        shapes = {"router_weight": (E, H), "w_in": (L, H, self.ffn_in_size), "w_out": (L, F, H)}
        if self.router_bias:
            shapes["router_bias"] = (E,)
        if self.routing == "sigmoid_grouped":
            shapes["e_score_correction_bias"] = (E,)
        if self.expert_bias:
            shapes["bias_in"], shapes["bias_out"] = (L, self.ffn_in_size), (L, H)
        if self.shared_experts:
            shapes["shared_w_in"], shapes["shared_w_out"] = (H, 2 * Fs if self.gated else Fs), (Fs, H)
        if self.shared_expert_gate:
            shapes["shared_gate_weight"] = (1, H)
        return shapes

    def check_weights(self, weights: dict) -> None:
        """Raise, naming it, for the first of `weights` (name -> tensor or None) that this
        config's layer lacks but is given, has but is None, is not a tensor (TypeError), or has
        another shape than weight_shapes() gives (every expert's)."""
        shapes = self.weight_shapes()
        for name, t in weights.items():
            if name not in shapes:
                if t is not None:
                    raise ValueError(f"{name} was given, but only a layer with {WEIGHT_NEEDS[name]} has it")
            elif t is None:
                raise ValueError(f"{name} is missing: this config has {WEIGHT_NEEDS[name]}")
            elif not isinstance(t, torch.Tensor):
                hint = " (torch.from_numpy converts it)" if type(t).__module__ == "numpy" else ""
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}{hint}")
            elif tuple(t.shape) != shapes[name]:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shapes[name]}")

    def weight_dtype(self, name: str) -> torch.dtype:
        """The dtype a layer keeps weight `name` in: the router's in router_dtype, the correction
        bias in float32 (a selection threshold, as transformers keeps it), the rest in dtype."""
        if name in ("router_weight", "router_bias"):
            return self.router_torch_dtype
        return torch.float32 if name == "e_score_correction_bias" else self.torch_dtype

    def local_experts(self, world_size: int) -> int:
        """Experts per rank; raises unless num_experts divides evenly over world_size."""
        if not is_int(world_size) or world_size < 1:
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


# Real shapes and routing, as the models' published config.json files give them. Where a comment
# says "= ...Config defaults", transformers 5.24's configuration class has the same values (checked
# against it); the others were written without network access, from the published files.
PRESETS: dict[str, MoEConfig] = {
    # mistralai/Mixtral-8x7B-v0.1: intermediate_size 14336, 8 local experts, 2 per token.
    "mixtral_8x7b": MoEConfig(hidden_size=4096, ffn_size=14336, num_experts=8, top_k=2),
    # Qwen/Qwen3-30B-A3B: moe_intermediate_size 768, 128 experts, 8 per token, norm_topk_prob.
    "qwen3_30b_a3b": MoEConfig(hidden_size=2048, ffn_size=768, num_experts=128, top_k=8),
    # deepseek-ai/DeepSeek-V3 (= DeepseekV3Config defaults): moe_intermediate_size 2048,
    # n_routed_experts 256, 8 per token, n_group 8, topk_group 4, norm_topk_prob,
    # routed_scaling_factor 2.5, n_shared_experts 1.
    "deepseek_v3": MoEConfig(hidden_size=7168, ffn_size=2048, num_experts=256, top_k=8,
                             routing="sigmoid_grouped", n_group=8, topk_group=4,
                             routed_scaling_factor=2.5, shared_experts=1),
    # moonshotai/Kimi-K2-Instruct (DeepSeek-V3's architecture): 384 routed experts, 8 per token,
    # n_group 1, topk_group 1, norm_topk_prob, routed_scaling_factor 2.827, n_shared_experts 1.
    "kimi_k2": MoEConfig(hidden_size=7168, ffn_size=2048, num_experts=384, top_k=8,
                         routing="sigmoid_grouped", routed_scaling_factor=2.827, shared_experts=1),
    # zai-org/GLM-4.5: hidden_size 5120, moe_intermediate_size 1536, n_routed_experts 160, 8 per
    # token, n_group 1, topk_group 1, norm_topk_prob, routed_scaling_factor 2.5, n_shared_experts 1.
    # (Glm4MoeConfig's defaults are GLM-4.5-Air's: 4096, 1408, 128 experts, scaling 1.0.)
    "glm45": MoEConfig(hidden_size=5120, ffn_size=1536, num_experts=160, top_k=8,
                       routing="sigmoid_grouped", routed_scaling_factor=2.5, shared_experts=1),
    # openai/gpt-oss-120b (= GptOssConfig defaults): hidden and intermediate 2880, 128 local
    # experts, 4 per token, router and expert biases, swiglu_alpha 1.702, swiglu_limit 7.0.
    "gpt_oss_120b": MoEConfig(hidden_size=2880, ffn_size=2880, num_experts=128, top_k=4,
                              activation="clamped_swiglu", routing="topk_softmax", router_bias=True,
                              expert_bias=True),
    # meta-llama/Llama-4-Scout-17B-16E (= Llama4TextConfig defaults): hidden 5120, intermediate
    # 8192 for the 16 routed experts and the one shared expert, 1 per token, sigmoid weight on
    # the expert's input.
    "llama4_scout": MoEConfig(hidden_size=5120, ffn_size=8192, num_experts=16, top_k=1,
                              routing="topk_sigmoid", renormalize=False, weight_on_input=True,
                              shared_experts=1),
    # Qwen/Qwen3-Next-80B-A3B-Instruct (= Qwen3NextConfig defaults): moe_intermediate_size 512,
    # 512 experts, 10 per token, norm_topk_prob, one shared expert of 512 with a sigmoid gate.
    "qwen3_next": MoEConfig(hidden_size=2048, ffn_size=512, num_experts=512, top_k=10,
                            shared_experts=1, shared_ffn_size=512, shared_expert_gate=True),
    # Small enough for a 2-core CPU: the fresh-machine benchmark and smoke tests.
    "tiny": MoEConfig(hidden_size=256, ffn_size=512, num_experts=8, top_k=2, dtype="float32"),
}


def preset(name: str, **overrides) -> MoEConfig:
    """A named preset, optionally with fields overridden (e.g. dtype='float32')."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
