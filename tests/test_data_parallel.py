"""MoELayers inside DistributedDataParallel (gloo): DDP keeps each rank's own experts, and with
prepare_ddp every gradient is that of the mean of the ranks' losses, the experts' included."""

import pytest
import torch
import torch.distributed as dist
from grad_reference import rel_err
from seeds import fresh_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flashmoe_py import MoEConfig, MoELayer, prepare_ddp
from flashmoe_py.data_parallel import clip_grad_norm_ as fm_clip
from flashmoe_py.data_parallel import sharded_names

CFG = MoEConfig(hidden_size=32, ffn_size=24, num_experts=8, top_k=2, dtype="float32", expert_bias=True,
                shared_experts=1, shared_ffn_size=16)


def model(seed: int, backward: str) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the Linear's weights, the same on every rank
        return nn.Sequential(nn.Linear(32, 32), MoELayer(CFG, seed=seed, backward=backward))


def ddp_against_plain(rank, world, seed: int, prepared: bool, backward: str):
    """A step of DDP(model) (prepare_ddp first, or not) and of the same model without DDP, on this
    rank's own x and dy. -> (whether DDP left this rank's experts as they were; the error of each
    DDP gradient against the plain model's made the mean loss's: replicated gradients summed over
    the ranks, then every gradient divided by the world size)."""
    plain, wrapped = model(seed, backward), model(seed, backward)
    own = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    if prepared:
        assert sorted(prepare_ddp(wrapped)) == ["1.b_in", "1.b_out", "1.expert_ids", "1.w_in", "1.w_out"]
    ddp = DistributedDataParallel(wrapped)
    kept = all(torch.equal(p, own[n]) for n, p in wrapped.named_parameters())
    g = torch.Generator().manual_seed(seed * 7 + rank)
    x, dy = torch.randn(9 + 4 * rank, 32, generator=g), torch.randn(9 + 4 * rank, 32, generator=g)
    (plain(x) * dy).sum().backward()
    (ddp(x) * dy).sum().backward()
    sharded = set(sharded_names(plain))
    errs = {}
    for (n, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        want = p.grad.clone()
        if n not in sharded:
            dist.all_reduce(want)
        errs[n] = rel_err(q.grad, want / world)
    return kept, errs


@pytest.mark.parametrize("backward", ["autograd", "saved"])
def test_ddp_keeps_each_rank_s_experts_and_takes_the_mean_loss_s_gradients(dist_pools, backward):
    for kept, errs in dist_pools(2).run(ddp_against_plain, fresh_seed(), True, backward):
        assert kept and max(errs.values()) <= 1e-5, errs


def test_unprepared_ddp_would_put_rank_0_s_experts_everywhere(dist_pools):
    """Why prepare_ddp (or patch_model) must run first: DDP copies rank 0's parameters."""
    kept = [k for k, _ in dist_pools(2).run(ddp_against_plain, fresh_seed(), False, "autograd")]
    assert kept == [True, False]


def prepared_with_frozen_experts_or_a_smaller_group(rank, world):
    """-> (prepare_ddp on a layer whose experts are frozen: the names it excluded; what it raised
    for a layer on a group of one rank, whose experts DDP over both ranks would let drift apart)."""
    frozen = model(5, "autograd")
    for name in ("w_in", "w_out", "b_in", "b_out"):
        getattr(frozen[1], name).requires_grad_(False)
    names = prepare_ddp(frozen)
    groups = [dist.new_group([r]) for r in range(world)]
    alone = nn.Sequential(MoELayer(CFG, process_group=groups[rank]))
    try:
        prepare_ddp(alone)
        raised = ""
    except ValueError as e:
        raised = str(e)
    return names, raised


def test_frozen_experts_are_excluded_without_a_hook_and_a_smaller_expert_group_is_refused(dist_pools):
    for names, raised in dist_pools(2).run(prepared_with_frozen_experts_or_a_smaller_group):
        assert sorted(names) == ["1.b_in", "1.b_out", "1.expert_ids", "1.w_in", "1.w_out"]
        assert "experts span 1 ranks, DDP's default group 2" in raised


def clipped_under_ddp(rank, world, seed: int):
    """A DDP step of model(seed) (prepared), its gradients clipped by flashmoe_py's clip_grad_norm_
    to a third of their norm -> (the norm it returned, the norm over every rank's experts and the
    replicated gradients once, the clip's factor on this rank, whether the replicated gradients
    are equal on every rank afterwards)."""
    net = model(seed, "saved")
    prepare_ddp(net)
    ddp = DistributedDataParallel(net)
    g = torch.Generator().manual_seed(seed * 7 + rank)
    x, dy = torch.randn(11, 32, generator=g), torch.randn(11, 32, generator=g)
    (ddp(x) * dy).sum().backward()
    sharded = set(sharded_names(net))
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    own = sum(float(v.square().sum()) for n, v in before.items() if n in sharded)
    every = [None] * world
    dist.all_gather_object(every, own)
    want = (sum(every) + sum(float(v.square().sum()) for n, v in before.items() if n not in sharded)) ** 0.5
    total = float(fm_clip(net, want / 3))
    factor = float(net[0].weight.grad.norm() / before["0.weight"].norm())
    replicated = [p.grad for n, p in net.named_parameters() if n not in sharded]
    mine = torch.cat([r.reshape(-1) for r in replicated])
    others = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(others, mine)
    return total, want, factor, all(torch.equal(o, mine) for o in others)


def test_clipping_counts_every_rank_s_experts_so_the_ranks_scale_alike(dist_pools):
    for total, want, factor, equal in dist_pools(2).run(clipped_under_ddp, fresh_seed()):
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
