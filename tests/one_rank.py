"""Rank 0 of a `world`-rank fused layer in one process, on the CPU (Triton interpreter) or a GPU:
its workspace holds plain tensors (workspace.LocalBuffers), and peers 1.. are never-running ranks
whose copies are scratch. What such a peer would have written into rank 0 (its count words) can
be set by hand, to stage a peer that stops at a chosen point of the protocol."""

import random

import torch

from flashmoe_py import ExpertPlacement, MoEConfig
from flashmoe_py.backends.flash import routing_plan
from flashmoe_py.kernels.fused_moe import launch_fused
from flashmoe_py.kernels.launch_config import LaunchConfig
from flashmoe_py.kernels.layout import CTL_EPOCH, Geometry
from flashmoe_py.kernels.workspace import LocalBuffers, Workspace


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
        self.gen = gen

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
        plan, _ = routing_plan(x, self.router, self.positions, cfg, geo, geo.send_order(0, self.device),
                               self.ws.scratch.comb_expect)
        launch = LaunchConfig(programs=programs, block_m=block_m, block_n=block_n or geo.block_n,
                              dispatch_programs=dispatch_programs)
        L = geo.local_experts
        launch_fused(x, out, self.w_in[:L].contiguous(), self.w_out[:L].contiguous(), plan, self.ws, launch,
                     activation=cfg.activation, rank=0, timeout_s=timeout_s)
        return x, out
