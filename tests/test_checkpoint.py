"""torch.distributed.checkpoint (gloo, files under pytest's tmp_path): sharded_state_dict saves
every rank's experts and their optimizer moments, and loads them back at the same and at another
world size; a plain state_dict's checkpoint keeps one rank's experts, and the layer's forward
then refuses them."""

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from seeds import fresh_seed
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from flashmoe_py import MoEConfig, MoELayer, load_sharded_state_dict, prepare_fsdp, sharded_state_dict

CFG = MoEConfig(hidden_size=32, ffn_size=24, num_experts=4, top_k=2, dtype="float32", expert_bias=True)
SHARDED = ("w_in", "w_out", "b_in", "b_out")


def model(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(32, 32), MoELayer(CFG, seed=seed))


def trained(rank, world, seed: int, fsdp: bool = False):
    """model(seed) (under fully_shard, prepared, or not) and an Adam after one step on this rank's
    tokens (replicated gradients summed over the ranks, or FSDP's average: equal everywhere)."""
    net = model(seed)
    if fsdp:
        fully_shard(net, mesh=init_device_mesh("cpu", (world,)), ignored_params=prepare_fsdp(net))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(seed + rank))
    net(x).square().sum().backward()
    for name, p in net.named_parameters():
        if name.rpartition(".")[2] not in SHARDED and world > 1 and not fsdp:
            dist.all_reduce(p.grad)
    opt.step()
    return net, opt


def everything(net: nn.Module, opt: torch.optim.Optimizer | None, world: int) -> dict:
    """Every weight and Adam moment (given opt) of the model, the experts' gathered over the ranks
    (slot-major: expert order for the contiguous placement)."""
    out = {}
    for name, p in net.named_parameters():
        for key, t in (("", p.detach()), *(opt.state[p].items() if opt else ())):
            t = t.full_tensor() if isinstance(t, DTensor) else t  # FSDP's
            if name.rpartition(".")[2] in SHARDED and world > 1 and t.dim() > 0:
                parts = [torch.empty_like(t) for _ in range(world)]
                dist.all_gather(parts, t.contiguous())
                t = torch.cat(parts)
            out[f"{name}/{key}"] = t.clone()
    return out


def save_sharded(rank, world, seed: int, path: str, fsdp: bool = False, optim: bool = True) -> dict:
    net, opt = trained(rank, world, seed, fsdp)
    opt = opt if optim else None
    dcp.save(sharded_state_dict(net, opt), checkpoint_id=path)
    return everything(net, opt, world)


def load_sharded(rank, world, seed: int, path: str, fsdp: bool = False, optim: bool = True) -> dict:
    """A model of other weights and an optimizer after a step of its own, loaded from path (the
    model alone where not optim)."""
    net, opt = trained(rank, world, seed + 1, fsdp)
    opt = opt if optim else None
    state = sharded_state_dict(net, opt)
    dcp.load(state, checkpoint_id=path)
    load_sharded_state_dict(net, state, opt)
    return everything(net, opt, world)


def test_a_sharded_checkpoint_keeps_every_rank_s_experts_and_moments_at_any_world_size(dist_pools, tmp_path):
    seed = fresh_seed()
    saved = dist_pools(2).run(save_sharded, seed, str(tmp_path / "ckpt"))[0]
    assert saved["1.w_in/"].shape[0] == CFG.num_experts
    for world in (2, 1):
        for got in dist_pools(world).run(load_sharded, seed, str(tmp_path / "ckpt")):
            assert got.keys() == saved.keys()
            differ = [k for k in saved if not torch.equal(got[k], saved[k])]
            assert not differ, (world, differ)


@pytest.mark.parametrize("fsdp, optim", [(True, True), (False, False)])
def test_so_does_one_of_a_model_under_fully_shard_or_of_a_model_alone(dist_pools, tmp_path, fsdp, optim):
    seed = fresh_seed()
    saved = dist_pools(2).run(save_sharded, seed, str(tmp_path / "ckpt"), fsdp, optim)[0]
    for got in dist_pools(2).run(load_sharded, seed, str(tmp_path / "ckpt"), fsdp, optim):
        differ = [k for k in saved if not torch.equal(got[k], saved[k])]
        assert got.keys() == saved.keys() and not differ, differ


def plain_checkpoint_then_forward(rank, world, seed: int, path: str) -> str:
    net, _ = trained(rank, world, seed)
    dcp.save(net.state_dict(), checkpoint_id=path)
    fresh = model(seed + 1)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=path)  # into the state_dict's tensors: the layer's own
    with pytest.raises(RuntimeError) as refused:
        fresh(torch.randn(3, 32))
    return str(refused.value)


def test_a_plain_state_dict_s_checkpoint_keeps_one_rank_s_experts_and_the_forward_refuses_them(dist_pools,
                                                                                            tmp_path):
    said = dist_pools(2).run(plain_checkpoint_then_forward, fresh_seed(), str(tmp_path / "plain"))
    assert any("whose placement puts" in s and "fm.sharded_state_dict" in s for s in said), said
