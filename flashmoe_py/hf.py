"""Hugging Face transformers MoE blocks -> MoELayer, and a one-call model patcher.

Converted, each to a layer that computes the block's function (transformers 5.x layouts):
- Mixtral, Qwen3-MoE, OLMoE (...SparseMoeBlock): 'softmax_topk', SiLU-gated experts;
- Qwen2-MoE, Qwen3-Next (...SparseMoeBlock): the same, plus one sigmoid-gated shared expert;
- DeepSeek-V3, GLM-4.5 (DeepseekV3MoE, Glm4MoeMoE; Kimi-K2 loads as DeepSeek-V3):
  'sigmoid_grouped' with the correction bias and scaling factor, plus n_shared_experts;
- Llama-4 (Llama4TextMoe): 'topk_sigmoid', the weight on the expert's input, one shared expert;
- gpt-oss (GptOssMLP): 'topk_softmax' with a router bias, expert biases, the clamped SwiGLU.

A block's router module stays in the HFMoEBlock, reading the layer's router parameters, for what
transformers takes from it: the router logits it records (output_router_logits=True), and the
router output gpt-oss and Llama-4 blocks return beside their hidden states."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import copy
import functools
import inspect
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import _get_fqns
from torch.distributed.tensor import DTensor

from . import hub_layout
from .checkpoint import check_groups_agree
from .config import DTYPES, ConfigError, MoEConfig
from .data_parallel import exclude_from_ddp, in_fsdp_class, include_in_ddp, sharded_names
from .layer import MoELayer, check_dst
from .runtime import ConsistencyError, on_every_rank
from .taken_params import take_out
from .wrappers import DataParallelError


class UnsupportedBlock(ValueError):
    """The module looks like an MoE block this adapter cannot reproduce exactly."""


@dataclass
class Conversion:
    """What one transformers block becomes.

    config: the layer's MoEConfig; weights: load_full_weights' arguments (full, unsharded);
    gate_up_layout: how w_in's gate and up columns are laid out; router: the block's router module;
    router_output: None when the block returns hidden states only, else (index into the router's
    output that the block returns beside them, whether those hidden states are [tokens, H]);
    shared_mlp: the shared experts' gate/up/down MLP, whose gate and up weights shared_w_in joins
    (a copy: every other weight is a view of the block's own)."""

    config: MoEConfig
    weights: dict[str, torch.Tensor]
    router: nn.Module
    gate_up_layout: str = "halves"
    router_output: tuple[int, bool] | None = None
    shared_mlp: nn.Module | None = None


def _tie_router_after_load(module: HFMoEBlock, incompatible_keys) -> None:
    """load_state_dict's post hook (a module-level function: a patched model still pickles)."""
    module.tie_router()


def _take_transformers_keys(module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys,
                            unexpected_keys, error_msgs) -> None:
    """load_state_dict's pre hook of each HFMoEBlock and of the module patch_model patched (a
    module-level function: a patched model still pickles). A transformers checkpoint (Trainer's
    resume_from_checkpoint and load_best_model_at_end load what a patched model's save_pretrained
    wrote; hf_state_dict's) holds each patched block's weights under its transformers block's
    keys, which `strict=False` would skip, leaving the experts and router as they were. Each
    block's are replaced in state_dict by its own (HFMoEBlock.state_from_hf: this rank's experts,
    in the layer's layout), whether in the layout of the transformers modules (keys under the
    block but not all of the block's own layout: some outside its modules, or none its layer's
    "moe."), or, within a transformers model, the Hub's
    (save_pretrained's default: hub_layout.py; Mixtral's under another name), before any tensor
    of the model is copied (the patched module's hook runs before its children load).

    A block whose keys come in part (a shard of a checkpoint split inside it: Trainer's
    load_sharded_checkpoint loads one shard a load_state_dict(strict=False)) waits: its keys are
    held back, nothing of the block loaded (a strict load then names the block's own keys
    missing), and join the next load's until the block is whole, its forward refusing to run
    meanwhile. A key of the next load replaces the one held; a held part that cannot join it (a
    whole checkpoint in another layout) is dropped, that load taken alone. Every block is
    converted before state_dict changes: where one cannot be (keys of two layouts, a key the block
    does not have, a weight it cannot take; with assign=True, one not in the layer's dtype)
    RuntimeError names it, nothing of state_dict loaded. While loading, state_dict holds each
    block's converted weights of this rank beside the checkpoint's. Keys inside the layer are the
    layer's to judge (it takes its weights' old names)."""
    blocks = [(f"{prefix}{name}." if name else prefix, block) for name, block in module.named_modules()
              if isinstance(block, HFMoEBlock)]
    held = module.__dict__.get("_held_keys", {})  # the parts earlier loads held back, keys relative to `module`
    joined = {prefix + k: t for k, t in held.items() if prefix + k not in state_dict}
    assign = local_metadata.get("assign_to_params_buffers", False)
    try:
        hub_keys, converted, parts, loaded = _plan_load(module, prefix, blocks, {**state_dict, **joined}, assign)
    except RuntimeError as error:
        if not joined:
            raise
        joined = {}  # the held part cannot join this load: dropped where this load takes its blocks whole
        hub_keys, converted, parts, loaded = _plan_load(module, prefix, blocks, state_dict, assign)
        if parts:  # (it holds a part again: the fault is in the keys, not a stale part; say it)
            raise error
    state_dict.update(joined)
    holding = {k: state_dict[k] for _, _, keys in parts for k in keys}
    taken = {*hub_keys, *(k for k in state_dict for under, _, _ in converted if k.startswith(under))}
    for key in taken | set(holding) | set(joined):  # (a joined key no block here took is dropped)
        state_dict.pop(key, None)
    for under, _, state in converted:
        state_dict.update({under + key: t for key, t in state.items()})
    waiting = {id(block): len(keys) for block, _, keys in parts}
    done = loaded | {id(block) for _, block, _ in converted} | ({id(b) for _, b in blocks} if held and not joined
                                                                 else set())
    for under, block in blocks:
        if id(block) in waiting:
            block._waiting = (f"{under[:-1] or type(block).__name__}: a load_state_dict took {waiting[id(block)]} "
                              "of its transformers block's keys and holds them back, nothing of the block loaded, "
                              "until a next load brings the rest (a shard of a checkpoint split inside the block: "
                              "load the shard holding the rest before running it, or a state_dict holding the "
                              "whole block)")
        elif id(block) in done:
            block._waiting = None
    module.__dict__["_held_keys"] = {k[len(prefix):]: t for k, t in holding.items()}


def _plan_load(module: nn.Module, prefix: str, blocks: list[tuple[str, HFMoEBlock]], state: dict, assign: bool):
    """What _take_transformers_keys does with `state` (not changed here): (the keys of the Hub's
    layout it takes, [(key prefix, block, the block's converted state)], [(block, key prefix, the
    keys of its part)] of the blocks it holds in part, ids of the blocks whose own layout it
    loads). RuntimeError naming the block it cannot take."""
    hub_keys, source, parts = set(), state, []
    if (hub := _blocks_in_hub_layout(module, prefix, blocks, state)) is not None:
        hub_keys, module_state, parts = hub
        source = {**{k: t for k, t in state.items() if k not in hub_keys}, **module_state}
    converted, loaded = [], set()
    for under, block in blocks:
        if any(b is block for b, _, _ in parts):
            continue
        own = {*block._modules, *block._parameters, *block._buffers}
        keys = [k for k in source if k.startswith(under)]
        if keys and any(k.startswith(under + "moe.") for k in keys) and all(k[len(under):].split(".")[0] in own
                                                                           for k in keys):
            loaded.add(id(block))  # the block's own layout: its layer judges it
            if assign:
                _refuse_assign_elsewhere(under, block, {k[len(under):]: source[k] for k in keys})
            continue
        if not keys:
            continue
        if block._skeleton is not None and {k[len(under):] for k in keys} < block.hf_keys():
            parts.append((block, under, set(keys)))  # (hooks are told strict=True whatever the load's is)
            continue
        try:
            if assign and (odd := next((k for k in keys if source[k].dtype not in DTYPES.values()), None)):
                raise RuntimeError(f"{odd} is {source[odd].dtype}, which assign=True would make a layer's weight "
                                   f"(flashmoe_py takes {tuple(DTYPES)}): load without assign (copies cast it)")
            state_of_block = block.state_from_hf({k[len(under):]: source[k] for k in keys})
            if assign:
                _refuse_assign_elsewhere(under, block, state_of_block)
        except (RuntimeError, ValueError) as e:
            raise RuntimeError(
                f"load_state_dict: {under[:-1] or type(block).__name__} is a patched block (flashmoe_py's HFMoEBlock) "
                f"and the state_dict holds keys of its transformers block, which it takes by converting them, but "
                f"could not: {e}. Nothing of this state_dict was loaded") from e
        converted.append((under, block, state_of_block))
    return hub_keys, converted, parts, loaded


def _blocks_in_hub_layout(module: nn.Module, prefix: str, blocks: list[tuple[str, HFMoEBlock]],
                          state_dict) -> tuple[set[str], dict[str, torch.Tensor], list] | None:
    """Where state_dict holds some of the patched blocks' weights in the Hub's layout (what
    save_pretrained writes), each block's read through the conversions of the outermost
    transformers model holding it in `module` (keys under `prefix`): (those keys, the same
    weights in the layout of the transformers blocks' modules, full keys, and the blocks it holds
    in part, (block, its key prefix, those keys) each); None where it holds none in that layout.
    RuntimeError where it holds a block's beside keys of its modules' layout, or they do not
    convert."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return None
    models = [(f"{prefix}{name}." if name else prefix, m) for name, m in module.named_modules()
              if isinstance(m, transformers.PreTrainedModel)]  # (outermost first)
    hub_keys, module_state, parts = set(), {}, []
    for under, block in blocks:
        base, model = next(((base, m) for base, m in models if under.startswith(base)), (None, None))
        if model is None or block._skeleton is None:
            continue
        module_names, names = block.hub_names(model, under[len(base):])
        if not any(base + name in state_dict for name in names - module_names):
            continue
        try:
            both = sorted(base + name for name in module_names - names if base + name in state_dict)
            if both:
                raise RuntimeError(f"it also holds {both[:3]}, keys of the transformers modules' layout")
            if mine := sorted(k for k in state_dict if k.startswith(under + "moe.")):
                raise RuntimeError(f"it also holds {mine[:3]}, keys of the patched block's own layout")
            present = {base + name for name in names if base + name in state_dict}
            if len(present) < len(names):
                parts.append((block, under, present))
                continue
            state = hub_layout.from_hub_layout(model, {name: state_dict[base + name] for name in names})
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise RuntimeError(
                f"load_state_dict: the state_dict holds the weights of the patched block {under[:-1]} in the Hub's "
                f"layout (transformers' save_pretrained's), which it takes by converting them, but could not: {e}. "
                "Nothing of this state_dict was loaded. Load the checkpoint with from_pretrained, then "
                "patch_model") from e
        hub_keys |= {base + name for name in names}
        module_state.update({base + k: t for k, t in state.items()})
    return (hub_keys, module_state, parts) if hub_keys or parts else None


def _refuse_assign_elsewhere(under: str, block: HFMoEBlock, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict(assign=True) makes a block's weights (`state`, keys relative to the block)
    its layer's own: RuntimeError, before anything is loaded, where one is not in its layer's
    dtype and on its device (MoELayer would refuse it while loading, after the model's other
    modules had been assigned theirs)."""
    for key, t in state.items():
        name = key.removeprefix("moe.")
        if key.startswith("moe.") and name in block.moe._parameters and torch.is_tensor(t) and (
                want := block.moe._home(name, t)):
            raise RuntimeError(
                f"load_state_dict(assign=True): the state_dict's weights of the patched block {under[:-1]} are "
                f"{t.dtype} on {t.device} ({name}), its layer's are {want}: the layer keeps its dtype and device, "
                "so they cannot be assigned; load without assign (copies convert them), or convert the "
                "checkpoint first. Nothing of this state_dict was loaded")


def _load_guards(module: nn.Module) -> list:
    """The keys of module's load_state_dict pre hooks that are _take_transformers_keys."""
    hooks = getattr(module, "_load_state_dict_pre_hooks", {})
    return [key for key, hook in hooks.items() if getattr(hook, "hook", None) is _take_transformers_keys]


class HFMoEBlock(nn.Module):
    """A drop-in for a transformers MoE block: [batch, seq, H] -> what that block returns.

    moe: the expert-parallel MoELayer (router, routed and shared experts). router: the block's own
    router module, its parameters tied to the layer's; it runs only when a hook would see its output
    (transformers' recorder while a call collects router logits, or any other) or the block returns
    part of it (router_output)."""

    def __init__(self, moe: MoELayer, router: nn.Module, router_output: tuple[int, bool] | None = None,
                 skeleton: nn.Module | None = None):
        super().__init__()
        self.moe, self.router, self.router_output = moe, router, router_output
        # what the conversion read from the router module (top_k, ...): the layer's config, fixed
        self._routing = {name: getattr(router, name) for name in ROUTING_ATTRS if hasattr(router, name)}
        # the converted block with its parameters on the meta device (no memory), for to_hf(); not a
        # submodule, so that its parameters are nobody's
        object.__setattr__(self, "_skeleton", skeleton)
        self._waiting = None  # why a forward refuses to run: part of a checkpoint held back (_take_transformers_keys)
        self.tie_router()
        # load_state_dict(assign=True) puts the state_dict's two copies in as two tensors: tie again
        self.register_load_state_dict_post_hook(_tie_router_after_load)
        self.register_load_state_dict_pre_hook(_take_transformers_keys)

    def tie_router(self, names: set[str] | None = None) -> None:
        """The router module's parameters (and correction bias) are the layer's: one set, one set
        of gradients, whatever replaced either (names: only those, by the router module's names)."""
        router = self.router
        if "weight" not in router._parameters:  # a wrapper's property (peft's modules_to_save)
            raise RuntimeError(self._router_replaced())
        for name, mine in self._router_tensors():
            if names is None or name in names:
                setattr(router, name, mine)

    def _apply(self, fn, recurse: bool = True):
        """Module.to() and the like, then the router module's tensors that were the layer's tied
        again: the layer keeps its own where a copy would hold nothing new (MoELayer._apply), while
        the router module's buffers (the correction bias) are replaced by copies. One the user
        had replaced stays replaced (the next forward refuses it, naming the remedy)."""
        _refuse_move(self, "", fn)
        tied = {name for name, mine in self._router_tensors() if _held(self.router, name) is mine}
        out = super()._apply(fn, recurse)
        self.tie_router(tied)
        return out

    def _router_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(the router module's name, the layer's tensor) of each router tensor the layer has."""
        moe = self.moe
        return [(name, t) for name, t in (("weight", moe.router_weight), ("bias", moe.router_bias),
                                          ("e_score_correction_bias", moe.e_score_correction_bias)) if t is not None]

    @torch.no_grad()
    def to_hf(self, device: torch.device | str | None = None, dst: int | None = None) -> nn.Module | None:
        """The transformers block this one was converted from, holding the layer's weights as they
        are now (every rank's experts gathered: collective when world_size > 1), each training
        where the layer's does now, in this block's train or eval mode and with the model's
        transformers config (shared), and this block's own router module (shared, not copied:
        unpatch_model's use): for save_pretrained, or a model without flashmoe_py. device: where
        its other parameters are made (default the layer's; MoELayer.full_weight_dict's device).
        dst: a global rank, the only one given the block (the others take part and get None).
        Each weight is checked to read back through the block's conversion as the layer's
        (RuntimeError if not)."""
        if self._skeleton is None:
            raise RuntimeError("this HFMoEBlock was built without its transformers block's skeleton")
        moe = self.moe
        device = moe.device if device is None else torch.device(device)
        block = copy.deepcopy(self._skeleton, _live_configs(self._skeleton))
        block.train(self.training)  # as this block is now, not as it was when converted
        layout = convert_block(block).gate_up_layout  # (converted on the meta device: no memory)
        full = moe.full_weight_dict(layout, device=device, dst=dst)  # every rank gathers first
        if not full:  # another rank than dst
            return None
        for module in block.modules():
            for name, p in module._parameters.items():
                if p is not None and p.is_meta:
                    module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device))
        parent, _, child = self._skeleton._router_path.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, child, self.router)
        groups = _param_groups(block, self.router)  # the router's are the layer's own
        for p in groups["experts"]:
            p.requires_grad_(moe.w_in.requires_grad)
        for p in groups["shared"]:  # (deepseek without shared experts: an MLP of width 0)
            p.requires_grad_(moe.shared_w_in is not None and moe.shared_w_in.requires_grad)
        conv = convert_block(block)
        want = {n: full[n] for n in conv.weights if n not in ROUTER_TENSORS}
        for name, value in want.items():
            if name == "shared_w_in":  # joined from the shared MLP's gate and up: split back
                gate, up = value.chunk(2, dim=1)
                conv.shared_mlp.gate_proj.weight.copy_(gate.t())
                conv.shared_mlp.up_proj.weight.copy_(up.t())
            else:
                conv.weights[name].copy_(value)
        back = convert_block(block).weights
        for name, value in want.items():
            if not torch.equal(back[name], value):
                raise RuntimeError(f"to_hf: {type(block).__name__}'s {name} does not read back as the layer's")
        return block

    def hub_names(self, model: nn.Module, name: str) -> tuple[frozenset[str], frozenset[str]]:
        """(the keys of the transformers block's modules, the keys save_pretrained writes for them)
        under the transformers model `model` holding this block as `name` ("model.layers.0.mlp."),
        kept for the next call with the same model type, name and conversions; the modules' keys
        again where transformers cannot revert them (nothing of the Hub's layout to look for)."""
        key = (type(model), name, id(getattr(model, "_weight_conversions", None)))
        cached = self.__dict__.get("_hub_names")
        if cached is None or cached[0] != key:
            meta = {name + k: t for k, t in self._skeleton.state_dict().items()}
            try:
                written = hub_layout.to_hub_layout(model, meta)
            except Exception:  # (a transformers release whose save_pretrained cannot write this model's either)
                written = meta
            cached = (key, frozenset(meta), frozenset(written))
            self.__dict__["_hub_names"] = cached
        return cached[1], cached[2]

    def hf_keys(self) -> frozenset[str]:
        """The keys of the transformers block's state_dict (its modules' layout, relative to it)."""
        if "_hf_keys" not in self.__dict__:
            self.__dict__["_hf_keys"] = frozenset(self._skeleton.state_dict())
        return self.__dict__["_hf_keys"]

    @torch.no_grad()
    def state_from_hf(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This block's state_dict (keys relative to it) holding the weights of `hf_state`, the whole
        state_dict of the transformers block it was converted from (keys relative to that block,
        as a transformers checkpoint holds them under it), read through the block's conversion:
        this rank's experts in the layer's layout (MoELayer.state_from_full), the router module's
        tensors the layer's. RuntimeError naming the keys where hf_state is not that block's whole
        state_dict; ValueError (the conversion's or the layer's) for a weight it cannot take."""
        if self._skeleton is None:
            raise RuntimeError("this HFMoEBlock was built without its transformers block's skeleton")
        block = copy.deepcopy(self._skeleton, _live_configs(self._skeleton))
        want = set(block.state_dict())
        missing, unexpected = sorted(want - set(hf_state)), sorted(set(hf_state) - want)
        if missing or unexpected:
            raise RuntimeError(
                f"{type(block).__name__}'s state_dict has {sorted(want)}; missing {missing}, unexpected {unexpected}")
        for key, t in hf_state.items():
            if not (torch.is_tensor(t) and t.is_floating_point() and t.layout == torch.strided) or t.is_meta:
                raise ValueError(f"{key}: expected a dense floating-point tensor with data, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}")
        # the skeleton's meta tensors -> hf_state's (float16's, float64's as float32: the copies into the layer
        # cast them as they would cast the checkpoint's own)
        block.load_state_dict({k: t if t.dtype in DTYPES.values() else t.float() for k, t in hf_state.items()},
                              assign=True)
        conv = convert_block(block)
        state = {f"moe.{name}": t.contiguous()  # (a transposed view converted: assign=True takes it as the layer's)
                 for name, t in self.moe.state_from_full(conv.weights, conv.gate_up_layout).items()}
        own = self.state_dict(keep_vars=True)
        by_tensor = {id(t): f"moe.{name}" for name, t in self.moe.state_dict(keep_vars=True).items()}
        for key, t in own.items():  # the router module's tensors: the layer's (tie_router)
            if key not in state and id(t) in by_tensor:
                state[key] = state[by_tensor[id(t)]]
        if set(state) != set(own):
            raise RuntimeError(f"the block's own state_dict has {sorted(own)}, converted were {sorted(state)}")
        return state

    def _router_replaced(self) -> str:
        return (f"the block's router module ({type(self.router).__name__}) no longer holds its MoELayer's "
                "router_weight: it was replaced or wrapped (peft's modules_to_save?), or given another tensor "
                "(torch.func.functional_call with tie_weights=False?), but the block routes with moe.router_weight, "
                "so that module would never train. Leave it out of modules_to_save (to train the router, set "
                "requires_grad on each block's moe.router_weight after wrapping); keep functional_call's "
                "tie_weights=True")

    def _bias_replaced(self) -> str | None:
        """Where the router module's bias or correction bias is no longer the layer's tensor (one
        assigned to the module: the layer would route with the old one, and to_hf export the new)."""
        router = self.router
        for name, mine in self._router_tensors():
            if name != "weight" and _held(router, name) is not mine:  # (the weight: _router_replaced)
                return (f"the block's router module ({type(router).__name__}) was given another {name} tensor, but "
                        f"the block routes with its MoELayer's ({'router_bias' if name == 'bias' else name}), so "
                        f"the new one would not be used: update it in place instead (router.{name}.copy_(new), "
                        "or .add_(delta)), which both hold")
        return None

    def _routing_changed(self) -> str | None:
        """Where a routing attribute of the router module (top_k, ...) no longer holds the value
        the layer's config was built from (the layer would route as before, silently)."""
        for name, was in getattr(self, "_routing", {}).items():  # (a block pickled before it was kept: none)
            if not hasattr(self.router, name):  # a wrapper's (peft's LoRA around Llama-4's nn.Linear router)
                return self._router_replaced()
            now = getattr(self.router, name)
            if now != was:
                return (f"the block's router module ({type(self.router).__name__}) has {name}={now!r}, but its "
                        f"MoELayer was built from {name}={was!r} and routes by its config, fixed when built: set it "
                        "back, or unpatch_model, change the transformers block and patch_model again")
        return None

    def forward(self, hidden_states: torch.Tensor):
        if (waiting := self.__dict__.get("_waiting")) is not None:  # (a block pickled before it had one: None)
            raise RuntimeError(waiting)
        if getattr(self.router, "weight", None) is not self.moe.router_weight:  # a wrapper may have none
            raise RuntimeError(self._router_replaced())
        if (problem := self._bias_replaced() or self._routing_changed()) is not None:
            raise RuntimeError(problem)
        if _router_hooks_refused(self.router):
            raise RuntimeError(f"the block's router module ({type(self.router).__name__}) has a forward pre-hook or a "
                               f"backward hook: {ROUTER_HOOKS}")
        out = self.moe(hidden_states)
        if self.router_output is None and not _hooks_want_router(self.router):
            return out
        router_out = self.router(hidden_states.reshape(-1, hidden_states.shape[-1]))
        if self.router_output is None:
            return out
        index, flat = self.router_output
        return (out.reshape(-1, out.shape[-1]) if flat else out), router_out[index]


ROUTER_TENSORS = ("router_weight", "router_bias", "e_score_correction_bias")  # the router module's own
# the router module's attributes a conversion reads into the layer's config (or that fix its shape)
ROUTING_ATTRS = ("top_k", "num_experts", "n_routed_experts", "norm_topk_prob", "num_group", "n_group",
                 "topk_group", "routed_scaling_factor")
ROUTER_HOOKS = ("the layer routes with its own router, so a pre-hook could not change its input and a backward "
                "hook would not see its gradients (its forward hooks see the router's output: they are kept)")


def _held(module: nn.Module, name: str) -> torch.Tensor | None:
    """module's own parameter or buffer `name` (not through Module.__getattr__), or None."""
    return module._parameters[name] if name in module._parameters else module._buffers.get(name)


def _router_hooks_refused(router: nn.Module) -> bool:
    """Whether the block's router module has hooks the layer cannot honour (ROUTER_HOOKS)."""
    return bool(router._forward_pre_hooks or router._forward_pre_hooks_with_kwargs or router._backward_hooks
                or router._backward_pre_hooks)


@functools.cache
def _output_collector():
    """transformers' context variable of the outputs a model call collects (None if it has none)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    return _active_collector


def _hooks_want_router(router: nn.Module) -> bool:
    """Whether a forward hook on the block's router module would see its output this call: any
    hook but transformers' output recorder, which stays on the router after the first
    output_router_logits=True call and records only while a model call collects its key. Under
    saved-tensor hooks (activation checkpointing's, which recompute the block in backward, outside
    the model call that collects), any hook: the forward and its recomputation must run the same
    ops."""
    hooks = router._forward_hooks.values()
    if not hooks:
        return False
    if torch.compiler.is_compiling():  # dynamo cannot read the recorder's closure: run the router
        return True
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return True
    collector = _output_collector()
    if collector is None:  # a transformers without it: run the router for whatever its hooks are
        return True
    collecting = collector.get() or {}
    for hook in hooks:
        code = getattr(hook, "__code__", None)
        if (getattr(hook, "__module__", None) != "transformers.utils.output_capturing" or code is None
                or "key" not in code.co_freevars):
            return True
        if hook.__closure__[code.co_freevars.index("key")].cell_contents in collecting:
            return True
    return False


def _param_groups(block: nn.Module, router: nn.Module) -> dict[str, set[nn.Parameter]]:
    """A transformers block's parameters by what the layer holds each as: its experts, its router
    (`router`, the block's router module), its shared experts (the rest)."""
    experts, routing = set(block.experts.parameters()), set(router.parameters())
    return {"experts": experts, "router": routing,
            "shared": {p for p in block.parameters() if p not in experts and p not in routing}}


def _live_configs(block: nn.Module) -> dict[int, object]:
    """A deepcopy memo keeping the transformers configs `block`'s modules hold as they are: the
    model's own, shared (its experts read settings from it at each call, as
    set_experts_implementation changes them), not copies frozen when the block was."""
    try:
        from transformers import PretrainedConfig
    except ImportError:  # a block not of transformers: none to keep
        return {}
    return {id(v): v for m in block.modules() for v in vars(m).values() if isinstance(v, PretrainedConfig)}


def _skeleton(block: nn.Module, router: nn.Module) -> nn.Module:
    """A copy of `block` whose parameters are on the meta device (no memory), its buffers copied,
    its hooks left out, its transformers config the model's own (_live_configs), and the path of
    its router module in `_router_path`."""
    memo = {id(p): nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad) for p in block.parameters()}
    memo |= _live_configs(block)
    for module in block.modules():  # hooks are the live model's (they may hold it all): not copied
        memo |= {id(v): type(v)() for k, v in vars(module).items() if "hook" in k and isinstance(v, dict)}
    skeleton = copy.deepcopy(block, memo)
    skeleton._router_path = next(name for name, m in block.named_modules() if m is router)
    return skeleton


def _dtype_name(t: torch.Tensor, what: str) -> str:
    name = next((n for n, d in DTYPES.items() if d == t.dtype), None)
    if name is None:
        raise UnsupportedBlock(f"{what} has dtype {t.dtype}; flashmoe_py takes {tuple(DTYPES)}")
    return name


def _require_silu(act: nn.Module, what: str) -> None:
    if "silu" not in type(act).__name__.lower():
        raise UnsupportedBlock(f"{what} activation {type(act).__name__} is not SiLU (swiglu)")


def _common(router_weight: torch.Tensor, expert_weight: torch.Tensor, **fields) -> dict:
    """MoEConfig fields every block shares: sizes and dtypes (a router kept in another dtype than
    the experts, as DeepSeek-V3's float32 router, gets router_dtype)."""
    dtype = _dtype_name(expert_weight, "the experts")
    router_dtype = _dtype_name(router_weight, "the router")
    E, H = router_weight.shape
    return dict(hidden_size=H, num_experts=E, dtype=dtype,
                router_dtype=None if router_dtype == dtype else router_dtype, **fields)


def _shared_mlp(mlp: nn.Module, act: nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """A gate_proj / up_proj / down_proj MLP -> (shared_w_in [H, 2F_s] (gate | up) and
    shared_w_out [F_s, H], F_s)."""
    for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        if proj.bias is not None:
            raise UnsupportedBlock("the shared expert's projections have biases")
    _require_silu(act, "the shared expert's")
    w_in = torch.cat([mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()], dim=1)
    return {"shared_w_in": w_in, "shared_w_out": mlp.down_proj.weight.t()}, mlp.gate_proj.out_features


def _softmax_block(block: nn.Module) -> Conversion:
    """Mixtral, Qwen3-MoE, OLMoE; Qwen2-MoE and Qwen3-Next with their gated shared expert.
    Experts: gate_up_proj [E, 2F, H] (gate | up rows), down_proj [E, H, F]."""
    gate, experts = block.gate, block.experts
    _require_silu(experts.act_fn, "expert")
    if getattr(block, "jitter_noise", 0):
        raise UnsupportedBlock(f"router_jitter_noise={block.jitter_noise} (training-time input noise) "
                               "is not implemented")
    weights = {"router_weight": gate.weight, "w_in": experts.gate_up_proj.transpose(1, 2),
               "w_out": experts.down_proj.transpose(1, 2)}
    fields = dict(ffn_size=experts.gate_up_proj.shape[1] // 2, top_k=gate.top_k,
                  renormalize=bool(getattr(gate, "norm_topk_prob", True)))  # Mixtral always renormalises
    if getattr(block, "shared_expert", None) is not None:
        if block.shared_expert_gate.bias is not None:
            raise UnsupportedBlock("the shared expert's gate has a bias")
        shared, width = _shared_mlp(block.shared_expert, block.shared_expert.act_fn)
        weights |= shared | {"shared_gate_weight": block.shared_expert_gate.weight}
        fields |= dict(shared_experts=1, shared_ffn_size=width, shared_expert_gate=True)
    return Conversion(MoEConfig(**_common(gate.weight, experts.gate_up_proj, **fields)), weights, gate,
                      shared_mlp=getattr(block, "shared_expert", None))


def _sigmoid_grouped_block(block: nn.Module) -> Conversion:
    """DeepSeek-V3 and GLM-4.5: grouped sigmoid routing with a correction bias and a scaling
    factor; n_shared_experts shared experts as one MLP of width n * moe_intermediate_size.
    Experts as in _softmax_block."""
    gate, experts = block.gate, block.experts
    _require_silu(experts.act_fn, "expert")
    F = experts.gate_up_proj.shape[1] // 2
    shared, width = {}, 0  # n_shared_experts=0 builds an MLP of width 0 (or none): no shared experts
    mlp = getattr(block, "shared_experts", None)
    if mlp is not None and mlp.gate_proj.out_features > 0:
        shared, width = _shared_mlp(mlp, mlp.act_fn)
    if width % F:
        raise UnsupportedBlock(f"the shared experts' width {width} is not a multiple of the experts' {F}")
    weights = {"router_weight": gate.weight, "w_in": experts.gate_up_proj.transpose(1, 2),
               "w_out": experts.down_proj.transpose(1, 2),
               "e_score_correction_bias": gate.e_score_correction_bias, **shared}
    fields = dict(ffn_size=F, top_k=gate.top_k, routing="sigmoid_grouped", n_group=gate.num_group,
                  topk_group=gate.topk_group, renormalize=bool(gate.norm_topk_prob),
                  routed_scaling_factor=float(gate.routed_scaling_factor), shared_experts=width // F)
    return Conversion(MoEConfig(**_common(gate.weight, experts.gate_up_proj, **fields)), weights, gate,
                      shared_mlp=mlp if width else None)


def _llama4_block(block: nn.Module) -> Conversion:
    """Llama-4: top-k logits, their sigmoid scales the expert's input; one shared expert. Experts:
    gate_up_proj [E, H, 2F] (gate | up columns), down_proj [E, F, H]. Returns (hidden states
    [tokens, H], router logits)."""
    router, experts = block.router, block.experts
    _require_silu(experts.act_fn, "expert")
    if router.bias is not None:
        raise UnsupportedBlock("the Llama-4 router has a bias")
    shared, width = _shared_mlp(block.shared_expert, block.shared_expert.activation_fn)
    weights = {"router_weight": router.weight, "w_in": experts.gate_up_proj, "w_out": experts.down_proj,
               **shared}
    fields = dict(ffn_size=experts.gate_up_proj.shape[2] // 2, top_k=router.top_k, routing="topk_sigmoid",
                  renormalize=False, weight_on_input=True, shared_experts=1, shared_ffn_size=width)
    return Conversion(MoEConfig(**_common(router.weight, experts.gate_up_proj, **fields)), weights, router,
                      router_output=(1, True), shared_mlp=block.shared_expert)


def _gpt_oss_block(block: nn.Module) -> Conversion:
    """gpt-oss: router with a bias, softmax over the top-k logits; experts with biases and the
    clamped SwiGLU, gate and up columns interleaved: gate_up_proj [E, H, 2F], gate_up_proj_bias
    [E, 2F], down_proj [E, F, H], down_proj_bias [E, H]. Returns (hidden states, routing weights)."""
    router, experts = block.router, block.experts
    weights = {"router_weight": router.weight, "router_bias": router.bias, "w_in": experts.gate_up_proj,
               "bias_in": experts.gate_up_proj_bias, "w_out": experts.down_proj, "bias_out": experts.down_proj_bias}
    fields = dict(ffn_size=experts.gate_up_proj.shape[2] // 2, top_k=router.top_k, routing="topk_softmax",
                  router_bias=True, expert_bias=True, activation="clamped_swiglu",
                  swiglu_alpha=float(experts.alpha), swiglu_limit=float(experts.limit))
    return Conversion(MoEConfig(**_common(router.weight, experts.gate_up_proj, **fields)), weights, router,
                      gate_up_layout="interleaved", router_output=(1, False))


ADAPTERS: dict[str, Callable[[nn.Module], Conversion]] = {
    "MixtralSparseMoeBlock": _softmax_block, "Qwen3MoeSparseMoeBlock": _softmax_block,
    "OlmoeSparseMoeBlock": _softmax_block, "Qwen2MoeSparseMoeBlock": _softmax_block,
    "Qwen3NextSparseMoeBlock": _softmax_block,
    "DeepseekV3MoE": _sigmoid_grouped_block, "Glm4MoeMoE": _sigmoid_grouped_block,
    "Llama4TextMoe": _llama4_block, "GptOssMLP": _gpt_oss_block,
}


def convert_block(block: nn.Module) -> Conversion:
    """The Conversion that reproduces `block` (raises UnsupportedBlock, saying why). A block is
    known by its class or a base class's name (ADAPTERS)."""
    adapter = next((ADAPTERS[c.__name__] for c in type(block).__mro__ if c.__name__ in ADAPTERS), None)
    if adapter is None:
        raise UnsupportedBlock(f"{type(block).__name__}: no adapter for this block; flashmoe_py converts "
                               f"{', '.join(ADAPTERS)}")
    if isinstance(getattr(block, "experts", None), nn.ModuleList):
        raise UnsupportedBlock(f"{type(block).__name__}: its experts are an nn.ModuleList of per-expert MLPs "
                               "(transformers 4.x's or a trust_remote_code layout); flashmoe_py converts transformers "
                               "5's fused experts (load the model with transformers >= 5, without trust_remote_code)")
    try:
        return adapter(block)
    except (UnsupportedBlock, ConfigError) as e:
        raise UnsupportedBlock(f"{type(block).__name__}: {e}") from None
    except AttributeError as e:  # a block of that name laid out otherwise than the adapter reads
        raise UnsupportedBlock(f"{type(block).__name__}: not transformers 5's layout of it ({e})") from None


def block_config(block: nn.Module) -> MoEConfig:
    """The MoEConfig that reproduces `block` (raises UnsupportedBlock, saying why)."""
    return convert_block(block).config


def _checked_conversion(block: nn.Module) -> tuple[Conversion, dict[str, bool]]:
    """convert_block, refusing weights not loaded yet, and which of the block's parameter groups
    train: {"experts", "router", "shared"}: requires_grad of each group's parameters (a group
    partly frozen is refused: the layer holds each as one set of tensors). Not collective."""
    conv = convert_block(block)
    hooked = [name for name, m in block.named_modules() if name and m is not conv.router and _has_hooks(m)]
    if hooked:
        raise UnsupportedBlock(f"{type(block).__name__}: its submodule(s) {hooked} have hooks, which would never run: "
                               "the layer computes its experts itself (hooks on the block, and forward hooks on "
                               "its router module, are kept)")
    if _router_hooks_refused(conv.router):
        raise UnsupportedBlock(f"{type(block).__name__}: its router module has a forward pre-hook or a backward "
                               f"hook: {ROUTER_HOOKS}")
    if any(t.is_meta for t in conv.weights.values()):
        raise UnsupportedBlock(f"{type(block).__name__}: its weights are on the meta device (not loaded "
                               "yet); materialise them before converting the block")
    trainable = {}
    for group, params in _param_groups(block, conv.router).items():
        states = {p.requires_grad for p in params}
        if len(states) > 1:
            raise UnsupportedBlock(f"{type(block).__name__}: its {group} parameters are partly frozen "
                                   "(requires_grad differs among them); the layer holds them as one set: freeze "
                                   "or unfreeze them together")
        if states:
            trainable[group] = states.pop()
    return conv, trainable


@torch.no_grad()
def _build(block: nn.Module, conv: Conversion, trainable: dict[str, bool], **layer_kwargs) -> HFMoEBlock:
    """The HFMoEBlock of block's checked conversion (collective when torch.distributed is
    initialised); its parameters train where the block's did."""
    skeleton = _skeleton(block, conv.router)
    layer_kwargs.setdefault("device", conv.weights["w_in"].device)
    layer_kwargs.setdefault("seed", 0)  # its weights are loaded below: no draw from torch's generator
    moe = MoELayer(conv.config, **layer_kwargs)
    moe.load_full_weights(**conv.weights, gate_up_layout=conv.gate_up_layout)
    for name, p in moe.named_parameters(recurse=False):
        group = "router" if name.startswith("router_") else "shared" if name.startswith("shared_") else "experts"
        if group in trainable:
            p.requires_grad_(trainable[group])
    return HFMoEBlock(moe, conv.router, conv.router_output, skeleton)


# A module's forward and backward hooks (not its state_dict hooks: the layouts differ)
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(module: nn.Module) -> bool:
    """Whether any of the module's _HOOK_DICTS holds a hook."""
    return any(getattr(module, name, None) for name in _HOOK_DICTS)


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Move old's forward and backward hooks to `new` (the module taking old's place: the same
    inputs and outputs): new takes the very dicts, so the handles that registered them still
    remove them; old gets empty ones (a hook registered on either then runs on that one only)."""
    for name in _HOOK_DICTS:
        if hasattr(old, name):
            hooks = getattr(old, name)
            setattr(new, name, hooks)
            setattr(old, name, type(hooks)())
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


def from_hf_block(block: nn.Module, **layer_kwargs) -> HFMoEBlock:
    """Build this rank's HFMoEBlock from a full (unsharded) transformers block.

    layer_kwargs go to MoELayer (backend, placement, process_group, max_tokens_per_rank, ...);
    the device defaults to the block's. Its parameters train where the block's did (a group of
    them partly frozen is refused); HFMoEBlock.to_hf() gives the block back with the layer's
    weights. Collective when torch.distributed is initialised: every rank must convert the same
    block (patch_model compares the ranks' decisions first). The block's own hooks stay on it
    (patch_model moves them to the block's replacement)."""
    return _build(block, *_checked_conversion(block), **layer_kwargs)


def _ranks_agree(decisions: list[tuple[str, str | None]], process_group) -> None:
    """Raise ConsistencyError on every rank unless every rank converts the same blocks (each
    layer's construction is collective: a rank that skipped one would leave the others waiting).
    decisions: (module name, None where converted, else why it is left alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    everyone = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(everyone, decisions, group=process_group)

    def says(reason: str | None) -> str:
        return "converts it" if reason is None else f"leaves it: {reason}"

    mine = dict(decisions)
    for rank, theirs in enumerate(everyone):
        if [name for name, _ in theirs] != list(mine):
            raise ConsistencyError(f"patch_model: rank {rank}'s model has other MoE blocks than this rank's")
        for name, reason in theirs:
            if (reason is None) != (mine[name] is None):
                raise ConsistencyError(f"patch_model: the ranks disagree on block {name!r}: this rank "
                                       f"{says(mine[name])}; rank {rank} {says(reason)}")


def _holders(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Every path of each module of `model` (one reached twice has two) and the paths of the
    modules holding each parameter as their own: {id(module): paths}, {id(parameter): paths}."""
    paths: dict[int, list[str]] = {}
    holders: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), []).append(path)
    return paths, holders


def _tied_elsewhere(index: tuple, name: str, block: nn.Module) -> str | None:
    """How the block at `name` is tied to the rest of the model (`index`: _holders of it), or
    None: the same module at another path too (one block in two layers), or a parameter of it
    also held by a module outside it (another block's, a dense layer's). Its replacement would
    hold copies, and the first optimizer step would untie them."""
    paths, holders = index
    others = [path for path in paths[id(block)] if path != name]
    if others:
        return f"is also the module at {others[0]!r}"
    outside = sorted(path for p in block.parameters() for path in holders[id(p)]
                     if path != name and not path.startswith(f"{name}."))
    return f"shares parameters with {outside[0]!r}" if outside else None


def patch_model(model: nn.Module, **layer_kwargs) -> dict[str, str]:
    """Replace every MoE block of `model` that ADAPTERS converts (in place) by an HFMoEBlock on
    this rank. Returns {module name: "replaced" or the reason it was left alone} for every module
    with an `experts` submodule. Every rank must call it on the same model: the ranks' decisions
    are compared first (ConsistencyError on every rank where they differ, e.g. weights loaded on
    one rank only), then the layers compare their configs and router weights. The layers'
    sharded parameters are excluded from DistributedDataParallel wrapping `model`
    (data_parallel.exclude_from_ddp; prepare_ddp also scales their gradients for DDP's average,
    without which a forward under DDP raises). The model and every module between it and a block
    refuse a move their blocks' layers would refuse (.to(), .half(), .cuda() elsewhere), before any
    module moves (_guarded_apply). A transformers model's save_pretrained without a
    state_dict saves hf_state_dict's in one process, and is refused with several
    (_save_pretrained). A state_dict of the unpatched blocks' layout is converted as it loads
    (_take_transformers_keys).
    unpatch_model takes these off (_guard, _unguard). A model already holding an
    HFMoEBlock is refused (ValueError): unpatch_model first to patch it with other arguments."""
    if isinstance(getattr(model, "experts", None), nn.Module) and not isinstance(model, HFMoEBlock):
        raise ValueError(f"patch_model: `model` is itself an MoE block ({type(model).__name__}), which it cannot "
                         "replace in place: pass the module that holds it, or build its replacement with "
                         "flashmoe_py.hf.from_hf_block(block)")
    blocks, decisions, patched, index = [], [], [], _holders(model)
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, HFMoEBlock):
            decisions.append((name, "already an HFMoEBlock"))
            patched.append(name)
            continue
        if not isinstance(getattr(module, "experts", None), nn.Module):
            continue
        try:
            if (tie := _tied_elsewhere(index, name, module)) is not None:
                raise UnsupportedBlock(f"{type(module).__name__}: {tie} (a layer holds copies of its block's "
                                       "weights: converting it would untie them)")
            blocks.append((name, *_checked_conversion(module)))
            decisions.append((name, None))
        except UnsupportedBlock as e:
            decisions.append((name, str(e)))
    _ranks_agree(decisions, layer_kwargs.get("process_group"))
    if patched:  # on every rank, once they agree
        raise ValueError(f"patch_model: `model` is already patched ({len(patched)} HFMoEBlock(s), the first at "
                         f"{patched[0]!r}); a second call would leave them as they are and ignore its arguments: "
                         "call flashmoe_py.hf.unpatch_model(model) first to patch it again")
    replaced = []  # the blocks' parameters (an optimizer built before holds these)
    for name, conv, trainable in blocks:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        block = getattr(parent, child)
        replaced += [(f"{name}.{n}", p) for n, p in block.named_parameters()]
        with torch.inference_mode(False):  # patched under inference_mode: the model's tensors, not inference tensors
            replacement = _build(block, conv, trainable, **layer_kwargs)
        _move_hooks(block, replacement)
        setattr(parent, child, replacement)
    if blocks:
        exclude_from_ddp(model)
        _guard(model, [name for name, _, _ in blocks])
    take_out(model, replaced, "patch_model")
    return {name: "replaced" if reason is None else reason for name, reason in decisions}


def _refuse_move(block: HFMoEBlock, name: str, fn) -> None:
    """Raise ValueError where Module._apply(fn) (.to(), .half(), .cuda(), ...) would move a tensor
    of the patched block `name` to another dtype or device, which its MoELayer refuses."""
    refused, _ = block.moe.move_refused(fn)
    if refused:
        raise ValueError(f"the patched block {name or type(block).__name__!r} (patch_model's) cannot move "
                         f"{refused}; nothing was moved. Its MoELayer keeps the dtype and device it was built "
                         "with: move or cast the model before patch_model (or load it so: from_pretrained(dtype=..., "
                         "device_map=...)), or unpatch_model(model), move it, and patch_model again")


def _guarded_apply(holder: nn.Module, fn, recurse: bool = True):
    """Module._apply of a module holding patched blocks (the model, and each module between it and
    a block; patch_model sets it): refused before any module moves where a block's layer would
    refuse the move (torch moves the modules one by one, so the layer's own refusal came after
    those before it had moved: a model cast in part, and a later .float() rounds its weights
    through the other dtype), else the holder's own _apply."""
    for name, module in holder.named_modules():
        if isinstance(module, HFMoEBlock):
            _refuse_move(module, name, fn)
    return type(holder)._apply(holder, fn, recurse)


def _guard(model: nn.Module, blocks: list[str]) -> None:
    """What patch_model puts on the patched `model` and the modules holding its blocks (by name),
    each a module-level function or a functools.partial of one, so copy.deepcopy and pickling keep
    them: _guarded_apply as the _apply of `model` and of every module between it and the blocks;
    _take_transformers_keys as `model`'s load_state_dict pre hook; and, on a transformers model,
    _save_pretrained as its save_pretrained. _unguard takes them off."""
    holders = {".".join(name.split(".")[:i]) for name in blocks for i in range(name.count(".") + 1)}
    for name in holders:
        holder = model.get_submodule(name)
        holder._apply = functools.partial(_guarded_apply, holder)
    if not _load_guards(model):
        model.register_load_state_dict_pre_hook(_take_transformers_keys)
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = functools.partial(_save_pretrained, model)


def _unguard(model: nn.Module) -> None:
    """_guard undone on every module of `model` (patch_model's, wherever it was called: a
    wrapper's inner model too): each takes its class's _apply and save_pretrained again, and
    loses the load guard."""
    for module in model.modules():
        for name, func in (("_apply", _guarded_apply), ("save_pretrained", _save_pretrained)):
            put = module.__dict__.get(name)
            if isinstance(put, functools.partial) and put.func is func:
                del module.__dict__[name]
        for key in _load_guards(module):
            del module._load_state_dict_pre_hooks[key]
        module.__dict__.pop("_held_keys", None)


def _refuse_waiting(model: nn.Module, what: str) -> None:
    """RuntimeError naming the first HFMoEBlock in `model` whose weights wait for the rest of a
    checkpoint (_take_transformers_keys): what it holds is neither the old weights nor the new."""
    for name, m in model.named_modules():
        if isinstance(m, HFMoEBlock) and (waiting := m.__dict__.get("_waiting")) is not None:
            raise RuntimeError(f"{what}: the block {name} waits for the rest of a checkpoint, so its weights are not "
                               f"the checkpoint's: {waiting}")


def _save_pretrained(model: nn.Module, *args, **kwargs):
    """A patched model's save_pretrained (patch_model sets it on the model, a functools.partial,
    so copy.deepcopy and pickling keep it): the class's, given hf_state_dict(model) where no
    state_dict is passed, in one process (transformers refuses the patched model's own
    state_dict: each block's router weight is also its layer's). So Trainer's checkpoints and
    push_to_hub write the unpatched model's checkpoint there. With several processes, where
    hf_state_dict is collective but Trainer saves from one rank only, that call is refused (a
    ValueError naming how to save) rather than left waiting for the other ranks."""
    call = inspect.signature(type(model).save_pretrained).bind(model, *args, **kwargs)
    if call.arguments.get("state_dict") is None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                f"save_pretrained of a patched model without state_dict= at world size {dist.get_world_size()}: "
                "its experts are gathered from every rank, and this call may come from one rank only (Trainer's "
                "checkpoints do). On every rank: model.save_pretrained(path, state_dict=fm.hf_state_dict(model), "
                "is_main_process=rank == 0); under Trainer set save_strategy='no' and save so from a callback "
                "(or fm.sharded_state_dict to resume)")
        call.arguments["state_dict"] = hf_state_dict(model)
    return type(model).save_pretrained(*call.args, **call.kwargs)


def unpatch_model(model: nn.Module) -> dict[str, str]:
    """Put back, in place, the transformers block of every HFMoEBlock in `model` (patch_model's),
    holding the layer's current weights (HFMoEBlock.to_hf: every rank's experts gathered, so
    every rank must call it; collective): then model.state_dict() and save_pretrained are the
    unpatched model's. -> {module name: "restored"}."""
    if isinstance(model, HFMoEBlock):
        raise ValueError("unpatch_model: `model` is itself an HFMoEBlock, which it cannot replace in place: pass "
                         "the module that holds it, or take its transformers block with model.to_hf()")
    _refuse_waiting(model, "unpatch_model")
    report, replaced = {}, []
    for name, module in list(model.named_modules()):
        if isinstance(module, HFMoEBlock):
            parent_name, _, child = name.rpartition(".")
            include_in_ddp(model, [f"{name}.{n}" for n in sharded_names(module)])
            replaced += [(f"{name}.{n}", p) for n, p in module.named_parameters()]
            block = module.to_hf()
            _move_hooks(module, block)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, block)
            report[name] = "restored"
    _unguard(model)
    take_out(model, replaced, "unpatch_model")
    return report


def hf_state_dict(model: nn.Module, dst: int = 0) -> dict[str, torch.Tensor]:
    """The state_dict `model` would have unpatched (transformers' names and layouts, every rank's
    experts), on the CPU and on global rank `dst` only (the others get {}), while `model` stays
    patched and keeps training: `model.save_pretrained(path, state_dict=hf_state_dict(model),
    is_main_process=rank == dst)`. Collective: every rank calls it. One layer's experts are
    gathered at a time, one local expert a collective (HFMoEBlock.to_hf on the CPU), so no GPU
    holds more than its own experts and one of every rank's; `dst`'s host memory takes the whole
    model. Tensors that share memory in the model (tied embeddings) share it here too. Names are
    the unwrapped model's (DistributedDataParallel's "module." and torch.compile's "_orig_mod."
    left out, as from_pretrained reads them). With expert groups smaller than the world (each
    holding every expert), dst's group's experts are taken, the groups compared first
    (checkpoint.check_groups_agree: ConsistencyError on every rank where they differ). A model
    under FSDP (sharded parameters) is refused: save it with sharded_state_dict."""
    check_dst(dst)
    _refuse_waiting(model, "hf_state_dict")
    if any(isinstance(p, DTensor) for p in model.parameters()) or in_fsdp_class(model):
        raise DataParallelError("hf_state_dict: `model` is under FSDP (its parameters are sharded); save it with "
                                "fm.sharded_state_dict and torch.distributed.checkpoint")
    keep = not dist.is_initialized() or dist.get_rank() == dst
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, HFMoEBlock)}
    check_groups_agree([m.moe for m in blocks.values()], "hf_state_dict")  # dst's group's experts are saved
    live = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    copies: dict[tuple, torch.Tensor] = {}

    def on_cpu(t: torch.Tensor) -> torch.Tensor:  # one copy per view of the model's memory
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() not in live:
            return t.detach()  # made by to_hf here: not copied again
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in copies:
            copies[key] = t.detach().to("cpu", copy=True)
        return copies[key]

    def prefixed(name: str, key: str) -> str:
        return f"{name}.{key}" if name else key

    def unwrapped(name: str) -> str:
        """name without wrappers' parts (DDP's "module.", torch.compile's "_orig_mod.", the
        activation-checkpoint wrapper's): torch's reading of its longest attribute path, the
        rest (a key that is no attribute, as a quantizer's) kept as it is."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            try:
                (fqn,) = _get_fqns(model, ".".join(parts[:end]))
            except AttributeError:
                continue
            return ".".join([fqn, *parts[end:]]) if fqn else ".".join(parts[end:])
        return name

    def block_name(name: str) -> str:  # a path through the block (a wrapper of the block itself unwrapped too)
        return unwrapped(prefixed(name, "moe")).rpartition(".")[0]

    def exported() -> dict[str, torch.Tensor]:  # dst's: the model's own tensors, outside the blocks
        inside = tuple(prefixed(block_name(name), "") for name in blocks)
        named = ((unwrapped(k), t) for k, t in model.state_dict().items())
        return {k: on_cpu(t) for k, t in named if not k.startswith(inside)}

    def block_state(name: str, module: HFMoEBlock) -> dict[str, torch.Tensor]:
        group = module.moe.process_group
        if group is not None and dst not in dist.get_process_group_ranks(group):
            return {}  # another expert group: dst's holds every expert (compared with it above)
        block = module.to_hf(device="cpu", dst=dst)  # the gathers, then dst's conversion alone
        where = block_name(name)
        return {} if block is None else {prefixed(where, k): on_cpu(t) for k, t in block.state_dict().items()}

    state = _on_every_rank(lambda: exported() if keep else {}, "hf_state_dict: the model's state_dict")
    for name, module in blocks.items():
        state |= _on_every_rank(functools.partial(block_state, name, module), f"hf_state_dict: block {name!r}")
    return state


def _on_every_rank(step: Callable, what: str):
    """step()'s result, raised on every rank where it raised on any (runtime.on_every_rank): the
    others a RuntimeError naming the first such rank's error. An error inside step's collectives
    (a rank's part of a block's gathers) is left to the process group's timeout: the others are
    waiting in them."""
    return on_every_rank(step, lambda rank, text: RuntimeError(f"{what} failed on rank {rank}: {text}"))
