"""The layer's autograd with backward="recompute": the forward runs as it does for inference (the
fused kernel or the torch backend, no graph recorded) and saves only x; the backward is explicit
steps in torch ops (one host synchronisation for the all-to-all split sizes at world > 1):

1. route x again, without a graph: the same experts and capacity drops as the forward's, since
   routing is deterministic (the router kernel on GPUs, torch ops elsewhere); then the routing
   weights of those experts, in torch ops through a graph (routing.weights_for);
2. send each kept slot's row (x, or its weight times x for weight_on_input), dy at its token and
   its scale (its weight, or 1) to the rank that holds its expert: an all-to-all with the
   forward's split sizes (at world 1, a gather);
3. the expert FFN's backward where the rows are (expert_grad.py): each slot's row gradient and
   <dy, y>, and the weight gradients of this rank's experts over the rows every rank sent;
4. both sent back and summed per token into dx; the slots' weight gradients go through step 1's
   graph into the router's parameters and x; the shared experts run again under a graph.

Capacity-dropped slots are not sent: they get no gradient. The backward is collective at world >
1, as the torch backend's is: every rank that recorded the forward runs it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ..routing import histogram, weights_for
from .autograd_ops import Exchange
from .expert_grad import expert_ffn_backward
from .torch_ep import shared_experts

ROUTER_PARAMS = ("router_weight", "router_bias")
EXPERT_PARAMS = ("w_in", "w_out", "b_in", "b_out")
SHARED_PARAMS = ("shared_w_in", "shared_w_out", "shared_gate_weight")


def recomputed_forward(layer, x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x: [T, H] -> run(x), the layer's inference forward, with the backward above recorded for x
    and every parameter of the layer."""
    names = [name for name, _ in layer.named_parameters()]
    return _Recomputed.apply(x, layer, run, names, *(p for _, p in layer.named_parameters()))


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer, run, names, *params):
        ctx.layer, ctx.names = layer, names
        ctx.save_for_backward(x, *params)  # saved: an in-place update before backward is caught
        return run(x)

    @staticmethod
    def backward(ctx, dy):
        x, *_ = ctx.saved_tensors
        want = {name for name, needs in zip(ctx.names, ctx.needs_input_grad[4:]) if needs}
        grads = moe_backward(ctx.layer, x, dy, want, x_needs_grad=ctx.needs_input_grad[0])
        return (grads.get("x"), None, None, None, *(grads.get(name) for name in ctx.names))


def moe_backward(layer, x: torch.Tensor, dy: torch.Tensor, want: set[str], x_needs_grad: bool) -> dict:
    """x, dy: [T, H] in the layer's dtype -> {"x" (if x_needs_grad) and each parameter name in
    want: its gradient} of sum(layer(x) * dy); collective at world > 1."""
    cfg = layer.config
    T, k = x.shape[0], cfg.top_k
    with torch.no_grad():
        r = layer.route(x)
    slot = torch.arange(T * k, device=x.device)  # slot t * k + j: token t's j-th expert
    pos = layer.expert_positions[r.experts].reshape(-1)  # (rank, local expert) of each slot
    if r.kept is not None:
        slot, pos = slot[r.kept.reshape(-1)], pos[r.kept.reshape(-1)]
    order = torch.sort(pos, stable=True).indices
    slot, pos = slot[order], pos[order]
    tok = slot // k
    send_counts = histogram(pos, cfg.num_experts).view(layer.world_size, layer.local_experts)

    router_params = [n for n in ROUTER_PARAMS if n in want]
    router_inputs = ([x.detach().requires_grad_()] if x_needs_grad else []) + [getattr(layer, n) for n in router_params]
    with torch.enable_grad():
        leaf_x = router_inputs[0] if x_needs_grad else x
        logits = leaf_x.float() @ layer.router_weight.float().t()
        if layer.router_bias is not None:
            logits = logits + layer.router_bias.float()
        weights = weights_for(logits, r.experts, cfg)  # [T, k]
    slot_w = weights.detach().reshape(-1)[slot]
    if cfg.weight_on_input:
        rows, scale = (x[tok].float() * slot_w[:, None]).to(x.dtype), torch.ones_like(slot_w)
    else:
        rows, scale = x[tok], slot_w
    d_rows, dot, expert_grads = _at_the_experts(layer, send_counts, rows, dy[tok].to(x.dtype), scale)

    if cfg.weight_on_input:  # the slot's row was w x: d(w x) = d_rows
        dx_slot, dw_slot = d_rows * slot_w[:, None], (d_rows * x[tok].float()).sum(1)
    else:
        dx_slot, dw_slot = d_rows, dot
    grads = {name: g for name, g in expert_grads.items() if name in want}
    dx = torch.zeros(T, cfg.hidden_size, dtype=torch.float32, device=x.device).index_add_(0, tok, dx_slot)
    if router_inputs:
        dw = torch.zeros(T * k, dtype=torch.float32, device=x.device).index_copy_(0, slot, dw_slot)
        got = torch.autograd.grad(weights, router_inputs, dw.view(T, k), allow_unused=True)
        if x_needs_grad:
            dx += got[0]
            got = got[1:]
        grads |= {n: _zero_if_none(g, getattr(layer, n)) for n, g in zip(router_params, got)}
    if cfg.shared_experts:
        grads |= _shared_grads(layer, x, dy, want, x_needs_grad, dx)
    if x_needs_grad:
        grads["x"] = dx.to(x.dtype)
    return grads


def _at_the_experts(layer, send_counts: torch.Tensor, rows: torch.Tensor, dy: torch.Tensor,
                    scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """send_counts: [W, L] slots this rank sends to each (rank, local expert); rows, dy: [S, H] and
    scale: [S] fp32, the slots in that order. -> (d_rows [S, H] fp32, dot [S] fp32, this rank's
    expert weight gradients), each slot's from the rank that holds its expert."""
    weights = {n: getattr(layer, n) for n in EXPERT_PARAMS}
    if layer.world_size == 1:
        g = expert_ffn_backward(rows, dy, scale, send_counts[0], weights, layer.config)
        return g.d_rows, g.dot, g.params
    W, L = layer.world_size, layer.local_experts
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=layer.process_group)
    splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # one host sync
    exchange = Exchange(*splits, group=layer.process_group)
    # Received rows are ordered (source rank, local expert); the experts want (local expert, source).
    row_expert = torch.arange(L, device=rows.device).repeat(W)
    row_expert = row_expert.repeat_interleave(recv_counts.reshape(-1), output_size=sum(splits[1]))
    perm = torch.sort(row_expert, stable=True).indices
    recv = [exchange.dispatch(t)[perm] for t in (rows, dy, scale[:, None])]
    g = expert_ffn_backward(recv[0], recv[1], recv[2][:, 0], recv_counts.sum(0), weights, layer.config)
    back = torch.empty(g.d_rows.shape[0], g.d_rows.shape[1] + 1, dtype=torch.float32, device=rows.device)
    back[perm] = torch.cat([g.d_rows, g.dot[:, None]], dim=1)
    back = exchange.combine(back)
    return back[:, :-1], back[:, -1], g.params


def _shared_grads(layer, x: torch.Tensor, dy: torch.Tensor, want: set[str], x_needs_grad: bool,
                  dx: torch.Tensor) -> dict:
    """The shared experts' parameter gradients (those in want), run again under a graph; their
    part of x's gradient is added to dx [T, H] fp32."""
    names = [n for n in SHARED_PARAMS if n in want]
    with torch.enable_grad():
        leaf_x = x.detach().requires_grad_(x_needs_grad)
        inputs = ([leaf_x] if x_needs_grad else []) + [getattr(layer, n) for n in names]
        if not inputs:
            return {}
        got = torch.autograd.grad(shared_experts(leaf_x, layer), inputs, dy.float(), allow_unused=True)
    if x_needs_grad:
        dx += got[0].float()
        got = got[1:]
    return {n: _zero_if_none(g, getattr(layer, n)) for n, g in zip(names, got)}


def _zero_if_none(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param) if grad is None else grad
