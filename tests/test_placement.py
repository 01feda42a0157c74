"""Expert placement policies: exact cover, serialisation, and load balancing."""

import random
import types

import numpy as np
import pytest
import torch

from flashmoe_py import ExpertPlacement, PlacementError


def assert_exact_cover(p: ExpertPlacement):
    held = [p.experts_on(r) for r in range(p.world_size)]
    assert all(len(h) == p.local_experts for h in held)
    assert sorted(e for h in held for e in h) == list(range(p.num_experts))


@pytest.mark.parametrize("E,W", [(8, 1), (8, 2), (8, 8), (128, 4), (256, 8)])
@pytest.mark.parametrize("policy", ["contiguous", "round_robin", "load_balanced"])
def test_every_expert_placed_exactly_once(E, W, policy):
    load = [random.random() for _ in range(E)]
    p = ExpertPlacement.build(policy, E, W, expert_load=load)
    assert_exact_cover(p)
    assert ExpertPlacement.from_json(p.to_json()) == p


@pytest.mark.parametrize("ask", [lambda p: p.experts_on(4), lambda p: p.experts_on(-1), lambda p: p.experts_on(1.0),
                                 lambda p: p.rank_loads([1.0] * 9)])
def test_a_rank_or_a_load_list_that_is_not_this_placement_s_is_refused(ask):
    """experts_on(4) of 4 ranks was [] and rank_loads ignored loads past the experts, silently."""
    with pytest.raises(ValueError, match="expected"):
        ask(ExpertPlacement.contiguous(8, 4))


def test_contiguous_and_round_robin_layouts():
    assert ExpertPlacement.contiguous(8, 4).experts_on(1) == [2, 3]
    assert ExpertPlacement.round_robin(8, 4).experts_on(1) == [1, 5]
    assert ExpertPlacement.contiguous(8, 4).positions().tolist() == list(range(8))


def zipf_load(E, s, seed):
    rng = random.Random(seed)
    load = [1000.0 / (i + 1) ** s for i in range(E)]
    rng.shuffle(load)
    return load


@pytest.mark.parametrize("E,W", [(8, 2), (64, 4), (128, 8), (256, 8)])
@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_load_balanced_no_worse_than_contiguous_on_skew(E, W, s):
    for seed in range(5):
        load = zipf_load(E, s, seed)
        lb = max(ExpertPlacement.load_balanced(load, W).rank_loads(load))
        assert lb <= max(ExpertPlacement.contiguous(E, W).rank_loads(load)) + 1e-9
        assert lb <= max(ExpertPlacement.round_robin(E, W).rank_loads(load)) + 1e-9
        assert lb >= max(max(load), sum(load) / W) - 1e-9  # cannot beat the lower bound


def test_load_balanced_beats_contiguous_when_hot_experts_are_adjacent():
    load = [100, 90, 80, 70] + [1] * 12
    lb = ExpertPlacement.load_balanced(load, 4)
    assert max(lb.rank_loads(load)) < max(ExpertPlacement.contiguous(16, 4).rank_loads(load))
    assert max(lb.rank_loads(load)) == 103  # one hot expert per rank


@pytest.mark.parametrize("bad", [
    dict(num_experts=8, world_size=3, rank_of=(0,) * 8, slot_of=tuple(range(8))),
    dict(num_experts=4, world_size=2, rank_of=(0, 0, 1, 1), slot_of=(0, 0, 0, 1)),
    dict(num_experts=4, world_size=2, rank_of=(0, 0, 1, 2), slot_of=(0, 1, 0, 1)),
    dict(num_experts=4, world_size=2, rank_of=(0, 0, 1), slot_of=(0, 1, 0)),
])
def test_invalid_placements_are_refused(bad):
    with pytest.raises(PlacementError):
        ExpertPlacement(**bad)


def test_load_balanced_needs_a_histogram():
    with pytest.raises(PlacementError, match="expert_load"):
        ExpertPlacement.build("load_balanced", 8, 2)
    with pytest.raises(PlacementError, match="unknown placement policy"):
        ExpertPlacement.build("random", 8, 2)


@pytest.mark.parametrize("field,bad,match", [
    ("rank_of", (0,) * 7 + (0.25,), "rank_of\\[7\\]=0.25 must be an int"),
    ("slot_of", tuple(range(7)) + (7.0,), "slot_of\\[7\\]=7.0 must be an int"),
    ("rank_of", (0,) * 7 + (False,), "rank_of\\[7\\]=False must be an int"),
    ("world_size", 1.0, "world_size=1.0 must be an int"),
    ("num_experts", 8.0, "num_experts=8.0 must be an int"),
])
def test_ranks_and_slots_must_be_ints(field, bad, match):
    """A float rank 0.25 passes 0 <= r < world_size and would misroute an expert silently."""
    good = dict(num_experts=8, world_size=1, rank_of=(0,) * 8, slot_of=tuple(range(8)))
    with pytest.raises(PlacementError, match=match):
        ExpertPlacement(**{**good, field: bad})


def test_builders_take_ints_only():
    with pytest.raises(PlacementError, match="experts_by_rank\\[0\\]\\[1\\]=1.0 must be an int"):
        ExpertPlacement.from_rank_lists([[0, 1.0]])
    with pytest.raises(PlacementError, match="world_size=2.0 must be an int"):
        ExpertPlacement.contiguous(8, 2.0)


def test_numpy_integers_are_taken_as_ints():
    p = ExpertPlacement(np.int64(4), np.int64(2), np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))
    assert p == ExpertPlacement.contiguous(4, 2)
    assert type(p.rank_of[0]) is int and ExpertPlacement.from_json(p.to_json()) == p


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0])
def test_load_balanced_needs_finite_non_negative_loads(bad):
    with pytest.raises(PlacementError, match=f"finite and non-negative; expert_load\\[7\\]={bad}"):
        ExpertPlacement.load_balanced([1] * 7 + [bad], 2)


@pytest.mark.parametrize("load, match", [
    ("1234", "expert_load must be an iterable of per-expert loads, got str"),  # was read as loads 1, 2, 3, 4
    (["a", "b"], r"expert_load\[0\]='a' must be a real number"),
    (torch.ones(2, 2), r"expert_load must be 1-D \(\[num_experts\]\), got shape \(2, 2\)"),
    (5, "got int"), (None, "got NoneType"), (torch.tensor(3.0), r"must be 1-D .*got shape \(\)"),
    ([1 + 1j, 1], r"expert_load\[0\]=\(1\+1j\) must be a real number")])
def test_load_balanced_names_expert_load_when_it_is_no_list_of_real_loads(load, match):
    with pytest.raises(PlacementError, match=match):
        ExpertPlacement.load_balanced(load, 2)


def test_load_balanced_takes_any_iterable_of_real_loads():
    """Tensors, arrays, a list of 0-d tensors (a tensor's entries), generators and dict views."""
    load = [5.0, 1.0, 1.0, 5.0]
    want = ExpertPlacement.load_balanced(load, 2)
    counts = torch.tensor(load)
    for given in (counts, np.array(load), list(counts), (v for v in load), dict(enumerate(load)).values(),
                  range(4)):
        expected = want if not isinstance(given, range) else ExpertPlacement.load_balanced([0, 1, 2, 3], 2)
        assert ExpertPlacement.load_balanced(given, 2) == expected
    assert ExpertPlacement.build("load_balanced", 4, 2, np.array(load)) == want
    assert ExpertPlacement.build("load_balanced", 4, 2, (v for v in load)) == want
    assert ExpertPlacement.from_rank_lists(np.array_split(np.arange(4), 2)) == ExpertPlacement.contiguous(4, 2)
    assert ExpertPlacement.from_rank_lists([range(0, 2), range(2, 4)]) == ExpertPlacement.contiguous(4, 2)
    d = ExpertPlacement.round_robin(4, 2).to_dict()
    assert ExpertPlacement.from_dict(types.MappingProxyType(d)) == ExpertPlacement.round_robin(4, 2)


@pytest.mark.parametrize("call, match", [
    (lambda: ExpertPlacement.from_rank_lists([0, 1]), "experts_by_rank must be a list of lists"),
    (lambda: ExpertPlacement.from_dict({"num_experts": 4}), r"\['world_size', 'rank_of', 'slot_of'\] missing"),
    (lambda: ExpertPlacement.build("load_balanced", 4, 2, np.float64(3)), "expert_load must be 1-D")])
def test_malformed_placement_arguments_are_refused_naming_them(call, match):
    with pytest.raises(PlacementError, match=match):
        call()
