"""Parameters that patch_model or unpatch_model took out of a model, refused in an optimizer step.

patch_model replaces each transformers MoE block by an HFMoEBlock holding new tensors, and
unpatch_model puts back blocks holding new tensors again. An optimizer built over the model
before either holds the tensors taken out, which no longer compute anything: its steps would
train the rest of the model and leave the MoE blocks as they were, silently. A global optimizer
step pre-hook (torch.optim.optimizer.register_optimizer_step_pre_hook, registered at the first
take_out) raises instead, naming the parameter and the remedy; a parameter put back into its
model by hand is taken again. Each optimizer is looked at again only when its parameter count or
the set of taken-out parameters has changed since its last step."""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

_TAKEN: dict[int, tuple[weakref.ref, str, weakref.ref]] = {}  # id(parameter) -> (it, where it was, its model)
_STATE = {"change": 0, "hook": None}  # take_out's calls so far; the hook, once registered
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> (change, parameter count)


def take_out(model: nn.Module, params: Iterable[tuple[str, torch.Tensor]], why: str) -> None:
    """(name, parameter) pairs `model` held and no longer holds (any it still holds, through
    another module, are left out), each refused in any optimizer's later step while `model` does
    not hold it again; why: what took them out ("patch_model", "unpatch_model")."""
    held = {id(p) for p in model.parameters()}
    gone = [(name, p) for name, p in params if id(p) not in held]
    if not gone:
        return
    for name, p in gone:
        key = id(p)
        _TAKEN[key] = (weakref.ref(p, lambda _, key=key: _TAKEN.pop(key, None)), f"{name} ({why})",
                       weakref.ref(model))
    _STATE["change"] += 1
    if _STATE["hook"] is None:
        _STATE["hook"] = register_optimizer_step_pre_hook(_refuse_taken)


def _still_taken(params: list[torch.Tensor]) -> list[str]:
    """Where each of params that was taken out of a model was ("<name> (<why>)"), but for those
    their model holds again (put back by hand), whose entries go."""
    found = [(p, entry) for p in params if (entry := _TAKEN.get(id(p))) is not None and entry[0]() is p]
    held: dict[int, set[int]] = {}  # id(model) -> ids of its parameters now, read once a model
    stale = []
    for p, (_, where, model_ref) in found:
        model = model_ref()
        if model is not None and id(model) not in held:
            held[id(model)] = {id(q) for q in model.parameters()}
        if model is not None and id(p) in held[id(model)]:
            _TAKEN.pop(id(p), None)
        else:
            stale.append(where)
    return stale


@torch.compiler.disable
def _refuse_taken(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """The step pre-hook: RuntimeError where the optimizer holds a parameter taken out."""
    seen = (_STATE["change"], sum(len(group["params"]) for group in optimizer.param_groups))
    if _CHECKED.get(optimizer) == seen:  # (every step: no list of its parameters made here)
        return
    stale = _still_taken([p for group in optimizer.param_groups for p in group["params"]])
    if stale:
        raise RuntimeError(
            f"{type(optimizer).__name__} holds {len(stale)} parameter(s) no longer in the model, e.g. {stale[0]}: "
            "flashmoe_py.hf.patch_model (or unpatch_model) replaced the MoE blocks' tensors after this optimizer "
            "was built, so its steps would not reach those now in the model (frozen ones too, once unfrozen). "
            "Build the optimizer after patching (or after unpatching), over model.parameters()")
    _CHECKED[optimizer] = seen
