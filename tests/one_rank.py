"""Rank 0 of a `world`-rank fused layer in one process, on the CPU (Triton interpreter) or a GPU:
its buffers are ordinary tensors, and peers 1.. are never-running ranks whose buffers are scratch.
What such a peer would have written into rank 0 (its count words) can be set by hand, to stage
a peer that stops at a chosen point of the protocol."""

import random

import torch

from flashmoe_py import ExpertPlacement, MoEConfig
from flashmoe_py.backends.flash import Geometry, routing_plan
from flashmoe_py.kernels.fused_moe import launch_fused


class OneRank:
    """Buffers for rank 0 of `world` ranks where only rank 0 runs: peers > 0 point at scratch."""

    def __init__(self, cfg: MoEConfig, max_tokens: int, world: int = 1, device: str = "cpu"):
        self.cfg, self.world, self.device = cfg, world, device
        self.geo = g = Geometry.for_config(cfg, world, max_tokens)
        self.sym = {n: torch.zeros(shape, dtype=dt, device=device) for n, (shape, dt) in
                    g.symmetric_buffers(cfg.torch_dtype).items()}
        self.scratch = {n: torch.zeros_like(t) for n, t in self.sym.items()}
        self.peers = {n: torch.tensor([t.data_ptr()] + [self.scratch[n].data_ptr()] * (world - 1), device=device)
                      for n, t in self.sym.items()}
        self.h = torch.zeros(world, g.S, cfg.ffn_size, dtype=cfg.torch_dtype, device=device)
        self.h_flags = torch.zeros(g.MAXQ, g.NF, dtype=torch.int32, device=device)
        self.comb_expect = torch.zeros(world, g.local_experts, g.MAXC, dtype=torch.int64, device=device)
        self.ctl = torch.tensor([1, 0, 0, 0], dtype=torch.int64, device=device)
        self.status = torch.zeros(8, dtype=torch.int64, device=device)
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
        epoch = int(self.ctl[0])
        self.sym["count_words"][epoch % 2, src] = (epoch << 32) | rows

    def forward(self, tokens: int, timeout_s: float = 1.0, block_m: int = 64, block_n: int | None = None,
                programs: int = 1, dispatch_programs: int | None = None):
        """One launch on `tokens` fresh random tokens -> (x, out); out is NaN where not written."""
        cfg = self.cfg
        x = torch.randn(tokens, cfg.hidden_size, generator=self.gen).to(self.device, cfg.torch_dtype)
        out = torch.full_like(x, float("nan"))
        plan = routing_plan(x, self.router, self.positions, cfg, self.geo, self.geo.send_order(0, self.device),
                            self.comb_expect)
        L = self.geo.local_experts
        launch_fused(x, out, self.w_in[:L].contiguous(), self.w_out[:L].contiguous(), plan, self.sym,
                     self.peers, self.h, self.h_flags, self.comb_expect, self.ctl, self.status, geo=self.geo,
                     activation=cfg.activation, rank=0, timeout_s=timeout_s, programs=programs,
                     block_m=block_m, block_n=block_n, dispatch_programs=dispatch_programs)
        return x, out
