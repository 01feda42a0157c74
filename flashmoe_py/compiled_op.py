"""MoELayer under torch.compile: two custom ops, forward and backward, with a registered autograd,
so the compiler sees the layer as one opaque op each way (no graph break). Whatever the layer's
`backward`, the compiled one is backward="recompute"'s: an op's outputs would have to carry what
"saved" keeps. `params` is the layer's parameters and `correction_bias` its correction bias (or
None): the ops compute with these, bound in the layer's place (explicit_backward.bound_parameters),
so that what the compiled region made of them (an update before the layer,
torch.func.functional_call's tensors) is what they read; in_graph: -1 grad mode off, else whether
the caller records the forward (compared across ranks). A recorded forward op also returns a copy
of the correction bias it routed with (routing='sigmoid_grouped'), made inside the op, for the
backward to route with again. The ops find their layer by a key (register)."""

from __future__ import annotations

import secrets
import weakref

import torch
import torch.fx.node

from .backends.explicit_backward import bound_parameters, moe_backward, parameters_problem, routing_bias_now
from .config import rows_of
from .wrappers import check_wrappers

_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # op id -> MoELayer


def register(layer) -> torch.Tensor:
    """A new op id for `layer` (an MoELayer), under which the ops find it, as a CPU int64 tensor:
    the layer passes it to the ops as a graph input of the compiled region, where an int would be
    a constant that dynamo guards on, so every layer of a model compiled block by block would
    compile its own graph (past torch's recompile limit the rest ran uncompiled). Drawn at random
    (62 bits), so that a program holding it (torch.export's, saved and loaded in another process)
    finds no layer there rather than whichever layer that process numbered the same. Held weakly."""
    layer_id = secrets.randbits(62)
    while layer_id in _LAYERS:
        layer_id = secrets.randbits(62)
    _LAYERS[layer_id] = layer
    return torch.tensor(layer_id, device="cpu")  # not the default device (meta, say)


def _layer(layer_key: torch.Tensor):
    """The MoELayer registered under layer_key's value (RuntimeError where this process has none)."""
    layer = _LAYERS.get(int(layer_key))
    if layer is None:
        raise RuntimeError(f"flashmoe_py's compiled op: no MoELayer of this process has op id {int(layer_key)}. A "
                           "compiled or exported program calls the layer it was made from, in the process that "
                           "made it, while that layer lives: one saved (torch.export.save) and loaded elsewhere, "
                           "or kept after its layer was freed, cannot run")
    return layer


def _param_names(layer) -> list[str]:
    return [name for name, _ in layer.named_parameters()]


@torch.library.custom_op("flashmoe::moe_forward", mutates_args=())
def _moe_forward(x: torch.Tensor, params: list[torch.Tensor], correction_bias: torch.Tensor | None,
                 layer_key: torch.Tensor, in_graph: int) -> list[torch.Tensor]:
    """MoELayer.forward as a custom op, so torch.compile keeps the layer whole -> [out] or [out,
    the correction bias's copy]."""
    layer = _layer(layer_key)
    named = dict(layer.named_parameters())
    check_wrappers(layer)  # on the layer's own parameters, before the op's inputs stand in for them
    problem = parameters_problem(layer, named) if in_graph == 1 else None  # its backward is the explicit one
    names = list(named)
    with bound_parameters(layer, names, params, correction_bias):
        bias = routing_bias_now(layer) if in_graph == 1 else None  # only a recorded forward has a backward
        out = layer._forward(x, None if in_graph < 0 else bool(in_graph), record=False, compiled_problem=problem)
    return [out] if bias is None else [out, bias]


@_moe_forward.register_fake
def _(x: torch.Tensor, params: list[torch.Tensor], correction_bias: torch.Tensor | None, layer_key: torch.Tensor,
      in_graph: int) -> list[torch.Tensor]:
    bias = correction_bias if in_graph == 1 else None
    return [x.new_empty(x.shape)] + ([] if bias is None else [x.new_empty(tuple(bias.shape), dtype=bias.dtype)])


@torch.library.custom_op("flashmoe::moe_backward", mutates_args=())
def _moe_backward(x: torch.Tensor, dy: torch.Tensor, params: list[torch.Tensor], layer_key: torch.Tensor,
                  routing_bias: torch.Tensor | None, wanted: list[bool]) -> list[torch.Tensor]:
    """-> the gradients of sum(layer(x) * dy) that wanted asks for ([x's, then each parameter's],
    in that order: a frozen parameter's weight-gradient GEMMs are not run), with the layer's
    parameters read as params (backends/explicit_backward.py; collective), routed with
    routing_bias (the forward op's copy of the correction bias, or None)."""
    layer = _layer(layer_key)
    H = layer.config.hidden_size
    names = _param_names(layer)
    with bound_parameters(layer, names, params):
        grads = moe_backward(layer, rows_of(x, H), rows_of(dy, H),
                             {name for name, want in zip(names, wanted[1:], strict=True) if want},
                             x_needs_grad=wanted[0], routing_bias=routing_bias)
    dx = [grads["x"].view(x.shape)] if wanted[0] else []
    return dx + [grads[name] for name, want in zip(names, wanted[1:]) if want]


@_moe_backward.register_fake
def _(x: torch.Tensor, dy: torch.Tensor, params: list[torch.Tensor], layer_key: torch.Tensor,
      routing_bias: torch.Tensor | None, wanted: list[bool]) -> list[torch.Tensor]:
    dx = [x.new_empty(x.shape)] if wanted[0] else []
    # contiguous, as moe_backward makes them, whatever a parameter's strides (backend torch takes strided weights)
    return dx + [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p, want in zip(params, wanted[1:]) if want]


def _setup_moe_forward(ctx, inputs, output) -> None:
    x, params, correction_bias, layer_key, _ = inputs
    ctx.num_params = len(params)
    # traced with grad off (torch.export under no_grad): no copy of the bias it routed with
    ctx.bias_lost = correction_bias is not None and len(output) == 1
    ctx.save_for_backward(x, layer_key, *params, *output[1:])


def _moe_forward_backward(ctx, grads):
    x, layer_key, *rest = ctx.saved_tensors
    params, bias = rest[:ctx.num_params], rest[ctx.num_params:]
    if ctx.bias_lost:
        raise RuntimeError("flashmoe_py's compiled op: this forward was traced without a graph to record (grad mode "
                           "off, or x and every parameter frozen: torch.export under torch.no_grad?), so it kept no "
                           "copy of the correction bias it routed with, and its backward cannot route again as it "
                           "did: export or compile the program with grad enabled and something requiring grad to "
                           "train through it")
    wanted = [ctx.needs_input_grad[0], *ctx.needs_input_grad[1]]
    got = iter(torch.ops.flashmoe.moe_backward(x, grads[0].contiguous(), params, layer_key,
                                               bias[0] if bias else None, wanted))
    dx, *param_grads = (next(got) if want else None for want in wanted)
    return dx, param_grads, None, None, None


_moe_forward.register_autograd(_moe_forward_backward, setup_context=_setup_moe_forward)
# Both ops are collective (all-to-alls at world > 1) and count the call (last_stats): never dead code.
# Without this, inductor dropped a call whose outputs have no elements (a rank with no tokens) where
# they fed another op (reading a zero-element buffer is a no-op), so that rank skipped the
# all-to-alls its peers were in.
torch.fx.node.has_side_effect(torch.ops.flashmoe.moe_forward.default)
torch.fx.node.has_side_effect(torch.ops.flashmoe.moe_backward.default)
