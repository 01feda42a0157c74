"""The benchmark's `symm_mem` baseline: PyTorch's NVSHMEM token shuffle + grouped GEMM.

Dispatch with `torch.ops.symm_mem.all_to_all_vdev_2d` (rows sorted by (rank, local expert) in,
grouped by (local expert, source rank) out, each expert's block aligned for the grouped GEMM),
`torch._grouped_mm` for the expert FFN, and `all_to_all_vdev_2d_offset` back: split sizes never
leave the device for the shuffles. torch refuses the 2-D shuffle for 16 or more experts per rank;
there it falls back to `all_to_all_vdev` (rows grouped by source) plus a local regroup by expert
(`mode` says which ran).

Receive buffers are sized for the worst case (every source sends all its slots here: W·min(k, L)/k
times the rows a rank gets under uniform routing). So that the expert FFN, its activation and the
copies work on the rows that arrived, not on that buffer, one host synchronisation reads how many
arrived, as backend torch's does. PyTorch's NVSHMEM must be the only NVSHMEM user in the process:
run this baseline in a process without flashmoe_py.init() (bench/layer.py does)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem

from flashmoe_py.reference import activate
from flashmoe_py.backends.torch_ep import shared_experts
from flashmoe_py.routing import histogram

ALIGN = 16           # rows: each expert's block starts aligned, as the grouped GEMM wants
MAX_2D_EXPERTS = 16  # all_to_all_vdev_2d needs fewer local experts than this (torch 2.11)


def heap_bytes(cfg, world_size: int, max_tokens: int) -> int:
    """NVSHMEM heap bytes for one SymmMemEP (cfg: MoEConfig)."""
    L = cfg.num_experts // world_size
    rows = 2 * max_tokens * cfg.top_k + 2 * (world_size * max_tokens * min(cfg.top_k, L) + L * ALIGN)
    return rows * cfg.hidden_size * torch.empty((), dtype=cfg.torch_dtype).element_size() + (64 << 20)


class SymmMemEP:
    """Forward of `layer` (an MoELayer with backend="torch": its weights, router and placement) over
    PyTorch symmetric memory. Collective at construction. Dropless routing, experts without biases
    or input weighting; shared experts are added by the layer's torch path."""

    def __init__(self, layer, max_tokens: int):
        cfg = layer.config
        if cfg.capacity_factor is not None or cfg.expert_bias or cfg.weight_on_input:
            raise ValueError("the symm_mem baseline is dropless, with experts without biases or input weighting")
        symm_mem.set_backend("NVSHMEM")
        self.layer, self.cfg = layer, cfg
        W, L, K, H = layer.world_size, layer.local_experts, cfg.top_k, cfg.hidden_size
        self.group_name = dist.group.WORLD.group_name
        self.mode = "2d" if L < MAX_2D_EXPERTS else "1d+regroup"
        rows_in = max_tokens * K
        rows_out = W * max_tokens * min(K, L) + L * ALIGN
        dev, dt = layer.device, cfg.torch_dtype
        self.send, self.recv = self._sym((rows_in, H), dt), self._sym((rows_out, H), dt)
        self.y, self.back = self._sym((rows_out, H), dt), self._sym((rows_in, H), dt)
        pairs = W * L if self.mode == "2d" else W
        self.in_splits = self._sym((pairs,), torch.int64)
        self.out_so = self._sym((2, pairs), torch.int64)   # splits, offsets of what arrived
        self.back_so = self._sym((2, pairs), torch.int64)
        self.y_splits = self._sym((pairs,), torch.int64)
        self.y_so = self._sym((2, pairs), torch.int64)
        self.out = torch.empty(max_tokens, H, dtype=dt, device=dev)

    def _sym(self, shape, dtype):
        t = symm_mem.empty(shape, dtype=dtype, device=self.layer.device)
        symm_mem.rendezvous(t, self.group_name)
        return t

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H] in x.dtype."""
        layer, cfg = self.layer, self.cfg
        W, L, K, E = layer.world_size, layer.local_experts, cfg.top_k, cfg.num_experts
        T = x.shape[0]
        r = layer.route(x)
        slot_pos = layer.expert_positions[r.experts].reshape(-1)
        order = torch.sort(slot_pos, stable=True).indices
        slot_tok = order // K
        n = T * K
        self.send[:n].copy_(x[slot_tok])
        counts = histogram(slot_pos, E)  # [W * L], (rank, local expert) order
        if self.mode == "2d":
            y_rows = self._ffn_2d(counts)
        else:
            y_rows = self._ffn_1d(counts.view(W, L))
        out = torch.zeros(T, cfg.hidden_size, dtype=torch.float32, device=x.device)
        out.index_add_(0, slot_tok, y_rows[:n].float() * r.weights.reshape(-1)[order, None])
        if cfg.shared_experts:
            out += shared_experts(x, layer)
        return out.to(x.dtype)

    def _grouped_ffn(self, rows: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Expert FFN over rows grouped by local expert; ends: [L] int32 end row of each group (the
        layer's w_in: gated ones in gate/up pairs)."""
        w_in, w_out = self.layer.w_in, self.layer.w_out
        h = torch._grouped_mm(rows, w_in, offs=ends)
        cfg = self.cfg
        return torch._grouped_mm(activate(h, cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit, paired=True), w_out,
                                offs=ends)

    def _ffn_2d(self, counts: torch.Tensor) -> torch.Tensor:
        W, L = self.layer.world_size, self.layer.local_experts
        self.in_splits.copy_(counts)
        torch.ops.symm_mem.all_to_all_vdev_2d(self.send, self.recv, self.in_splits, self.out_so,
                                              self.group_name, major_align=ALIGN)
        splits, offsets = self.out_so[0].view(L, W), self.out_so[1].view(L, W)
        starts = offsets[:, 0]
        last = starts[-1] + torch.clamp((splits[-1].sum() + ALIGN - 1) // ALIGN * ALIGN, min=ALIGN)
        ends = torch.cat([starts[1:], last.view(1)]).to(torch.int32)
        used = int(last)  # the host synchronisation: rows up to the last expert's aligned end
        self.y[:used].copy_(self._grouped_ffn(self.recv[:used], ends))
        torch.ops.symm_mem.all_to_all_vdev_2d_offset(self.y, self.back, self.out_so, self.back_so,
                                                     self.group_name)
        return self.back

    def _ffn_1d(self, counts: torch.Tensor) -> torch.Tensor:
        """counts: [W, L] rows this rank sends to each (rank, local expert)."""
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts.contiguous())  # [source, local expert]
        self.in_splits.copy_(counts.sum(1))
        torch.ops.symm_mem.all_to_all_vdev(self.send, self.recv, self.in_splits, self.out_so,
                                           self.group_name)
        perm, ends = regroup_by_expert(recv_counts, self.out_so[1])
        if perm.numel():  # a rank may receive nothing (skewed routing); the return shuffle still runs
            self.y[perm] = self._grouped_ffn(self.recv[perm], ends)
        self.y_splits.copy_(self.out_so[0])
        torch.ops.symm_mem.all_to_all_vdev(self.y, self.back, self.y_splits, self.y_so, self.group_name)
        return self.back


def regroup_by_expert(recv_counts: torch.Tensor, src_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-D shuffle's arrivals regrouped by local expert. recv_counts: [W, L] int64 rows each
    source sent to each local expert (a source's rows arrive in expert order); src_start: [W] int64
    row where each source's rows start in the receive buffer. -> (perm, ends): perm [R] int64, the
    receive-buffer rows of the R = recv_counts.sum() that arrived, by (local expert, source); ends
    [L] int32, each expert's end row in that order. Synchronises with the host once (R)."""
    W, L = recv_counts.shape
    dev, per_src = recv_counts.device, recv_counts.sum(1)
    total = int(per_src.sum())
    first = torch.cumsum(per_src, 0) - per_src  # each source's first row among the arrivals
    rows = torch.arange(total, device=dev) + (src_start - first).repeat_interleave(per_src, output_size=total)
    expert = torch.arange(L, device=dev).repeat(W).repeat_interleave(recv_counts.reshape(-1), output_size=total)
    # arrivals are in (source, expert) order: a stable sort by expert gives (expert, source)
    return rows[torch.sort(expert, stable=True).indices], torch.cumsum(recv_counts.sum(0), 0).to(torch.int32)
