"""MoELayer: the drop-in expert-parallel MoE block (torch.nn.Module)."""

from __future__ import annotations

import copy
import functools
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from . import compiled_op
from .backends import capture
from .backends.flash import FlashBackend
from .backends.explicit_backward import explicit_forward, parameters_problem, without_autocast
from .backends.torch_ep import AUTOGRAD, EXPLICIT, TorchEPBackend
from .config import (EXPERT_WEIGHTS, OPTIONAL_WEIGHTS, RENAMED_WEIGHTS, WEIGHT_NEEDS, WEIGHTS, MoEConfig, as_int,
                     is_int, rows_of, x_shape_problem)
from .gate_up import (HALVES_VERSION, PAIRS_VERSION, STATE_DICT_MARKER, check_layout, to_halves, to_interleaved,
                      to_pairs)
from .gate_up import WEIGHTS as GATE_UP_WEIGHTS
from .kernels.fused_moe import TMA_ROW_MULTIPLE
from .options import FusedOptions
from .placement import EXPERTS_OVERWRITTEN, ExpertPlacement
from .routing import Routing, load_balancing_loss, route, router_logits
from .runtime import (ConsistencyError, find_mismatch, from_every_rank, fused_unavailable_reason, on_every_rank,
                      runtime_device)
from .wrappers import check_wrappers

BACKENDS = ("torch", "flash")


@dataclass
class MoEStats:
    """Per-forward counters of this rank's tokens, kept on the device (reading them syncs).

    expert_counts: [num_experts] int64 token-slots routed to each expert before any drop.
    dropped_slots: [] int64 token-slots dropped by the capacity policy (0 when dropless)."""

    expert_counts: torch.Tensor
    dropped_slots: torch.Tensor


class MoELayer(nn.Module):
    """An expert-parallel MoE block: replicated router, this rank's experts only.

    Parameters (E = num_experts, L = local experts on this rank, H = hidden, F = ffn, F_s = the
    shared experts' width; MoEConfig.weight_shapes names them all), None where the config has none:
      router_weight: [E, H]            (like nn.Linear(H, E).weight), in config.router_dtype
      router_bias:   [E]               router_bias=True
      e_score_correction_bias: [E]     fp32 buffer, routing='sigmoid_grouped' (selection only)
      w_in:          [L, H, F_in]      F_in = 2F for gated activations (gate and up columns in pairs,
                                       flashmoe_py/gate_up.py), else F
      w_out:         [L, F, H]
      bias_in, bias_out:   [L, F_in], [L, H] expert_bias=True (bias_in's columns as w_in's)
      shared_w_in:   [H, F_s_in]       shared experts, replicated like the router (gated: in pairs)
      shared_w_out:  [F_s, H]
      shared_gate_weight: [1, H]       shared_expert_gate=True
    Weights are drawn from `seed` per global expert, so a layer is the same function at any world
    size (seed None, the default: one drawn from torch's default generator, the first rank's of the
    layer's process group on each of its ranks, so torch.manual_seed decides it and two layers
    differ, as other modules' weights); replicated weights (router, shared experts) must be
    identical on every rank, which construction and load_full_weights check (ConsistencyError).

    forward(x): x [tokens, H] or [batch, seq, H] in config.dtype on the layer's device; returns the
    same shape and dtype. After each forward, `last_stats` holds this rank's MoEStats.

    Gradients (either backend, any world size): autograd gives x and every parameter their gradients
    of the sum of every rank's loss; capacity-dropped slots get none. w_in/w_out.grad on a rank sums
    every rank's tokens routed to its experts; router_weight and the shared experts are replicated,
    and their .grad holds only this rank's tokens' part, to be summed over ranks with the other
    replicated parameters, as data parallelism does (exclude w_in, w_out, bias_in and bias_out from that:
    they are sharded, not replicated; data_parallel.prepare_ddp / prepare_fsdp do both for DDP and
    FSDP and match the experts' gradients to their average, setting `expert_grad_divisor` (1 by
    default; the expert weights' gradients are divided by it in the backward) to the world size;
    a forward under either wrapper unprepared raises DataParallelError, wrappers.py). `backward`: "autograd" (backend
    torch's default) records the torch backend's ops and saves their activations; "saved" (backend
    flash's default) runs the forward as for inference, keeping x, its routing (with the fp32
    logits) and each expert row's first GEMM output before the activation (and the shared experts'
    a token; the fused kernel writes them as it goes; backend flash
    replays a small training forward from a CUDA graph and copies those out, and launches larger
    ones), and takes the gradients from them in explicit steps; "recompute" keeps only x, and in
    backward routes again and recomputes each expert's first GEMM (backends/explicit_backward.py).
    The backward is collective: every rank must record the forward (grad mode on, and x or a
    parameter requiring grad, on all ranks or on none; a mismatch raises on every rank, except that
    backend flash cannot see a rank under no_grad beside one recording) and run backward through it.

    backend: "torch" (all-to-all over torch.distributed; CPU or GPU) or "flash" (the fused NVSHMEM
    kernel; needs flashmoe_py.init() first, `max_tokens_per_rank` to size its buffers, and ends
    any device-side wait that lasts `timeout_s` seconds of the GPU's clock with
    FusedKernelError). `transport` (flash only): "p2p" (stores
    through NVLink peer mappings; default, one node) or "nvshmem" (NVSHMEM device-API puts and
    signals; reaches any PE NVSHMEM can, e.g. other nodes). With `cuda_graphs` (default), the fused
    forward is replayed from a CUDA graph per token count after its first call at that count (the 8
    latest counts keep theirs): it reads the weights where they are, so update them in place (copy_;
    gated w_in, bias_in and shared_w_in in the layer's pairs) or with load_full_weights (any layout); a
    weight replaced by a new tensor drops the graphs, which are captured again.
    `launch_override` (flash only, for tuning): launch settings fixed instead of chosen per call
    (kernels/launch_config.py). All of these and `backward` are options.FusedOptions, compared
    across ranks.
    """

    expert_grad_divisor: int = 1  # data_parallel.prepare_ddp / prepare_fsdp set the world size

    def __init__(self, config: MoEConfig, *, placement: ExpertPlacement | None = None,
                 process_group=None, backend: str = "torch", device=None, seed: int | None = None,
                 max_tokens_per_rank: int | None = None, timeout_s: float = 10.0,
                 cuda_graphs: bool = True, transport: str = "p2p", launch_override: dict | None = None,
                 backward: str | None = None):
        super().__init__()
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None (the default group), "
                            f"got {type(process_group).__name__} {process_group!r}")
        distributed = dist.is_available() and dist.is_initialized()
        # the default group as None: a layer then copies and pickles (a ProcessGroup does neither)
        self.process_group = process_group if distributed and process_group is not dist.group.WORLD else None
        self.world_size = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        options, problem = None, None
        try:
            options = FusedOptions(max_tokens_per_rank, timeout_s, cuda_graphs, transport, launch_override,
                                   backward)
        except ValueError as e:
            problem = str(e)
        seed = as_int(seed)
        # where a tensor made there lands: "cuda" is the current GPU, "cpu:0" the CPU (x is compared with it)
        try:
            where = _as_device(device) or _default_device(distributed)
            if where.type == "meta":
                raise ValueError(f"device={device!r} cannot be used here: the layer draws its weights when it is "
                                 "built; build it on a real device")
        except ValueError as e:
            where, problem = None, problem or str(e)
        self.device = where
        problem = problem or self._setup_problem(config, placement, backend, options, seed)
        if self.world_size > 1:
            self._check_ranks_agree(config, placement, backend, options, problem)
        if problem:
            raise ValueError(problem)
        self.config, self.options = config, options
        self.placement = placement or ExpertPlacement.contiguous(config.num_experts, self.world_size)
        self.local_experts = self.placement.local_experts
        self._make_weights()
        self._weight_specs = self._expected_weights()
        self.register_buffer(STATE_DICT_MARKER, torch.tensor(PAIRS_VERSION, device=self.device))  # gate_up.py
        with torch.inference_mode(False):  # built under inference_mode too: buffers whose writes are counted
            self.register_buffer("expert_positions", self.placement.positions(self.device), persistent=False)
            # the global expert in each of this rank's slots: a state_dict must hold the same ones
            self.register_buffer("expert_ids", torch.tensor(self.placed_experts, device=self.device))
        for name in ("expert_ids", "expert_positions"):  # _placement_buffer_problem: as built
            self.__dict__[f"_{name}_seen"] = (self._buffers[name], _version(self._buffers[name]))
        self.reset_parameters(seed)
        self.backend = TorchEPBackend(self) if backend == "torch" else FlashBackend(self, options)
        self.last_stats: MoEStats | None = None
        self._register()

    def _setup_problem(self, config, placement, backend, options: FusedOptions, seed) -> str | None:
        """What is wrong with the constructor arguments on this rank, or None."""
        if not isinstance(config, MoEConfig):
            return f"config must be a MoEConfig, got {type(config).__name__}"
        if (problem := _seed_problem(seed, config.num_experts)) is not None:
            return problem
        if placement is not None and not isinstance(placement, ExpertPlacement):
            return (f"placement must be an ExpertPlacement (e.g. ExpertPlacement.build(...)), got "
                    f"{type(placement).__name__} {placement!r}")
        if backend not in BACKENDS:
            return f"backend={backend!r} is not available; choose one of {BACKENDS}"
        if backend == "torch" and (options.launch_override is not None or options.transport != "p2p"):
            return ("launch_override and transport set the fused kernel's launch and transport: backend='torch' "
                    f"has neither (got launch_override={options.launch_override!r}, transport={options.transport!r})")
        if backend == "flash":
            try:
                options.require_max_tokens()
            except ValueError as e:
                return str(e)
            widths = (config.hidden_size, config.ffn_size, config.shared_width)
            if any(n % TMA_ROW_MULTIPLE for n in widths):
                return (f"backend='flash' needs hidden_size, ffn_size and the shared experts' width in multiples "
                        f"of {TMA_ROW_MULTIPLE} (16-byte weight rows for its TMA loads); got {widths}")
            reason = fused_unavailable_reason()
            if reason:
                return f"backend='flash' is unavailable: {reason}"
            if self.device != runtime_device():
                return (f"device={self.device} but flashmoe_py.init() bound this process to {runtime_device()}: a "
                        "fused layer lives on the runtime's GPU, where its symmetric heap is")
            if self.process_group not in (None, dist.group.WORLD):
                return "backend='flash' spans all NVSHMEM PEs: use the default process group"
            if options.backward == "autograd":
                return ("backward='autograd' records the torch backend's ops; backend='flash' runs one kernel "
                        "with none to record: its backward is 'saved' (None picks it) or 'recompute'")
        try:
            config.local_experts(self.world_size)
        except ValueError as e:
            return str(e)
        if placement is not None and (placement.num_experts, placement.world_size) != (
                config.num_experts, self.world_size):
            return (f"placement is for {placement.num_experts} experts on {placement.world_size} "
                    f"ranks, but the layer has {config.num_experts} experts on {self.world_size}")
        return None

    def _check_ranks_agree(self, config, placement, backend, options, problem) -> None:
        """Every rank must build the same layer; compared before any forward can hang on it."""
        if placement is None and problem is None:  # the default, compared as what it resolves to
            placement = ExpertPlacement.contiguous(config.num_experts, self.world_size)
        mine = {"problem": problem, "backend": backend,
                "options": options.to_dict() if options is not None else None,
                "config": config.to_dict() if isinstance(config, MoEConfig) else repr(config),
                "placement": placement.to_dict() if placement is not None else "contiguous"}
        everyone = from_every_rank(mine, self.process_group)
        if problem:
            return  # this rank raises its own error, which names the argument
        others = [(r, d["problem"]) for r, d in enumerate(everyone) if d["problem"]]
        if others:
            raise ConsistencyError(f"rank {others[0][0]} rejected the layer: {others[0][1]}")
        mismatch = find_mismatch([{k: v for k, v in d.items() if k != "problem"} for d in everyone])
        if mismatch:
            raise ConsistencyError(mismatch)

    def _make_weights(self) -> None:
        """Every weight MoEConfig.weight_shapes names, this rank's experts only; the optional ones
        the config lacks are None. The correction bias is a buffer: it only steers selection."""
        cfg = self.config
        shapes = cfg.weight_shapes(self.local_experts)
        for name in WEIGHTS + OPTIONAL_WEIGHTS:
            t = None
            if name in shapes:
                t = torch.empty(shapes[name], dtype=cfg.weight_dtype(name), device=self.device)
            if name == "e_score_correction_bias":
                self.register_buffer(name, t)
            else:
                self.register_parameter(name, None if t is None else nn.Parameter(t))

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Replicated weights (router, correction bias, shared experts) from `seed`, drawn in
        weight_shapes order; expert e's weights (w_in, w_out, bias_in, bias_out) from `seed + 1 + e`
        (independent of placement). Each is N(0, 1 / fan_in), biases included, so a fresh layer
        exercises every path. seed None: drawn from torch's default (CPU) generator, the process
        group's first rank's taken on each of its ranks. Collective when world_size > 1: the
        ranks' seeds are compared (None on every rank or the same int), then the replicas
        (ConsistencyError on every rank). A seed the constructor refuses raises ValueError (on
        every rank) before anything is drawn."""
        seed = as_int(seed)  # a numpy integer as the int it is
        drawn = int(torch.randint(0, 2**62, (), device="cpu")) if seed is None else None  # not a meta default
        if self.world_size > 1:  # every rank gathers, whatever its seed: the same collectives everywhere
            everyone = from_every_rank((seed, drawn), self.process_group)
            seeds = [given for given, _ in everyone]
            if any(given != seeds[0] for given in seeds):
                raise ConsistencyError(f"seed (MoELayer(seed=...) or reset_parameters(seed=...)): the ranks' seeds "
                                       f"differ ({seeds}): pass the same int on every rank, or None on every rank "
                                       "(rank 0's draw is taken)")
            drawn = everyone[0][1]
        if (problem := _seed_problem(seed, self.config.num_experts)) is not None:  # the same on every rank
            raise ValueError(f"reset_parameters: {problem}")
        seed = drawn if seed is None else seed
        cfg = self.config
        H, F = cfg.hidden_size, cfg.ffn_size
        fan_in = {"router_weight": H, "router_bias": H, "e_score_correction_bias": H, "w_in": H, "bias_in": H,
                  "w_out": F, "bias_out": F, "shared_w_in": H, "shared_w_out": cfg.shared_width,
                  "shared_gate_weight": H}
        names = list(cfg.weight_shapes())
        gen = torch.Generator(device=self.device)

        def draw(t: torch.Tensor, name: str) -> None:
            # float32 draws whatever torch's default dtype: the same seed, the same weights
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32, device=self.device)
                    / fan_in[name] ** 0.5)

        gen.manual_seed(seed)
        for name in names:
            if name not in EXPERT_WEIGHTS:
                draw(getattr(self, name), name)
        for slot, e in enumerate(self.placed_experts):
            gen.manual_seed(seed + 1 + e)
            for name in names:
                if name in EXPERT_WEIGHTS:
                    draw(getattr(self, name)[slot], name)
        self._check_replicas_agree("reset_parameters")

    @torch.no_grad()
    def load_full_weights(self, router_weight: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, *,
                          gate_up_layout: str = "halves", router_bias: torch.Tensor | None = None,
                          e_score_correction_bias: torch.Tensor | None = None,
                          bias_in: torch.Tensor | None = None, bias_out: torch.Tensor | None = None,
                          shared_w_in: torch.Tensor | None = None, shared_w_out: torch.Tensor | None = None,
                          shared_gate_weight: torch.Tensor | None = None) -> None:
        """Load the full (unsharded) layer's weights and keep this rank's experts.

        Names and shapes as MoEConfig.weight_shapes() gives them (full_weight_dict() returns them
        so): router_weight [E, H]; w_in [E, H, F_in]; w_out [E, F, H]; and each optional weight the
        config has, which is then required (one it lacks is refused). Any dtype and device.
        gate_up_layout: how the gated w_in, bias_in and shared_w_in lay out their last dimension:
        'halves' (every gate column, then every up column) or 'interleaved' (gate, up, gate, up,
        ...: gpt-oss); the layer keeps them in its own pairs (gate_up.py). Collective when
        world_size > 1: the replicated weights are compared across ranks (ConsistencyError if
        they differ)."""
        given = {"router_weight": router_weight, "w_in": w_in, "w_out": w_out, "router_bias": router_bias,
                 "e_score_correction_bias": e_score_correction_bias, "bias_in": bias_in, "bias_out": bias_out,
                 "shared_w_in": shared_w_in, "shared_w_out": shared_w_out,
                 "shared_gate_weight": shared_gate_weight}
        on_every_rank(lambda: self._check_full_weights(given, gate_up_layout), _refused("load_full_weights"),
                      self.process_group)
        for name, t in given.items():  # one at a time (a converted copy of every weight at once would not fit)
            if t is not None:
                getattr(self, name).copy_(self._local_weight(name, t, gate_up_layout))
        self._check_replicas_agree("load_full_weights")

    def state_from_full(self, full: dict[str, torch.Tensor], gate_up_layout: str = "halves") -> dict[str, torch.Tensor]:
        """The state_dict (keys relative to the layer) of this rank's layer holding the full layer's
        weights `full` (load_full_weights' names, shapes and gate_up_layout; the config's optional
        weights required, as there): this rank's experts, gate and up in pairs, the marker and
        expert_ids, each weight in full's dtype and on its device. Checked as load_full_weights
        checks its arguments (ValueError), on this rank alone: nothing is compared across ranks."""
        given = {name: full.get(name) for name in (*WEIGHTS, *OPTIONAL_WEIGHTS)}
        unknown = sorted(set(full) - set(given))
        if unknown:
            raise ValueError(f"state_from_full: {unknown} are not weights of a layer; expected names of {list(given)}")
        self._check_full_weights(given, gate_up_layout)
        state = {name: self._local_weight(name, t, gate_up_layout) for name, t in given.items() if t is not None}
        state[STATE_DICT_MARKER] = torch.tensor(PAIRS_VERSION)
        return {**state, "expert_ids": torch.tensor(self.placed_experts)}

    def _local_weight(self, name: str, t: torch.Tensor, gate_up_layout: str) -> torch.Tensor:
        """t, the full layer's weight `name` in gate_up_layout -> this rank's part in the layer's
        layout: an expert weight's rows of this rank's experts (taken first: only they are
        converted), a gated weight's gate and up columns in pairs."""
        if name in EXPERT_WEIGHTS:
            t = t[torch.tensor(self.placed_experts, device=t.device)]
        if self.config.gated and name in GATE_UP_WEIGHTS:
            t = to_pairs(t, gate_up_layout)
        return t

    def _check_full_weights(self, given: dict, gate_up_layout: str) -> None:
        """Raise, naming it, for what is wrong with load_full_weights' arguments on this rank."""
        for name, t in given.items():
            if isinstance(t, DTensor):
                raise ValueError(f"{name} is a DTensor; load_full_weights takes the full weight as a plain tensor "
                                 f"({name}.full_tensor())")
            if t is not None and isinstance(getattr(self, name), DTensor):
                raise ValueError(f"the layer's {name} is sharded by fully_shard (a DTensor): load the full weights "
                                 "before wrapping the model, or load a checkpoint of the wrapped model "
                                 "(flashmoe_py.sharded_state_dict)")
        self.config.check_weights(given)
        check_layout(gate_up_layout)
        if gate_up_layout != "halves" and not self.config.gated:
            raise ValueError(f"gate_up_layout={gate_up_layout!r} needs a gated activation; "
                             f"activation={self.config.activation!r} has no gate")
        for name, t in given.items():
            if t is not None and (not t.is_floating_point() or t.device.type == "meta" or t.layout != torch.strided):
                raise ValueError(f"{name} must be a dense real floating-point tensor with data, got {t.dtype} "
                                 f"({t.layout}) on {t.device}")

    def full_weight_dict(self, gate_up_layout: str = "halves", *, device: torch.device | str | None = None,
                         dst: int | None = None) -> dict[str, torch.Tensor]:
        """Every weight of the full (unsharded) layer, named and shaped as MoEConfig.weight_shapes()
        gives them and load_full_weights and reference_forward take them (gated: gate and up in
        gate_up_layout, "halves" or "interleaved" as load_full_weights takes, converted from the
        layer's pairs):
        the per-expert ones gathered from every rank in global expert order (collective when
        world_size > 1), the replicated ones copied (whole: ones fully_shard sharded gathered from
        its mesh, collective there too).
        device: where the dict's tensors are made (default the layer's). dst: a global rank;
        every rank of the layer's group takes part, but only dst keeps and returns the tensors
        (the others {}). With either, the experts are gathered one local expert at a time, so the
        layer's device holds at most one expert of every rank beyond its own; without, in one
        collective a weight."""
        def check() -> None:
            check_layout(gate_up_layout)
            check_dst(dst, self.process_group)
            _as_device(device)

        on_every_rank(check, _refused("full_weight_dict"), self.process_group)
        device = _as_device(device) or self.device
        one_by_one = dst is not None or device != self.device
        plans = from_every_rank((dst, one_by_one), self.process_group)  # the same collectives on every rank
        if any(plan != plans[0] for plan in plans):
            raise ConsistencyError(f"full_weight_dict: the ranks' (dst, a gather per local expert) differ: {plans} "
                                   "(device= other than the layer's, or a dst, gathers one local expert at a time): "
                                   "pass the same dst, and devices alike, on every rank")
        keep = dst is None or not dist.is_initialized() or dist.get_rank() == dst
        full = {}
        for name in self.config.weight_shapes():
            t = getattr(self, name).detach()
            if isinstance(t, DTensor):  # under fully_shard: every rank takes part, as in the experts' gathers
                t = t.full_tensor()
            if name in EXPERT_WEIGHTS:
                t = self._gathered(t, device, keep, one_by_one=one_by_one)
            elif keep:
                t = t.to(device, copy=True)
            if keep:
                gate_up = self.config.gated and name in GATE_UP_WEIGHTS
                full[name] = (to_interleaved if gate_up_layout == "interleaved" else to_halves)(t) if gate_up else t
        return full

    def _gathered(self, t: torch.Tensor, device: torch.device, keep: bool, one_by_one: bool) -> torch.Tensor | None:
        """Every rank's rows of the per-expert t [L, ...] as [E, ...] on `device` in global expert
        order (None where not keep), gathered from every rank of the group (collective), in one
        collective or one local expert a collective."""
        # position r·L + i holds expert order[..] (the placement's: the buffer may have been written)
        order = torch.argsort(self.placement.positions()).to(device)
        if self.world_size == 1 or not one_by_one:
            if self.world_size > 1:
                parts = [torch.empty_like(t) for _ in range(self.world_size)]
                dist.all_gather(parts, t.contiguous(), group=self.process_group)
                t = torch.cat(parts)
            if not keep:
                return None
            out = torch.empty(t.shape, dtype=t.dtype, device=device)
            out[order] = t.to(device)
            return out
        local, order = t.shape[0], order.tolist()
        out = torch.empty(self.world_size * local, *t.shape[1:], dtype=t.dtype, device=device) if keep else None
        for i in range(local):
            parts = [torch.empty_like(t[i]) for _ in range(self.world_size)]
            dist.all_gather(parts, t[i].contiguous(), group=self.process_group)
            if keep:
                for r, part in enumerate(parts):
                    out[order[r * local + i]].copy_(part)
        return out

    def route(self, x: torch.Tensor, *, keep_logits: bool = False,
              correction_bias: torch.Tensor | None = None, x_at: torch.Tensor | None = None) -> Routing:
        """This rank's tokens x [T, H] through the layer's router (routing.route, with its biases;
        keep_logits: the Routing holds the logits too; correction_bias: another [E] correction bias
        than the layer's, e.g. a forward's copy for its backward; x_at: routing.route's, x's rows
        read at the address that word holds)."""
        bias = self.e_score_correction_bias if correction_bias is None else correction_bias
        return route(x, self.router_weight, self.config, router_bias=self.router_bias,
                     e_score_correction_bias=bias, keep_logits=keep_logits, x_at=x_at)

    def load_balancing_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The auxiliary load-balancing loss of this rank's tokens x [..., H] (the layer's dtype and
        device) under the layer's router, for training a layer from scratch: num_experts * sum_e
        f_e P_e, as transformers' Mixtral and Switch Transformer take it (routing.load_balancing_loss
        says how each routing's probabilities are taken), top_k when the routing is uniform. The
        experts are those the layer's router chooses (capacity drops counted as chosen; on GPUs in
        bf16 the router kernel's choice, which for a near-tied token may differ from a recording
        forward's torch ops); the router's logits are computed again in fp32, so the loss is
        differentiable in x, router_weight and router_bias, with every backend and backward. A
        scalar fp32 of this rank's tokens alone (pass only real tokens, not padding): add coef *
        loss to the training loss; transformers' router_aux_loss_coef (0.001-0.02) weighs one term
        for the whole model, so with L layers take the mean of theirs. Under a fully_shard of the
        layer alone, call it inside the forward of what it wraps (outside, the router is sharded:
        refused)."""
        problem = self._input_problem(x)
        if problem is not None:
            raise problem
        for name in ("router_weight", "router_bias"):
            if isinstance(getattr(self, name), DTensor):
                raise ValueError(f"load_balancing_loss: {name} is sharded here (a DTensor: fully_shard gathers it "
                                 "for the forward of the module it wraps); call it inside that forward (e.g. the "
                                 "block's, where the layer runs), or shard the layer with its parent")
        rows = x.reshape(-1, self.config.hidden_size)
        with without_autocast(self.device.type):
            with torch.no_grad():  # the choice (on GPUs the router kernel's) carries no gradient
                experts = self.route(rows).experts
            return load_balancing_loss(router_logits(rows, self.router_weight, self.router_bias), experts,
                                       self.config)

    def full_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router_weight [E, H], w_in [E, H, F_in], w_out [E, F, H]) of the full layer, as
        full_weight_dict() has them (collective when world_size > 1)."""
        full = self.full_weight_dict()
        return full["router_weight"], full["w_in"], full["w_out"]

    def _checksums(self, which) -> dict[str, str]:
        """{name: _checksum} of the weights the config has whose names `which` takes."""
        return {name: _checksum(getattr(self, name)) for name in self.config.weight_shapes() if which(name)}

    def _check_replicas_agree(self, after: str, fix: str = "Every rank must use the same seed and load the same "
                                                           "router and shared weights") -> None:
        """The replicated weights must be bit-identical on every rank (a rank-dependent seed,
        differently loaded weights, or gradients not summed over the ranks would route each rank's
        tokens differently): their checksums are compared, and a difference raises
        ConsistencyError on every rank, saying `fix`."""
        if self.world_size == 1:
            return
        mine = self._checksums(lambda name: name not in EXPERT_WEIGHTS)
        mismatch = find_mismatch(from_every_rank(mine, self.process_group))
        if mismatch:
            raise ConsistencyError(f"after {after}, the replicated weights differ: {mismatch}. {fix}")

    def _input_problem(self, x) -> Exception | None:
        """What is wrong with this forward on this rank (raised on every rank by the backend), or None;
        an x whose checks themselves fail is refused as such (raised here, the peers would wait for
        this rank's collectives until the group's timeout)."""
        try:
            return self._x_problem(x)
        except Exception as e:  # noqa: BLE001 (any: the peers must hear of it)
            return ValueError(f"x could not be checked ({type(e).__name__}: {e}); the layer takes a dense "
                              f"[tokens, {self.config.hidden_size}] or [batch, seq, {self.config.hidden_size}] "
                              "torch.Tensor")

    def _x_problem(self, x) -> Exception | None:
        """_input_problem's checks."""
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            return ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if isinstance(x, DTensor):
            return ValueError("x is a DTensor; the layer takes this rank's tokens as a plain tensor (x.to_local(), "
                              "or x.full_tensor() where every rank's should be taken)")
        if x.layout != torch.strided:
            return ValueError(f"x is a {x.layout} tensor; the layer takes a dense (strided) one")
        if (shape := x_shape_problem(x, cfg.hidden_size)) is not None:
            return ValueError(shape)
        if x.dtype != cfg.torch_dtype:
            # (said whether or not autocast is on here: inside the compiled op it never is)
            return ValueError(f"x has dtype {x.dtype}; the layer's dtype is {cfg.torch_dtype} (the layer does not "
                              "follow torch.autocast: build it in the dtype to compute in)")
        if x.device != self.device:
            return ValueError(f"x is on {x.device}; the layer's experts are on {self.device}")
        tokens, limit = x.numel() // cfg.hidden_size, self.options.max_tokens_per_rank
        if limit is not None and tokens > limit:
            return ValueError(f"x has {tokens} tokens; max_tokens_per_rank={limit}")
        return self._weights_problem()

    def _expected_weights(self) -> tuple[tuple[str, torch.Size | None, torch.dtype | None], ...]:
        """(name, shape, dtype) of every weight the config has, this rank's experts only; (name,
        None, None) of each it lacks (which must stay None). Kept as _weight_specs from the
        constructor on: a plain attribute, which torch.compile reads inside a graph (a
        cached_property filled on first use broke the graph of a fresh layer)."""
        cfg = self.config
        shapes = cfg.weight_shapes(self.local_experts)
        return tuple((name, torch.Size(shapes[name]), cfg.weight_dtype(name)) if name in shapes else (name, None, None)
                     for name in WEIGHTS + OPTIONAL_WEIGHTS)

    def _weights_problem(self, names: tuple[str, ...] | None = None) -> Exception | None:
        """Where a weight was replaced (`.data =`, or a new Parameter set on the layer) by one of
        another shape, dtype or device than the layer's, which its GEMMs would read as they are
        (a wrong result, not always an error), or by a strided view where the backend reads
        contiguous rows (backend flash: its launch would be refused), or
        one the config lacks was set: the error naming it, else None. Read every forward (host
        time on this project's CPU: ~1.8 us for three weights, ~2.7 for eight); a weight that a
        parametrization or a hook-based wrapper (prune, weight_norm) makes at each forward is
        left to it. names: only these, of the weights the config has (one it lacks is read by
        nothing)."""
        params, buffers, device = self._parameters, self._buffers, self.device
        contiguous = self.backend.contiguous_weights
        for name, shape, dtype in self._weight_specs:
            if names is not None and (name not in names or shape is None):
                continue
            t = params.get(name, ...)
            if t is ...:  # the correction bias, or a weight made by a parametrization
                t = buffers.get(name, ...)
                if t is ...:
                    continue
            if shape is None:
                if t is not None:
                    return ValueError(f"{name} was set on the layer, but only a layer with {WEIGHT_NEEDS[name]} has "
                                      "it (backend torch would read it, the fused kernel not)")
            elif (t is None or t.shape != shape or t.dtype != dtype or t.device != device
                  or (contiguous and not t.is_contiguous())):
                got = "None" if t is None else f"{tuple(t.shape)} {t.dtype} on {t.device}" + (
                    ", not contiguous" if contiguous and not t.is_contiguous() else "")
                want = f"{tuple(shape)} {dtype} on {device}" + (", contiguous" if contiguous else "")
                made = "t" if name in buffers else "torch.nn.Parameter(t)"  # a buffer stays one (no gradient)
                return ValueError(f"{name} is {got}; this layer's is {want} (this rank's experts only): set "
                                  f"layer.{name} = {made} with t of that shape, dtype and device"
                                  f"{' (t.contiguous())' if contiguous else ''}, or load values into a weight that "
                                  "has them (load_full_weights, load_state_dict)")
        return None

    def _records_graph(self, x) -> bool:
        return torch.is_grad_enabled() and (getattr(x, "requires_grad", False)
                                            or any(p.requires_grad for p in self.parameters()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # None: grad mode off, so no rank can record; else whether this rank does (ranks must agree)
        in_graph = self._records_graph(x) if torch.is_grad_enabled() else None
        if torch.compiler.is_compiling():  # one opaque op per direction for the compiler: no graph break
            flag = -1 if in_graph is None else int(in_graph)
            return torch.ops.flashmoe.moe_forward(x, list(self.parameters()), self.e_score_correction_bias,
                                                  self._op_key, flag)[0]
        check_wrappers(self)  # DDP or FSDP must have left this rank's experts alone
        return self._forward(x, in_graph, record=bool(in_graph))

    def _forward(self, x: torch.Tensor, in_graph: bool | None, record: bool,
                 compiled_problem: Exception | None = None) -> torch.Tensor:
        """record: run under the explicit backward's autograd Function when backward is "saved"
        or "recompute" (else no graph of the layer's own, or backend torch's autograd ops when
        in_graph and backward="autograd"); False with in_graph: the compiled op, whose backward
        is the explicit one. compiled_problem: the compiled op's parameters_problem, raised (on every
        rank) as an input's is."""
        # before autocast goes off: see dtype
        problem = self._input_problem(x) or self._expert_ids_problem() or compiled_problem
        if problem is None and in_graph and x.is_inference():  # every recording forward saves x
            problem = ValueError("x was made under torch.inference_mode and cannot be saved for backward: make it "
                                 "outside inference_mode (or x.clone() there), or run this forward under it too")
        mode = self.options.backward_for(self.backend.name)
        explicit = record and mode != "autograd"
        named = dict(self.named_parameters()) if explicit else None
        if problem is None and explicit:  # raised by the backend on every rank
            problem = parameters_problem(self, named)
        with without_autocast(self.device.type):  # the layer computes in its own dtype
            if (self.world_size > 1 and isinstance(x, torch.Tensor) and capture.capturing(x)
                    and (in_graph is not None or self.backend.name == "torch")):
                capture.refuse_forward(self)  # also the compiled layer's op, which runs this
            x2d = rows_of(x, self.config.hidden_size) if problem is None else x
            in_graph = in_graph and problem is None
            if in_graph:  # what its backward will run, which the ranks compare (torch_ep.GRAPH_KINDS)
                in_graph = EXPLICIT if explicit or not record else AUTOGRAD  # not record: the compiled op
            if explicit and problem is None:
                stats = {}

                # Under saved-tensor hooks (non-reentrant activation checkpointing, save_on_cpu),
                # what "saved" keeps would be held past them (an autograd Function's own, not its
                # saved tensors): nothing is kept, and its backward recomputes, as "recompute"'s.
                saving = mode == "saved" and torch._C._autograd._top_saved_tensors_default_hooks(False) is None

                def run(rows: torch.Tensor):
                    if saving:
                        out, got, saved = self.backend.forward_saving(rows)
                    else:
                        (out, got), saved = self.backend.forward(rows, None, in_graph=EXPLICIT), None
                    stats.update(got)
                    return out, saved

                out = explicit_forward(self, x2d, run, named)
            else:
                out, stats = self.backend.forward(x2d, problem, in_graph=in_graph)
            self.__dict__["last_stats"] = MoEStats(**stats)  # a plain attribute: not through Module.__setattr__
            return out.view(x.shape)

    @functools.cached_property
    def placed_experts(self) -> list[int]:
        """The global experts this rank's slots hold, in slot order (the placement's; fixed)."""
        return self.placement.experts_on(self.rank)

    def _expert_ids_problem(self) -> Exception | None:
        """Where the expert_ids buffer no longer names this rank's experts (a checkpoint loaded into
        the state_dict's tensors, a broadcast of the model's buffers), or the expert_positions
        buffer (each expert's place over the ranks, which routes every token) is no longer the
        placement's (it sent tokens to other experts' weights, silently): the error (raised on
        every rank by the backend), else None."""
        ids = self._placement_buffer_problem("expert_ids", lambda: self.placed_experts)
        if ids is not None:
            return RuntimeError(f"expert_ids holds experts {ids[0]} on rank {self.rank}, whose placement puts "
                                f"{ids[1]} there: {EXPERTS_OVERWRITTEN}")
        positions = self._placement_buffer_problem("expert_positions", lambda: self.placement.position_list)
        if positions is not None:
            return RuntimeError(f"expert_positions holds {positions[0]}, where the layer's placement puts the "
                                f"experts at {positions[1]}: it is the placement's, fixed when the layer is built "
                                "(build another layer with placement=..., and load its weights)")
        return None

    def _placement_buffer_problem(self, name: str, want) -> tuple[list, list] | None:
        """(what buffer `name` holds, want()) where they differ, else None. Read every forward on the
        CPU; on a GPU only when replaced or written through autograd's version counter (a
        collective's or .data's write is not: backend torch's exchange compares expert_ids on the
        device at world > 1), and never during a CUDA graph capture."""
        t = self._buffers[name]  # not through Module.__getattr__: ~1.5 us a forward
        seen = self.__dict__.get(f"_{name}_seen")
        if t.is_cuda and (seen is not None and seen[0] is t and seen[1] is not None and seen[1] == _version(t)
                          or torch.cuda.is_current_stream_capturing()):
            return None
        got, wanted = t.tolist(), want()
        if got != wanted:
            return got, wanted
        self.__dict__[f"_{name}_seen"] = (t, _version(t))
        return None

    def synchronize(self) -> None:
        """Wait for this rank's last forward; raise if the fused kernel reported a failed wait
        (the fused backend otherwise reports it at the next forward, without a host sync)."""
        self.backend.raise_if_failed(block=True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """gate_up.STATE_DICT_MARKER says how a state_dict's gated weights lay out gate and up:
        PAIRS_VERSION (this layer's pairs, what state_dict() writes) or HALVES_VERSION (gate |
        up halves, a checkpoint from before the pairs, marked so by hand: converted here; its
        optimizer moments stay in halves, so build a fresh optimizer). A gated layer's state_dict
        without the marker is ambiguous (a parameters-only dict, or an old checkpoint): the marker
        is then a missing key (load_state_dict's strict refuses it; strict=False takes pairs).
        `expert_ids` (which expert each of this rank's slots holds) must match the layer's
        placement where the state_dict has it. A weight under its name before a rename
        (RENAMED_WEIGHTS) loads as the weight (load_state_dict hands this a copy of the dict)."""
        for old, new in RENAMED_WEIGHTS.items():  # (where the layer has it: elsewhere torch names the old key)
            if prefix + old in state_dict and prefix + new not in state_dict and self._parameters.get(new) is not None:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        marker, ids = prefix + STATE_DICT_MARKER, prefix + "expert_ids"
        problem = self._state_dict_problem(state_dict, prefix, local_metadata.get("assign_to_params_buffers", False))
        if problem:
            error_msgs.append(problem)
            return
        if marker not in state_dict and not self.config.gated:
            state_dict[marker] = torch.tensor(PAIRS_VERSION)  # one F-wide block: no layout to tell
        if marker in state_dict and int(state_dict[marker]) == HALVES_VERSION:
            shapes = self.config.weight_shapes()
            for name in GATE_UP_WEIGHTS if self.config.gated else ():  # one F-wide block: nothing to convert
                if prefix + name in state_dict:
                    t, want = state_dict[prefix + name], getattr(self, name).shape
                    if t.shape != want:  # (the conversion needs it: 2F gate and up columns)
                        error_msgs.append(f"size mismatch for {prefix + name}: copying a param with shape "
                                          f"{tuple(t.shape)} from checkpoint, the shape in current model is "
                                          f"{tuple(want)} (the full layer's: {tuple(shapes[name])})")
                        return
                    state_dict[prefix + name] = to_pairs(t)
            state_dict[marker] = torch.tensor(PAIRS_VERSION)
        elif marker in state_dict and int(state_dict[marker]) != PAIRS_VERSION:
            error_msgs.append(f"{marker}={int(state_dict[marker])}: a gate/up layout this version does not know")
            return
        assign = local_metadata.get("assign_to_params_buffers", False)
        strided = [prefix + n for n in WEIGHTS + OPTIONAL_WEIGHTS if assign and self.backend.contiguous_weights
                   and torch.is_tensor(t := state_dict.get(prefix + n)) and not t.is_contiguous()]
        if strided:  # (as the layout leaves it: halves converted are new tensors)
            error_msgs.append(f"{strided[0]} is a strided view (not contiguous); load_state_dict(assign=True) would "
                              "make it the layer's, whose weights backend flash reads as contiguous rows: pass "
                              "t.contiguous(), or load without assign")
            return
        mine = torch.tensor(self.placed_experts)  # the placement's, not the buffer's (overwritten?)
        if ids not in state_dict:  # a checkpoint from before expert_ids, or parameters only
            if any(prefix + name in state_dict for name in EXPERT_WEIGHTS) and (
                    self.world_size > 1 or self.placed_experts != list(range(self.config.num_experts))):
                error_msgs.append(
                    f"{ids} is missing beside expert weights: which experts the state_dict's slots hold is unknown "
                    f"(rank {self.rank} of {self.world_size}, whose placement puts {mine.tolist()} there). A "
                    "checkpoint saved before expert_ids, by this rank with this placement: set state_dict"
                    f"[{ids!r}] = torch.tensor(layer.placed_experts) before loading it")
                return
            state_dict[ids] = mine.to(self.expert_ids.device)  # every expert in order: the only order
        elif not torch.equal(state_dict[ids].cpu(), mine):
            error_msgs.append(f"{ids}: the state_dict's slots hold experts {state_dict[ids].tolist()}, this layer's "
                              f"placement puts {mine.tolist()} there; build the layer with the placement "
                              "it was saved with, or load full_weight_dict() through load_full_weights")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        drift = self._drift()
        if drift:
            error_msgs.append(f"after loading {prefix or 'the layer'}: {drift}")

    def _state_dict_problem(self, state_dict, prefix: str, assign: bool) -> str | None:
        """What load_state_dict cannot take from state_dict's entries for this layer (a weight
        that is not floating point, whose copy would truncate it, or with assign=True not in the
        layer's dtype and on its device, which would be assigned before any later check; a gate/up
        marker or expert_ids that are not integer tensors), or None."""
        for name in WEIGHTS + OPTIONAL_WEIGHTS:
            t = state_dict.get(prefix + name)
            if t is not None and not (torch.is_tensor(t) and t.is_floating_point()):
                return f"{prefix + name}: expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}"
            want = self._home(name, t) if t is not None and assign else None
            if want:
                return (f"{prefix + name} is {t.dtype} on {t.device}; load_state_dict(assign=True) would make it the "
                        f"layer's, whose is {want}: convert it first, or load without assign")
        for name, shape in ((STATE_DICT_MARKER, ()), ("expert_ids", (self.local_experts,))):
            t = state_dict.get(prefix + name)
            if t is not None and not (torch.is_tensor(t) and not t.is_floating_point() and t.dtype != torch.bool
                                      and not t.is_complex() and tuple(t.shape) == shape):
                what = f"{t.dtype} {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
                other = (name == "expert_ids" and torch.is_tensor(t) and t.dim() == 1 and not t.is_floating_point()
                         and f" (the state_dict's layer holds {t.numel()} experts a rank, this one "
                             f"{self.local_experts}: {self.config.num_experts} over {self.world_size} ranks; a "
                             "checkpoint of a layer with another number of experts or ranks)")
                return f"{prefix + name}: expected an integer tensor of shape {shape}, got {what}{other or ''}"
        return None

    def _own_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of the layer's own parameters and buffers (those it registers)."""
        return [*self.named_parameters(recurse=False), *self.named_buffers(recurse=False)]

    def _home(self, name: str, t: torch.Tensor) -> str | None:
        """"<dtype> on <device>", where the layer keeps its tensor `name` and t is not (a weight: its
        config's dtype; a buffer: t's own), else None."""
        want = self.config.weight_dtype(name) if name in WEIGHTS + OPTIONAL_WEIGHTS else t.dtype
        return None if t.dtype == want and t.device == self.device else f"{want} on {self.device}"

    def _drift(self) -> str | None:
        """Where a weight is no longer in the dtype and on the device the layer was built for, or None."""
        for name, t in self._own_tensors():
            want = self._home(name, t)
            if want:
                return (f"{name} is {t.dtype} on {t.device}, the layer's is {want}: a MoELayer "
                        "keeps its config's dtype and its device; build a new one there and load its weights")
        return None

    def _apply(self, fn, recurse: bool = True):
        """Module.to(), .cuda(), .double() and the like: refused, before any of the layer's tensors
        moves (a parent's modules visited earlier have moved), where they would move a weight to
        another dtype or device (the config names the dtypes the kernels are built for, and the
        fused backend's CUDA graphs and symmetric heap hold addresses on the device it was built
        on), taken as no-ops otherwise (a model moved where the layer already is). One that would
        copy the tensors where they are (Module.to_empty's uninitialised storage, a CPU index spelled
        out) leaves the layer's own alone: a copy would hold nothing new (to_empty's, garbage), and
        backend flash's CUDA graphs hold their addresses."""
        refused, copies = self.move_refused(fn)
        if refused:
            raise ValueError(f"MoELayer cannot move {refused}: build the layer with MoEConfig(dtype=..., "
                             "router_dtype=...) and device=... where it runs, and load its weights there "
                             "(load_full_weights or load_state_dict)")
        return self if copies else super()._apply(fn, recurse)

    def move_refused(self, fn) -> tuple[str | None, bool]:
        """What _apply(fn) would refuse ("w_in from torch.float32 on cpu to torch.bfloat16 on cpu"),
        or None; and whether fn copies a tensor where it is (probed on an empty tensor of each of
        the layer's dtypes and devices: fn moves nothing)."""
        copies = False
        for name, t in self._own_tensors():
            probe = torch.empty(0, dtype=t.dtype, device=t.device)
            moved = fn(probe)
            if moved.dtype != t.dtype or moved.device != t.device:
                return f"{name} from {t.dtype} on {t.device} to {moved.dtype} on {moved.device}", copies
            copies = copies or moved is not probe
        return None, copies

    def __deepcopy__(self, memo: dict) -> MoELayer:
        """copy.deepcopy: as for any module, but the copy runs in the same process group (one made
        by dist.new_group cannot be copied)."""
        if self.process_group is not None:
            memo.setdefault(id(self.process_group), self.process_group)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        # Module's state (without a compiled call of the original's), not a parametrized layer's
        # __getstate__, which refuses pickling (torch.nn.utils.parametrize) but not copies
        new.__setstate__(copy.deepcopy(nn.Module.__getstate__(self), memo))
        return new

    def __setattr__(self, name: str, value) -> None:
        """The layer's structure (config, placement, its rank and group, device) is fixed once
        built: its weights' shapes, expert slots, buffers and backend follow it, so a new value
        would run with the old ones (a new placement: the old dispatch, silently). And
        expert_grad_divisor must be a positive int."""
        if name in _FIXED and name in self.__dict__:
            raise AttributeError(f"MoELayer.{name} is fixed when the layer is built: build another layer "
                                 "(MoELayer(config, placement=...)) and load_full_weights or load_state_dict into it")
        if name == "expert_grad_divisor" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"expert_grad_divisor must be a positive int (the data-parallel world), got {value!r}")
        if name in RENAMED_WEIGHTS:  # set under its old name, it would be a parameter the layer never reads
            raise AttributeError(f"MoELayer.{name} is {RENAMED_WEIGHTS[name]} since 2026-12-06: set "
                                 f"{RENAMED_WEIGHTS[name]}")
        super().__setattr__(name, value)

    def __copy__(self):
        """copy.copy is refused: the copy would share the layer's backend (its workspace, and the
        layer it is bound to), so one of the two would run with the other's attributes."""
        raise TypeError("copy.copy of a MoELayer would share its backend with the original: use copy.deepcopy "
                        "(backend torch), or build another layer and load_state_dict into it")

    def __setstate__(self, state) -> None:
        """A copy (copy.deepcopy, or pickle's torch.save / torch.load) gets its own op id (the
        compiled op finds its layer by it, compiled_op.register: the original's would have run the
        original) and its backend bound to it (backend torch's; backend flash's refuses to be
        copied). A layer pickled before a rename of its weights (RENAMED_WEIGHTS) gets them under
        their names."""
        if any(old in state.get("_parameters", {}) for old in RENAMED_WEIGHTS):
            state["_parameters"] = {RENAMED_WEIGHTS.get(n, n): p for n, p in state["_parameters"].items()}
        super().__setstate__(state)
        self._register()
        self.backend.layer = weakref.proxy(self)

    def _register(self) -> None:
        """A new op key, under which the compiled op finds this layer (compiled_op.register): a CPU
        int64 tensor (_op_key, not a buffer), a graph input of the compiled region."""
        self.__dict__["_op_key"] = compiled_op.register(self)

    def extra_repr(self) -> str:
        return (f"{self.config}, rank={self.rank}/{self.world_size}, "
                f"local_experts={self.local_experts}, backend={self.backend.name!r}")


def _version(t: torch.Tensor) -> int | None:
    """t's version counter (its in-place writes), or None for an inference tensor, which keeps none
    (a buffer loaded from one, assign=True): _placement_buffer_problem then reads it every time."""
    return None if t.is_inference() else t._version


def _seed_problem(seed, num_experts: int) -> str | None:
    """What is wrong with a layer's `seed` (None, or expert e's weights drawn from seed + 1 + e),
    or None."""
    if seed is not None and (not is_int(seed) or seed < 0):
        return f"seed must be a non-negative int or None, got {seed!r}"
    if seed is not None and seed + num_experts >= 2**64:
        return (f"seed={seed} is too large: expert e's weights are drawn from seed + 1 + e, which must stay "
                f"below 2**64 (num_experts={num_experts})")
    return None


_FIXED = frozenset(("config", "placement", "local_experts", "rank", "world_size", "process_group", "device"))


def _as_device(device) -> torch.device | None:
    """A device argument (the constructor's, full_weight_dict's) as the torch.device where a tensor
    made there lands ("cuda": the current GPU; None: none given); ValueError naming it where it is
    no device, or one this torch cannot use (a CPU-only torch asserts on "cuda")."""
    if device is None:
        return None
    try:
        return torch.empty(0, device=device).device
    except (RuntimeError, TypeError, AssertionError) as e:
        raise ValueError(f"device={device!r} cannot be used here: {e}") from None


def _default_device(distributed: bool) -> torch.device:
    if torch.cuda.is_available() and (not distributed or dist.get_backend() == "nccl"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _checksum(t: torch.Tensor) -> str:
    """An exact fingerprint of t's bits, the same whatever order a device sums in: the sum of
    each element's bits times (its position mod 65521, plus 1), in wrapping int64."""
    bits = t.detach().contiguous().view(-1).view(_SAME_SIZE_INT[t.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    chunk = 1 << 22  # bounds the int64 copies to 32 MiB each
    for start in range(0, bits.numel(), chunk):
        part = bits[start:start + chunk].long()
        total += (part * (torch.arange(start, start + part.numel(), device=t.device) % 65521 + 1)).sum()
    return f"checksum {int(total) & (2**64 - 1):#018x}"


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _refused(what: str):
    """on_every_rank's refusal for the layer's collective `what` on the ranks that did not raise."""
    return lambda rank, text: ConsistencyError(f"rank {rank} refused {what}: {text}")


def check_dst(dst: int | None, group=None) -> None:
    """dst, a global rank to gather to (None: every rank), one of `group`'s (None: any)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dst is not None and not (is_int(dst) and 0 <= dst < world):
        raise ValueError(f"dst={dst!r}: a global rank (an int), 0..{world - 1}, or None")
    if dst is not None and group is not None and dst not in (members := dist.get_process_group_ranks(group)):
        raise ValueError(f"dst={dst}: not a rank of the layer's process group (global ranks {members}), so no "
                         "rank would keep the weights")
