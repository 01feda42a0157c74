"""torch.distributed.checkpoint (gloo, files under pytest's tmp_path): sharded_state_dict saves
every rank's experts and their optimizer state, and loads them back at the same and at another
world size, the model wrapped or not; a checkpoint of another placement, or optimizer state that
mixes the experts, is refused; a plain state_dict's checkpoint keeps one rank's experts, and the
layer's forward then refuses them."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from seeds import fresh_seed
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from flashmoe_py import (ConsistencyError, ExpertPlacement, MoEConfig, MoELayer, load_sharded_state_dict, prepare_ddp,
                         prepare_fsdp, sharded_state_dict)

CFG = MoEConfig(hidden_size=32, ffn_size=24, num_experts=4, top_k=2, dtype="float32", expert_bias=True)
SHARDED = ("w_in", "w_out", "bias_in", "bias_out")


@dataclasses.dataclass(frozen=True)
class Run:
    """How a run builds and trains its model: wrapped ("ddp", "fsdp", prepared, or None), its
    optimizer ("adam", "adafactor", or None: the model alone is checkpointed), expert biases, and
    the placement ("contiguous" or "round_robin")."""

    wrap: str | None = None
    optim: str | None = "adam"
    bias: bool = True
    placement: str = "contiguous"


def trained(rank, world, seed: int, run: Run):
    """The model (a Linear, then an MoELayer) and its optimizer after one step on this rank's tokens
    (replicated gradients summed over the ranks unwrapped, or the wrapper's average: equal
    everywhere) -> (the module to checkpoint, the bare model, the optimizer)."""
    cfg = dataclasses.replace(CFG, expert_bias=run.bias)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        placement = getattr(ExpertPlacement, run.placement)(cfg.num_experts, world)
        net = nn.Sequential(nn.Linear(32, 32), MoELayer(cfg, seed=seed, placement=placement))
    top = net
    if run.wrap == "fsdp":
        fully_shard(net, mesh=init_device_mesh("cpu", (world,)), ignored_params=prepare_fsdp(net))
    elif run.wrap == "ddp":
        prepare_ddp(net)
        top = DistributedDataParallel(net)
    opt = (torch.optim.Adafactor if run.optim == "adafactor" else torch.optim.Adam)(net.parameters(), lr=1e-2)
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(seed + rank))
    top(x).square().sum().backward()
    for name, p in net.named_parameters():
        if name.rpartition(".")[2] not in SHARDED and world > 1 and run.wrap is None:
            dist.all_reduce(p.grad)
    opt.step()
    return top, net, opt if run.optim else None


def everything(net: nn.Module, opt: torch.optim.Optimizer | None, world: int) -> dict:
    """Every weight and optimizer state tensor (given opt) of the model, the experts' gathered over
    the ranks (slot-major)."""
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


def save_sharded(rank, world, seed: int, path: str, run: Run) -> dict:
    top, net, opt = trained(rank, world, seed, run)
    dcp.save(sharded_state_dict(top, opt), checkpoint_id=path)
    return everything(net, opt, world)


def load_sharded(rank, world, seed: int, path: str, run: Run) -> dict | str:
    """A model of other weights and its optimizer after a step of its own, loaded from path ->
    everything, or what load_sharded_state_dict raised."""
    top, net, opt = trained(rank, world, seed + 1, run)
    state = sharded_state_dict(top, opt)
    dcp.load(state, checkpoint_id=path)
    try:
        load_sharded_state_dict(top, state, opt)
    except RuntimeError as e:
        return str(e)
    return everything(net, opt, world)


def round_trip(dist_pools, path, saved_by: Run, loaded_by: Run, worlds=(2,)) -> tuple[dict, list]:
    seed = fresh_seed()
    saved = dist_pools(2).run(save_sharded, seed, str(path), saved_by)[0]
    return saved, [got for world in worlds for got in dist_pools(world).run(load_sharded, seed, str(path), loaded_by)]


@pytest.mark.parametrize("run", [Run(), Run(wrap="ddp"), Run(wrap="fsdp"), Run(optim=None),
                                 Run(optim="adafactor", bias=False)], ids=str)
def test_a_sharded_checkpoint_keeps_every_rank_s_experts_and_optimizer_state(dist_pools, tmp_path, run):
    worlds = (2, 1) if run.wrap is None else (2,)  # and resharded onto one rank
    saved, loaded = round_trip(dist_pools, tmp_path / "ckpt", run, run, worlds)
    assert saved["1.w_in/"].shape[0] == CFG.num_experts
    for got in loaded:
        differ = [k for k in saved if not torch.equal(got[k], saved[k])]
        assert got.keys() == saved.keys() and not differ, differ


def test_a_checkpoint_of_another_placement_is_refused_at_the_load_on_every_rank(dist_pools, tmp_path):
    """Saved round robin at 2 ranks (rank 0 holds experts 0 and 2), loaded into the contiguous
    placement at 2 ranks and at 1, and round robin at 4 (ranks 0 and 3 get the experts they had,
    ranks 1 and 2 do not): refused on every rank, naming the ranks (dcp.load has written the
    weights by then)."""
    _, said = round_trip(dist_pools, tmp_path / "ckpt", Run(placement="round_robin"), Run(), worlds=(2, 1))
    _, said4 = round_trip(dist_pools, tmp_path / "ckpt4", Run(placement="round_robin"),
                          Run(placement="round_robin"), worlds=(4,))
    assert all(isinstance(s, str) for s in said + said4), said + said4
    assert "rank 0: 1.expert_ids holds experts [0, 2] where the placement puts [0, 1]" in said[0]
    assert "rank 0: 1.expert_ids holds experts [0, 2, 1, 3] where the placement puts [0, 1, 2, 3]" in said[2]
    assert all("rank 1: 1.expert_ids holds experts [2] where the placement puts [1]; rank 2: " in s for s in said4)


def strided_one_expert_round_trip(rank, world, seed: int, path: str) -> bool:
    """Saved and loaded at one expert a rank, into a layer whose w_in (and so Adam's moments of it)
    load_state_dict(assign=True) made a strided view -> whether the load restored every weight and
    moment."""
    cfg = dataclasses.replace(CFG, num_experts=world)
    layers, opts = [], []
    for s in (seed, seed + 1):
        layer = MoELayer(cfg, seed=s)
        if s != seed:
            state = layer.state_dict()
            layer.load_state_dict(state | {"w_in": state["w_in"].transpose(1, 2).contiguous().transpose(1, 2)},
                                  assign=True)
            assert not layer.w_in.is_contiguous()
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        layer(torch.randn(6, 32, generator=torch.Generator().manual_seed(s + rank))).square().sum().backward()
        for name, p in layer.named_parameters():
            if name not in SHARDED:
                dist.all_reduce(p.grad)
        opt.step()
        layers.append(layer)
        opts.append(opt)
    dcp.save(sharded_state_dict(layers[0], opts[0]), checkpoint_id=path)
    state = sharded_state_dict(layers[1], opts[1])
    dcp.load(state, checkpoint_id=path)
    load_sharded_state_dict(layers[1], state, opts[1])
    want, got = everything(layers[0], opts[0], 1), everything(layers[1], opts[1], 1)  # this rank's own
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_strided_expert_weight_loads_at_one_expert_a_rank(dist_pools, tmp_path):
    """DTensor's view of a one-expert [1, ...] weight is restrided, and torch's loader refused to
    copy it into the weight whose memory it is ("refer to a single memory location")."""
    assert all(dist_pools(2).run(strided_one_expert_round_trip, fresh_seed(), str(tmp_path / "ckpt")))


def adafactor_with_biases(rank, world, seed: int) -> str:
    """Adafactor's column factor of a 2-D parameter [L, F] is [1, F], over the experts."""
    top, _, opt = trained(rank, world, seed, Run(optim="adafactor"))
    with pytest.raises(ValueError) as refused:
        sharded_state_dict(top, opt)
    return str(refused.value)


def test_optimizer_state_that_mixes_the_experts_is_refused(dist_pools):
    for said in dist_pools(2).run(adafactor_with_biases, fresh_seed()):
        assert "optimizer's col_var of 1.bias_" in said and "has shape (1, " in said and "mixes the experts" in said


def plain_checkpoint_then_forward(rank, world, seed: int, path: str) -> str:
    top, _, _ = trained(rank, world, seed, Run(optim=None))
    dcp.save(top.state_dict(), checkpoint_id=path)
    fresh, _, _ = trained(rank, world, seed + 1, Run(optim=None))
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=path)  # into the state_dict's tensors: the layer's own
    with pytest.raises(RuntimeError) as refused:
        fresh(torch.randn(3, 32))
    return str(refused.value)


def test_a_plain_state_dict_s_checkpoint_keeps_one_rank_s_experts_and_the_forward_refuses_them(dist_pools,
                                                                                            tmp_path):
    said = dist_pools(2).run(plain_checkpoint_then_forward, fresh_seed(), str(tmp_path / "plain"))
    assert any("whose placement puts" in s and "fm.sharded_state_dict" in s for s in said), said


def drifted_then_saved(rank, world, seed: int) -> str:
    """A step whose replicated gradients were not summed over the ranks (no DDP): each rank's
    router took its own step -> the error of sharded_state_dict on this rank."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(32, 32), MoELayer(CFG, seed=seed))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(10, 32, generator=torch.Generator().manual_seed(seed + rank))).square().sum().backward()
    opt.step()
    with pytest.raises(ConsistencyError) as refused:
        sharded_state_dict(net)
    return str(refused.value)


def test_replicas_that_drifted_apart_are_refused_before_dcp_writes_one_of_them(dist_pools):
    """DCP writes one rank's copy of a replicated tensor: the other ranks' routers were lost,
    silently (a new user's two-rank loop without DDP: 2.1e-3 apart after one step)."""
    for said in dist_pools(2).run(drifted_then_saved, fresh_seed()):
        assert "after training, the replicated weights differ: router_weight differs across ranks" in said
        assert "fm.prepare_ddp" in said


def save_two_expert_groups(rank, world, path: str, change: str) -> str:
    """Ranks {0, 1} and {2, 3} each hold every expert of a layer in their own process group, the
    second group changed as `change` says -> what sharded_state_dict raised, or after a save and a
    load into a layer of other weights, whether it holds this rank's weights again."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cfg = MoEConfig(hidden_size=16, ffn_size=8, num_experts=4, top_k=2, dtype="float32")
    second = rank >= 2
    placement = ExpertPlacement.round_robin(4, 2) if second and change == "placement" else None
    layer = MoELayer(cfg, process_group=groups[rank // 2], seed=1, placement=placement)
    if second and change in ("router", "experts"):
        with torch.no_grad():
            (layer.router_weight if change == "router" else layer.w_in).add_(1.0)
    try:
        dcp.save(sharded_state_dict(layer), checkpoint_id=path)
    except ConsistencyError as e:
        return str(e)
    fresh = MoELayer(cfg, process_group=groups[rank // 2], seed=2, placement=placement)
    state = sharded_state_dict(fresh)
    dcp.load(state, checkpoint_id=path)
    load_sharded_state_dict(fresh, state)
    same = all(torch.equal(getattr(fresh, n), getattr(layer, n)) for n in ("router_weight", "w_in", "w_out"))
    return "loaded back" if same else "loaded other weights"


@pytest.mark.parametrize("change", ["nothing", "router", "experts", "placement"])
def test_expert_groups_smaller_than_the_world_save_only_when_they_hold_the_same_model(dist_pools, tmp_path,
                                                                                      change):
    """Every group saves its experts under the same names and DCP keeps one copy of each: a group
    whose router or experts drifted, or which placed its experts otherwise, was saved mixed with
    the other (a review's run: every rank loaded one group's router and the other's w_in, or other
    experts' rows), silently. Now refused on every rank; groups alike save and load back."""
    said = dist_pools(4).run(save_two_expert_groups, str(tmp_path / "ckpt"), change)
    if change == "nothing":
        assert said == ["loaded back"] * 4, said
    else:
        want = {"router": "replicated", "experts": "expert weights", "placement": "experts"}[change]
        assert all(f"expert groups differ ({want} of rank" in s for s in said), said


def world_1_layer_under_fully_shard(rank, world, path: str) -> bool:
    """Each rank its own process group of one (pure data parallelism: every expert on every rank,
    replicated like the rest), the model under fully_shard, Adam: a step, saved, loaded into a
    model of other weights after a step of its own -> whether every weight and moment came back."""
    def built(seed: int):
        solo = [dist.new_group([r]) for r in range(world)][rank]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = nn.Sequential(nn.Linear(32, 32), MoELayer(CFG, seed=seed, process_group=solo))
        assert net[1].world_size == 1
        fully_shard(net, mesh=init_device_mesh("cpu", (world,)))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        net(torch.randn(10, 32, generator=torch.Generator().manual_seed(seed + rank))).square().sum().backward()
        opt.step()
        return net, opt

    net, opt = built(1)
    saved = everything(net, opt, 1)
    dcp.save(sharded_state_dict(net, opt), checkpoint_id=path)
    fresh, fresh_opt = built(2)
    state = sharded_state_dict(fresh, fresh_opt)
    dcp.load(state, checkpoint_id=path)
    load_sharded_state_dict(fresh, state, fresh_opt)
    got = everything(fresh, fresh_opt, 1)
    return got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)


def test_a_layer_of_world_1_under_fully_shard_loads_back(dist_pools, tmp_path):
    """Its experts are FSDP's DTensors: the load turned them into this rank's shards, which
    set_state_dict then refused (size mismatch for 1.w_in: [2, 32, 48] against [4, 32, 48])."""
    assert dist_pools(2).run(world_1_layer_under_fully_shard, str(tmp_path / "ckpt")) == [True, True]


class Twice(nn.Module):
    """One MoELayer in two places (weights shared across depth): state_dict names its tensors under
    both."""

    def __init__(self, seed: int):
        super().__init__()
        self.a = MoELayer(CFG, seed=seed)
        self.b = self.a

    def forward(self, x):
        return self.b(self.a(x))


def shared_layer_saved_and_loaded(rank, world, path: str) -> bool:
    """-> whether a checkpoint of Twice loads this rank's experts back into a Twice of other weights."""
    layer = Twice(1)
    state = sharded_state_dict(layer)
    assert all(isinstance(state[f"{p}.{n}"], DTensor) for p in "ab" for n in (*SHARDED, "expert_ids"))
    dcp.save(state, checkpoint_id=path)
    fresh = Twice(2)
    state = sharded_state_dict(fresh)
    dcp.load(state, checkpoint_id=path)
    load_sharded_state_dict(fresh, state)
    return all(torch.equal(getattr(fresh.a, n), getattr(layer.a, n)) for n in (*SHARDED, "router_weight"))


def test_a_layer_used_in_two_places_keeps_every_rank_s_experts(dist_pools, tmp_path):
    """Its second name was saved as a plain tensor (one rank's copy), which the load wrote over the
    first's rows, then refused as a checkpoint of another placement (a review's run)."""
    assert dist_pools(2).run(shared_layer_saved_and_loaded, str(tmp_path / "ckpt")) == [True, True]


def test_adafactor_state_of_a_layer_of_world_1_saves_as_torch_s_own(tmp_path):
    """One process, no process group: nothing is sharded, so Adafactor's factors over the experts
    ([1, 2F] for bias_in [E, 2F]) are refused nowhere (they were, as state that mixes experts)."""
    layer = MoELayer(CFG, seed=0)
    opt = torch.optim.Adafactor(layer.parameters(), lr=1e-2)
    layer(torch.randn(8, 32)).square().sum().backward()
    opt.step()
    state = sharded_state_dict(layer, opt)
    assert state["optim"]["state"]["bias_in"]["col_var"].shape == (1, CFG.ffn_in_size)
    dcp.save(state, checkpoint_id=tmp_path / "ckpt")
    fresh = MoELayer(CFG, seed=1)
    fresh_opt = torch.optim.Adafactor(fresh.parameters(), lr=1e-2)
    fresh(torch.randn(8, 32)).square().sum().backward()
    fresh_opt.step()
    loaded = sharded_state_dict(fresh, fresh_opt)
    dcp.load(loaded, checkpoint_id=tmp_path / "ckpt")
    load_sharded_state_dict(fresh, loaded, fresh_opt)
    assert torch.equal(fresh.w_in, layer.w_in) and torch.equal(fresh_opt.state[fresh.bias_in]["col_var"],
                                                               opt.state[layer.bias_in]["col_var"])
