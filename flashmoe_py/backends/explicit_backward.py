"""The layer's autograd with backward="saved" or "recompute": the forward runs as it does for
inference (the fused kernel or the torch backend, no graph recorded) and keeps x, and under
"saved" what backends/saved.py says (its routing, and GEMM1's outputs where the experts ran); the
backward is explicit steps (the project's kernels on GPUs, torch ops elsewhere; one host
synchronisation for the all-to-all split sizes at world > 1, or for the kept slots under capacity;
with neither, and bf16 rows in the per-expert products, none: a caller can capture a whole training
step in a CUDA graph, and elsewhere a backward under capture raises, capture.py):

1. the forward's routing ("saved"), or x routed again ("recompute": the same experts and
   capacity drops, since routing is deterministic: the router kernel on GPUs, torch ops
   elsewhere, with the correction bias the forward routed with, copied then), its routing
   weights (those the forward used: each slot's expert output, or with weight_on_input its
   input, scaled by them) and the fp32 logits they came from;
2. send each kept slot's row (x, or its weight times x for weight_on_input), dy at its token and
   its scale (its weight, or 1) to the rank that holds its expert: an all-to-all with the
   forward's split sizes (at world 1, a gather);
3. the expert FFN's backward where the rows are (expert_grad.py, from the saved GEMM1 outputs or
   with GEMM1 run again): each slot's row gradient and <dy, y>, and the weight gradients of this
   rank's experts over the rows every rank sent;
4. both sent back and summed per token into dx; the slots' weight gradients go back through
   step 1 (routing.weights_backward) into the router's parameters and x; the shared experts are
   step 3 over every token.

Every derivative is written out: no autograd inside, so the compiled layer's backward op (a
custom op's body runs below the autograd keys) is the same code.

Capacity-dropped slots are not sent: they get no gradient. First-order gradients only: a backward
asked to record itself (create_graph=True) raises. The backward is collective at world >
1, as the torch backend's is: every rank that recorded the forward runs it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from ..kernels.router_grad import router_weight_grad
from ..kernels.token_sum import token_sum
from ..kernels.weights_grad import weights_grad
from ..routing import weights_backward
from . import capture
from .expert_grad import expert_ffn_backward
from .saved import SavedForward
from .torch_ep import exchange_for, slots_by_destination

EXPERT_PARAMS = ("w_in", "w_out", "bias_in", "bias_out")


def explicit_forward(layer, x: torch.Tensor,
                     run: Callable[[torch.Tensor], tuple[torch.Tensor, SavedForward | None]],
                     named: dict[str, torch.Tensor]) -> torch.Tensor:
    """x: [T, H] -> the output of run(x), the layer's inference forward (with what it saved for
    backward="saved", or None), with the backward above recorded for x and every parameter of
    the layer (named: its named_parameters(), which parameters_problem found to be its weights)."""
    return _Explicit.apply(x, layer, run, list(named), *named.values())


class _Explicit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer, run, names, *params):
        ctx.layer, ctx.names = layer, names
        ctx.save_for_backward(x, *params)  # saved: an in-place update before backward is caught
        ctx.routing_bias = routing_bias_now(layer)
        out, ctx.saved_forward = run(x)
        return out

    @staticmethod
    def backward(ctx, dy):
        refuse_create_graph(ctx.layer)
        x, *params = ctx.saved_tensors
        want = {name for name, needs in zip(ctx.names, ctx.needs_input_grad[4:]) if needs}
        # Released here, not when the autograd graph goes (a caller's `loss` can hold it into the
        # next forward): a CUDA graph lends its buffers only until then (backends/flash.CapturedForward).
        # A second backward through a retained graph recomputes instead: the same gradients.
        saved, ctx.saved_forward = ctx.saved_forward, None
        # the weights the forward ran with, in the layer's own dtype
        with bound_parameters(ctx.layer, ctx.names, params), without_autocast(x.device.type):
            grads = moe_backward(ctx.layer, x, dy, want, x_needs_grad=ctx.needs_input_grad[0], saved=saved,
                                 routing_bias=ctx.routing_bias)
        return (grads.get("x"), None, None, None, *(grads.get(name) for name in ctx.names))


def without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """A block where torch.autocast is off (when it is on): the layer computes in its own dtype,
    forward and backward, on every backend (backend torch's matmuls would otherwise follow
    autocast, and its router's choices with them, unlike the fused kernel and a backward that
    recomputes them)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def bound_parameters(layer, names: Sequence[str], tensors: Sequence[torch.Tensor],
                     correction_bias: torch.Tensor | None = None) -> Iterator[None]:
    """Inside the block, the layer's parameters `names` read as `tensors` (and its correction bias
    as correction_bias, when given), restored after: a backward computes with the weights its
    forward ran with (torch.func.functional_call's, which are gone by then), and the compiled
    layer's ops with their inputs (a parameter updated earlier in the compiled region reaches them
    only so)."""
    slots = [_parameter_slot(layer, name) for name in names]
    held = [params[leaf] for params, leaf in slots]
    held_bias = layer._buffers.get("e_score_correction_bias")
    try:
        for (params, leaf), t in zip(slots, tensors, strict=True):
            params[leaf] = t
        if correction_bias is not None:
            layer._buffers["e_score_correction_bias"] = correction_bias
        yield
    finally:
        for (params, leaf), t in zip(slots, held):
            params[leaf] = t
        if correction_bias is not None:
            layer._buffers["e_score_correction_bias"] = held_bias


def _parameter_slot(layer, name: str) -> tuple[dict, str]:
    """named_parameters()'s name -> (the _parameters dict that holds it, its key there): a dotted
    name is a submodule's (torch.nn.utils.parametrize keeps w_in as parametrizations.w_in.original)."""
    owner, _, leaf = name.rpartition(".")
    return (layer.get_submodule(owner) if owner else layer)._parameters, leaf


def parameters_problem(layer, named: dict[str, torch.Tensor]) -> Exception | None:
    """named: the layer's named_parameters(). Where the explicit backward (backward "saved" or
    "recompute", and the compiled layer's) would not give every parameter that trains its
    gradient: the error naming them, else None.
    Its steps give gradients to the config's weights held as the layer's own parameters, so it
    refuses a weight that is not one (reparametrized by torch.nn.utils.parametrize, some LoRA;
    made in a forward pre-hook from prune's `w_in_orig`, weight_norm's `w_out_g` and `w_out_v`,
    spectral_norm's `router_weight_orig`; flattened into a wrapper's parameter by torch's older
    FullyShardedDataParallel class) and a parameter that is not one of them and trains (one a
    user set on the layer, a parametrization's)."""
    own = layer.config.weight_shapes()
    # the older FSDP class with use_orig_params=True puts views of its flat parameter in their place
    missing = [name for name in own if name != "e_score_correction_bias"
               and (name not in named or getattr(getattr(named[name], "_base", None), "_is_flat_param", False))]
    foreign = [name for name, p in named.items() if name not in own and ("." in name or p.requires_grad)]
    if not missing and not foreign:
        return None
    what = ([f"its weights {', '.join(missing)} are not its own parameters"] if missing else []) + (
        [f"{', '.join(foreign)} are parameters but not its weights"] if foreign else [])
    return NotImplementedError(
        f"MoELayer(backward={layer.options.backward_for(layer.backend.name)!r}) gives gradients to its own "
        f"weights only ({'; '.join(what)}: a parametrization, prune, weight_norm or spectral_norm, torch's older "
        "FullyShardedDataParallel class, or a parameter set on the layer): use backend='torch' with "
        "backward='autograd' (not compiled), fully_shard, or train the weights directly")


def refuse_create_graph(layer) -> None:
    """Raise where the backward is asked to record itself (create_graph=True: a gradient penalty,
    a Hessian-vector product): its explicit steps are not differentiable, and a graph of them
    would give second-order gradients that are wrong or missing, not an error."""
    if torch.is_grad_enabled():
        raise NotImplementedError(
            f"MoELayer(backward={layer.options.backward_for(layer.backend.name)!r}) gives first-order gradients "
            "only: create_graph=True (double backward) is not supported. Use backend='torch' with "
            "backward='autograd' at world 1 for higher-order gradients")


def routing_bias_now(layer) -> torch.Tensor | None:
    """A copy of the layer's correction bias ([E] fp32, routing='sigmoid_grouped'), or None: what
    a backward that routes again must route with. The buffer is not a parameter, and balancing
    updates it between steps (often between a forward and its backward)."""
    bias = layer.e_score_correction_bias
    return None if bias is None else bias.detach().clone()


def moe_backward(layer, x: torch.Tensor, dy: torch.Tensor, want: set[str], x_needs_grad: bool,
                 saved: SavedForward | None = None, routing_bias: torch.Tensor | None = None) -> dict:
    """x, dy: [T, H] in the layer's dtype -> {"x" (if x_needs_grad) and each parameter name in
    want: its gradient} of sum(layer(x) * dy); collective at world > 1. saved: what the forward
    kept (backward="saved"), or None to route and run GEMM1 again, with routing_bias: the
    correction bias the forward routed with (routing_bias_now's copy; None without one). No
    autograd inside (the compiled layer's backward op runs it below the autograd keys)."""
    cfg = layer.config
    if capture.capturing(x):
        capture.refuse_backward(layer)
    layer.backend.raise_if_failed(block=False)  # a fused forward that timed out (where its status landed)
    if saved is None and (routing_bias is None) != (layer.e_score_correction_bias is None):
        raise ValueError("moe_backward: routing_bias must be the forward's correction bias (routing_bias_now), "
                         f"given {'none' if routing_bias is None else 'one'} for routing={cfg.routing!r}")
    # a loss like y.sum() hands back an expanded (stride 0) gradient; .contiguous() keeps an empty one's strides
    dy = dy.contiguous() if dy.numel() else dy.new_zeros(dy.shape)
    T, k = x.shape[0], cfg.top_k
    if saved is None:
        with torch.no_grad():  # the forward's routing (the router kernel, on GPUs), even under create_graph
            r = layer.route(x, keep_logits=True, correction_bias=routing_bias)
        slot, send_counts = slots_by_destination(r, layer)  # slot t * k + j: token t's j-th expert
    else:
        r, send_counts = saved.routing, saved.send_counts.long()
        if r.logits is None:  # route(keep_logits=True) above always has them
            raise ValueError("moe_backward: the forward's routing has no logits; a saving forward routes with "
                             "keep_logits=True")
        slot = saved.slot.long() if r.kept is None else saved.slot[:int(send_counts.sum())].long()
    tok = slot // k

    router_weight, logits = layer.router_weight, r.logits
    slot_w = r.weights.reshape(-1)[slot]  # the forward's (the router kernel's where it ran)
    if cfg.weight_on_input:
        x_slot = x[tok].float()
        rows, scale = (x_slot * slot_w[:, None]).to(x.dtype), torch.ones_like(slot_w)
    else:
        rows, scale = x[tok], slot_w
    d_rows, dot, expert_grads = _at_the_experts(layer, send_counts, rows, dy[tok], scale,
                                                None if saved is None else saved.pre, want)

    if cfg.weight_on_input:  # the slot's row was w x: d(w x) = d_rows
        d_rows = d_rows.float()
        dx_slot, dw_slot = d_rows * slot_w[:, None], (d_rows * x_slot).sum(1)
    else:
        dx_slot, dw_slot = d_rows, dot
    d = layer.expert_grad_divisor
    grads = {name: g if d == 1 else g / d for name, g in expert_grads.items()}
    dw = torch.zeros(T * k, dtype=torch.float32, device=x.device).index_copy_(0, slot, dw_slot)
    d_logits = _weights_backward(logits, r.experts, cfg, dw.view(T, k))
    dx = _per_token(dx_slot, slot, T, k, d_logits, router_weight)
    if "router_weight" in want:
        grads["router_weight"] = _router_weight_grad(d_logits, x).to(router_weight.dtype)
    if "router_bias" in want:
        grads["router_bias"] = d_logits.sum(0).to(layer.router_bias.dtype)
    if cfg.shared_experts:
        shared_pre = None if saved is None else saved.shared_pre
        grads |= _shared_grads(layer, x, dy, dx, shared_pre, want)
    if x_needs_grad:
        grads["x"] = dx.to(x.dtype)
    return grads


def _per_token(rows: torch.Tensor, slot: torch.Tensor, T: int, k: int, d_logits: torch.Tensor,
               router_weight: torch.Tensor) -> torch.Tensor:
    """rows: [S, H], one per kept slot (slot [S]: token * k + choice, each at most once);
    d_logits: [T, E] fp32; router_weight: [E, H] -> dx [T, H] fp32: each token's rows summed
    (a dropped slot adds nothing), plus d_logits @ router_weight. One kernel pass on GPUs
    (kernels/token_sum.py); elsewhere the rows gathered into slot order (a dropped slot reads a zero
    row), the k of a token added in fp32, then the product. Never a scatter of the rows: on an H200
    the scatter took 306 us of qwen3's 3.4 ms step at 4,096 tokens (bench/NOTES.md item 53)."""
    S, H = rows.shape
    where = torch.full((T * k,), S, dtype=torch.int64, device=rows.device)
    where[slot] = torch.arange(S, device=rows.device)
    if rows.is_cuda:
        return token_sum(rows, where.view(T, k), d_logits, router_weight.contiguous())
    if S < T * k:  # dropped slots: their index S reads the zero row
        rows = torch.cat([rows, rows.new_zeros(1, H)])
    return rows[where].view(T, k, H).sum(1, dtype=torch.float32) + d_logits @ router_weight.float()


def _weights_backward(logits: torch.Tensor, experts: torch.Tensor, cfg, grad: torch.Tensor) -> torch.Tensor:
    """logits: [T, E] fp32, experts: [T, k], grad: [T, k] fp32 (of the scaled routing weights) ->
    the logits' gradient [T, E] fp32: one kernel on GPUs (kernels/weights_grad.py, one launch for
    about fourteen), routing.weights_backward's torch ops elsewhere."""
    if logits.is_cuda:
        return weights_grad(logits, experts, cfg, grad)
    return weights_backward(logits, experts, cfg, grad)


def _router_weight_grad(d_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d_logits: [T, E] fp32; x: [T, H] -> d_logits^T @ x, [E, H] fp32: on GPUs one kernel on the
    tensor cores (kernels/router_grad.py: x read in its own dtype, no fp32 copy of it), elsewhere
    an fp32 matmul."""
    if x.is_cuda:
        return router_weight_grad(d_logits, x.contiguous())
    return d_logits.t() @ x.float()


def _at_the_experts(layer, send_counts: torch.Tensor, rows: torch.Tensor, dy: torch.Tensor,
                    scale: torch.Tensor, pre: torch.Tensor | None,
                    want: set[str]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """send_counts: [W, L] slots this rank sends to each (rank, local expert); rows, dy: [S, H] and
    scale: [S] fp32, the slots in that order; pre: SavedForward.pre, or None. -> (d_rows [S, H]
    (rows' dtype at world 1, fp32 otherwise), dot [S] fp32, the gradients of this rank's expert
    weights named in want), each slot's from the rank that holds its expert."""
    weights = {n: getattr(layer, n) for n in EXPERT_PARAMS}
    if layer.world_size == 1:
        g = expert_ffn_backward(rows, dy, scale, send_counts[0], weights, layer.config,
                                None if pre is None else pre[:rows.shape[0]], want)
        return g.d_rows, g.dot, g.params
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=layer.process_group)
    exchange, perm = exchange_for(send_counts, recv_counts, layer.process_group)
    recv = [exchange.dispatch(t)[perm] for t in (rows, dy, scale[:, None])]
    g = expert_ffn_backward(recv[0], recv[1], recv[2][:, 0], recv_counts.sum(0), weights, layer.config,
                            None if pre is None else pre[:recv[0].shape[0]], want)
    back = torch.empty(g.d_rows.shape[0], g.d_rows.shape[1] + 1, dtype=torch.float32, device=rows.device)
    back[perm] = torch.cat([g.d_rows.float(), g.dot[:, None]], dim=1)
    back = exchange.combine(back)
    return back[:, :-1], back[:, -1], g.params


def _shared_grads(layer, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pre: torch.Tensor | None,
                  want: set[str]) -> dict:
    """The gradients of the shared experts' parameters named in want (one expert over every row,
    its output scaled by sigmoid(x shared_gate_weight^T) when gated; pre: their saved GEMM1 output
    [T, Fs_in], or None); their part of x's gradient is added to dx [T, H] fp32."""
    cfg = layer.config
    counts = torch.full((1,), x.shape[0], dtype=torch.int64, device=x.device)
    weights = {"w_in": layer.shared_w_in[None], "w_out": layer.shared_w_out[None]}
    gate = None
    if cfg.shared_expert_gate:
        gate_weight = layer.shared_gate_weight.float()  # [1, H]
        gate = torch.sigmoid(x.float() @ gate_weight.t())[:, 0]
    scale = torch.ones(x.shape[0], device=x.device) if gate is None else gate
    g = expert_ffn_backward(x, dy, scale, counts, weights, cfg, pre,
                            want={n.removeprefix("shared_") for n in want if n.startswith("shared_w_")})
    dx += g.d_rows
    grads = {"shared_" + n: grad[0] for n, grad in g.params.items()}
    if gate is not None:
        d_logit = g.dot * gate * (1 - gate)  # [T]
        dx += d_logit[:, None] * gate_weight
        if "shared_gate_weight" in want:
            grads["shared_gate_weight"] = (d_logit @ x.float())[None].to(layer.shared_gate_weight.dtype)
    return grads
