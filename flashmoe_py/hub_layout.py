"""A transformers model's checkpoint in the Hub's layout read back into the layout of its modules.

transformers 5's save_pretrained writes the Hub's layout (save_original_format=True, its default):
most MoE families' experts one module each (`experts.0.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.0.w1.weight`), where the model's modules hold them fused
(`experts.gate_up_proj`). from_pretrained converts them back; Module.load_state_dict does not, so
Trainer's resume_from_checkpoint and load_best_model_at_end skip those keys (strict=False), for an
unpatched model too (huggingface/transformers#48805). hf.py reads a patched model's blocks back
through the model's own conversions here, each result checked to write back as given."""

from __future__ import annotations

import copy

import torch
from torch import nn


def _conversions(model: nn.Module) -> tuple[list, list]:
    """(renamings, converters): the weight conversions save_pretrained reverts for `model`."""
    from transformers import core_model_loading
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    # from_pretrained's, else the model type's without PrefixChange (a WeightRenaming; newer transformers 5
    # releases have it), as revert_weight_conversion
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, getattr(core_model_loading, "PrefixChange", ()))]
    return ([c for c in conversions if isinstance(c, WeightRenaming)],
            [c for c in conversions if isinstance(c, WeightConverter)])


def to_hub_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """state (keys relative to `model`, in its modules' layout; meta tensors will do) -> what
    model.save_pretrained writes for it (keys and tensors in the Hub's layout)."""
    from transformers.core_model_loading import revert_weight_conversion
    return revert_weight_conversion(model, dict(state))


def from_hub_layout(model: nn.Module, hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """hub (keys relative to `model`, in the Hub's layout, as save_pretrained writes them) -> the
    same weights in the layout of the model's modules, through the model's own weight
    conversions (from_pretrained's), forwards. RuntimeError unless the result writes back
    (to_hub_layout) as hub exactly, key for key and bit for bit."""
    from transformers.core_model_loading import WeightRenaming, dot_natural_key, rename_source_key

    renamings, converters = _conversions(model)
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    collecting = {}  # module key -> the transform collecting the hub tensors it is made of
    for key, t in sorted(hub.items(), key=lambda kv: dot_natural_key(kv[0])):
        target, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            transform, pattern = collecting.setdefault(target, WeightRenaming(key, target)), key
        else:
            transform = collecting.setdefault(target, copy.deepcopy(by_pattern[pattern]))
        transform.add_tensor(target, key, pattern, t)
    state = {}
    for first, transform in collecting.items():
        realized = transform.convert(first, model=model, config=model.config)
        if isinstance(realized, tuple):  # (the tensors, conversion errors): transformers 5.0's
            realized = realized[0]
        for name, value in realized.items():
            state[name] = value[0] if isinstance(value, list) else value
    back = to_hub_layout(model, state)
    if set(back) != set(hub) or not all(torch.equal(back[k], t) for k, t in hub.items()):
        wrong = sorted(set(back) ^ set(hub)) or [k for k, t in hub.items() if not torch.equal(back[k], t)]
        raise RuntimeError(f"{type(model).__name__}'s weight conversions do not read {wrong[:3]} back as written")
    return state
