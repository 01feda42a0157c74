"""MoELayers inside a model trained data-parallel: torch's DistributedDataParallel (DDP) or
fully_shard (FSDP).

Both assume every parameter is replicated: DDP copies rank 0's parameters and buffers to every
rank at construction and averages every gradient over the ranks; FSDP shards each parameter over
the ranks and gathers it back. An MoELayer's experts are sharded (each rank holds its own: w_in,
w_out, bias_in, bias_out, and the expert_ids buffer naming them), so either would replace them,
silently (wrappers.py refuses such a forward). And the layer's expert gradients already sum every
rank's tokens (the gradient of the sum of the ranks' losses), where the wrappers' average of the
replicated ones is the gradient of their mean. And a global gradient norm must count every rank's
experts."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from .config import EXPERT_WEIGHTS, as_number
from .layer import MoELayer
from .wrappers import FSDP_IGNORED

SHARDED = (*EXPERT_WEIGHTS, "expert_ids")  # each rank's own experts


def sharded_tensors(model: nn.Module):
    """(fully qualified name, MoELayer, tensor) of each sharded parameter and buffer in `model`,
    under every name of a layer used in several places (state_dict names its tensors under each:
    a name left out went to a checkpoint as a plain tensor, one rank's copy)."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, MoELayer):
            for n in SHARDED:
                if (t := getattr(module, n)) is not None:
                    yield (f"{prefix}.{n}" if prefix else n), module, t


def sharded_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the sharded parameters and buffers of every MoELayer in `model`."""
    return [name for name, _, _ in sharded_tensors(model)]


def _set_ignored(model: nn.Module, names: list[str]) -> None:
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def ddp_spellings(names: list[str]) -> list[str]:
    """names, and for those without a dot (the wrapped module's own: an MoELayer wrapped itself)
    DDP's reducer's spelling too: it names a parameter f"{module name}.{name}", ".w_in" for the wrapped
    module's own, where its copy from rank 0 names it "w_in" (torch 2.x): with "w_in" alone the
    reducer averaged the ranks' different experts. And each under torch.compile's "_orig_mod."
    too: DDP(torch.compile(model)) reads the names set on model through the compiled wrapper,
    whose parameters it names so (without them it copied rank 0's experts to every rank)."""
    spelled = [*names, *(f".{n}" for n in names if "." not in n)]
    return [*spelled, *(f"_orig_mod.{n}" for n in names)]


def exclude_from_ddp(model: nn.Module) -> list[str]:
    """Have DDP, when it wraps `model` itself, leave every MoELayer's sharded parameters and
    buffers alone (neither copied from rank 0 nor averaged), beside any names already set there.
    -> the names excluded now."""
    names = ddp_spellings(sharded_names(model))
    before = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    _set_ignored(model, before + [n for n in names if n not in before])
    return names


def include_in_ddp(model: nn.Module, names: list[str]) -> None:
    """exclude_from_ddp's inverse for `names` (those of layers taken out of `model`)."""
    if hasattr(model, "_ddp_params_and_buffers_to_ignore"):
        gone = set(ddp_spellings(names))
        _set_ignored(model, [n for n in model._ddp_params_and_buffers_to_ignore if n not in gone])


def _set_expert_grad_divisors(model: nn.Module, wrapper: str) -> None:
    """Refuse a layer whose experts span fewer ranks than the default group (each expert held by
    several ranks, whose copies the wrapper would not keep equal); have each layer divide its
    expert weights' gradients by its world size in its backward (MoELayer.expert_grad_divisor:
    the layer's own, so it survives pickling, copies and replaced weights)."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:  # every layer checked before any is changed
        if dist.is_initialized() and layer.world_size != dist.get_world_size():
            raise ValueError(f"prepare_{wrapper}: an MoELayer's experts span {layer.world_size} ranks, the default "
                             f"group {dist.get_world_size()}: its expert copies would drift apart")
    for layer in layers:
        layer.expert_grad_divisor = layer.world_size


def prepare_ddp(model: nn.Module) -> list[str]:
    """Ready `model` for DistributedDataParallel(model) over the default process group:
    exclude_from_ddp, and each MoELayer's expert gradients divided by its world size as they
    are taken, so that with DDP's average every gradient is that of the mean of the ranks' losses.
    Call it before wrapping, on every rank. A layer whose experts span fewer ranks than DDP's is
    refused (ValueError). Clip gradients with clip_grad_norm_ below (torch's sees one rank's
    experts only). -> the names excluded."""
    _set_expert_grad_divisors(model, "ddp")
    return exclude_from_ddp(model)


def prepare_fsdp(model: nn.Module) -> set[nn.Parameter]:
    """Ready `model` for torch's fully_shard over the default process group, as prepare_ddp for
    DDP: each MoELayer's expert gradients divided by its world size as they are taken, and -> its
    sharded parameters (frozen ones too), marked, to pass as ignored_params to every fully_shard
    call (FSDP then neither shards nor reduces them; each rank keeps its own experts). Call it
    before wrapping, on every rank, and again after replacing expert weights. Clip gradients with
    clip_grad_norm_ below."""
    _set_expert_grad_divisors(model, "fsdp")
    ignored = set()
    for _, _, t in sharded_tensors(model):
        if isinstance(t, nn.Parameter):
            setattr(t, FSDP_IGNORED, True)
            ignored.add(t)
    return ignored


def in_fsdp_class(model: nn.Module) -> bool:
    """Whether torch's older FullyShardedDataParallel class wraps `model` or manages parameters of
    it (given the module inside the wrapper: its flat parameter, or the originals, are marked)."""
    return (any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
            or any(getattr(p, "_fsdp_flattened", False) for p in model.parameters()))


def _positive_norm(max_norm) -> float:
    """clip_grad_norm_'s max_norm as a float: a real number (numpy's, a one-element tensor) > 0, inf
    included (nothing clipped); -1.0 or NaN, which torch's takes and scales every gradient by a
    negative or NaN factor, silently, raise ValueError."""
    value = max_norm
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    value = as_number(value)
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"clip_grad_norm_: max_norm={max_norm!r}; expected a number > 0 (inf: clip nothing)")
    return float(value)


_REPLICATED = object()  # clip_grad_norm_'s group of a parameter that is no layer's expert weight


def _reduce_part(part: torch.Tensor, two: bool, group) -> torch.Tensor:
    """A layer's experts' part of the norm (squared for norm 2) over the ranks of its group: their
    sum, or for inf their max, NaN where any rank's is (a MAX all_reduce keeps or drops a NaN by
    the ranks' order under gloo, and NCCL drops it: a rank's NaN expert gradient went uncounted,
    the total finite, as torch's norm on one rank's gradients never is)."""
    if two:  # a sum carries a NaN
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        return part
    both = torch.stack([torch.where(part.isnan(), 0.0, part), part.isnan().float()])  # (inf kept)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    return torch.where(both[1] > 0, float("nan"), both[0])


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a model whose MoELayers hold each rank's own experts,
    trained data-parallel (its replicated gradients already equal on every rank, as after DDP's
    average, or sharded DTensors, as after FSDP's): the total norm counts every rank's expert
    gradients (one all_reduce over each layer's process group) and the replicated ones once, so
    every rank scales by the same factor (torch's, on one rank's parameters, sees only that rank's
    experts: the ranks would scale their replicated weights differently and drift apart).
    norm_type 2 or inf. Collective. -> the total norm (float32, on the gradients' device)."""
    if not isinstance(model, nn.Module):  # torch's takes parameters: this one needs the modules to find the layers
        raise TypeError(f"clip_grad_norm_: model must be the nn.Module (it finds the MoELayers' experts in it), "
                        f"got {type(model).__name__}; call fm.clip_grad_norm_(model, max_norm), not with "
                        "model.parameters()")
    max_norm = _positive_norm(max_norm)
    if norm_type not in (2.0, float("inf")):
        raise ValueError(f"clip_grad_norm_: norm_type={norm_type}; flashmoe_py's takes 2 or inf")
    if in_fsdp_class(model):
        raise ValueError("clip_grad_norm_: the model is inside torch's older FullyShardedDataParallel, whose flat "
                         "gradient shards this function cannot count; use fully_shard, whose gradients it counts "
                         "(FullyShardedDataParallel.clip_grad_norm_ would count one rank's experts only)")
    # each expert-parallel layer's experts by its group (None: the default); a layer of world 1 (built
    # before the process group, say) holds every expert, replicated like the rest
    group_of = {id(t): layer.process_group for _, layer, t in sharded_tensors(model) if layer.world_size > 1}
    groups = list(dict.fromkeys(group_of.values()))  # each once, in the model's order (the same on its ranks)
    params = [p for p in model.parameters() if p.grad is not None]
    # every rank reaches its groups' all_reduces, one without gradients too
    device = params[0].grad.device if params else next(model.parameters(), torch.empty(0)).device
    two = norm_type == 2.0

    def norm_of(grads: list) -> torch.Tensor:  # this rank's part: squared for norm 2
        norm = get_total_norm(grads, norm_type) if grads else torch.zeros((), device=device)
        norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).float().to(device)
        return norm.square() if two else norm

    total = norm_of([p.grad for p in params if id(p) not in group_of])  # replicated: counted once
    for group in groups:  # each layer's experts over the ranks of its own group
        part = norm_of([p.grad for p in params if group_of.get(id(p), _REPLICATED) is group])
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            part = _reduce_part(part, two, group)
        total = total + part if two else torch.maximum(total, part)
    total = total.sqrt() if two else total
    for fsdp in (False, True):  # one foreach kernel takes DTensors or tensors, not both
        group = [p for p in params if isinstance(p.grad, DTensor) == fsdp]
        if group:
            clip_grads_with_norm_(group, max_norm, total)
    return total
