"""MoELayer: the drop-in expert-parallel MoE block (torch.nn.Module)."""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .backends.flash import FlashBackend
from .backends.torch_ep import TorchEPBackend
from .config import MoEConfig
from .options import FusedOptions
from .placement import ExpertPlacement
from .runtime import ConsistencyError, find_mismatch, fused_unavailable_reason

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

    Parameters (E = num_experts, L = local experts on this rank, H = hidden, F = ffn):
      router_weight: [E, H]            (like nn.Linear(H, E).weight)
      w_in:          [L, H, F_in]      F_in = 2F for swiglu (gate columns, then up columns), else F
      w_out:         [L, F, H]
    Weights are drawn from `seed` per global expert, so a layer is the same function at any world size.

    forward(x): x [tokens, H] or [batch, seq, H] in config.dtype on the layer's device; returns the
    same shape and dtype. After each forward, `last_stats` holds this rank's MoEStats.

    Gradients (backend "torch", any world size and device): autograd gives x, router_weight, w_in
    and w_out their gradients of the sum of every rank's loss; capacity-dropped slots get none.
    w_in/w_out.grad on a rank sums every rank's tokens routed to its experts (the backward's
    all-to-alls bring them); router_weight is replicated, and its .grad holds only this rank's
    tokens' part, to be summed over ranks with the other replicated parameters, as data
    parallelism does (exclude w_in and w_out from that: they are sharded, not replicated). The
    backward is collective: every rank must record the forward (grad mode on, and x or a
    parameter requiring grad, on all ranks or on none; a mismatch raises on every rank) and run
    backward through it. Backend "flash" has no backward: there, a forward that would record a
    graph raises NotImplementedError on every rank; run it under torch.no_grad() or
    torch.inference_mode().

    backend: "torch" (all-to-all over torch.distributed; CPU or GPU) or "flash" (the fused NVSHMEM
    kernel; needs flashmoe_py.init() first, `max_tokens_per_rank` to size its buffers, and ends
    any device-side wait that lasts `timeout_s` seconds of the GPU's clock with FusedKernelError). `transport` (flash only): "p2p" (stores
    through NVLink peer mappings; default, one node) or "nvshmem" (NVSHMEM device-API puts and
    signals; reaches any PE NVSHMEM can, e.g. other nodes). With `cuda_graphs` (default), the fused
    forward is replayed from a CUDA graph per token count after its first call at that count: it
    reads the current weights (in place), so replace weights with copy_, not new tensors.
    """

    def __init__(self, config: MoEConfig, *, placement: ExpertPlacement | None = None,
                 process_group=None, backend: str = "torch", device=None, seed: int = 0,
                 max_tokens_per_rank: int | None = None, timeout_s: float = 10.0,
                 cuda_graphs: bool = True, transport: str = "p2p"):
        super().__init__()
        distributed = dist.is_available() and dist.is_initialized()
        self.process_group = process_group if distributed else None
        self.world_size = dist.get_world_size(process_group) if distributed else 1
        self.rank = dist.get_rank(process_group) if distributed else 0
        options, problem = None, None
        try:
            options = FusedOptions(max_tokens_per_rank, timeout_s, cuda_graphs, transport)
        except ValueError as e:
            problem = str(e)
        problem = problem or self._setup_problem(config, placement, backend, options)
        if self.world_size > 1:
            self._check_ranks_agree(config, placement, backend, options, problem)
        if problem:
            raise ValueError(problem)
        self.config, self.options = config, options
        self.placement = placement or ExpertPlacement.contiguous(config.num_experts, self.world_size)
        self.local_experts = self.placement.local_experts
        self.device = torch.device(device) if device is not None else _default_device(distributed)
        dtype = config.torch_dtype
        H, F, L = config.hidden_size, config.ffn_size, self.local_experts
        self.router_weight = nn.Parameter(torch.empty(config.num_experts, H, dtype=dtype, device=self.device))
        self.w_in = nn.Parameter(torch.empty(L, H, config.ffn_in_size, dtype=dtype, device=self.device))
        self.w_out = nn.Parameter(torch.empty(L, F, H, dtype=dtype, device=self.device))
        self.register_buffer("expert_positions", self.placement.positions(self.device), persistent=False)
        self.reset_parameters(seed)
        self.backend = TorchEPBackend(self) if backend == "torch" else FlashBackend(self, options)
        self.last_stats: MoEStats | None = None
        self._op_id = next(_layer_ids)
        _LAYERS[self._op_id] = self

    def _setup_problem(self, config, placement, backend, options: FusedOptions) -> str | None:
        """What is wrong with the constructor arguments on this rank, or None."""
        if not isinstance(config, MoEConfig):
            return f"config must be a MoEConfig, got {type(config).__name__}"
        if backend not in BACKENDS:
            return f"backend={backend!r} is not available; choose one of {BACKENDS}"
        if backend == "flash":
            try:
                options.require_max_tokens()
            except ValueError as e:
                return str(e)
            reason = fused_unavailable_reason()
            if reason:
                return f"backend='flash' is unavailable: {reason}"
            if self.process_group not in (None, dist.group.WORLD):
                return "backend='flash' spans all NVSHMEM PEs: use the default process group"
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
        mine = {"problem": problem, "backend": backend,
                "options": options.to_dict() if options is not None else None,
                "config": config.to_dict() if isinstance(config, MoEConfig) else repr(config),
                "placement": placement.to_dict() if placement is not None else "contiguous"}
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.process_group)
        others = [(r, d["problem"]) for r, d in enumerate(everyone) if d["problem"] and r != self.rank]
        if others and not problem:
            raise ConsistencyError(f"rank {others[0][0]} rejected the layer: {others[0][1]}")
        mismatch = find_mismatch([{k: v for k, v in d.items() if k != "problem"} for d in everyone])
        if mismatch:
            raise ConsistencyError(mismatch)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Router from `seed`; expert e's weights from `seed + 1 + e` (independent of placement)."""
        cfg = self.config
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        self.router_weight.copy_(torch.randn(self.router_weight.shape, generator=gen, device=self.device)
                                 / cfg.hidden_size ** 0.5)
        for slot, e in enumerate(self.placement.experts_on(self.rank)):
            gen.manual_seed(seed + 1 + e)
            self.w_in[slot].copy_(torch.randn(self.w_in.shape[1:], generator=gen, device=self.device)
                                  / cfg.hidden_size ** 0.5)
            self.w_out[slot].copy_(torch.randn(self.w_out.shape[1:], generator=gen, device=self.device)
                                   / cfg.ffn_size ** 0.5)

    @torch.no_grad()
    def load_full_weights(self, router_weight: torch.Tensor, w_in: torch.Tensor,
                          w_out: torch.Tensor) -> None:
        """Load unsharded weights and keep this rank's shard.

        router_weight: [E, H]; w_in: [E, H, F_in] (swiglu: gate | up); w_out: [E, F, H]; any dtype/device."""
        cfg = self.config
        E, H, F = cfg.num_experts, cfg.hidden_size, cfg.ffn_size
        for name, t, shape in (("router_weight", router_weight, (E, H)),
                               ("w_in", w_in, (E, H, cfg.ffn_in_size)), ("w_out", w_out, (E, F, H))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        mine = torch.tensor(self.placement.experts_on(self.rank), dtype=torch.long)
        self.router_weight.copy_(router_weight)
        self.w_in.copy_(w_in[mine.to(w_in.device)])
        self.w_out.copy_(w_out[mine.to(w_out.device)])

    def full_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router_weight [E, H], w_in [E, H, F_in], w_out [E, F, H]) gathered from every rank, in
        global expert order (collective when world_size > 1)."""
        w_in, w_out = self.w_in.detach(), self.w_out.detach()
        if self.world_size > 1:
            w_in, w_out = (_all_gather_cat(w, self.process_group) for w in (w_in, w_out))
        order = torch.argsort(self.expert_positions)  # position p holds expert order[p]
        full_in, full_out = torch.empty_like(w_in), torch.empty_like(w_out)
        full_in[order], full_out[order] = w_in, w_out
        return self.router_weight.detach().clone(), full_in, full_out

    def _input_problem(self, x) -> Exception | None:
        """What is wrong with this forward on this rank (raised on every rank by the backend), or None."""
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            return ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != cfg.hidden_size:
            return ValueError(f"x has shape {tuple(x.shape)}; expected [tokens, {cfg.hidden_size}] or "
                              f"[batch, seq, {cfg.hidden_size}] (hidden_size={cfg.hidden_size})")
        if x.dtype != cfg.torch_dtype:
            return ValueError(f"x has dtype {x.dtype}; the layer's dtype is {cfg.torch_dtype}")
        if x.device != self.device:
            return ValueError(f"x is on {x.device}; the layer's experts are on {self.device}")
        tokens, limit = x.numel() // cfg.hidden_size, self.options.max_tokens_per_rank
        if limit is not None and tokens > limit:
            return ValueError(f"x has {tokens} tokens; max_tokens_per_rank={limit}")
        if self._records_graph(x) and not self._backward_supported():
            return NotImplementedError(
                f"MoELayer backward is not implemented for backend={self.backend.name!r} at "
                f"world_size={self.world_size} on {x.device.type}: this forward would record a graph "
                "whose gradients are wrong. Run it under torch.no_grad() or torch.inference_mode(), "
                "or call requires_grad_(False) on x and the layer's parameters")
        return None

    def _records_graph(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _backward_supported(self) -> bool:
        """Where autograd through the forward is tested against the reference: backend "torch"
        (tests/test_backward.py, tests/test_training.py); the fused kernel has no backward yet."""
        return self.backend.name == "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque op for the compiler: no graph break here
            if self._records_graph(x):  # the op has no autograd formula: refuse, as _forward does
                raise NotImplementedError("MoELayer under torch.compile has no backward: compile the "
                                          "model for inference (torch.no_grad() or inference_mode())")
            return torch.ops.flashmoe.moe_forward(x, self._op_id)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        problem = self._input_problem(x)
        x2d = x.reshape(-1, self.config.hidden_size).contiguous() if problem is None else x
        out, stats = self.backend.forward(x2d, problem)
        self.last_stats = MoEStats(**stats)
        return out.view(x.shape)

    def synchronize(self) -> None:
        """Wait for this rank's last forward; raise if the fused kernel reported a failed wait
        (the fused backend otherwise reports it at the next forward, without a host sync)."""
        if isinstance(self.backend, FlashBackend):
            self.backend.raise_if_failed(block=True)
        elif self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def extra_repr(self) -> str:
        return (f"{self.config}, rank={self.rank}/{self.world_size}, "
                f"local_experts={self.local_experts}, backend={self.backend.name!r}")


_layer_ids = itertools.count()
_LAYERS: weakref.WeakValueDictionary[int, MoELayer] = weakref.WeakValueDictionary()


@torch.library.custom_op("flashmoe::moe_forward", mutates_args=())
def _moe_forward(x: torch.Tensor, layer_id: int) -> torch.Tensor:
    """MoELayer.forward as a custom op, so torch.compile keeps the layer whole."""
    return _LAYERS[layer_id]._forward(x)


@_moe_forward.register_fake
def _(x: torch.Tensor, layer_id: int) -> torch.Tensor:
    return torch.empty_like(x)


def _default_device(distributed: bool) -> torch.device:
    if torch.cuda.is_available() and (not distributed or dist.get_backend() == "nccl"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_cat(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


