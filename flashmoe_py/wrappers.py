"""What torch's data-parallel wrappers may do to an MoELayer's experts, checked at each forward.

DistributedDataParallel (DDP) and FullyShardedDataParallel (fully_shard, and the older
FullyShardedDataParallel class) take every parameter they manage for one tensor replicated on
every rank. An MoELayer sharded over more than one rank holds each rank's own experts (w_in, w_out,
bias_in, bias_out, and the expert_ids buffer naming them): DDP would copy rank 0's to every rank, FSDP
would gather a mix of the ranks' experts, both silently. data_parallel.prepare_ddp and
prepare_fsdp keep them out (FSDP's marked) and set the layer's expert_grad_divisor; a forward
under a wrapper that manages them, or without the divisor, raises DataParallelError before any
collective; so does DDP over other ranks than the layer's, or with a replicated weight its
reducer does not average (replaced or unfrozen after DDP was built). Reads torch internals that
are stable across its releases (DistributedDataParallel._get_active_ddp_module,
_module_parameters and _build_params_for_reducer, the _is_fsdp_managed_module and
_fsdp_flattened marks); tests/test_data_parallel.py fails if they change."""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import EXPERT_WEIGHTS

FSDP_IGNORED = "_flashmoe_fsdp_ignored"  # on a sharded parameter: prepare_fsdp returned it for ignored_params


SHARDED_WEIGHTS = frozenset(EXPERT_WEIGHTS)


class _SeenDDP(NamedTuple):
    """What _check_ddp keeps of one DDP: the layers found left alone, and the ids of the
    parameters its reducer averages (read once: it is fixed when DDP is built)."""

    layers: weakref.WeakSet
    averaged: frozenset[int]


_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # DDP -> _SeenDDP


class DataParallelError(RuntimeError):
    """A data-parallel wrapper manages, or was not told about, an MoELayer's sharded experts."""


def check_wrappers(layer) -> None:
    """Raise DataParallelError where the DDP running this forward, or an FSDP managing `layer`,
    would copy or mix its experts, or where their gradients are not averaged (prepare_*'s
    expert_grad_divisor). A layer on one rank holds every expert (replicated, as the wrappers
    assume): nothing to check."""
    if layer.world_size == 1:
        return
    ddp = DistributedDataParallel._get_active_ddp_module()
    if ddp is not None:
        _check_ddp(layer, ddp)
    if layer.__dict__.get("_is_fsdp_managed_module", False):
        _check_fsdp(layer)


def _experts(layer) -> list[tuple[str, torch.Tensor | None]]:
    return [(n, layer._parameters.get(n)) for n in EXPERT_WEIGHTS]


def _group_ranks(group) -> list[int]:
    """The global ranks of a process group (None: the default one)."""
    return sorted(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


def _check_ddp(layer, ddp: DistributedDataParallel) -> None:
    if (seen := _seen.get(ddp)) is None:
        seen = _seen[ddp] = _SeenDDP(weakref.WeakSet(), frozenset(id(p) for p in ddp._build_params_for_reducer()[0]))
    if layer not in seen.layers:
        if _group_ranks(ddp.process_group) != (mine := _group_ranks(layer.process_group)):
            raise DataParallelError(
                f"DistributedDataParallel averages over ranks {_group_ranks(ddp.process_group)}, this MoELayer's "
                f"experts span ranks {mine}: its replicated weights (router, shared experts) would drift apart "
                "between the ranks DDP does not average over, and no gradient would be the mean loss's. Wrap "
                "with the layer's process group")
        # what DDP copied from rank 0, and what its reducer averages (which spells names its own way:
        # data_parallel.ddp_spellings)
        managed = seen.averaged | {id(p) for p in ddp._module_parameters}
        if ddp.broadcast_buffers:
            managed |= {id(b) for b in ddp.modules_buffers}
        copied = [n for n, t in [*_experts(layer), ("expert_ids", layer.expert_ids)] if id(t) in managed]
        if copied:
            raise DataParallelError(
                f"DistributedDataParallel manages this MoELayer's {', '.join(copied)}: it copied rank 0's "
                "experts to every rank when it was built, and averages them. Call fm.prepare_ddp(model) on every "
                "rank before wrapping (and rebuild the model: this one's experts are rank 0's now)")
        seen.layers.add(layer)
    # a replicated weight replaced after DDP was built is not averaged (with find_unused_parameters or
    # static_graph, torch says nothing): its copies would drift apart
    for name, p in layer._parameters.items():
        if name not in SHARDED_WEIGHTS and p is not None and p.requires_grad and id(p) not in seen.averaged:
            raise DataParallelError(
                f"MoELayer.{name} was replaced, or set to require grad, after DistributedDataParallel was built, "
                "which does not average its gradient: its copies on the ranks would drift apart. Load new values into "
                f"the existing one (load_state_dict, or layer.{name}.data.copy_(t)), or replace it before wrapping")
    _check_averaged(layer, "DistributedDataParallel", "fm.prepare_ddp(model) before wrapping")


def _check_fsdp(layer) -> None:
    for name, p in _experts(layer):
        if name in layer._parameters and p is None:
            continue  # an optional weight the config lacks
        ignored = isinstance(p, nn.Parameter) and getattr(p, FSDP_IGNORED, False)
        if not ignored or getattr(p, "_fsdp_flattened", False):  # the older class marks what it flattens
            raise DataParallelError(
                f"FSDP manages this MoELayer's {name}: it shards each rank's own experts as one tensor and "
                "gathers a mix of the ranks' experts. Pass fm.prepare_fsdp(model)'s parameters as ignored_params "
                "to every fully_shard call (ignored_states for FullyShardedDataParallel), and call it again "
                "after replacing expert weights")
    drift = layer._drift()
    if drift:
        raise DataParallelError(f"under FSDP, this MoELayer's {drift}. A MixedPrecisionPolicy's param_dtype casts "
                                "the layer's weights: give the fully_shard that holds it a policy without param_dtype")
    _check_averaged(layer, "FSDP", "fm.prepare_fsdp(model)")


def _check_averaged(layer, wrapper: str, remedy: str) -> None:
    trained = [name for name, p in _experts(layer) if p is not None and p.requires_grad]
    if trained and layer.expert_grad_divisor != layer.world_size:
        raise DataParallelError(
            f"MoELayer.{trained[0]}'s gradient is not averaged (expert_grad_divisor {layer.expert_grad_divisor}, "
            f"world size {layer.world_size}): it sums every rank's tokens while {wrapper} averages the rest (not "
            f"the mean loss's gradient). Call {remedy}")
