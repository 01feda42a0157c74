"""Saving and loading MoELayers with torch.distributed.checkpoint (DCP).

DCP takes a plain tensor under one name on every rank for a replicated one and writes one rank's
copy. A model's state_dict() holds each rank's own experts under the same names (and an
optimizer's, their moments), so dcp.save of it would keep one rank's experts and lose the others',
silently (the layer's forward refuses experts loaded back so; nothing can tell for the moments).
sharded_state_dict hands DCP each layer's sharded tensors as what they are: rank r's [L, ...] the
rows r*L.. of one [W*L, ...] tensor (slot-major: global expert order for a contiguous placement),
a DTensor over the layer's process group. DCP then writes every rank's rows, and can load them
onto another world size with a contiguous placement."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .data_parallel import sharded_names, sharded_tensors


def _as_rows_of_one(local: torch.Tensor, layer) -> torch.Tensor:
    """local [L, ...] on this rank -> the DTensor [W*L, ...] it is rank r's rows of, sharing its
    memory (dcp.load into it writes the layer's own); itself at world 1."""
    if layer.world_size == 1:
        return local
    group = layer.process_group or dist.group.WORLD
    mesh = DeviceMesh.from_group(group, local.device.type)
    shape = (layer.world_size * local.shape[0], *local.shape[1:])
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def sharded_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """What to give dcp.save and dcp.load for `model` (and `optimizer`), on every rank:
    model.state_dict(), or with an optimizer {"model": ..., "optim": ...} as torch's
    get_state_dict returns them (its options' defaults; parameters named by their qualified
    names), each MoELayer's sharded tensors (w_in, w_out, b_in, b_out, expert_ids, and the
    optimizer's per-parameter tensors of the same shape, Adam's moments say) as DTensors holding
    this rank's rows. After dcp.load, call load_sharded_state_dict with it."""
    owners = {name: layer for name, layer, _ in sharded_tensors(model)}
    state = model.state_dict() if optimizer is None else dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
    params = state if optimizer is None else state["model"]
    for name, layer in owners.items():
        params[name] = _as_rows_of_one(params[name], layer)
    if optimizer is not None:
        moments = state["optim"]["state"]
        for name in moments.keys() & owners.keys():
            shape = owners[name]._parameters[name.rpartition(".")[2]].shape
            # a new dict: torch's holds the optimizer's own per-parameter state
            moments[name] = {key: _as_rows_of_one(t, owners[name]) if isinstance(t, torch.Tensor) and t.shape == shape
                             else t for key, t in moments[name].items()}
    return state


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _own_local(entries: dict, names: set[str]) -> dict:
    """entries {name: tensor, or {key: tensor} for an optimizer's} with the DTensors that
    sharded_state_dict made (under `names`) back to this rank's tensors; FSDP's own left as they are."""
    out = dict(entries)
    for name in out.keys() & names:
        v = out[name]
        out[name] = {key: _local(t) for key, t in v.items()} if isinstance(v, dict) else _local(v)
    return out


def load_sharded_state_dict(model: nn.Module, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load what dcp.load read into sharded_state_dict(model[, optimizer]) into the model (and the
    optimizer): load_state_dict's checks included (a layer whose expert_ids differ from the
    state's, a placement other than the saved one's, is refused)."""
    names = set(sharded_names(model))
    if optimizer is None:
        model.load_state_dict(_own_local(state, names))
        return
    optim = {**state["optim"], "state": _own_local(state["optim"]["state"], names)}
    set_state_dict(model, optimizer, model_state_dict=_own_local(state["model"], names), optim_state_dict=optim)
