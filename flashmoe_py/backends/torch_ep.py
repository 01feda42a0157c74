"""backend="torch": route, all-to-all dispatch, grouped expert FFN, all-to-all combine, weighted sum.

The portable path (gloo on the CPU, NCCL on GPUs) and the baseline the fused kernel must beat. One
host synchronisation per forward is inherent to it: the all-to-all split sizes must be on the host."""

from __future__ import annotations

import functools
import weakref

import torch
import torch.distributed as dist

from ..config import EXPERT_WEIGHTS, MoEConfig
from ..placement import EXPERTS_OVERWRITTEN
from ..routing import Routing, histogram
from . import capture
from .saved import SavedForward
from .autograd_ops import Exchange, dispatch_experts_combine, divide_grad, grouped_mm
from ..lean_autograd import (activated, activation_of, bias_rows, fp32_product, pre_activation, scaled_rows,
                             weighted_sum)


class PeerInputError(RuntimeError):
    """Another rank rejected its input; this rank aborts the same forward instead of hanging."""


@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs and is right for this device and dtype (probed once, never
    inside a CUDA graph capture). The reference is the CPU's, so that only _grouped_mm itself is
    probed (a cuBLAS product raises under torch.use_deterministic_algorithms without
    CUBLAS_WORKSPACE_CONFIG, which would be cached as "does not work")."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if capture.capturing(device_type):
        capture.refuse_probe("torch._grouped_mm")
    try:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(48, 32, generator=g).to(dtype)
        b = torch.randn(3, 32, 16, generator=g).to(dtype)
        offs = torch.tensor([16, 16, 48], dtype=torch.int32, device=device_type)
        got = torch._grouped_mm(a.to(device_type), b.to(device_type), offs=offs).cpu().double()
        want = torch.cat([a[:16].double() @ b[0].double(), a[16:48].double() @ b[2].double()])
        return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm_aligned(x: torch.Tensor, w_out: torch.Tensor) -> bool:
    """torch._grouped_mm needs row strides of a multiple of 16 bytes: hidden and ffn sizes."""
    return all(n * x.element_size() % 16 == 0 for n in w_out.shape[1:])


def expert_ffn(x: torch.Tensor, counts: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
               config: MoEConfig, bias_in: torch.Tensor | None = None,
               bias_out: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped expert FFN over rows sorted by local expert.

    x: [N, hidden]; counts: [local_experts] int64 rows per expert (sum N); w_in: [L, hidden, ffn_in];
    w_out: [L, ffn, hidden]; bias_in: [L, ffn_in] and bias_out: [L, hidden], or None; gated w_in and bias_in
    in the layer's pairs of columns (gate_up.py). Returns [N, hidden] in x.dtype; biases and
    activation in fp32."""
    return _expert_ffn(x, counts, w_in, w_out, config, bias_in, bias_out, keep_pre=False)[0]


def _expert_ffn(x, counts, w_in, w_out, config, bias_in, bias_out, keep_pre: bool):
    """expert_ffn's output, and with keep_pre (backward="saved") pre [N, ffn_in] in x.dtype: GEMM1's
    output plus bias_in, before the activation (else None)."""
    kept = []

    def act(h: torch.Tensor, bias: torch.Tensor | None, counts: torch.Tensor | None = None) -> torch.Tensor:
        """bias: one expert's [ffn_in], or every expert's [L, ffn_in] with counts [L] (h's rows)."""
        if not keep_pre:
            return activated(h, bias, counts, config)
        pre = pre_activation(h, bias, counts)  # (backward="saved": no graph recorded)
        kept.append(pre.to(x.dtype))
        return activation_of(pre, config, x.dtype)

    def add_bias(y: torch.Tensor, bias: torch.Tensor | None, counts: torch.Tensor | None = None) -> torch.Tensor:
        """bias as act takes it, expanded to the rows in fp32: its gradient is then the rows' sum in
        fp32, rounded once (expanded in bf16, a GPU summed the rows' bf16 gradients in bf16:
        gpt_oss's bias_out at 4,096 tokens 1.4e-2 off)."""
        return y if bias is None else (y.float() + bias_rows(bias.float(), counts, y.shape[0])).to(x.dtype)

    if x.shape[0] == 0:  # empty products, still of the weights: a recorded graph gives them zero gradients
        a = act(x @ w_in[0], None if bias_in is None else bias_in[0])
        return add_bias(a @ w_out[0], None if bias_out is None else bias_out[0]), kept[0] if keep_pre else None

    if grouped_mm_works(x.device.type, x.dtype) and grouped_mm_aligned(x, w_out):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        a = act(grouped_mm(x, w_in, offs), bias_in, counts)
        return add_bias(grouped_mm(a, w_out, offs), bias_out, counts), kept[0] if keep_pre else None
    out = torch.empty(x.shape[0], w_out.shape[-1], dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            a = act(x[start:start + n] @ w_in[e], None if bias_in is None else bias_in[e])
            out[start:start + n] = add_bias(a @ w_out[e], None if bias_out is None else bias_out[e])
            start += n
    return out, torch.cat(kept) if keep_pre else None


def shared_experts(x: torch.Tensor, layer) -> torch.Tensor:
    """The layer's shared experts on every row of x [T, hidden] -> [T, hidden] fp32, gated by
    sigmoid(x @ shared_gate_weight^T) when the config has that gate."""
    return _shared_experts(x, layer, keep_pre=False)[0]


def _shared_experts(x: torch.Tensor, layer, keep_pre: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """shared_experts' output, and with keep_pre their GEMM1 output [T, shared ffn_in]."""
    cfg = layer.config
    counts = torch.full((1,), x.shape[0], dtype=torch.int64, device=x.device)
    y, pre = _expert_ffn(x, counts, layer.shared_w_in[None], layer.shared_w_out[None], cfg, None, None, keep_pre)
    if cfg.shared_expert_gate:
        return scaled_rows(y, torch.sigmoid(fp32_product(x, layer.shared_gate_weight))[:, 0]), pre
    return y.float(), pre


class TorchEPBackend:
    """Expert parallelism with torch.distributed all-to-all (single process when world_size == 1)."""

    name = "torch"
    contiguous_weights = False  # torch's products read strided weights as they are

    def __init__(self, layer):
        self.layer = weakref.proxy(layer)  # the layer owns the backend: no cycle to keep it alive

    def __getstate__(self) -> dict:
        """Copied or pickled with its layer, which binds the copy to itself (MoELayer.__setstate__):
        the weak proxy would have been copied as a second layer of its own, whose attributes
        (expert_grad_divisor, set by prepare_ddp on the copy) the copy's forwards then read."""
        return {k: v for k, v in self.__dict__.items() if k != "layer"}

    def raise_if_failed(self, block: bool) -> None:
        """Nothing can have failed on the device here (the all-to-alls raise on the host); block=True
        waits for the layer's GPU."""
        if block and self.layer.device.type == "cuda":
            torch.cuda.synchronize(self.layer.device)

    def forward(self, x: torch.Tensor, error: Exception | None, in_graph: int | None = None):
        """x: [T, hidden] in the layer's dtype and device, or anything when `error` says why it was
        rejected; the error is shared with every rank before it is raised. in_graph: what this
        rank's backward of it runs (0 or False: none recorded; else a GRAPH_KINDS key: compared
        across ranks; None: grad mode off).
        -> (out [T, hidden], stats)."""
        return self._run(x, error, in_graph, keep=False)[:2]

    def forward_saving(self, x: torch.Tensor):
        """A training forward of backward="saved" (collective; every rank in it): x [T, hidden]
        -> (out [T, hidden], stats, SavedForward), no graph recorded."""
        with torch.no_grad():
            return self._run(x, None, EXPLICIT, keep=True)

    def _run(self, x: torch.Tensor, error: Exception | None, in_graph: int | None, keep: bool):
        layer, cfg = self.layer, self.layer.config
        W, L, E, k = layer.world_size, layer.local_experts, cfg.num_experts, cfg.top_k
        device = layer.device  # not a weight's: one replaced on another device is this forward's error
        if error is None:
            r = layer.route(x, keep_logits=keep)
            slot, send_counts = slots_by_destination(r, layer)
            slot_tok, slot_w = slot // k, r.weights.reshape(-1)[slot]
            stats = {"expert_counts": histogram(r.experts.reshape(-1), E),
                     "dropped_slots": (torch.zeros((), dtype=torch.int64, device=device)
                                       if r.kept is None else (~r.kept).sum())}
        else:
            send_counts = torch.zeros(W, L, dtype=torch.int64, device=device)

        if W == 1:
            if error is not None:
                raise error
            y_sorted, pre = self._local_experts(self._rows(x, slot_tok, slot_w), send_counts[0], keep)
        else:
            recv_counts = self._exchange_counts(send_counts, error, int(in_graph or 0))
            rows = self._rows(x, slot_tok, slot_w)
            y_sorted, pre = self._dispatch_compute_combine(rows, send_counts, recv_counts, bool(in_graph), keep)

        # (with weight_on_input the weight was applied to the expert's input)
        out = weighted_sum(y_sorted, None if cfg.weight_on_input else slot_w, slot_tok, x.shape[0])
        shared_pre = None
        if cfg.shared_experts:
            y_shared, shared_pre = _shared_experts(x, layer, keep)
            out += y_shared
        saved = SavedForward(r, slot, send_counts, pre, shared_pre) if keep else None
        return out.to(x.dtype), stats, saved

    def _rows(self, x: torch.Tensor, slot_tok: torch.Tensor, slot_w: torch.Tensor) -> torch.Tensor:
        """The rows sent to the experts, one per token-slot: the token, or (weight_on_input) the
        token times its routing weight."""
        if not self.layer.config.weight_on_input:
            return x[slot_tok]
        return scaled_rows(x[slot_tok], slot_w).to(x.dtype)

    def _local_experts(self, rows: torch.Tensor, counts: torch.Tensor, keep: bool):
        """rows: [N, hidden] sorted by this rank's local expert, counts: [L] -> ([N, hidden], and
        with keep GEMM1's output [N, ffn_in] before the activation, else None)."""
        layer, d = self.layer, self.layer.expert_grad_divisor
        w_in, w_out, bias_in, bias_out = (divide_grad(getattr(layer, n), d) for n in EXPERT_WEIGHTS)
        return _expert_ffn(rows, counts, w_in, w_out, layer.config, bias_in, bias_out, keep)

    @functools.cached_property
    def placed_ids(self) -> torch.Tensor:
        """[L] int64 on the layer's device: the experts its placement puts in this rank's slots."""
        return torch.tensor(self.layer.placed_experts, device=self.layer.device)

    def _exchange_counts(self, send_counts: torch.Tensor, error: Exception | None,
                         in_graph: int) -> torch.Tensor:
        """send_counts: [W, L] rows this rank sends to each (rank, local expert). Returns recv_counts
        [W, L]: rows each source rank sends to this rank's experts. Flag columns carry input
        errors, so a rank that rejects its input still completes this exchange, then all raise;
        what this rank's backward runs (in_graph), on which every rank must agree
        (check_graphs_agree); and whether
        its expert_ids buffer names other experts than its placement puts there, compared on the
        device (a broadcast of the model's buffers writes past the version counter that the
        layer's own check reads on GPUs)."""
        layer, ids = self.layer, self.layer.expert_ids
        placed = self.placed_ids
        flags = torch.tensor([int(error is not None), int(in_graph), 0], device=send_counts.device)
        if ids.shape == placed.shape and ids.device == placed.device:
            flags[2:] = (ids != placed).any()
        else:  # a buffer replaced by another shape or device: this rank raises here; every rank must exchange
            flags[2] = 1
        send = torch.cat([send_counts, flags.expand(layer.world_size, 3)], dim=1).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=layer.process_group)
        if error is not None:
            raise error
        bad, overwritten = (torch.nonzero(recv[:, c]).flatten().tolist() for c in (-3, -1))
        if bad:
            raise peers_refused(bad, layer.rank)
        if overwritten:
            raise RuntimeError(f"expert_ids on rank(s) {overwritten} names other experts than the layer's placement "
                               f"puts there: {EXPERTS_OVERWRITTEN}")
        check_graphs_agree(recv[:, -2].tolist())
        return recv[:, :-3]

    def _dispatch_compute_combine(self, send_x: torch.Tensor, send_counts: torch.Tensor,
                                  recv_counts: torch.Tensor, in_graph: bool, keep: bool):
        """send_x: [S, hidden] rows sorted by (dest rank, local expert). Returns each row's expert
        output, in the same order, differentiable when in_graph (every rank records a graph); and
        with keep the received rows' GEMM1 outputs in the experts' order, else None."""
        layer = self.layer
        exchange, perm = exchange_for(send_counts, recv_counts, layer.process_group)
        pre = []

        def experts(recv_x):
            y = torch.empty_like(recv_x)
            y[perm], kept = self._local_experts(recv_x[perm], recv_counts.sum(0), keep)
            pre.append(kept)
            return y

        return dispatch_experts_combine(send_x, experts, exchange, in_graph=in_graph), pre[0]


def slots_by_destination(r: Routing, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """r: a forward's routing of T tokens -> (slot [S] int64: the kept slots t * top_k + j, sorted
    stably by the (rank, local expert) that holds their expert; send_counts [W, L] int64)."""
    slot = torch.arange(r.experts.numel(), device=r.experts.device)
    pos = layer.expert_positions[r.experts].reshape(-1)
    if r.kept is not None:
        slot, pos = slot[r.kept.reshape(-1)], pos[r.kept.reshape(-1)]
    order = torch.sort(pos, stable=True).indices
    send_counts = histogram(pos, layer.config.num_experts).view(layer.world_size, layer.local_experts)
    return slot[order], send_counts


def exchange_for(send_counts: torch.Tensor, recv_counts: torch.Tensor, group) -> tuple[Exchange, torch.Tensor]:
    """[W, L] rows sent to / received from each (rank, local expert) -> (the all-to-all with those
    splits, perm: received rows [perm] are in (local expert, source) order, as the experts take
    them, from their (source, local expert) order). One host synchronisation."""
    W, L = recv_counts.shape
    splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
    row_expert = torch.arange(L, device=recv_counts.device).repeat(W)
    row_expert = row_expert.repeat_interleave(recv_counts.reshape(-1), output_size=sum(splits[1]))
    return Exchange(*splits, group=group), torch.sort(row_expert, stable=True).indices


def peers_refused(bad: list[int], rank: int) -> PeerInputError:
    """The error of a rank whose forward is aborted because ranks `bad` refused theirs."""
    return PeerInputError(f"rank(s) {bad} refused this MoE forward (their input, or their layer); rank {rank} "
                          "aborts it too (see the error on those ranks)")


# What a rank's backward of a forward will run (a forward's in_graph, compared across ranks):
# each kind is its own sequence of collectives, so ranks must agree. 0 (or False): no graph.
# The explicit backward (backends/explicit_backward.py) runs the same collectives whether its
# forward saved GEMM1's rows or it recomputes them.
AUTOGRAD, EXPLICIT = 1, 2
GRAPH_KINDS = {AUTOGRAD: "backend torch's recorded ops (backward='autograd')",
               EXPLICIT: "the layer's own backward (backward='saved' or 'recompute', or the layer under "
                         "torch.compile whatever its backward)"}


def check_graphs_agree(in_graph: list[int]) -> None:
    """in_graph: [W] what each rank's backward of this forward runs (0: none recorded; else a
    GRAPH_KINDS key). The backward is collective (all-to-alls), so a rank
    that records one while a peer does not, or runs another kind, would wait forever in
    backward or mix its data: raise on every rank instead."""
    kinds = set(in_graph)
    if len(kinds) <= 1:
        return
    if 0 in kinds:
        on = [r for r, f in enumerate(in_graph) if f]
        off = [r for r, f in enumerate(in_graph) if f == 0]
        raise RuntimeError(
            f"rank(s) {on} record an autograd graph for this MoE forward and rank(s) {off} do not: "
            "its backward is collective, so run the forward in the same grad mode on every rank "
            "(x or a layer parameter requiring grad under grad mode on all, or on none)")
    runs = "; ".join(f"rank(s) {[r for r, f in enumerate(in_graph) if f == kind]} {GRAPH_KINDS[kind]}"
                     for kind in sorted(kinds))
    raise RuntimeError(
        f"the ranks' backwards of this MoE forward would run different collectives: {runs}. Give every rank "
        "the same backward, and compile the layer on every rank or on none (a rank that falls back to eager, "
        "at torch._dynamo's recompile limit, runs the layer's own backward: mark the token dimension dynamic, "
        "or raise the limit)")
