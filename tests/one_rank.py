"""Rank 0 of a `world`-rank fused layer in one process, on the CPU (Triton interpreter) or a GPU:
its workspace holds plain tensors (workspace.LocalBuffers), and peers 1.. are never-running ranks
whose copies are scratch. What such a peer would have written into rank 0 (its count words) can
be set by hand, to stage a peer that stops at a chosen point of the protocol."""

import random

import torch

from flashmoe_py import ExpertPlacement, MoEConfig
from flashmoe_py.config import EXPERT_WEIGHTS
from flashmoe_py.backends.flash import routing_plan
from flashmoe_py.kernels.fused_moe import launch_fused
from flashmoe_py.kernels.launch_config import LaunchConfig
from flashmoe_py.kernels.layout import CTL_EPOCH, Geometry
from flashmoe_py.kernels.workspace import LocalBuffers, Workspace
from flashmoe_py.routing import route


class OneRank:
    """Rank 0 of `world` ranks where only rank 0 runs: its workspace, and full random weights."""

    def __init__(self, cfg: MoEConfig, max_tokens: int, world: int = 1, device: str = "cpu",
                 transport: str = "p2p"):
        self.cfg, self.world, self.device = cfg, world, device
        self.geo = Geometry.for_config(cfg, world, max_tokens)
        self.ws = Workspace.allocate(self.geo, cfg.torch_dtype, transport, device, LocalBuffers(device, world))
        self.status, self.ctl = self.ws.scratch.status, self.ws.scratch.ctl
        gen = torch.Generator().manual_seed(random.randrange(2**31))
        E, H, F = cfg.num_experts, cfg.hidden_size, cfg.ffn_size
        dt = cfg.torch_dtype
        self.router = (torch.randn(E, H, generator=gen) / H**0.5).to(device, dt)
        self.w_in = (torch.randn(E, H, cfg.ffn_in_size, generator=gen) / H**0.5).to(device, dt)
        self.w_out = (torch.randn(E, F, H, generator=gen) / F**0.5).to(device, dt)
        self.positions = ExpertPlacement.contiguous(E, world).positions(device)
        self.b_in = (torch.randn(E, cfg.ffn_in_size, generator=gen) / 4).to(device, dt) if cfg.expert_bias else None
        self.b_out = (torch.randn(E, H, generator=gen) / 4).to(device, dt) if cfg.expert_bias else None
        self.router_bias = (torch.randn(E, generator=gen) / 4).to(device) if cfg.router_bias else None
        self.correction = (torch.rand(E, generator=gen) / 4).to(device) if cfg.routing == "sigmoid_grouped" else None
        self.gen = gen

    def router_extras(self) -> dict:
        """The router's biases by reference_forward's names (those the config has)."""
        extras = {"router_bias": self.router_bias, "e_score_correction_bias": self.correction}
        return {name: t for name, t in extras.items() if t is not None}

    def full_weights(self) -> dict:
        """Every weight of the layer (all experts) by reference_forward's names."""
        extras = {"b_in": self.b_in, "b_out": self.b_out, **self.router_extras()}
        return {"router_weight": self.router, "w_in": self.w_in, "w_out": self.w_out,
                **{name: t for name, t in extras.items() if t is not None}}

    def peer_published(self, src: int, rows: int) -> None:
        """Peer `src` published, for the next call, that it sends `rows` rows to each of rank 0's
        experts (as its count words would, in the parity slot of the call's epoch)."""
        epoch = int(self.ctl[CTL_EPOCH.value])
        self.ws.sym.count_words.local[epoch % 2, src] = (epoch << 32) | rows

    def forward(self, tokens: int, timeout_s: float = 1.0, block_m: int = 64, block_n: int | None = None,
                programs: int = 1, dispatch_programs: int | None = None):
        """One launch on `tokens` fresh random tokens -> (x, out); out is NaN where not written."""
        cfg, geo = self.cfg, self.geo
        x = torch.randn(tokens, cfg.hidden_size, generator=self.gen).to(self.device, cfg.torch_dtype)
        out = torch.full_like(x, float("nan"))
        r = route(x, self.router, cfg, **self.router_extras())
        plan, _ = routing_plan(r, self.positions, geo, geo.send_order(0, self.device), self.ws.scratch.comb_expect)
        launch = LaunchConfig(programs=programs, block_m=block_m, block_n=block_n or geo.block_n,
                              dispatch_programs=dispatch_programs)
        L = geo.local_experts
        experts = {name: t[:L].contiguous() for name, t in self.full_weights().items() if name in EXPERT_WEIGHTS}
        launch_fused(x, out, experts, plan, self.ws, launch, config=cfg, rank=0, timeout_s=timeout_s)
        return x, out
