"""Expert placement: which rank holds each global expert, and in which local slot.

Every rank holds exactly `local_experts = num_experts // world_size` experts, so weight shards and
symmetric-heap buffers have the same shape everywhere. A placement is a pure value: build it the same
way on every rank (or serialise it with `to_dict`) and the layer checks that all ranks agree.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .config import is_int

POLICIES = ("contiguous", "round_robin", "load_balanced")

# why a layer's expert_ids buffer no longer names the experts its placement puts on its rank
EXPERTS_OVERWRITTEN = (
    "the layer's experts were overwritten, e.g. by a torch.distributed.checkpoint of state_dict() (it keeps one "
    "rank's copy of a plain tensor: use fm.sharded_state_dict), by a wrapper that broadcasts buffers "
    "(FullyShardedDataParallel's sync_module_states), or by a dist.broadcast of the model's tensors (broadcast "
    "only the replicated ones: router and shared experts). Rebuild the model's experts")


class PlacementError(ValueError):
    """An invalid placement or placement request."""


@dataclass(frozen=True)
class ExpertPlacement:
    """rank_of[e], slot_of[e]: the rank holding global expert e and its local slot there."""

    num_experts: int
    world_size: int
    rank_of: tuple[int, ...]
    slot_of: tuple[int, ...]

    def __post_init__(self) -> None:
        # Python ints only (numpy integers are taken and stored as ints): a float rank or slot
        # (0.25) would pass the range checks below and misroute an expert silently.
        for field in ("num_experts", "world_size"):
            object.__setattr__(self, field, _int(getattr(self, field), field))
        for field in ("rank_of", "slot_of"):
            value = getattr(self, field)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise PlacementError(f"{field}={value!r} must be a sequence of ints, one per expert")
            object.__setattr__(self, field, tuple(_int(v, f"{field}[{e}]") for e, v in enumerate(value)))
        E, W = self.num_experts, self.world_size
        if W < 1 or E < 1 or E % W:
            raise PlacementError(
                f"num_experts={E} must be a positive multiple of world_size={W}")
        if len(self.rank_of) != E or len(self.slot_of) != E:
            raise PlacementError(f"rank_of and slot_of must have num_experts={E} entries")
        L = E // W
        seen = set()
        for e, (r, s) in enumerate(zip(self.rank_of, self.slot_of)):
            if not (0 <= r < W and 0 <= s < L):
                raise PlacementError(f"expert {e} placed at (rank {r}, slot {s}), outside "
                                     f"{W} ranks x {L} slots")
            if (r, s) in seen:
                raise PlacementError(f"two experts placed at (rank {r}, slot {s})")
            seen.add((r, s))

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.world_size

    def experts_on(self, rank: int) -> list[int]:
        """Global expert ids held by `rank`, in local-slot order."""
        if not (is_int(rank) and 0 <= rank < self.world_size):
            raise ValueError(f"rank={rank!r}: expected a rank of this placement, 0..{self.world_size - 1}")
        held = sorted((s, e) for e, (r, s) in enumerate(zip(self.rank_of, self.slot_of))
                      if r == rank)
        return [e for _, e in held]

    @property
    def position_list(self) -> list[int]:
        """rank_of[e] * local_experts + slot_of[e] for each expert e: its place in the (rank, slot)
        order that dispatch sorts by."""
        return [r * self.local_experts + s for r, s in zip(self.rank_of, self.slot_of)]

    def positions(self, device=None) -> torch.Tensor:
        """position_list as a [num_experts] int64 tensor."""
        return torch.tensor(self.position_list, dtype=torch.int64, device=device)

    def rank_loads(self, expert_load) -> list[float]:
        """Sum of `expert_load` ([num_experts]) over the experts each rank holds."""
        load = [float(v) for v in expert_load]
        if len(load) != self.num_experts:
            raise ValueError(f"expert_load has {len(load)} values; expected one per expert ({self.num_experts})")
        totals = [0.0] * self.world_size
        for e, r in enumerate(self.rank_of):
            totals[r] += load[e]
        return totals

    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "world_size": self.world_size,
                "rank_of": list(self.rank_of), "slot_of": list(self.slot_of)}

    @classmethod
    def from_dict(cls, d: dict) -> ExpertPlacement:
        keys = ("num_experts", "world_size", "rank_of", "slot_of")
        missing = [k for k in keys if not isinstance(d, Mapping) or k not in d]
        if missing:
            raise PlacementError(f"ExpertPlacement.from_dict: {missing} missing (to_dict() gives num_experts, "
                                 "world_size, rank_of, slot_of)")
        return cls(d["num_experts"], d["world_size"], tuple(d["rank_of"]), tuple(d["slot_of"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> ExpertPlacement:
        return cls.from_dict(json.loads(s))

    @classmethod
    def from_rank_lists(cls, experts_by_rank: list[list[int]]) -> ExpertPlacement:
        """Build from, for each rank, the global experts it holds in slot order."""
        if isinstance(experts_by_rank, (str, bytes)) or not all(
                hasattr(x, "__len__") and not isinstance(x, (str, bytes)) for x in experts_by_rank):
            raise PlacementError(f"experts_by_rank must be a list of lists (each rank's experts in slot order), got "
                                 f"{experts_by_rank!r}")
        E = sum(len(x) for x in experts_by_rank)
        rank_of, slot_of = [-1] * E, [-1] * E
        for r, experts in enumerate(experts_by_rank):
            for s, e in enumerate(experts):
                e = _int(e, f"experts_by_rank[{r}][{s}]")
                if not 0 <= e < E or rank_of[e] != -1:
                    raise PlacementError(f"expert {e} is out of range or placed twice")
                rank_of[e], slot_of[e] = r, s
        return cls(E, len(experts_by_rank), tuple(rank_of), tuple(slot_of))

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> ExpertPlacement:
        """Rank r holds experts [r*L, (r+1)*L)."""
        L = _local(num_experts, world_size)
        return cls.from_rank_lists([list(range(r * L, (r + 1) * L)) for r in range(world_size)])

    @classmethod
    def round_robin(cls, num_experts: int, world_size: int) -> ExpertPlacement:
        """Expert e goes to rank e % world_size."""
        _local(num_experts, world_size)
        return cls.from_rank_lists([list(range(r, num_experts, world_size))
                                    for r in range(world_size)])

    @classmethod
    def load_balanced(cls, expert_load, world_size: int) -> ExpertPlacement:
        """Minimise the most-loaded rank's total for an observed per-expert load histogram.

        Greedy longest-processing-time (heaviest expert to the lightest rank with a free slot),
        refined by pairwise swaps that lower the maximum; the result is never worse than the
        contiguous or round-robin placement, because those are candidates too.
        """
        load = _loads(expert_load)
        for e, v in enumerate(load):
            if not (math.isfinite(v) and v >= 0):
                raise PlacementError(f"expert_load must be finite and non-negative; expert_load[{e}]={v}")
        E = len(load)
        L = _local(E, world_size)
        bins: list[list[int]] = [[] for _ in range(world_size)]
        totals = [0.0] * world_size
        for e in sorted(range(E), key=lambda e: (-load[e], e)):
            r = min((r for r in range(world_size) if len(bins[r]) < L), key=lambda r: (totals[r], r))
            bins[r].append(e)
            totals[r] += load[e]
        _improve_by_swaps(bins, totals, load)
        greedy = cls.from_rank_lists([sorted(b) for b in bins])
        candidates = [greedy, cls.contiguous(E, world_size), cls.round_robin(E, world_size)]
        return min(candidates, key=lambda p: max(p.rank_loads(load)))

    @classmethod
    def build(cls, policy: str, num_experts: int, world_size: int,
              expert_load=None) -> ExpertPlacement:
        """A placement by policy name: 'contiguous', 'round_robin' or 'load_balanced'
        (the last needs `expert_load`, [num_experts])."""
        if policy == "contiguous":
            return cls.contiguous(num_experts, world_size)
        if policy == "round_robin":
            return cls.round_robin(num_experts, world_size)
        if policy == "load_balanced":
            load = None if expert_load is None else _loads(expert_load)  # (once: it may be a generator)
            if load is None or len(load) != num_experts:
                raise PlacementError("policy 'load_balanced' needs expert_load with "
                                     f"num_experts={num_experts} entries")
            return cls.load_balanced(load, world_size)
        raise PlacementError(f"unknown placement policy {policy!r}; known: {POLICIES}")


def _loads(expert_load) -> list[float]:
    """expert_load (an iterable of real numbers: a list, a 1-D tensor or array, 0-d tensors, a
    generator) as floats; else PlacementError naming it."""
    if getattr(expert_load, "ndim", 1) != 1:
        raise PlacementError(f"expert_load must be 1-D ([num_experts]), got shape {tuple(expert_load.shape)}")
    if isinstance(expert_load, (str, bytes)) or not isinstance(expert_load, Iterable):
        raise PlacementError(f"expert_load must be an iterable of per-expert loads, got {type(expert_load).__name__}")
    load = []
    for e, v in enumerate(expert_load.tolist() if hasattr(expert_load, "tolist") else expert_load):
        if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # a 0-d tensor or array
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise PlacementError(f"expert_load[{e}]={v!r} must be a real number")
        load.append(float(v))
    return load


def _int(value, field: str) -> int:
    """value as a Python int, if it is an integer (int or numpy integer, not bool); else raise
    naming `field`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PlacementError(f"{field}={value!r} must be an int, got {type(value).__name__}")
    return int(value)


def _local(num_experts: int, world_size: int) -> int:
    num_experts, world_size = _int(num_experts, "num_experts"), _int(world_size, "world_size")
    if world_size < 1 or num_experts < 1 or num_experts % world_size:
        raise PlacementError(f"num_experts={num_experts} is not divisible by "
                             f"world_size={world_size}")
    return num_experts // world_size


def _improve_by_swaps(bins: list[list[int]], totals: list[float], load: list[float]) -> None:
    """Swap an expert on the heaviest rank with a lighter one elsewhere while the max drops."""
    for _ in range(4 * sum(len(b) for b in bins)):
        hi = max(range(len(bins)), key=lambda r: totals[r])
        best = None  # (new max of the pair, lo rank, i, j)
        for lo in range(len(bins)):
            if lo == hi:
                continue
            for i, a in enumerate(bins[hi]):
                for j, b in enumerate(bins[lo]):
                    d = load[a] - load[b]
                    if d <= 0:
                        continue
                    pair_max = max(totals[hi] - d, totals[lo] + d)
                    if pair_max < totals[hi] and (best is None or pair_max < best[0]):
                        best = (pair_max, lo, i, j)
        if best is None:
            return
        _, lo, i, j = best
        a, b = bins[hi][i], bins[lo][j]
        d = load[a] - load[b]
        bins[hi][i], bins[lo][j] = b, a
        totals[hi] -= d
        totals[lo] += d
