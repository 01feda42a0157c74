"""The torch backend's differentiable pieces: the dispatch and combine all-to-alls, the grouped
GEMM, and the division of the expert weights' gradients (MoELayer.expert_grad_divisor).

A dispatch is an all-to-all of token rows, so its backward is the all-to-all of their gradients
back to the sources (split sizes swapped), i.e. a combine; a combine's backward is likewise a
dispatch. These all-to-alls are collective in the backward too: if one rank skipped one, its
peers would wait forever. So on every rank that records a graph, both are recorded and both
backwards run, whatever this rank's experts received."""

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


def dispatch_experts_combine(send_x: torch.Tensor, experts: Callable[[torch.Tensor], torch.Tensor],
                             exchange: Exchange, *, in_graph: bool) -> torch.Tensor:
    """send_x: [S, hidden] rows ordered by destination rank; experts(recv_x) -> the outputs
    [R, hidden] of the received rows, in their order (differentiable in this rank's weights).
    Returns [S, hidden]: each sent row's expert output (collective).

    in_graph: every rank of the group records this forward's graph (they must agree). Both
    all-to-alls are then recorded even where send_x needs no gradient on this rank, and the
    combine's backward always leads to the dispatch's (even where the experts got no rows)."""
    if in_graph and not send_x.requires_grad:
        send_x = send_x.detach().requires_grad_()
    recv_x = _Dispatch.apply(send_x, exchange)
    return _Combine.apply(experts(recv_x), recv_x, exchange)


def _refuse_create_graph() -> None:
    """The all-to-alls' backwards are not recorded: a graph of a backward through them (create_graph
    =True) would give second-order gradients that are wrong (0.4-0.8 off at 2 ranks), not an error.
    Every rank recording the forward runs the combine's backward first, so every rank raises here
    before any of them waits in a collective."""
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "create_graph=True (second-order gradients) through backend torch's all-to-alls (world > 1) is not "
            "supported: their backwards are not differentiable. At world 1, backward='autograd' takes it")


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, send_x, exchange):
        ctx.exchange = exchange
        return exchange.dispatch(send_x)

    @staticmethod
    def backward(ctx, grad_recv):
        _refuse_create_graph()
        return ctx.exchange.combine(grad_recv), None


class _Combine(torch.autograd.Function):
    """combine(y); recv_x, the dispatch's output, is an input only so that the dispatch's backward
    follows this one on every rank: its gradient from here is zero."""

    @staticmethod
    def forward(ctx, y, recv_x, exchange):
        ctx.exchange = exchange
        return exchange.combine(y)

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_create_graph()
        return ctx.exchange.dispatch(grad_out), None, None


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


class _DivideGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, divisor):
        ctx.divisor = divisor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g / ctx.divisor, None


def divide_grad(t: torch.Tensor | None, divisor: int) -> torch.Tensor | None:
    """t itself in the forward; its gradient divided by `divisor` in the backward (t where the
    divisor is 1, or t is None)."""
    return t if t is None or divisor == 1 else _DivideGrad.apply(t, divisor)
