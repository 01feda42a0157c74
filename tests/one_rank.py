"""Rank 0 of a `world`-rank fused layer in one process, on the CPU (Triton interpreter) or a GPU:
its workspace holds plain tensors (workspace.LocalBuffers), and peers 1.. are never-running ranks
whose copies are scratch. What such a peer would have written into rank 0 (its count words) can
be set by hand, to stage a peer that stops at a chosen point of the protocol."""

import random

import torch

from flashmoe_py import ExpertPlacement, MoEConfig
from flashmoe_py.config import EXPERT_WEIGHTS
from flashmoe_py.backends.flash import FUSED_WEIGHTS, routing_plan
from flashmoe_py.gate_up import WEIGHTS as GATE_UP_WEIGHTS
from flashmoe_py.gate_up import to_pairs
from flashmoe_py.kernels.addresses import write_addresses
from flashmoe_py.kernels.fused_moe import Saved, launch_fused, zeroed_out
from flashmoe_py.kernels.launch_config import LaunchConfig
from flashmoe_py.kernels.layout import CTL_EPOCH, Geometry
from flashmoe_py.kernels.workspace import LocalBuffers, Workspace
from flashmoe_py.reference import routed_sum
from flashmoe_py.routing import route


def symmetric_copies(geo: Geometry, dtype: torch.dtype, device="cpu", shared_memory: bool = False) -> list[dict]:
    """Every rank's copy of the symmetric buffers of transport "p2p" ({name: tensor}, zeroed, one
    dict a rank), in shared memory where ranks in other processes must reach them."""
    def copy() -> dict:
        bufs = {n: torch.zeros(shape, dtype=dt, device=device)
                for n, (shape, dt) in geo.symmetric_buffers(dtype).items()}
        return {n: t.share_memory_() for n, t in bufs.items()} if shared_memory else bufs

    return [copy() for _ in range(geo.world_size)]


class RankBuffers:
    """A workspace allocator (workspace.Allocator) over symmetric_copies, as rank `rank` sees them:
    its own copies, and every rank's addresses (in this process's mapping of them), as a symmetric
    heap's mapped copies would give."""

    def __init__(self, copies: list[dict], rank: int):
        self.copies, self.rank = copies, rank

    def allocate(self, buffers: dict) -> dict[str, torch.Tensor]:
        return {name: self.copies[self.rank][name] for name in buffers}

    def peer_ptrs(self, name: str) -> torch.Tensor:
        return torch.tensor([c[name].data_ptr() for c in self.copies], dtype=torch.int64,
                            device=self.copies[self.rank][name].device)


def kernel_weights(weights: dict, cfg: MoEConfig, mine: slice) -> dict:
    """The fused kernel's weights of the experts `mine` from the full layer's (reference_forward's
    names, gated ones in halves): the layer's own gate/up pairs, as its flash backend passes them."""
    experts = {name: t[mine].contiguous() if name in EXPERT_WEIGHTS else t for name, t in weights.items()
               if name in FUSED_WEIGHTS}
    if cfg.gated:
        experts.update({n: to_pairs(experts[n]) for n in GATE_UP_WEIGHTS if n in experts})
    return experts


def draw_weights(cfg: MoEConfig, gen: torch.Generator, device) -> dict:
    """Every weight of the full layer (reference_forward's names and layout), random and scaled by
    fan-in (biases small, the correction bias in [0, 1/4)), drawn from gen on the CPU, on device
    in the config's dtypes."""
    def draw(name: str, shape) -> torch.Tensor:
        if name == "e_score_correction_bias":
            return (torch.rand(shape, generator=gen) / 4).to(device)
        if name in ("router_weight", "shared_gate_weight"):
            scale = shape[-1] ** -0.5  # [out, H]
        elif name in ("w_in", "w_out", "shared_w_in", "shared_w_out"):
            scale = shape[-2] ** -0.5  # [..., in, out]
        else:  # biases
            scale = 0.25
        return (torch.randn(shape, generator=gen) * scale).to(device, cfg.weight_dtype(name))

    return {name: draw(name, shape) for name, shape in cfg.weight_shapes().items()}


def routed_reference(x: torch.Tensor, routing, weights: dict, cfg: MoEConfig) -> torch.Tensor:
    """The float64 reference of x through `routing` (a Routing: its experts, weights and kept
    slots) with the full layer's weights (reference_forward's names): where two experts' logits
    lie within float32's rounding, the float64 routing of reference_forward may choose the other
    (a near tie, not the kernel's error)."""
    return routed_sum(x.double(), routing.weights.double(), routing.experts, routing.kept,
                      **{n: t.double() for n, t in weights.items()
                         if n not in ("router_weight", "router_bias", "e_score_correction_bias")},
                      config=cfg)


class OneRank:
    """Rank 0 of `world` ranks where only rank 0 runs: its workspace, and full random weights."""

    def __init__(self, cfg: MoEConfig, max_tokens: int, world: int = 1, device: str = "cpu",
                 transport: str = "p2p", split_slots: int = 0):
        self.cfg, self.world, self.device = cfg, world, device
        self.geo = Geometry.for_config(cfg, world, max_tokens, split_slots)
        self.ws = Workspace.allocate(self.geo, cfg.torch_dtype, transport, device, LocalBuffers(device, world))
        self.status, self.ctl = self.ws.scratch.status, self.ws.scratch.ctl
        self.seed = random.randrange(2**31)  # every draw below and in forward() follows from it
        print(f"OneRank seed: {self.seed}")  # shown by pytest when a test fails: replay with it
        gen = torch.Generator().manual_seed(self.seed)
        self.gen = gen
        self.weights = draw_weights(cfg, gen, device)
        self.router, self.w_in, self.w_out = (self.weights[n] for n in ("router_weight", "w_in", "w_out"))
        self.positions = ExpertPlacement.contiguous(cfg.num_experts, world).positions(device)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The float64 reference of the last forward's x through the routing that forward took."""
        return routed_reference(x, self.routing, self.weights, self.cfg)

    def router_extras(self) -> dict:
        """The router's biases by reference_forward's names (those the config has)."""
        return {n: t for n, t in self.weights.items() if n in ("router_bias", "e_score_correction_bias")}

    def full_weights(self) -> dict:
        """Every weight of the layer (all experts) by reference_forward's names."""
        return dict(self.weights)

    def peer_published(self, src: int, rows: int) -> None:
        """Peer `src` published, for the next call, that it sends `rows` rows to each of rank 0's
        experts (as its count words would, in the parity slot of the call's epoch)."""
        epoch = int(self.ctl[CTL_EPOCH.value])
        self.ws.sym.count_words.local[epoch % 2, src] = (epoch << 32) | rows

    def forward(self, tokens: int, timeout_s: float = 1.0, save: bool = False, addressed: bool = False,
                **fields):
        """One launch on `tokens` fresh random tokens -> (x, out); out is NaN where not written.
        fields: LaunchConfig's (default one program, 64-row tiles, the geometry's block_n
        and block_t). The call's routing plan is left in self.plan; save: the launch also fills
        self.saved (kernels/fused_moe.Saved, NaN where not written); addressed: the kernels find x
        and out through address words (kernels/addresses.py), their arguments a NaN stand-in that
        must stay NaN (out zeroed first where fused_moe.zeroed_out, as a graph's replay does)."""
        cfg, geo = self.cfg, self.geo
        x = torch.randn(tokens, cfg.hidden_size, generator=self.gen).to(self.device, cfg.torch_dtype)
        out = torch.full_like(x, float("nan"))
        r = route(x, self.router, cfg, **self.router_extras())
        plan, _ = routing_plan(r, self.positions, geo, geo.send_order(0, self.device), self.ws.scratch.comb_expect)
        launch = LaunchConfig(**{"programs": 1, "block_m": 64, "block_n": geo.block_n, "block_t": geo.block_t,
                                 **fields})
        L = geo.local_experts
        experts = kernel_weights(self.weights, cfg, slice(0, L))
        self.plan, self.saved, self.routing = plan, None, r
        if save:
            f_in, fs_in = cfg.ffn_in_size, cfg.shared_ffn_in_size
            self.saved = Saved(*(torch.full((rows, cols), float("nan"), dtype=cfg.torch_dtype, device=self.device)
                                 for rows, cols in ((tokens * min(cfg.top_k, L), f_in), (tokens, fs_in))))
        io = None
        stand_in = x
        if addressed:
            io = torch.zeros(2, dtype=torch.int64, device=self.device)
            stand_in = torch.full_like(x, float("nan"))
            if zeroed_out(launch, cfg):
                out.zero_()
            write_addresses(io, x, out)
        launch_fused(stand_in, stand_in if addressed else out, experts, plan, self.ws, launch, config=cfg, rank=0,
                     timeout_s=timeout_s, saved=self.saved, io=io)
        assert not addressed or stand_in.isnan().all()
        return x, out
