"""Routing plan kernels: from the router's top-k to where every token-slot of this rank goes.

Three launches, no host synchronisation (they replace some forty small torch ops, ~185 µs a
forward for qwen3_30b_a3b at 4,096 tokens on an H200, sort included):

  slot_ranks   per slot: its (destination, expert slot) pair `pos` and its place among the
               pair's slots, taken from an atomic counter per pair (the order within a pair is
               not the token order, and on a GPU not the same every run: no forward output
               depends on it, each row's result being its own, but backward="saved" sums an
               expert's rows in it, so its weight and bias gradients may differ in the last bits
               between runs). With `deterministic` (torch.use_deterministic_algorithms), the
               places are taken again in slot order (ranks_in_slot_order: a stable sort and a
               few small ops), as backward="recompute" orders its rows;
  pair_table   one program: each pair's first slot in the sorted order, its CHUNK-aligned
               offset in this rank's region at the destination, and the running count of chunks
               in send order;
  slot_plan    per slot: destination, row there, chunk, and the sorted token list; per send
               chunk: its pair and index; per pair: the rows this rank will get back per chunk,
               added to the cumulative comb_expect.

Pairs are numbered pos = destination * L + slot (E = W * L of them); a dropped slot (capacity)
has pos = E."""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

BLOCK = 1024  # slots or send chunks a program of slot_ranks / slot_plan handles


class RoutingPlan(NamedTuple):
    """Where each of this rank's token-slots goes, as the fused kernel reads it (E = W * L pairs
    in (rank, slot) order, K = top_k, C = send chunks):

    send_slot [T*K] int32: the slots sorted by pair (slot = token * K + choice);
    pos_start, send_counts, region_off [E] int32: each pair's first sorted slot, its slots, and its
    CHUNK-aligned offset in this rank's region at the destination;
    chunk_pos, chunk_c [C] int32: each send chunk's pair and index within it (past the last: pair
    -1, index 0);
    slot_dest, slot_row, slot_chunk [T, K] int32: each slot's destination rank, row in this
    rank's region there, and chunk counter (pair * MAXC + chunk), -1 for dropped slots;
    slot_w [T, K] fp32: each slot's routing weight."""

    send_slot: torch.Tensor
    pos_start: torch.Tensor
    send_counts: torch.Tensor
    region_off: torch.Tensor
    chunk_pos: torch.Tensor
    chunk_c: torch.Tensor
    slot_dest: torch.Tensor
    slot_row: torch.Tensor
    slot_chunk: torch.Tensor
    slot_w: torch.Tensor


@triton.jit(do_not_specialize=["NS"])  # one variant at any token count (compile_variants)
def slot_ranks_kernel(experts_ptr, kept_ptr, positions_ptr, counts_ptr, stats_ptr, pos_ptr, rank_ptr,
                      NS, E, HAS_KEPT: tl.constexpr, BLOCK: tl.constexpr):
    """experts: [NS] int64 global expert ids; kept: [NS] bool (HAS_KEPT); positions: [E] int64;
    counts: [E + 1] int32 and stats: [E + 1] int64, zeroed, counted into (stats by expert, its
    first E); pos, rank: [NS] int32."""
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = s < NS
    expert = tl.load(experts_ptr + s, mask=m, other=0)
    pos = tl.load(positions_ptr + expert, mask=m, other=0).to(tl.int32)
    if HAS_KEPT:
        pos = tl.where(tl.load(kept_ptr + s, mask=m, other=0) != 0, pos, E)
    rank = tl.atomic_add(counts_ptr + pos, 1, mask=m, sem="relaxed")
    tl.atomic_add(stats_ptr + expert, 1, mask=m, sem="relaxed")
    tl.store(pos_ptr + s, pos, mask=m)
    tl.store(rank_ptr + s, rank, mask=m)


@triton.jit
def pair_table_kernel(counts_ptr, send_order_ptr, pos_start_ptr, region_off_ptr, chunk_cum_ptr, stats_ptr, E, L,
                      CHUNK: tl.constexpr, E_POW2: tl.constexpr):
    """counts: [E + 1] int32 (slot_ranks); send_order: [E] int64 pairs in send order ->
    pos_start: [E] int32 first slot of each pair in pair order; region_off: [E] int32 the pair's
    offset in this rank's region at its destination (pairs of one destination, CHUNK-padded, in
    slot order); chunk_cum: [E] int32 chunks of the pairs up to each in send order (inclusive);
    stats[E] (int64, [E + 1]) = counts[E], the dropped slots."""
    tl.store(stats_ptr + E, tl.load(counts_ptr + E).to(tl.int64))
    p = tl.arange(0, E_POW2)
    m = p < E
    counts = tl.load(counts_ptr + p, mask=m, other=0)
    tl.store(pos_start_ptr + p, tl.cumsum(counts, 0) - counts, mask=m)
    padded = (counts + CHUNK - 1) // CHUNK * CHUNK
    before = tl.cumsum(padded, 0) - padded
    tl.store(region_off_ptr + p, before, mask=m)
    tl.debug_barrier()  # every pair's `before` is in memory for the loads below
    dest_first = tl.load(region_off_ptr + p // L * L, mask=m, other=0)
    tl.debug_barrier()  # ... and read before it is overwritten
    tl.store(region_off_ptr + p, before - dest_first, mask=m)
    in_order = tl.load(counts_ptr + tl.load(send_order_ptr + p, mask=m, other=0), mask=m, other=0)
    tl.store(chunk_cum_ptr + p, tl.cumsum((in_order + CHUNK - 1) // CHUNK, 0), mask=m)


@triton.jit(do_not_specialize=["NS", "SEND_CHUNKS", "SLOT_PROGRAMS", "CHUNK_PROGRAMS"])  # as slot_ranks_kernel
def slot_plan_kernel(pos_ptr, rank_ptr, counts_ptr, pos_start_ptr, region_off_ptr, chunk_cum_ptr, send_order_ptr,
                     send_slot_ptr, slot_dest_ptr, slot_row_ptr, slot_chunk_ptr, chunk_pos_ptr, chunk_c_ptr,
                     comb_expect_ptr, NS, E, L, MAXC, SEND_CHUNKS, SLOT_PROGRAMS, CHUNK_PROGRAMS,
                     CHUNK: tl.constexpr, E_POW2: tl.constexpr, MAXC_POW2: tl.constexpr, BLOCK: tl.constexpr):
    """Programs [0, SLOT_PROGRAMS): BLOCK slots each -> send_slot [NS] int32 (the slots in
    sorted order), slot_dest/slot_row/slot_chunk [NS] int32 (-1 when dropped). The next
    CHUNK_PROGRAMS: BLOCK send chunks each -> chunk_pos, chunk_c [SEND_CHUNKS] int32 (-1 and 0 past
    the last). The last E: one pair each -> comb_expect[pair, c] (int64, [E, MAXC]) += rows of chunk c."""
    pid = tl.program_id(0)
    if pid < SLOT_PROGRAMS:
        s = pid * BLOCK + tl.arange(0, BLOCK)
        m = s < NS
        pos = tl.load(pos_ptr + s, mask=m, other=0)
        rank = tl.load(rank_ptr + s, mask=m, other=0)
        live = m & (pos < E)
        first = tl.load(pos_start_ptr + pos, mask=live, other=0)
        row = tl.load(region_off_ptr + pos, mask=live, other=0) + rank
        tl.store(send_slot_ptr + first + rank, s, mask=live)
        tl.store(slot_dest_ptr + s, tl.where(live, pos // L, -1), mask=m)
        tl.store(slot_row_ptr + s, tl.where(live, row, -1), mask=m)
        tl.store(slot_chunk_ptr + s, tl.where(live, pos * MAXC + rank // CHUNK, -1), mask=m)
    elif pid < SLOT_PROGRAMS + CHUNK_PROGRAMS:
        q = (pid - SLOT_PROGRAMS) * BLOCK + tl.arange(0, BLOCK)
        live = q < tl.load(chunk_cum_ptr + E - 1)  # chunks past the last are padding
        # nth: how many pairs (in send order) end at or before chunk q, i.e. the pair of chunk q:
        # a binary search of chunk_cum (non-decreasing), one gather per halving.
        nth = tl.zeros((BLOCK,), dtype=tl.int32)
        step = E_POW2 // 2
        while step > 0:
            probe = nth + step - 1
            ends = tl.load(chunk_cum_ptr + probe, mask=probe < E, other=2**31 - 1)
            nth = tl.where(ends <= q, nth + step, nth)
            step //= 2
        before = tl.load(chunk_cum_ptr + nth - 1, mask=live & (nth > 0), other=0)
        pair = tl.load(send_order_ptr + nth, mask=live, other=-1)
        m = q < SEND_CHUNKS
        tl.store(chunk_pos_ptr + q, tl.where(live, pair, -1).to(tl.int32), mask=m)
        tl.store(chunk_c_ptr + q, tl.where(live, q - before, 0), mask=m)
    else:
        p = pid - SLOT_PROGRAMS - CHUNK_PROGRAMS
        c = tl.arange(0, MAXC_POW2)
        count = tl.load(counts_ptr + p)
        rows = tl.minimum(tl.maximum(count - c * CHUNK, 0), CHUNK).to(tl.int64)
        ptrs = comb_expect_ptr + p.to(tl.int64) * MAXC + c
        tl.store(ptrs, tl.load(ptrs, mask=c < MAXC) + rows, mask=c < MAXC)


def ranks_in_slot_order(pos: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """pos: [NS] int32 each slot's pair (E: dropped); counts: [E + 1] int32 the slots of each
    pair -> [NS] int32 each slot's place among its pair's slots, in slot order (a stable sort: the
    same every run, whatever order an atomic counter took them in). Sorts and gathers only, which
    CUDA graphs of a training step already hold (torch.sort); no index_put_, whose form under
    torch's deterministic setting is another path, not seen in a capture here."""
    sorted_pos, order = torch.sort(pos, stable=True)
    first = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    place = torch.arange(pos.numel(), dtype=torch.int32, device=pos.device) - first[sorted_pos.long()]
    return place[torch.argsort(order)]  # the sorted order's inverse permutation


def build_plan(experts: torch.Tensor, kept: torch.Tensor | None, weights: torch.Tensor, positions: torch.Tensor,
               send_order: torch.Tensor, comb_expect: torch.Tensor, *, local_experts: int, chunk: int,
               maxc: int, deterministic: bool = False) -> tuple[RoutingPlan, torch.Tensor]:
    """experts: [T, K] int64 global expert ids; kept: [T, K] bool or None (dropless); weights:
    [T, K] routing weights; positions: [E] int64 expert -> pair; send_order: [E] int64 pairs in
    send order; comb_expect: [E, maxc] int64, contiguous (any shape of that size), added to;
    deterministic: each pair's slots in slot order (token, then choice) instead of the atomic
    counter's. -> (the RoutingPlan, stats [E + 1] int64: the slots routed to each expert before any
    drop, then the dropped slots; plan_stats names them)."""
    T, K = experts.shape
    E, NS, dev = positions.numel(), T * K, experts.device
    if send_order.shape != (E,) or comb_expect.numel() != E * maxc:
        raise ValueError(f"send_order: expected [{E}], got {tuple(send_order.shape)}; comb_expect: expected "
                         f"{E * maxc} elements, got {comb_expect.numel()}")
    for name, t in (("positions", positions), ("send_order", send_order), ("comb_expect", comb_expect)):
        if t.dtype != torch.int64 or not t.is_contiguous():  # the kernels index them as flat int64 arrays
            raise ValueError(f"{name}: expected a contiguous int64 tensor, got {t.dtype} with strides {t.stride()}")
    i32 = torch.int32
    counts = torch.zeros(E + 1, dtype=i32, device=dev)
    stats = torch.zeros(E + 1, dtype=torch.int64, device=dev)  # one tensor: a replayed forward copies it once
    pos, rank = torch.empty(NS, dtype=i32, device=dev), torch.empty(NS, dtype=i32, device=dev)
    flat = experts.reshape(NS)
    slot_programs = triton.cdiv(NS, BLOCK)
    if NS:
        slot_ranks_kernel[(slot_programs,)](flat, kept.reshape(NS) if kept is not None else flat, positions, counts,
                                            stats, pos, rank, NS, E, HAS_KEPT=kept is not None,
                                            BLOCK=BLOCK)
        if deterministic:
            rank = ranks_in_slot_order(pos, counts)
    pos_start, region_off, chunk_cum = (torch.empty(E, dtype=i32, device=dev) for _ in range(3))
    E_POW2 = triton.next_power_of_2(E)
    pair_table_kernel[(1,)](counts, send_order, pos_start, region_off, chunk_cum, stats, E, local_experts,
                            CHUNK=chunk, E_POW2=E_POW2)
    send_chunks = triton.cdiv(NS, chunk) + E
    out = {name: torch.empty(NS, dtype=i32, device=dev)
           for name in ("send_slot", "slot_dest", "slot_row", "slot_chunk")}
    chunk_pos, chunk_c = (torch.empty(send_chunks, dtype=i32, device=dev) for _ in range(2))
    chunk_programs = triton.cdiv(send_chunks, BLOCK)
    slot_plan_kernel[(slot_programs + chunk_programs + E,)](
        pos, rank, counts, pos_start, region_off, chunk_cum, send_order, out["send_slot"], out["slot_dest"],
        out["slot_row"], out["slot_chunk"], chunk_pos, chunk_c, comb_expect, NS, E, local_experts, maxc, send_chunks,
        slot_programs, chunk_programs, CHUNK=chunk, E_POW2=E_POW2, MAXC_POW2=triton.next_power_of_2(maxc),
        BLOCK=BLOCK)
    plan = RoutingPlan(out["send_slot"], pos_start, counts[:E], region_off, chunk_pos, chunk_c,
                       out["slot_dest"].view(T, K), out["slot_row"].view(T, K), out["slot_chunk"].view(T, K),
                       weights.float().contiguous())
    return plan, stats


def plan_stats(stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """build_plan's stats [E + 1] int64 -> {expert_counts: [E] int64, dropped_slots: [] int64}
    (views of it)."""
    return {"expert_counts": stats[:-1], "dropped_slots": stats[-1]}
