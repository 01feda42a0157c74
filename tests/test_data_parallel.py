"""MoELayers inside DistributedDataParallel and FSDP (gloo): prepared, the wrappers keep each rank's
own experts and every gradient is that of the mean of the ranks' losses, the experts' included;
unprepared, the layer's forward refuses them."""

import pickle
import re
import unittest.mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
from grad_reference import rel_err
from seeds import fresh_seed
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from flashmoe_py import DataParallelError, MoEConfig, MoELayer, prepare_ddp, prepare_fsdp
from flashmoe_py.data_parallel import clip_grad_norm_ as fm_clip
from flashmoe_py.data_parallel import exclude_from_ddp, sharded_names

CFG = MoEConfig(hidden_size=32, ffn_size=24, num_experts=8, top_k=2, dtype="float32", expert_bias=True,
                shared_experts=1, shared_ffn_size=16)


def model(seed: int, backward: str) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the Linear's weights, the same on every rank
        return nn.Sequential(nn.Linear(32, 32), MoELayer(CFG, seed=seed, backward=backward))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def wrap(net: nn.Module, how: str, world: int) -> nn.Module:
    """net wrapped data-parallel, prepared first as the README says (how: "ddp", "ddp_pickled":
    pickled and unpickled after prepare_ddp, "ddp_compiled_inside": DDP(torch.compile(net)) after
    prepare_ddp(net), nanoGPT's order, "fsdp": one fully_shard of the whole model,
    "fsdp_per_block": the layer's block first, as torchtitan shards each block) or not
    ("ddp_unprepared", "fsdp_unprepared", "fsdp_prepared_not_passed": prepare_fsdp called, its
    parameters not given to fully_shard, "ddp_excluded_only": patch_model's exclusion without
    prepare_ddp's averaging, "fsdp_mixed_precision": prepared, under a bfloat16 param_dtype)."""
    if how.startswith("ddp"):
        if how in ("ddp", "ddp_pickled", "ddp_compiled_inside"):
            names = ["1.bias_in", "1.bias_out", "1.expert_ids", "1.w_in", "1.w_out"]
            assert sorted(prepare_ddp(net)) == [*names, *(f"_orig_mod.{n}" for n in names)]
        if how == "ddp_compiled_inside":  # (DDP names the parameters through the compiled wrapper)
            return DistributedDataParallel(torch.compile(net, backend="eager"))
        if how == "ddp_pickled":  # a prepared model saved whole and loaded (a Parameter's hooks would be lost)
            net = pickle.loads(pickle.dumps(net))
        elif how == "ddp_excluded_only":
            exclude_from_ddp(net)
        return DistributedDataParallel(net)
    mesh = init_device_mesh("cpu", (world,))
    ignored = prepare_fsdp(net) if how != "fsdp_unprepared" else None
    if how == "fsdp":
        assert ignored == {net[1].w_in, net[1].w_out, net[1].bias_in, net[1].bias_out}
    ignored = ignored if how != "fsdp_prepared_not_passed" else None
    if how == "fsdp_mixed_precision":  # casts the router the layer computes with
        return fully_shard(net, mesh=mesh, ignored_params=ignored,
                           mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    if how == "fsdp_per_block":
        fully_shard(net[1], mesh=mesh, ignored_params=ignored)
    return fully_shard(net, mesh=mesh, ignored_params=ignored)


def wrapped_against_plain(rank, world, seed: int, how: str, backward: str):
    """A step of wrap(model, how) and of the same model unwrapped (step_against_plain) -> (whether
    wrapping left this rank's experts as they were; step_against_plain's errors, or what the
    wrapped forward raised)."""
    plain, net = model(seed, backward), model(seed, backward)
    own = {n: p.detach().clone() for n, p in net.named_parameters()}
    wrapped = wrap(net, how, world)
    if isinstance(wrapped, DistributedDataParallel):
        net = getattr(wrapped.module, "_orig_mod", wrapped.module)  # (torch.compile's wrapper: the model in it)
    kept = all(torch.equal(full(p), own[n]) for n, p in net.named_parameters())
    return kept, step_against_plain(plain, net, wrapped, rank, world, seed)


def step_against_plain(plain: nn.Module, net: nn.Module, wrapped: nn.Module, rank, world, seed: int):
    """A step of `wrapped` (around `net`) and of `plain` on this rank's own x and dy -> what the
    wrapped forward raised, or the error of each of net's gradients against plain's made the
    mean loss's (replicated gradients summed over the ranks, then every gradient divided by the
    world size)."""
    g = torch.Generator().manual_seed(seed * 7 + rank)
    x, dy = torch.randn(9 + 4 * rank, 32, generator=g), torch.randn(9 + 4 * rank, 32, generator=g)
    (plain(x) * dy).sum().backward()
    try:
        (wrapped(x) * dy).sum().backward()
    except DataParallelError as e:
        return str(e)
    sharded = set(sharded_names(plain))
    errs = {}
    for (n, p), q in zip(plain.named_parameters(), net.parameters()):
        want = p.grad.clone()
        if n not in sharded:
            dist.all_reduce(want)
        errs[n] = rel_err(full(q.grad), want / world)
    return errs


@pytest.mark.parametrize("how", ["ddp", "ddp_pickled", "ddp_compiled_inside", "fsdp", "fsdp_per_block"])
@pytest.mark.parametrize("backward", ["autograd", "saved"])
def test_prepared_wrappers_keep_each_rank_s_experts_and_take_the_mean_loss_s_gradients(dist_pools, how, backward):
    """ddp_compiled_inside: the names prepare_ddp set were read through the compiled wrapper, whose
    parameters DDP names "_orig_mod.1.w_in": none matched, DDP copied rank 0's experts to rank 1
    and the forward refused them, naming prepare_ddp, which had been called (a review's run)."""
    for kept, errs in dist_pools(2).run(wrapped_against_plain, fresh_seed(), how, backward):
        assert kept and max(errs.values()) <= 1e-5, errs


def full_weights_under_fully_shard(rank, world, seed: int):
    """model(seed)'s layer under fully_shard: full_weight_dict (to every rank, and to rank 0 only)
    against the same layer's before wrapping, and what load_full_weights says."""
    net = model(seed, "autograd")
    before = net[1].full_weight_dict()
    wrap(net, "fsdp", world)
    sharded = [n for n in before if isinstance(getattr(net[1], n), DTensor)]
    after, at_0 = net[1].full_weight_dict(), net[1].full_weight_dict(dst=0)
    same = all(type(t) is torch.Tensor and torch.equal(t, before[n]) for n, t in after.items())
    same_at_0 = all(torch.equal(t, before[n]) for n, t in at_0.items()) and bool(at_0) == (rank == 0)
    try:
        net[1].load_full_weights(**before)
        said = "loaded"
    except ValueError as e:
        said = str(e)
    return sharded, sorted(after) == sorted(before) and same, same_at_0, said


def test_full_weights_under_fully_shard_are_whole_and_loading_them_there_is_refused(dist_pools):
    """fully_shard makes the router and shared experts DTensors: full_weight_dict gathers them
    (before, each rank's dict held its own rows of them, which load_full_weights refused and a
    saved dict kept half of); load_full_weights into them says to load before wrapping (before,
    torch's "mixed torch.Tensor and DTensor")."""
    for sharded, whole, whole_at_0, said in dist_pools(2).run(full_weights_under_fully_shard, fresh_seed()):
        assert "router_weight" in sharded and "shared_w_in" in sharded, sharded
        assert whole and whole_at_0
        assert "sharded by fully_shard" in said and "before wrapping" in said, said


def compiled_step(rank, world, seed: int, how: str) -> str:
    """One step of torch.compile(wrap(model(seed), how)) (aot_eager: the layer is one custom op
    there, its check run inside the op) -> "ok" or what it raised."""
    wrapped = torch.compile(wrap(model(seed, "saved"), how, world), backend="aot_eager")
    try:
        wrapped(torch.randn(7, 32)).sum().backward()
    except DataParallelError as e:
        return str(e)
    return "ok"


def test_compiled_wrapped_models_are_checked_as_eager_ones(dist_pools):
    seed = fresh_seed()
    for how in ("ddp", "fsdp"):
        assert dist_pools(2).run(compiled_step, seed, how) == ["ok", "ok"], how
    for said in dist_pools(2).run(compiled_step, seed, "ddp_unprepared"):
        assert "DistributedDataParallel manages this MoELayer's" in said


def test_unprepared_ddp_copies_rank_0_s_experts_and_the_forward_says_so(dist_pools):
    """Why prepare_ddp (or patch_model) must run first: DDP copies rank 0's parameters and
    buffers when it is built; the layer's forward then refuses, naming what DDP manages."""
    (kept0, raised0), (kept1, raised1) = dist_pools(2).run(wrapped_against_plain, fresh_seed(), "ddp_unprepared",
                                                           "autograd")
    assert (kept0, kept1) == (True, False)
    for raised in (raised0, raised1):
        assert "DistributedDataParallel manages this MoELayer's w_in, w_out, bias_in, bias_out, expert_ids" in raised


def bare_layer_under_ddp(rank, world, seed: int, excluded: str):
    """DDP around an MoELayer itself (no parent module), prepared by prepare_ddp ("prepared"), or
    with its sharded tensors excluded by their names alone and its gradients averaged ("names"):
    DDP's reducer spells the wrapped module's own parameters ".w_in", so "w_in" alone left it
    averaging the ranks' different experts. -> (what the forward raised, or the error of each
    gradient against the plain layer's made the mean loss's)."""
    plain, layer = MoELayer(CFG, seed=seed), MoELayer(CFG, seed=seed)
    prepare_ddp(layer)
    if excluded == "names":
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(layer, sharded_names(layer))
    return step_against_plain(plain, layer, DistributedDataParallel(layer), rank, world, seed)


def test_ddp_around_a_bare_layer_keeps_each_rank_s_expert_gradients(dist_pools):
    """DDP(layer), the README's training example with the layer as the model: the experts'
    gradients are each rank's own (DDP's reducer averaged them across ranks before, silently);
    excluded under one spelling only, the forward refuses, naming what DDP averages."""
    seed = fresh_seed()
    for errs in dist_pools(2).run(bare_layer_under_ddp, seed, "prepared"):
        assert max(errs.values()) <= 1e-5, errs
    for raised in dist_pools(2).run(bare_layer_under_ddp, seed, "names"):
        assert isinstance(raised, str) and "DistributedDataParallel manages this MoELayer's w_in" in raised, raised


def ddp_misuse(rank, world, seed: int, how: str) -> str:
    """A prepared model under DDP over half the ranks ("subgroup"), or whose router weight is a new
    nn.Parameter set after DDP was built (find_unused_parameters, where torch says nothing), or
    refreshed in place ("in_place") -> what its forward raised, or "ok" after two steps."""
    net = model(seed, "autograd")
    prepare_ddp(net)
    halves = [dist.new_group(list(range(h, world, 2))) for h in (0, 1)]  # every rank makes every group
    if how == "subgroup":
        wrapped = DistributedDataParallel(net, process_group=halves[rank % 2])
    else:
        wrapped = DistributedDataParallel(net, find_unused_parameters=True)
    layer = net[1]
    x = torch.randn(6, 32)
    try:
        for _ in range(2):
            wrapped(x).sum().backward()
            if how == "replaced":
                layer.router_weight = nn.Parameter(layer.router_weight.detach().clone())
            elif how == "in_place":
                with torch.no_grad():
                    layer.router_weight.copy_(layer.router_weight * 0.5)
    except DataParallelError as e:
        return str(e)
    return "ok"


@pytest.mark.parametrize("how, says", [
    ("subgroup", r"DistributedDataParallel averages over ranks \[[0-3], [0-3]\], this MoELayer's experts span ranks "
                 r"\[0, 1, 2, 3\]"),
    ("replaced", "MoELayer.router_weight was replaced, or set to require grad, after DistributedDataParallel was "
                 "built"),
    ("in_place", "ok")])
def test_ddp_that_would_leave_replicated_weights_unaveraged_is_refused(dist_pools, how, says):
    """DDP over fewer ranks than the layer's (its router and shared experts averaged among some
    ranks only: 1.05 off the mean loss's gradient, copies drifting apart), or a replicated weight
    replaced after wrapping (its gradient never averaged: torch says nothing with
    find_unused_parameters or static_graph) trained silently; refused now. Values loaded in place
    are averaged as before."""
    for said in dist_pools(4).run(ddp_misuse, fresh_seed(), how):
        assert re.search(says, said) if says != "ok" else said == "ok", said


@pytest.mark.parametrize("how, says", [
    ("fsdp_unprepared", "FSDP manages this MoELayer's w_in"),
    ("fsdp_prepared_not_passed", "FSDP manages this MoELayer's w_in"),
    ("fsdp_mixed_precision", "under FSDP, this MoELayer's router_weight is torch.bfloat16"),
    ("ddp_excluded_only", "MoELayer.w_in's gradient is not averaged"),
])
def test_a_wrapper_that_would_mix_experts_or_their_gradients_is_refused_at_the_forward(dist_pools, how, says):
    for _, raised in dist_pools(2).run(wrapped_against_plain, fresh_seed(), how, "autograd"):
        assert isinstance(raised, str) and says in raised, raised


def under_fsdp1(rank, world, seed: int, use_orig_params: bool, prepared: str):
    """torch's older FullyShardedDataParallel class around model(seed), prepare_fsdp's parameters
    given as ignored_states (prepared "passed"), or not ("not_passed"), or prepare_fsdp not called
    ("no") -> (what its forward raised, or the error of its output
    and of its expert gradients against the plain model's made the mean loss's; what
    clip_grad_norm_ raised, given the wrapper and the module inside it)."""
    plain, net = model(seed, "autograd"), model(seed, "autograd")
    ignored = list(prepare_fsdp(net)) if prepared != "no" else None
    ignored = ignored if prepared == "passed" else None
    wrapped = FullyShardedDataParallel(net, device_id=torch.device("cpu"), use_orig_params=use_orig_params,
                                       ignored_states=ignored)
    g = torch.Generator().manual_seed(seed * 7 + rank)
    x, dy = torch.randn(9 + 4 * rank, 32, generator=g), torch.randn(9 + 4 * rank, 32, generator=g)
    y = plain(x)
    (y * dy).sum().backward()
    try:
        y_wrapped = wrapped(x)
    except DataParallelError as e:
        return str(e), None
    (y_wrapped * dy).sum().backward()
    errs = [rel_err(y_wrapped, y)] + [rel_err(getattr(net[1], n).grad, getattr(plain[1], n).grad / world)
                                      for n in ("w_in", "w_out", "bias_in", "bias_out")]
    refusals = []
    for given in (wrapped, net):
        with pytest.raises(ValueError) as clipped:
            fm_clip(given, 1.0)
        refusals.append(str(clipped.value))
    return errs, refusals


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_the_older_fsdp_class_is_refused_unless_given_the_experts_as_ignored_states(dist_pools, use_orig_params):
    for prepared in ("no", "not_passed"):
        for raised, _ in dist_pools(2).run(under_fsdp1, fresh_seed(), use_orig_params, prepared):
            assert "FSDP manages this MoELayer's w_in" in raised, prepared
    for errs, refusals in dist_pools(2).run(under_fsdp1, fresh_seed(), use_orig_params, "passed"):
        assert max(errs) <= 1e-5, errs
        assert all("FullyShardedDataParallel.clip_grad_norm_" in r for r in refusals), refusals


def fsdp1_explicit_backward(rank, world, use_orig_params: bool, backward: str) -> str | None:
    """The older class around a prepared model whose layer has an explicit backward -> what its
    training forward raised (None if nothing)."""
    net = model(3, backward)
    wrapped = FullyShardedDataParallel(net, device_id=torch.device("cpu"), use_orig_params=use_orig_params,
                                       ignored_states=list(prepare_fsdp(net)))
    try:
        wrapped(torch.randn(5, 32))
    except NotImplementedError as e:
        return str(e)
    return None


@pytest.mark.parametrize("use_orig_params", [False, True])
@pytest.mark.parametrize("backward", ["saved", "recompute"])
def test_the_older_fsdp_class_is_refused_by_the_explicit_backwards(dist_pools, use_orig_params, backward):
    """It flattens the router and shared experts into its own parameters: the explicit backwards
    gave them zero gradients (the router's, with use_orig_params False), or a KeyError (True)."""
    for said in dist_pools(2).run(fsdp1_explicit_backward, use_orig_params, backward):
        assert said is not None and "its weights router_weight, shared_w_in, shared_w_out are not its own" in said


def prepared_with_frozen_experts_or_a_smaller_group(rank, world):
    """-> (prepare_ddp on a layer whose experts are frozen: the names it excluded; what it raised
    for a model whose second layer is on a group of one rank, whose experts DDP over both ranks
    would let drift apart, and the first layer's divisor after: unchanged)."""
    frozen = model(5, "autograd")
    for name in ("w_in", "w_out", "bias_in", "bias_out"):
        getattr(frozen[1], name).requires_grad_(False)
    names = prepare_ddp(frozen)
    groups = [dist.new_group([r]) for r in range(world)]
    alone = nn.Sequential(MoELayer(CFG), MoELayer(CFG, process_group=groups[rank]))
    try:
        prepare_ddp(alone)
        raised = ""
    except ValueError as e:
        raised = str(e)
    return names, raised, alone[0].expert_grad_divisor


def test_frozen_experts_are_excluded_and_a_smaller_expert_group_is_refused(dist_pools):
    for names, raised, divisor in dist_pools(2).run(prepared_with_frozen_experts_or_a_smaller_group):
        assert divisor == 1
        plain = ["1.bias_in", "1.bias_out", "1.expert_ids", "1.w_in", "1.w_out"]
        assert sorted(names) == [*plain, *(f"_orig_mod.{n}" for n in plain)]
        assert "experts span 1 ranks, the default group 2" in raised


def clipped_when_wrapped(rank, world, seed: int, how: str):
    """A step of wrap(model(seed), how), its gradients clipped by flashmoe_py's clip_grad_norm_ to
    a third of their norm -> (the norm it returned, the norm over every rank's experts and the
    replicated gradients once, the clip's factor on this rank, whether the replicated gradients
    are equal on every rank afterwards)."""
    net = model(seed, "saved")
    wrapped = wrap(net, how, world)
    g = torch.Generator().manual_seed(seed * 7 + rank)
    x, dy = torch.randn(11, 32, generator=g), torch.randn(11, 32, generator=g)
    (wrapped(x) * dy).sum().backward()
    sharded = set(sharded_names(net))
    before = {n: full(p.grad).clone() for n, p in net.named_parameters()}
    own = sum(float(v.square().sum()) for n, v in before.items() if n in sharded)
    every = [None] * world
    dist.all_gather_object(every, own)
    want = (sum(every) + sum(float(v.square().sum()) for n, v in before.items() if n not in sharded)) ** 0.5
    total = float(fm_clip(net, want / 3))
    factor = float(full(net[0].weight.grad).norm() / before["0.weight"].norm())
    replicated = [full(p.grad) for n, p in net.named_parameters() if n not in sharded]
    mine = torch.cat([r.reshape(-1) for r in replicated])
    others = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(others, mine)
    return total, want, factor, all(torch.equal(o, mine) for o in others)


@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_clipping_counts_every_rank_s_experts_so_the_ranks_scale_alike(dist_pools, how):
    for total, want, factor, equal in dist_pools(2).run(clipped_when_wrapped, fresh_seed(), how):
        assert abs(total - want) <= 1e-5 * want and abs(factor - 1 / 3) < 1e-5 and equal, (total, want, factor)


def clipped_where_one_rank_has_no_gradients(rank, world):
    net = model(3, "autograd")
    (net(torch.randn(5, 32)) ** 2).sum().backward()  # the layer's step is collective
    if rank == 1:
        net.zero_grad(set_to_none=True)
    return float(fm_clip(net, 1.0))


def test_clipping_is_collective_even_where_a_rank_has_no_gradients(dist_pools):
    total = dist_pools(2).run(clipped_where_one_rank_has_no_gradients)
    assert total[0] > 0 and total[1] >= 0  # both ranks returned: nobody left in the all_reduce


def clipped_with_a_nan_expert_gradient(rank, world, nan_rank: int, norm_type: float) -> float:
    """DDP, one step, then a NaN in rank nan_rank's own expert gradient (an overflow there) -> the
    total norm fm's clip returns on this rank."""
    net = model(4, "autograd")
    wrapped = wrap(net, "ddp", world)
    (wrapped(torch.randn(7, 32, generator=torch.Generator().manual_seed(rank))) ** 2).sum().backward()
    if rank == nan_rank:
        net[1].w_in.grad[0, 0, 0] = float("nan")
    return float(fm_clip(net, 1.0, norm_type))


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
@pytest.mark.parametrize("nan_rank", [0, 1])
def test_clipping_returns_nan_where_any_rank_s_expert_gradient_is_nan(dist_pools, nan_rank, norm_type):
    """As torch's norm does on a rank's own gradients, on every rank: a loop that skips a step on a
    non-finite norm must see it. With inf, a MAX all_reduce dropped rank 1's NaN (a review's run:
    2.834 on both ranks, rank 1's w_in NaN)."""
    totals = dist_pools(2).run(clipped_with_a_nan_expert_gradient, nan_rank, norm_type)
    assert all(np.isnan(t) for t in totals), totals


@pytest.mark.parametrize("max_norm", [-1.0, 0, float("nan"), "1.0", True, torch.tensor([1.0, 2.0])])
def test_clipping_refuses_a_max_norm_that_is_no_positive_number(max_norm):
    """torch's scales every gradient by a negative factor for -1.0 (their signs flipped) and by NaN
    for NaN, silently."""
    net = nn.Sequential(nn.Linear(4, 4))
    net(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ValueError, match=r"max_norm=.*expected a number > 0"):
        fm_clip(net, max_norm)


@pytest.mark.parametrize("max_norm", [float("inf"), np.float32(0.5), torch.tensor(0.5)])
def test_clipping_takes_any_positive_real_max_norm_as_torch_does(max_norm):
    """inf (measure the norm, clip nothing), numpy's and a one-element tensor's, as torch's takes them."""
    nets = [nn.Sequential(nn.Linear(4, 4)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    for net in nets:
        net(torch.ones(2, 4)).sum().backward()
    total = fm_clip(nets[0], max_norm)
    want = torch.nn.utils.clip_grad_norm_(nets[1].parameters(), max_norm)
    assert torch.allclose(total, want) and all(torch.equal(a.grad, b.grad) for a, b in
                                                zip(nets[0].parameters(), nets[1].parameters()))


def test_clipping_refuses_parameters_in_place_of_the_model():
    """torch's clip_grad_norm_ takes parameters; this one needs the model to find the layers: called
    torch's way it failed on a generator's missing attribute."""
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="not with model.parameters"):
        fm_clip(net.parameters(), 1.0)


def clip_with_two_expert_groups(rank, world) -> tuple[float, float]:
    """Ranks {0, 1} and {2, 3} each hold all experts of a layer in their own process group ->
    (fm's total norm, the norm over this layer's group by hand) after one backward."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cfg = MoEConfig(hidden_size=32, ffn_size=64, num_experts=4, top_k=2, dtype="float32")
    layer = MoELayer(cfg, process_group=groups[rank // 2], seed=0)
    layer(torch.randn(16, 32, generator=torch.Generator().manual_seed(100 + rank))).square().sum().backward()
    experts = torch.stack([layer.w_in.grad.square().sum(), layer.w_out.grad.square().sum()]).sum()
    dist.all_reduce(experts, group=groups[rank // 2])
    want = (experts + layer.router_weight.grad.square().sum()).sqrt().item()
    return fm_clip(layer, 1e9).item(), want


def test_clip_grad_norm_counts_each_layer_s_experts_over_its_own_process_group(dist_pools):
    """Two expert-parallel groups of two ranks: the experts' norms were summed over the default
    group, every expert counted twice (392.06 against 308.18 in a review's run)."""
    for got, want in dist_pools(4).run(clip_with_two_expert_groups):
        assert abs(got - want) <= 1e-5 * want, (got, want)


def clip_a_layer_built_before_the_process_group(rank, world) -> tuple[float, float]:
    """A layer built before the process group (world 1: every expert on every rank), the same
    gradients on each rank -> (fm's total norm, torch's over this rank's parameters)."""
    with unittest.mock.patch.object(dist, "is_initialized", lambda: False):
        layer = MoELayer(MoEConfig(hidden_size=32, ffn_size=64, num_experts=4, top_k=2, dtype="float32"), seed=0)
    assert layer.world_size == 1 and layer.process_group is None
    layer(torch.randn(16, 32, generator=torch.Generator().manual_seed(100))).square().sum().backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in layer.parameters()]).item()
    return fm_clip(layer, 1e9).item(), want


def test_clip_grad_norm_counts_a_layer_of_world_1_s_experts_once(dist_pools):
    """Its experts are replicated, as under DDP: they were summed over the default group, counted
    once a rank (a review's run at world 2: 16.43 against 15.14), every step over-clipped."""
    for got, want in dist_pools(2).run(clip_a_layer_built_before_the_process_group):
        assert abs(got - want) <= 1e-5 * want, (got, want)


def gather_to_rank_0_from_the_second_group(rank, world) -> str | None:
    """full_weight_dict(dst=0) of a layer whose group is ranks {2, 3} -> the error each rank of
    that group raised (None on ranks 0 and 1, which take no part)."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    layer = MoELayer(MoEConfig(hidden_size=32, ffn_size=64, num_experts=4, top_k=2, dtype="float32"),
                     process_group=groups[rank // 2], seed=0)
    if rank < 2:
        return None
    try:
        layer.full_weight_dict(dst=0)
    except ValueError as e:
        return str(e)
    return "no error"


def test_full_weight_dict_to_a_rank_outside_the_layer_s_group_is_refused(dist_pools):
    """Every rank of the group gathered and none kept the weights: {} on each, silently."""
    said = dist_pools(4).run(gather_to_rank_0_from_the_second_group)
    assert said[:2] == [None, None] and all("dst=0: not a rank of the layer's process group (global ranks [2, 3])"
                                            in s for s in said[2:]), said
