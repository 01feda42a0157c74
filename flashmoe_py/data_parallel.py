"""MoELayers inside a model trained with torch's DistributedDataParallel (DDP).

DDP assumes every parameter and buffer is replicated: at construction it copies rank 0's to every
rank, and it averages every gradient over the ranks. An MoELayer's experts are sharded (each rank
holds its own: w_in, w_out, b_in, b_out, and the expert_ids buffer naming them), so DDP would put
rank 0's experts on every rank, silently. And the layer's expert gradients already sum every
rank's tokens (the gradient of the sum of the ranks' losses), where DDP's average of the
replicated ones is the gradient of their mean."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .layer import MoELayer

SHARDED = ("w_in", "w_out", "b_in", "b_out", "expert_ids")  # each rank's own experts
_SCALED = "_flashmoe_expert_grads_averaged"


def sharded_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the sharded parameters and buffers of every MoELayer in `model`."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, MoELayer):
            names += [f"{prefix}.{n}" if prefix else n for n in SHARDED if getattr(module, n) is not None]
    return names


def exclude_from_ddp(model: nn.Module) -> list[str]:
    """Have DDP, when it wraps `model` itself, leave every MoELayer's sharded parameters and
    buffers alone (neither copied from rank 0 nor averaged), beside any names already set there.
    -> the names excluded now."""
    names = sharded_names(model)
    before = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, before + [n for n in names if n not in before])
    return names


def prepare_ddp(model: nn.Module) -> list[str]:
    """Ready `model` for DistributedDataParallel(model) over the default process group:
    exclude_from_ddp, and each MoELayer's expert gradients divided by its world size as they
    arrive (a hook on each sharded parameter that requires grad, added once), so that with DDP's
    average every gradient is that of the mean of the ranks' losses. Call it before wrapping, on
    every rank; experts unfrozen or weights replaced afterwards (new Parameter objects) need it
    again. A layer whose experts span fewer ranks than DDP's (a smaller process group: each
    expert held by several ranks, whose copies DDP would not keep equal) is refused (ValueError).
    Clipping gradients by their global norm needs the experts' part summed over the ranks (each
    rank's own experts differ), or the replicated weights drift apart. -> the names excluded."""
    for module in model.modules():
        if not isinstance(module, MoELayer):
            continue
        if dist.is_initialized() and module.world_size != dist.get_world_size():
            raise ValueError(f"prepare_ddp: an MoELayer's experts span {module.world_size} ranks, DDP's "
                             f"default group {dist.get_world_size()}: its expert copies would drift apart")
        if module.world_size > 1:
            for name in SHARDED:
                p = module._parameters.get(name)
                if p is not None and p.requires_grad and not getattr(p, _SCALED, False):
                    p.register_hook(functools.partial(torch.div, other=module.world_size))
                    setattr(p, _SCALED, True)
    return exclude_from_ddp(model)
