"""Parameters that patch_model or unpatch_model took out of a model, refused in an optimizer step.

patch_model replaces each transformers MoE block by an HFMoEBlock holding new tensors, and
unpatch_model puts back blocks holding new tensors again. An optimizer built over the model
before either holds the tensors taken out, which no longer compute anything: its steps would
train the rest of the model and leave the MoE blocks as they were, silently. A global optimizer
step pre-hook (torch.optim.optimizer.register_optimizer_step_pre_hook, registered at the first
take_out) raises instead, naming the parameter and the remedy. Each optimizer is looked at again
only when its parameter count or the set of taken-out parameters has changed since its last
step."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

_TAKEN: dict[int, tuple[weakref.ref, str]] = {}  # id(parameter) -> (the parameter, where it was)
_CHANGES = itertools.count(1)
_STATE = {"change": 0, "hook": None}
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> (change, parameter count)


def take_out(params: Iterable[tuple[str, torch.Tensor]], why: str) -> None:
    """(name, parameter) pairs a model no longer holds, each refused in any optimizer's later
    step; why: what took them out ("patch_model", "unpatch_model")."""
    for name, p in params:
        key = id(p)
        _TAKEN[key] = (weakref.ref(p, lambda _, key=key: _TAKEN.pop(key, None)), f"{name} ({why})")
    _STATE["change"] = next(_CHANGES)
    if _STATE["hook"] is None:
        _STATE["hook"] = register_optimizer_step_pre_hook(_refuse_taken)


def taken(p: torch.Tensor) -> str | None:
    """Where p was taken out of a model ("<name> (<why>)"), or None."""
    entry = _TAKEN.get(id(p))
    return entry[1] if entry is not None and entry[0]() is p else None


@torch.compiler.disable
def _refuse_taken(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """The step pre-hook: RuntimeError where the optimizer holds a parameter taken out."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    seen = (_STATE["change"], len(params))
    if _CHECKED.get(optimizer) == seen:
        return
    stale = [where for p in params if (where := taken(p)) is not None]
    if stale:
        raise RuntimeError(
            f"{type(optimizer).__name__} holds {len(stale)} parameter(s) no longer in the model, e.g. {stale[0]}: "
            "flashmoe_py.hf.patch_model (or unpatch_model) replaced the MoE blocks' tensors after this optimizer "
            "was built, so its step would leave them untrained. Build the optimizer after patching "
            "(or after unpatching), over model.parameters()")
    _CHECKED[optimizer] = seen
