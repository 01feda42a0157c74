"""Hugging Face transformers MoE blocks -> MoELayer, and a one-call model patcher.

Supported (transformers 5.x layout: router `gate.weight` [E, H], experts `gate_up_proj` [E, 2F, H]
and `down_proj` [E, H, F], SiLU-gated): Mixtral, Qwen3-MoE, Qwen2-MoE (its shared expert and
sigmoid gate run beside the layer, outside the fused path) and OLMoE. DeepSeek-V3's router
(sigmoid scores, expert groups, a correction bias, a scaling factor) is not softmax top-k, so its
blocks are reported as unsupported rather than converted to something else."""

from __future__ import annotations

import torch
from torch import nn

from .config import MoEConfig
from .layer import MoELayer


class UnsupportedBlock(ValueError):
    """The module looks like an MoE block this adapter cannot reproduce exactly."""


class HFMoEBlock(nn.Module):
    """A drop-in for a transformers sparse-MoE block: [batch, seq, H] -> [batch, seq, H].

    moe: the expert-parallel MoELayer (routed experts); shared_expert / shared_expert_gate: the
    Qwen2-MoE shared path, added as sigmoid(gate(x)) * shared_expert(x), or None."""

    def __init__(self, moe: MoELayer, shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None):
        super().__init__()
        self.moe, self.shared_expert, self.shared_expert_gate = moe, shared_expert, shared_expert_gate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.moe(hidden_states)
        if self.shared_expert is not None:
            flat = hidden_states.reshape(-1, hidden_states.shape[-1])
            shared = torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
            out = out + shared.view_as(out)
        return out


def block_config(block: nn.Module) -> MoEConfig:
    """The MoEConfig that reproduces `block` (raises UnsupportedBlock, saying why)."""
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if gate is None or experts is None or not hasattr(experts, "gate_up_proj"):
        raise UnsupportedBlock(f"{type(block).__name__}: expected .gate.weight and .experts.gate_up_proj")
    if hasattr(gate, "e_score_correction_bias"):
        raise UnsupportedBlock(f"{type(block).__name__}: grouped sigmoid routing (DeepSeek-V3 style) "
                               "is not the softmax top-k router flashmoe_py implements")
    if "silu" not in type(experts.act_fn).__name__.lower():
        raise UnsupportedBlock(f"{type(block).__name__}: expert activation "
                               f"{type(experts.act_fn).__name__} is not SiLU (swiglu)")
    E, H = gate.weight.shape
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(gate.weight.dtype)
    if dtype is None:
        raise UnsupportedBlock(f"{type(block).__name__}: dtype {gate.weight.dtype} is not supported")
    return MoEConfig(hidden_size=H, ffn_size=experts.gate_up_proj.shape[1] // 2, num_experts=E,
                     top_k=gate.top_k, activation="swiglu", dtype=dtype,
                     renormalize=bool(getattr(gate, "norm_topk_prob", True)))


@torch.no_grad()
def from_hf_block(block: nn.Module, **layer_kwargs) -> HFMoEBlock:
    """Build this rank's HFMoEBlock from a full (unsharded) transformers block.

    layer_kwargs go to MoELayer (backend, placement, process_group, max_tokens_per_rank, ...);
    the device defaults to the block's. Collective when torch.distributed is initialised."""
    cfg = block_config(block)
    layer_kwargs.setdefault("device", block.gate.weight.device)
    moe = MoELayer(cfg, **layer_kwargs)
    experts = block.experts
    moe.load_full_weights(block.gate.weight, experts.gate_up_proj.transpose(1, 2),
                          experts.down_proj.transpose(1, 2))
    return HFMoEBlock(moe, getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None))


def patch_model(model: nn.Module, **layer_kwargs) -> dict[str, str]:
    """Replace every supported sparse-MoE block in `model` (in place) by an HFMoEBlock on this
    rank. Returns {module name: "replaced" or the reason it was left alone}. Every rank must call
    it on the same model (the layers compare their configs across ranks)."""
    report = {}
    for name, module in list(model.named_modules()):
        if not (hasattr(module, "gate") and hasattr(module, "experts")) or isinstance(module, HFMoEBlock):
            continue
        try:
            new = from_hf_block(module, **layer_kwargs)
        except UnsupportedBlock as e:
            report[name] = str(e)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        report[name] = "replaced"
    return report
