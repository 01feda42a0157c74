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
from torch.distributed.checkpoint.state_dict import (_get_fqns, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .config import EXPERT_WEIGHTS
from .data_parallel import in_fsdp_class, sharded_tensors
from .runtime import ConsistencyError, from_every_rank


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


def _owners(model: nn.Module) -> dict[str, tuple]:
    """{the state_dict name torch's get_state_dict gives (wrappers' prefixes such as DDP's
    "module." and torch.compile's "_orig_mod." left out): (MoELayer, attribute name)} of every
    MoELayer's sharded tensors."""
    out = {}
    for name, layer, _ in sharded_tensors(model):
        (fqn,) = _get_fqns(model, name)
        out[fqn] = (layer, name.rpartition(".")[2])
    return out


def _per_expert(t, layer, param: torch.Tensor, where: str):
    """An optimizer's state tensor t of the sharded parameter `param` -> t as this rank's rows
    (per-expert state: leading dimension the local experts, as Adam's moments, or Adafactor's
    factors) or t itself (a 0-dim value, as a step count, the same on every rank); ValueError for
    state that mixes the experts (DCP would keep one rank's copy); t itself at world 1 (every
    expert on every rank: nothing sharded, any state saved as torch's get_state_dict gives it)."""
    if layer.world_size == 1 or not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    if t.dim() == param.dim() and t.shape[0] == param.shape[0]:
        return _as_rows_of_one(t, layer)
    raise ValueError(f"sharded_state_dict: the optimizer's {where} has shape {tuple(t.shape)} for a parameter of "
                     f"{tuple(param.shape)}: state that mixes the experts cannot be saved or loaded per rank (a "
                     "checkpoint saved where each rank held one expert loads only where each still does)")


def check_groups_agree(layers: list, what: str = "sharded_state_dict") -> None:
    """Layers whose expert group is smaller than the world (several groups, each holding every
    expert): every group saves each piece under the same name and DCP keeps one copy (`what`:
    the caller; hf_state_dict keeps one group's), so the groups must hold the same model: the
    same replicated weights everywhere, and on ranks of the same rank in their group the same
    experts and the same weights of them (a group that drifted, or one placed otherwise, would be
    saved mixed with the others, or left out, silently). Compared over the default group
    (collective: every rank); ConsistencyError on every rank otherwise."""
    if not dist.is_initialized() or all(layer.world_size == dist.get_world_size() for layer in layers):
        return
    mine = [None if layer.world_size == dist.get_world_size() else {
        "group rank": layer.rank, "experts": layer.placed_experts,
        "replicated": layer._checksums(lambda n: n not in EXPERT_WEIGHTS),
        "expert weights": layer._checksums(lambda n: n in EXPERT_WEIGHTS)} for layer in layers]
    everyone = from_every_rank(mine)
    for i in range(len(layers)):
        rows = [(rank, d[i]) for rank, d in enumerate(everyone) if d[i] is not None]
        for rank, row in rows:
            first = next(r for r in rows if r[1]["group rank"] == row["group rank"])
            for field in ("replicated", "experts", "expert weights"):
                other = rows[0] if field == "replicated" else first
                if row[field] != other[1][field]:
                    raise ConsistencyError(
                        f"{what}: layer {i}'s expert groups differ ({field} of rank {rank} and rank "
                        f"{other[0]}): each group of its process group saves its experts under the same names, and "
                        "one copy of each is kept, so the checkpoint would mix them or leave a group's out. Keep "
                        "the groups' replicas the same (sum their gradients over the groups too) and their "
                        "placements alike")


def sharded_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """What to give dcp.save and dcp.load for `model` (and `optimizer`), on every rank: torch's
    get_model_state_dict(model), or with an optimizer {"model": ..., "optim": ...} as its
    get_state_dict returns them (their options' defaults; names without wrappers' prefixes),
    each MoELayer's sharded weights (w_in, w_out, bias_in, bias_out) and the optimizer's per-expert
    state of them (Adam's moments, say) and expert_ids as DTensors holding this rank's rows,
    sharing their memory. After dcp.load, call load_sharded_state_dict with it. Collective: each
    layer's replicated weights (router, shared experts) are compared across ranks first, where no
    FSDP shards them (DCP would write one rank's copy of replicas that drifted apart, silently),
    and with expert groups smaller than the world, the groups with each other (check_groups_agree:
    then every rank of the default group calls it)."""
    owners = _owners(model)
    if not in_fsdp_class(model):
        plain = [layer for layer in {id(layer): layer for layer, _ in owners.values()}.values()
                 if not any(isinstance(p, DTensor) for p in layer.parameters())]
        for layer in plain:
            layer._check_replicas_agree("training", "Their gradients must be summed over the ranks: wrap the "
                                        "model in DDP after fm.prepare_ddp, or fully_shard after fm.prepare_fsdp")
        check_groups_agree(plain)
    state = ({"model": get_model_state_dict(model)} if optimizer is None
             else dict(zip(("model", "optim"), get_state_dict(model, optimizer))))
    params = state["model"]
    for name, (layer, _) in owners.items():
        params[name] = _as_rows_of_one(params[name], layer)
    if optimizer is not None:
        moments = state["optim"]["state"]
        for name in moments.keys() & owners.keys():
            layer, attr = owners[name]
            # a new dict: torch's holds the optimizer's own per-parameter state
            moments[name] = {key: _per_expert(t, layer, getattr(layer, attr), f"{key} of {name}")
                             for key, t in moments[name].items()}
    return state if optimizer is not None else params


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _own(t, own):
    """t (a DTensor sharded_state_dict made of `own`, this rank's tensor, or a plain tensor) ->
    `own` itself where t's rows are own's memory (dcp.load has written them there: the copy
    torch's loaders make is then a no-op; to_local's view of a one-expert [1, ...] own, restrided,
    would be refused by their copy_ as overlapping), else t's local tensor."""
    local = _local(t)
    if (own is not None and local.data_ptr() == own.data_ptr() and local.shape == own.shape
            and local.dtype == own.dtype):
        return own.detach()
    return local


def _own_local(entries: dict, owns: dict) -> dict:
    """entries {name: tensor, or {key: tensor} for an optimizer's} with the DTensors that
    sharded_state_dict made (under owns' names, layers of world > 1: {name: this rank's tensor, or
    {key: the optimizer's}}) back to this rank's tensors; FSDP's own left as they are (a layer of
    world 1 under fully_shard: its experts are FSDP's)."""
    out = dict(entries)
    for name in out.keys() & owns.keys():
        v, own = out[name], owns[name]
        out[name] = {key: _own(t, own.get(key)) for key, t in v.items()} if isinstance(v, dict) else _own(v, own)
    return out


def load_sharded_state_dict(model: nn.Module, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load what dcp.load read into sharded_state_dict(model[, optimizer]) into the model (and the
    optimizer), through torch's set_model_state_dict / set_state_dict. dcp.load has already
    written the checkpoint's experts and expert_ids into the layers: where those are not the ones
    the layer's placement puts on a rank (a checkpoint of another placement) this raises
    RuntimeError on every rank (collective: every rank calls it), and so would the layer's
    forward; the model must be rebuilt with the saved placement."""
    owners = _owners(model)
    params = state if optimizer is None else state["model"]
    mismatches = []  # this rank's
    for name, (layer, attr) in owners.items():
        if attr != "expert_ids":
            continue
        saved, mine = _local(params[name]).tolist(), layer.placed_experts
        if saved != mine:
            mismatches.append(f"{name} holds experts {saved} where the placement puts {mine}")
    everyone = from_every_rank(mismatches)  # refused on every rank
    bad = [f"rank {rank}: {m}" for rank, ms in enumerate(everyone) for m in ms]
    if bad:
        raise RuntimeError(f"load_sharded_state_dict: a checkpoint of another placement ({'; '.join(bad)}); "
                           "dcp.load has written those experts' weights into the model: rebuild it with the "
                           "placement the checkpoint was saved with")
    mine = {name: getattr(layer, attr) for name, (layer, attr) in owners.items() if layer.world_size > 1}
    if optimizer is None:
        set_model_state_dict(model, _own_local(params, mine))
        return
    moments = {name: optimizer.state.get(t, {}) for name, t in mine.items()}
    optim = {**state["optim"], "state": _own_local(state["optim"]["state"], moments)}
    set_state_dict(model, optimizer, model_state_dict=_own_local(params, mine), optim_state_dict=optim)
