"""The routing plan kernels (kernels/plan.py) against the plan's definition, in the Triton
interpreter on CPU-only machines (on a GPU where there is one)."""

import os

import pytest
import torch

from flashmoe_py.backends.flash import routing_plan
from flashmoe_py.kernels import plan as plan_module
from flashmoe_py.kernels.layout import Geometry
from flashmoe_py.kernels.plan import build_plan, plan_stats
from flashmoe_py.routing import Routing
from flashmoe_py import MoEConfig
from seeds import fresh_seed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or TRITON_INTERPRET=1")


def random_routing(T, K, E, W, drop: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.int64)
    kept = torch.rand(T, K, generator=gen) >= drop if drop else None
    positions = torch.randperm(E, generator=gen)  # any placement: expert -> (rank, slot) pair
    rank = int(torch.randint(W, (1,), generator=gen))
    L = E // W
    send_order = ((rank + torch.arange(W)) % W * L + torch.arange(L)[:, None]).reshape(E)
    return experts, kept, positions, send_order


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("T,K,E,W,drop", [(300, 2, 8, 2, 0.0), (257, 4, 12, 3, 0.0), (100, 8, 64, 4, 0.0),
                                          (200, 3, 8, 1, 0.3), (0, 2, 8, 2, 0.0), (1500, 2, 4, 2, 0.0)])
def test_plan_places_every_kept_slot_once_in_its_pairs_rows(T, K, E, W, drop, deterministic):
    CHUNK, MAXC = 16, -(-max(T, 1) // 16)
    experts, kept, positions, send_order = random_routing(T, K, E, W, drop, seed=fresh_seed())
    L = E // W
    comb_expect = torch.full((E, MAXC), 5, dtype=torch.int64, device=DEVICE)  # cumulative: the plan adds
    weights = torch.rand(T, K, device=DEVICE)
    experts, kept, positions, send_order = (t.to(DEVICE) if t is not None else None
                                            for t in (experts, kept, positions, send_order))
    plan, stats = build_plan(experts, kept, weights, positions, send_order, comb_expect, local_experts=L,
                             chunk=CHUNK, maxc=MAXC, deterministic=deterministic)
    plan = {**{k: v.cpu() for k, v in plan._asdict().items()}, **{k: v.cpu() for k, v in plan_stats(stats).items()}}
    experts, positions = experts.cpu(), positions.cpu()
    kept = kept.cpu() if kept is not None else None
    live = kept if kept is not None else torch.ones(T, K, dtype=torch.bool)
    pos = positions[experts]
    counts = torch.bincount(pos[live], minlength=E)
    assert plan["send_counts"].tolist() == counts.tolist()
    assert plan["pos_start"].tolist() == (torch.cumsum(counts, 0) - counts).tolist()
    padded = (counts + CHUNK - 1) // CHUNK * CHUNK
    assert plan["region_off"].tolist() == [int(padded[p // L * L:p].sum()) for p in range(E)]
    assert (plan["slot_dest"][~live] == -1).all() and (plan["slot_row"][~live] == -1).all()
    assert (plan["slot_chunk"][~live] == -1).all()
    assert int(plan["dropped_slots"]) == int((~live).sum())
    assert plan["expert_counts"].tolist() == torch.bincount(experts.reshape(-1), minlength=E).tolist()
    for p in range(E):
        mine = live & (pos == p)
        rows = plan["slot_row"][mine] - plan["region_off"][p]  # each slot's place within its pair
        assert sorted(rows.tolist()) == list(range(int(counts[p])))
        assert (plan["slot_dest"][mine] == p // L).all()
        assert (plan["slot_chunk"][mine] == p * MAXC + rows // CHUNK).all()
        slots = torch.nonzero(mine.reshape(-1))[:, 0]  # slot = token * K + choice
        assert (plan["send_slot"][plan["pos_start"][p] + rows] == slots).all()
    assert torch.equal(plan["slot_w"], weights.cpu())
    rows_back = (counts[:, None] - torch.arange(MAXC) * CHUNK).clamp(0, CHUNK)
    assert torch.equal(comb_expect.cpu(), 5 + rows_back)
    assert (plan["chunk_c"][plan["chunk_pos"] == -1] == 0).all()  # send chunks past the last


@pytest.mark.parametrize("name", ["comb_expect", "positions", "send_order"])
def test_plan_refuses_what_its_kernels_would_misread(name):
    """The kernels index these as flat int64 arrays: a strided view of the right size had
    comb_expect's counts added in the wrong places."""
    experts, kept, positions, send_order = random_routing(40, 2, 4, 2, 0.0, seed=1)
    args = {"positions": positions, "send_order": send_order,
            "comb_expect": torch.zeros(5, 4, dtype=torch.int64).t()}  # [E, MAXC] as a strided view
    if name != "comb_expect":
        args["comb_expect"] = args["comb_expect"].contiguous()
        args[name] = args[name].int()
    with pytest.raises(ValueError, match=name):
        build_plan(experts, kept, torch.rand(40, 2), args["positions"], args["send_order"], args["comb_expect"],
                   local_experts=2, chunk=16, maxc=5)


class ScrambledRanks:
    """slot_ranks_kernel, then each pair's places reversed: an order the atomic counter may hand
    out (the interpreter runs a program's slots in order, so it never shows another; on a GPU the
    counter's own order is already not slot order). `rank`: the places handed out, [NS] int32."""

    def __init__(self, kernel):
        self.kernel, self.rank = kernel, None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            counts, pos, rank = args[3], args[5], args[6]
            rank.copy_(counts[pos.long()] - 1 - rank)
            self.rank = rank.cpu()
        return launch


@pytest.fixture
def scrambled(monkeypatch):
    kernel = ScrambledRanks(plan_module.slot_ranks_kernel)
    monkeypatch.setattr(plan_module, "slot_ranks_kernel", kernel)
    return kernel


@pytest.mark.parametrize("deterministic", [False, True])
def test_under_torch_deterministic_algorithms_each_experts_rows_come_in_slot_order(scrambled, monkeypatch,
                                                                                   deterministic):
    """backward="saved" sums an expert's rows in the plan's order: under
    torch.use_deterministic_algorithms the fused backend's plan numbers them in slot order (token,
    then choice), whatever order the atomic counter took them in, so those sums are the same bits
    every run. Otherwise the counter's order stands (here reversed; on a GPU reversed from its own)."""
    T, cfg = 300, MoEConfig(hidden_size=64, ffn_size=64, num_experts=8, top_k=2)
    geo = Geometry.for_config(cfg, 2, T)
    gen = torch.Generator().manual_seed(fresh_seed())
    experts = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(T)]).to(DEVICE)
    r = Routing(torch.rand(T, 2, device=DEVICE), experts, None, None)
    positions = torch.arange(8, device=DEVICE)
    comb_expect = torch.zeros(2, 4, geo.max_chunks, dtype=torch.int64, device=DEVICE)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    plan, _ = routing_plan(r, positions, geo, geo.send_order(0, DEVICE), comb_expect)
    send_slot, starts, counts = plan.send_slot.cpu(), plan.pos_start.cpu(), plan.send_counts.cpu()
    in_slot_order = []
    for p in range(8):
        slots = send_slot[starts[p]:starts[p] + counts[p]].tolist()
        in_slot_order.append(slots == sorted(slots))
        if not deterministic:
            assert slots == sorted(slots, key=lambda s: int(scrambled.rank[s]))  # the counter's places
        rows = plan.slot_row.cpu().reshape(-1)[torch.tensor(slots, dtype=torch.long)] - plan.region_off[p].cpu()
        assert rows.tolist() == list(range(len(slots)))
    assert all(in_slot_order) if deterministic else not any(in_slot_order)
