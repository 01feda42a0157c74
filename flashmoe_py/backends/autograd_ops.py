"""The torch backend's differentiable pieces: dispatch -> local experts -> combine as one autograd
node, and the grouped GEMM.

A dispatch is an all-to-all of token rows, so its backward is the all-to-all of their gradients
back to the sources (split sizes swapped), i.e. a combine; a combine's backward is likewise a
dispatch. These all-to-alls are collective in the backward too: if one rank skipped one, its
peers would wait forever. So the round trip is one node, recorded on every rank that records a
graph, whose backward always makes both exchanges, whatever this rank's experts received."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Exchange:
    """One forward's all-to-all: send_splits[r] rows go to rank r, recv_splits[r] come from it."""

    send_splits: list[int]
    recv_splits: list[int]
    group: object

    def dispatch(self, rows: torch.Tensor) -> torch.Tensor:
        """[sum(send_splits), ...] by destination -> [sum(recv_splits), ...] by source."""
        return _all_to_all(rows, self.recv_splits, self.send_splits, self.group)

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        """[sum(recv_splits), ...] by source -> [sum(send_splits), ...] back in the sent order."""
        return _all_to_all(rows, self.send_splits, self.recv_splits, self.group)


def _all_to_all(rows: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = rows.new_empty(sum(out_splits), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
    return out


Experts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dispatch_experts_combine(send_x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                             experts: Experts, exchange: Exchange, *, in_graph: bool) -> torch.Tensor:
    """send_x: [S, hidden] rows ordered by destination rank; experts(recv_x, w_in, w_out) -> the
    outputs [R, hidden] of the received rows, in their order. Returns [S, hidden]: each sent row's
    expert output (collective).

    in_graph: every rank of the group records this forward's graph (they must agree). The round
    trip is then one autograd node even where neither send_x nor the weights need a gradient on
    this rank, so that its backward (collective) runs on every rank."""
    if not in_graph:
        return exchange.combine(experts(exchange.dispatch(send_x), w_in, w_out))
    if not send_x.requires_grad:
        send_x = send_x.detach().requires_grad_()
    return _DispatchExpertsCombine.apply(send_x, w_in, w_out, experts, exchange)


class _DispatchExpertsCombine(torch.autograd.Function):
    """Forward: dispatch, the experts (their graph recorded on the received rows), combine.
    Backward: dispatch of the output gradients (combine's backward), the experts' backward (dX
    and the per-expert dW), combine of the received rows' gradients (dispatch's backward)."""

    @staticmethod
    def forward(ctx, send_x, w_in, w_out, experts, exchange):
        with torch.enable_grad():
            leaves = [exchange.dispatch(send_x).requires_grad_(), w_in.detach().requires_grad_(),
                      w_out.detach().requires_grad_()]
            y = experts(*leaves)
        ctx.exchange, ctx.leaves, ctx.y = exchange, leaves, y
        return exchange.combine(y.detach())

    @staticmethod
    def backward(ctx, grad_out):
        grad_y = ctx.exchange.dispatch(grad_out)
        wanted = [0] + [i for i in (1, 2) if ctx.needs_input_grad[i]]  # rows' gradients: always
        grads = [None] * 3
        if ctx.y.requires_grad:  # not when this rank's experts received no rows
            got = torch.autograd.grad(ctx.y, [ctx.leaves[i] for i in wanted], grad_y, allow_unused=True)
            for i, g in zip(wanted, got):
                grads[i] = g
        grad_recv = grads[0] if grads[0] is not None else torch.zeros_like(ctx.leaves[0])
        del ctx.y, ctx.leaves
        return ctx.exchange.combine(grad_recv), grads[1], grads[2], None, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: torch._grouped_mm's CPU backward
    rejects stride-0 (expanded) gradients such as those of a .sum()."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a: [N, K] rows grouped by expert; b: [G, K, M]; offs: [G] int32 cumulative row counts.
    Returns [N, M], group g's rows times b[g]; differentiable in a and b (a group with no rows gets
    a zero gradient)."""
    return _ContiguousGrad.apply(torch._grouped_mm(a, b, offs=offs))
