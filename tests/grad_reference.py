"""What each rank's gradients must be, from float64 autograd through reference_forward (shared by
tests/test_backward.py and tests/gpu/check_backward.py).

At world W each rank routes its own tokens (capacity per source rank), so the reference gradient
of rank r's loss is that of reference_forward on rank r's tokens. What each rank's .grad holds:
  x:              rank r's own reference gradient;
  router_weight:  rank r's own reference gradient (replicated: only this rank's tokens' part);
  w_in, w_out:    the sum over every rank's reference gradient, for the experts rank r holds."""

import math

import torch
import torch.distributed as dist

from flashmoe_py import MoELayer, reference_forward
from flashmoe_py.reference import ffn, reference_routing
from flashmoe_py.routing import weights_for
from flashmoe_py.config import EXPERT_WEIGHTS
from flashmoe_py.gate_up import WEIGHTS as GATE_UP_WEIGHTS
from flashmoe_py.gate_up import to_halves


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want| (|got - want| where want is 0); inf for NaN, which max() and NCCL's MAX
    would drop beside a finite value."""
    diff, norm = (got.double() - want.double()).norm(), want.double().norm()
    err = float(diff / norm) if norm > 0 else float(diff)
    return math.inf if math.isnan(err) else err


def near_a_kink(x: torch.Tensor, full: dict, config) -> bool:
    """Whether a pre-activation of x [..., H] (x w_in[e] (+ bias_in[e]) at any expert, and x
    shared_w_in) lies within float32's rounding of a point where the activation's derivative jumps:
    relu's 0, clamped_swiglu's gate at swiglu_limit and up at +-swiglu_limit (the smooth ones have
    none). There the layer's float32 and the reference's float64 can fall on either side, and a
    whole row's part of the weight gradient with them: both are right, and an fp32 bar would fail on
    rounding (a relu pre-activation of 5e-10 in float64, -5.6e-8 in float32, put w_in's gradient
    1.1e-2 off; bench/NOTES.md item 68). full: MoELayer.full_weight_dict()."""
    if config.activation not in ("relu", "clamped_swiglu"):
        return False
    x = x.reshape(-1, x.shape[-1]).double()
    blocks = [(full["w_in"].double(), None if full.get("bias_in") is None else full["bias_in"].double())]
    if full.get("shared_w_in") is not None:
        blocks.append((full["shared_w_in"].double()[None], None))
    for w, b in blocks:  # w [E, H, F_in], b [E, F_in]
        pre = torch.einsum("th,ehf->tef", x, w) + (0 if b is None else b[None])
        rounding = 1e-5 * (x.norm(dim=1)[:, None, None] * w.norm(dim=1)[None] + (0 if b is None else b.abs()[None]))
        if config.activation == "relu":
            to_kink = pre.abs()
        else:  # gate | up halves
            gate, up = pre.chunk(2, dim=-1)
            limit = config.swiglu_limit
            to_kink = torch.cat([(gate - limit).abs(), torch.minimum((up - limit).abs(), (up + limit).abs())], -1)
        if bool((to_kink < rounding).any()):
            return True
    return False


def reference_grads(layer: MoELayer, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """d(sum(out * dy)) / d(x and each of the layer's parameters), by name, for this rank's tokens
    x [T, H], in float64 (collective: the expert weights' gradients are summed over ranks, then
    cut to this rank's experts; the correction bias is a buffer that only steers the choice)."""
    full = {name: t.detach().double() for name, t in layer.full_weight_dict().items()}
    leaves = {"x": x.detach().double().requires_grad_()}
    leaves |= {name: t.requires_grad_() for name, t in full.items() if name != "e_score_correction_bias"}
    out = reference_forward(leaves["x"], config=layer.config, compute_dtype=torch.float64, **full)
    grads = {name: torch.zeros_like(t) for name, t in leaves.items()}  # no tokens: nothing depends on them
    if out.requires_grad:
        got = torch.autograd.grad((out * dy.double()).sum(), list(leaves.values()), allow_unused=True)
        grads |= {name: g for name, g in zip(leaves, got) if g is not None}
    mine = torch.tensor(layer.placement.experts_on(layer.rank), device=x.device)
    for name in [n for n in EXPERT_WEIGHTS if n in grads]:  # the same order on every rank
        if layer.world_size > 1:
            dist.all_reduce(grads[name], group=layer.process_group)
        grads[name] = grads[name][mine]
    return grads


def grad_errors(layer: MoELayer, x: torch.Tensor, dy: torch.Tensor, forward=None, y=None, step=None) -> dict:
    """Backward of sum(forward(x) * dy), x [..., H], forward the layer or a wrapper of it (a
    compiled one), or of sum(y * dy) with y = layer(x) taken earlier, or step() (a CUDA graph's
    replay of a captured training step on x and dy, leaving the gradients in .grad) -> {x or
    parameter name: relative error against the reference}; None where nothing needs that gradient
    (x or a parameter that requires none), inf where one is needed and .grad is None (a backward
    that never produced it must not pass)."""
    if step is not None:
        step()
    else:
        y = (layer if forward is None else forward)(x) if y is None else y
        (y * dy).sum().backward()
    H = layer.config.hidden_size
    want = reference_grads(layer, x.reshape(-1, H), dy.reshape(-1, H))
    got = {"x": None if x.grad is None else x.grad.reshape(-1, H)}
    got |= {name: p.grad for name, p in layer.named_parameters()}
    if layer.config.gated:  # the layer's gate/up pairs -> the reference's halves
        got |= {n: to_halves(got[n]) for n in GATE_UP_WEIGHTS if got.get(n) is not None}
    assert set(got) == set(want), (sorted(got), sorted(want))
    needed = {"x": x.is_leaf and x.requires_grad} | {name: p.requires_grad for name, p in layer.named_parameters()}
    return {n: (math.inf if needed[n] else None) if got[n] is None else rel_err(got[n], want[n]) for n in want}


def routed_otherwise(layer: MoELayer, x: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H]; experts: [T, k], another routing's choice for x (a reference's) -> (the layer's
    router's choice [T, k] on experts' device, bool [T]: the tokens whose experts differ as sets).
    The layer routes as its forward does: under no_grad, so the router kernel on GPUs (with a graph
    recorded, route() would take torch ops)."""
    with torch.no_grad():
        chosen = layer.route(x.detach()).experts.to(experts.device)
    return chosen, (chosen.sort(1).values != experts.sort(1).values).any(1)


def lean_grad_errors(layer: MoELayer, x: torch.Tensor, dy: torch.Tensor, dtype=torch.float32,
                     report: dict | None = None) -> dict:
    """grad_errors for full-size layers, whose float64 copy would not fit beside them: the
    reference in `dtype`, one expert's weights upcast at a time, each expert's part of the loss
    differentiated on its own (the routing weights' gradient gathered, then taken through the
    router once); the errors are summed norms over experts. x: [T, H], this rank's tokens
    (x.requires_grad). Collective when world_size > 1: each expert's gradient is summed over the
    ranks' tokens (one all_reduce an expert, in expert order on every rank) and compared on the
    rank that holds it; x, the router's and the shared experts' gradients are this rank's own
    (tests/grad_reference.py's header).

    A token whose experts the layer's router (the router kernel, on GPUs) chose otherwise than
    the reference's, a near tie in bf16 x (one such token among 2,048 moves every error by ~1e-2),
    is taken with the layer's experts, scored by the reference's logits: the gradient of the
    function the layer computed. report, when given, receives how many: tokens_routed_otherwise
    (this rank's)."""
    cfg = layer.config
    assert x.grad is None and all(p.grad is None for p in layer.parameters()), "gradients left from a step before"
    (layer(x) * dy).sum().backward()
    # the full weights on the host (a second copy of the experts would not fit beside the layer and
    # its gradients: deepseek_v3 on an 80 GB GPU), each expert's moved to x's device when it is taken
    full = layer.full_weight_dict(device="cpu")
    got = {n: p.grad for n, p in layer.named_parameters()}
    norms = {n: [0.0, 0.0] for n in ["x", *got] if n == "x" or got[n] is not None}  # [|got - want|^2, |want|^2]

    def halves(name: str, g: torch.Tensor) -> torch.Tensor:  # a gradient in the reference's layout
        return to_halves(g) if cfg.gated and name in GATE_UP_WEIGHTS else g

    def add(name: str, g: torch.Tensor | None, want: torch.Tensor) -> None:
        if name not in norms:  # a frozen parameter's: none to compare
            return
        g = halves(name, g)
        norms[name][0] += float((g.double() - want.double()).square().sum())
        norms[name][1] += float(want.double().square().sum())

    def take(name: str, index=None) -> torch.Tensor:
        t = full[name] if index is None else full[name][index]
        return t.to(x.device, dtype).requires_grad_()

    xr = x.detach().to(dtype).requires_grad_()
    router = {n: take(n) for n in ("router_weight", "router_bias") if n in full}
    correction = full.get("e_score_correction_bias")
    weights, experts, kept = reference_routing(xr, router["router_weight"], cfg, dtype,
                                               router_bias=router.get("router_bias"),
                                               e_score_correction_bias=None if correction is None
                                               else correction.to(x.device))
    chosen, otherwise = routed_otherwise(layer, x, experts)
    if report is not None:
        report["tokens_routed_otherwise"] = int(otherwise.sum())
    if otherwise.any():
        logits = xr @ router["router_weight"].t() + (router["router_bias"] if "router_bias" in router else 0)
        weights = torch.where(otherwise[:, None], weights_for(logits, chosen, cfg), weights)
        experts = torch.where(otherwise[:, None], chosen, experts)
    dyr, xd = dy.to(dtype), xr.detach()
    dx, dw = torch.zeros_like(xd), torch.zeros_like(weights)
    expert_names = [n for n in EXPERT_WEIGHTS if n in full]
    slot = {e: i for i, e in enumerate(layer.placement.experts_on(layer.rank))}
    for e in range(cfg.num_experts):
        token, k = torch.nonzero((experts == e) & kept, as_tuple=True)
        leaves = {n: take(n, e) for n in expert_names}
        rows, w = xd[token].requires_grad_(), weights[token, k].detach().unsqueeze(1).requires_grad_()
        biases = (leaves.get("bias_in"), leaves.get("bias_out"))
        if cfg.weight_on_input:
            y = ffn(w * rows, leaves["w_in"], leaves["w_out"], cfg, *biases)
        else:
            y = w * ffn(rows, leaves["w_in"], leaves["w_out"], cfg, *biases)
        inputs = [rows, w, *leaves.values()]
        g_rows, g_w, *g_params = torch.autograd.grad((y * dyr[token]).sum(), inputs, allow_unused=True)
        dx.index_add_(0, token, g_rows)
        dw[token, k] = g_w[:, 0]
        for n, leaf, g in zip(leaves, leaves.values(), g_params):
            g = torch.zeros_like(leaf) if g is None else g
            if layer.world_size > 1:  # every rank's tokens' part, summed where the expert is held
                dist.all_reduce(g, group=layer.process_group)
            if e in slot and got[n] is not None:
                add(n, got[n][slot[e]], g)
    router_grads = torch.autograd.grad(weights, [xr, *router.values()], dw, allow_unused=True)
    dx += router_grads[0]
    for n, g in zip(router, router_grads[1:]):
        add(n, got[n], g)
    if cfg.shared_experts:
        shared = {n: take(n) for n in full if n.startswith("shared_")}
        xs = xd.clone().requires_grad_()
        y = ffn(xs, shared["shared_w_in"], shared["shared_w_out"], cfg)
        if cfg.shared_expert_gate:
            y = torch.sigmoid(xs @ shared["shared_gate_weight"].t()) * y
        g_x, *g_shared = torch.autograd.grad((y * dyr).sum(), [xs, *shared.values()], allow_unused=True)
        dx += 0 if g_x is None else g_x
        for n, g in zip(shared, g_shared):  # None: no tokens here
            add(n, got[n], torch.zeros_like(shared[n]) if g is None else g)
    add("x", x.grad, dx)
    errs = {n: (d / w) ** 0.5 if w > 0 else d ** 0.5 for n, (d, w) in norms.items()}
    # a parameter that requires a gradient and got none: the backward never produced it
    errs |= {n: math.inf for n, p in layer.named_parameters() if p.requires_grad and p.grad is None}
    return {n: math.inf if math.isnan(e) else e for n, e in errs.items()}  # NaN: as rel_err
