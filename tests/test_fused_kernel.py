"""The fused kernel in the Triton interpreter on the CPU, against the float64 reference: whole, on
one rank; whole, on 2-3 ranks in separate processes sharing 'symmetric' buffers; its tile decode;
and its bounded waits."""

import dataclasses
import itertools
import os
import random
import sys
import types
from typing import NamedTuple

import pytest
import torch
import triton
import triton.language as tl

from one_rank import OneRank, RankBuffers, kernel_weights, routed_reference, symmetric_copies
from seeds import fresh_seed

from flashmoe_py import ExpertPlacement, MoEConfig, MoELayer, reference_forward
from flashmoe_py.config import ACTIVATIONS, EXPERT_WEIGHTS, ROUTINGS
from flashmoe_py.backends.flash import FlashBackend, FusedKernelError, routing_plan
from flashmoe_py.kernels import fused_moe, transport
from flashmoe_py.gate_up import to_pairs
from flashmoe_py.kernels.fused_moe import Saved, launch_fused
from flashmoe_py.kernels.fused_moe_details.combine import WIDE_TOP_K
from flashmoe_py.kernels.fused_moe_details.expert_ffn import sum_parts
from flashmoe_py.kernels.fused_moe_details.tasks import expert_tile, tile_table
from flashmoe_py.kernels.launch_config import SPLIT_SLOTS, LaunchConfig, launch_variants, partial_slots
from flashmoe_py.kernels.addresses import check_words
from flashmoe_py.kernels.sorted_rows import sort_rows
from flashmoe_py.kernels.layout import (CTL_EPOCH, EPOCH_LAST, WAIT_CHUNK, WAIT_COMBINE, WAIT_COUNTS, Geometry,
                                       describe_timeout)
from flashmoe_py.kernels.workspace import Workspace
from flashmoe_py.routing import route

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter test (the GPU suite runs the kernel for real)")


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def expected_pre(cfg, weights, dest, sent):
    """GEMM1's outputs before the activation (float64, in gate/up pairs) of every row rank `dest`'s
    experts receive, in Saved's order: local expert, then source, then the row's place in its
    pair. weights: the full layer's, in halves; sent: per source rank (x, send_slot, pos_start,
    send_counts, slot_w) of its plan."""
    L = cfg.local_experts(len(sent))
    w_in, bias_in = weights["w_in"].double(), weights.get("bias_in")
    if cfg.gated:
        w_in, bias_in = to_pairs(w_in), None if bias_in is None else to_pairs(bias_in)
    rows = []
    for e in range(L):
        g = dest * L + e
        for x, send_slot, pos_start, send_counts, slot_w in sent:
            slots = send_slot[int(pos_start[g]):int(pos_start[g]) + int(send_counts[g])].long()
            a = x[slots // cfg.top_k].double()
            if cfg.weight_on_input:
                a = a * slot_w.reshape(-1)[slots].double()[:, None]
            rows.append(a @ w_in[g] + (0 if bias_in is None else bias_in[g].double()))
    return torch.cat(rows)


def expected_shared_pre(cfg, weights, x):
    w = weights["shared_w_in"].double()
    return x.double() @ (to_pairs(w) if cfg.gated else w)


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("block_m", [64, 128])
def test_whole_kernel_matches_reference(activation, top_k, block_m):
    cfg = MoEConfig(hidden_size=48, ffn_size=80, num_experts=4, top_k=top_k, activation=activation,
                    dtype="float32")
    rank = OneRank(cfg, max_tokens=80)
    for call, tokens in enumerate([37, 80, 0, 5]):  # epochs 1..4, no flag reset in between
        x, out = rank.forward(tokens, block_m=block_m)
        assert int(rank.status[0]) == 0
        if tokens:
            ref = rank.reference(x)
            assert rel_err(out, ref) <= 1e-5
        assert rank.ctl.tolist() == [call + 2, 0, 0, 0]  # next epoch open, task counters rewound


@pytest.mark.parametrize("programs,dispatch_programs", [(3, 1), (3, 2), (2, None)])
def test_programs_split_between_dispatch_and_compute(programs, dispatch_programs):
    """Only the first dispatch_programs programs send chunks; every task is still done once (the
    interpreter runs programs one after another, so later programs find the queues drained)."""
    cfg = MoEConfig(hidden_size=40, ffn_size=48, num_experts=4, top_k=2, dtype="float32")
    rank = OneRank(cfg, max_tokens=50)
    for call, tokens in enumerate([50, 17]):
        x, out = rank.forward(tokens, programs=programs, dispatch_programs=dispatch_programs)
        assert int(rank.status[0]) == 0 and rank.ctl.tolist() == [call + 2, 0, 0, 0]
        ref = rank.reference(x)
        assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("dispatch_programs", [0, 3])
def test_dispatch_programs_must_be_some_of_the_programs(dispatch_programs):
    cfg = MoEConfig(hidden_size=32, ffn_size=32, num_experts=2, top_k=1, dtype="float32")
    with pytest.raises(ValueError, match=f"dispatch_programs={dispatch_programs}"):
        OneRank(cfg, max_tokens=8).forward(4, programs=2, dispatch_programs=dispatch_programs)


@pytest.mark.parametrize("world,rank", [(1, 0), (3, 0), (3, 2), (4, 1)])
def test_chunks_are_sent_expert_slot_by_slot_to_rotating_destinations(world, rank):
    """The send queue: every chunk of every (destination, expert) pair once, in order of local
    expert slot, then destination rank, rank + 1, ... (mod world)."""
    cfg = MoEConfig(hidden_size=16, ffn_size=16, num_experts=2 * world, top_k=2, dtype="float32")
    geo = Geometry.for_config(cfg, world, 300)
    x = torch.randn(300, 16)
    router = torch.randn(cfg.num_experts, 16)
    plan, _ = routing_plan(route(x, router, cfg), ExpertPlacement.contiguous(cfg.num_experts, world).positions(),
                           geo, geo.send_order(rank), torch.zeros(world, geo.local_experts, geo.max_chunks,
                                                                  dtype=torch.int64))
    L, counts = geo.local_experts, plan.send_counts.tolist()
    expected = [(d * L + e, c) for e in range(L) for d in [(rank + i) % world for i in range(world)]
                for c in range(-(-counts[d * L + e] // geo.chunk))]
    sent = [(p, c) for p, c in zip(plan.chunk_pos.tolist(), plan.chunk_c.tolist()) if p >= 0]
    assert sent == expected
    assert all(p == -1 for p in plan.chunk_pos.tolist()[len(sent):])


def test_gemm2_tile_width_may_change_between_calls():
    """GEMM2 tiles of 128 or 256 columns (hidden 384: the last wide tile is half outside) count
    rows per 128-column combine tile, so calls of either width share the cumulative counters."""
    cfg = MoEConfig(hidden_size=384, ffn_size=48, num_experts=4, top_k=2, dtype="float32")
    rank = OneRank(cfg, max_tokens=40)
    for tokens, block_n in [(40, 256), (23, 128), (40, 256)]:
        x, out = rank.forward(tokens, block_n=block_n)
        assert int(rank.status[0]) == 0
        ref = rank.reference(x)
        assert rel_err(out, ref) <= 1e-5


def test_gemm2_tile_width_must_be_a_power_of_two_multiple_of_the_combine_tile():
    cfg = MoEConfig(hidden_size=32, ffn_size=32, num_experts=2, top_k=1, dtype="float32")
    with pytest.raises(ValueError, match="block_n=192"):
        OneRank(cfg, max_tokens=8).forward(4, block_n=192)


@pytest.mark.parametrize("top_k", [3, 6])
def test_combine_tiles_may_hold_more_tokens_and_columns(top_k):
    """Combine tiles of 64 or 128 tokens (block_t) sum the same rows as those of 32, shared
    expert included (a combine tile reads one shared tile of block_m rows), and so do tasks of
    2 or 4 column tiles (combine_span; hidden 640 has 5, so either ends in a partial task); calls
    may switch. Both ways of summing a task's columns: as one wide tile (top-3) and tile by tile
    (top-6, above combine.WIDE_TOP_K)."""
    assert (top_k <= WIDE_TOP_K.value) == (top_k == 3)
    cfg = MoEConfig(hidden_size=640, ffn_size=48, num_experts=8, top_k=top_k, dtype="float32",
                    shared_experts=1, shared_ffn_size=40)
    rank = OneRank(cfg, max_tokens=150)
    for tokens, block_t, span in [(150, 128, 1), (150, 64, 2), (70, 64, 4), (150, 32, 1), (1, 128, 2),
                                  (150, 32, 4)]:
        x, out = rank.forward(tokens, block_m=128, block_t=block_t, combine_span=span, programs=2)
        assert int(rank.status[0]) == 0
        assert rel_err(out, rank.reference(x)) <= 1e-5


@pytest.mark.parametrize("fields", [
    dict(),
    dict(activation="clamped_swiglu", expert_bias=True, weight_on_input=True, routing="topk_sigmoid",
         renormalize=False, capacity_factor=0.6),
    dict(activation="gelu", shared_experts=1, shared_ffn_size=40, shared_expert_gate=True),
    dict(activation="swiglu", shared_experts=2, shared_ffn_size=72, top_k=3)])
@pytest.mark.parametrize("static", [0, 1])
def test_a_training_forward_saves_gemm1_outputs_in_the_experts_order(fields, static):
    """save: besides the same output, GEMM1's product with biases and input weights, before the
    activation, lands in Saved.pre row by row in the experts' order (the plan's sorted slots at
    world 1) and nowhere past the kept rows (capacity drops some); the shared experts' per token
    in Saved.shared_pre. Both GEMM1 schedules (queue and static_ffn_in)."""
    cfg = MoEConfig(**{**dict(hidden_size=72, ffn_size=200, num_experts=4, top_k=2, dtype="float32"), **fields})
    rank = OneRank(cfg, max_tokens=90)
    for tokens, save in [(90, True), (31, False), (57, True)]:
        x, out = rank.forward(tokens, save=save, static_ffn_in=static)
        assert int(rank.status[0]) == 0
        ref = rank.reference(x)
        assert rel_err(out, ref) <= 1e-5
        if not save:
            continue
        p = rank.plan
        pre = expected_pre(cfg, rank.weights, 0, [(x, p.send_slot, p.pos_start, p.send_counts, p.slot_w)])
        kept = pre.shape[0]
        assert kept == int(p.send_counts.sum()) and (kept < tokens * cfg.top_k) == (cfg.capacity_factor is not None)
        assert rel_err(rank.saved.pre[:kept], pre) <= 1e-5
        assert rank.saved.pre[kept:].isnan().all()
        if cfg.shared_experts:
            assert rel_err(rank.saved.shared_pre, expected_shared_pre(cfg, rank.weights, x)) <= 1e-5


@pytest.mark.parametrize("fields", [
    dict(),
    dict(activation="clamped_swiglu", expert_bias=True, weight_on_input=True, routing="topk_sigmoid",
         renormalize=False),
    dict(activation="gelu", shared_experts=1, shared_ffn_size=40, shared_expert_gate=True)])
def test_gemm1_tiles_in_a_static_order_at_world_1(fields):
    """static_ffn_in=1: GEMM1 tiles in the static order, each with its own K loop and its h flag
    raised one tile late, the rest from the queue. Outputs as the reference's, and gate and up
    saved for the backward, over calls of the queue order and this one in turn (epochs and
    counters shared), an empty call included. One program: the interpreter runs programs one after
    another, and a static order needs them all at once."""
    cfg = MoEConfig(hidden_size=264, ffn_size=200, num_experts=4, top_k=2, dtype="float32", **fields)
    rank = OneRank(cfg, max_tokens=90)
    for tokens, static in [(90, 1), (31, 0), (0, 1), (57, 1)]:
        x, out = rank.forward(tokens, static_ffn_in=static, save=tokens > 0)
        check_call(rank, cfg, x, out)


def check_call(rank: OneRank, cfg, x, out) -> None:
    """rank's last call (forward(x) -> out): no timeout; out, and gate and up where saved, as the
    reference's."""
    assert int(rank.status[0]) == 0
    if x.shape[0]:
        ref = rank.reference(x)
        assert rel_err(out, ref) <= 1e-5
        if rank.saved is not None:
            p = rank.plan
            pre = expected_pre(cfg, rank.weights, 0, [(x, p.send_slot, p.pos_start, p.send_counts, p.slot_w)])
            assert rel_err(rank.saved.pre[:pre.shape[0]], pre) <= 1e-5


# expert variants of the world-1 launch options' tests: plain; biases, input weights, sigmoid routing
# and capacity drops; shared experts with a gate at top-3
LAUNCH_VARIANTS = [
    dict(),
    dict(activation="clamped_swiglu", expert_bias=True, weight_on_input=True, routing="topk_sigmoid",
         renormalize=False, capacity_factor=0.6),
    dict(activation="gelu", shared_experts=1, shared_ffn_size=40, shared_expert_gate=True, top_k=3)]


@pytest.mark.parametrize("fields", LAUNCH_VARIANTS)
def test_gemm2_rows_through_tma_at_world_1(fields):
    """h_tma=1: a GEMM2 tile's h rows load as one TMA box a K step (a part-full tile's box reads
    rows past its expert's, whose products are never sent). Outputs as the reference's, from the
    queue and after GEMM1 tiles in the static order, over calls with and without it in turn
    (flags, epochs and counters shared), an empty call included."""
    cfg = MoEConfig(**{**dict(hidden_size=264, ffn_size=200, num_experts=4, top_k=2, dtype="float32"), **fields})
    rank = OneRank(cfg, max_tokens=90)
    for tokens, static, h_tma in [(90, 0, 1), (31, 1, 1), (57, 1, 0), (0, 0, 1), (75, 1, 1)]:
        x, out = rank.forward(tokens, static_ffn_in=static, h_tma=h_tma)
        assert int(rank.status[0]) == 0
        if tokens:
            ref = rank.reference(x)
            assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("fields", LAUNCH_VARIANTS)
def test_gemm1_rows_copied_into_expert_order_come_through_tma_at_world_1(fields, monkeypatch):
    """sorted_rows=1: a kernel before the launch copies x's kept slots' rows into recv_x where
    their expert tiles read them, and a GEMM1 tile's rows load as one TMA box a K step (a part-full
    tile's box reads the next expert's rows, whose products are never stored). Outputs, and gate
    and up saved for the backward, as the reference's, from the queue and in the static order,
    over calls with and without it in turn (flags, epochs and counters shared), an empty call
    included; recv_x poisoned before each call, so no row is read that was not copied."""
    cfg = MoEConfig(**{**dict(hidden_size=264, ffn_size=200, num_experts=4, top_k=2, dtype="float32"), **fields})
    rank = OneRank(cfg, max_tokens=90)
    # 128-row tiles too (a box from a tile's first row can pass recv_x's end: zeros, never stored)
    for tokens, static, sorted_rows, h_tma, block_m in [(90, 0, 1, 0, 64), (31, 1, 1, 1, 64), (57, 1, 0, 0, 64),
                                                        (0, 0, 1, 0, 64), (75, 1, 1, 0, 64), (88, 0, 1, 0, 128)]:
        rank.ws.sym.recv_x.local.fill_(float("nan"))
        x, out = rank.forward(tokens, static_ffn_in=static, sorted_rows=sorted_rows, h_tma=h_tma, block_m=block_m,
                              save=tokens > 0)
        check_call(rank, cfg, x, out)
    # the tiles read recv_x, not x: without the copy they read its poison (which clamped_swiglu clamps)
    monkeypatch.setattr(fused_moe, "sort_rows", lambda *args, **kwargs: None)
    rank.ws.sym.recv_x.local.fill_(float("nan"))
    x, out = rank.forward(40, sorted_rows=1)
    ref = reference_forward(x, config=cfg, compute_dtype=torch.float64, **rank.full_weights())
    assert not rel_err(out.nan_to_num(1e9), ref) <= 1e-2


@pytest.mark.parametrize("fields", [
    dict(),
    dict(activation="clamped_swiglu", expert_bias=True, weight_on_input=True, routing="topk_sigmoid",
         renormalize=False, capacity_factor=0.6),
    dict(activation="gelu", expert_bias=True, routed_scaling_factor=2.5)])
def test_top1_gemm2_tiles_store_weighted_rows_straight_into_the_output(fields):
    """direct_out=1 (world 1, top-1, no shared experts): each GEMM2 tile stores its rows, times their
    routing weights (biases in; input weights already applied), into their tokens' rows of out,
    and no row goes to the combine buffer (poisoned before each call, still poison after); with
    capacity, dropped tokens' rows are zeros. Outputs as the reference's over calls with and
    without it in turn, with the static GEMM1 order, TMA rows and a split K loop, an empty call
    included: a call without it after calls with it waits on combine counters that were kept."""
    cfg = MoEConfig(**{**dict(hidden_size=264, ffn_size=200, num_experts=4, top_k=1, dtype="float32"), **fields})
    rank = OneRank(cfg, max_tokens=90, split_slots=SPLIT_SLOTS)
    combine_y = rank.ws.sym.combine_y.local
    for tokens, direct, more in [(90, 1, {}), (31, 0, {}), (57, 1, dict(static_ffn_in=1, h_tma=1)), (0, 1, {}),
                                 (75, 1, dict(sorted_rows=1, block_m=128)), (3, 1, dict(f_split=4, programs=8)),
                                 (40, 0, dict(static_ffn_in=1))]:
        combine_y.fill_(float("nan"))
        x, out = rank.forward(tokens, direct_out=direct, save=tokens > 0, **more)
        check_call(rank, cfg, x, out)
        assert bool(combine_y.isnan().all()) == bool(direct or not tokens)


def test_direct_output_is_refused_where_a_token_has_more_than_one_row_to_sum():
    small = dict(hidden_size=32, ffn_size=32, num_experts=4)
    for fields, world in [(dict(top_k=2), 1), (dict(top_k=1), 2), (dict(top_k=1, shared_experts=1), 1)]:
        geo = Geometry.for_config(MoEConfig(**small, **fields), world, 16)
        with pytest.raises(ValueError, match=f"direct_out=1 at world_size={world}"):
            LaunchConfig(programs=2, block_m=64, block_n=geo.block_n, direct_out=1).check(geo)


@pytest.mark.parametrize("fields", LAUNCH_VARIANTS)
def test_the_kernel_reads_x_and_writes_out_at_the_addresses_of_its_words(fields):
    """io words (a CUDA graph replayed on a caller's x, into a new out: kernels/addresses.py): the
    kernel's x and out arguments are a NaN stand-in, never read or written; x's rows are read and
    out's written at the addresses the words hold, by the row copy into expert order and by the
    GEMM1 tiles, the combine or the GEMM2 tiles storing the output (top-1), the shared experts
    too. Outputs as the reference's over calls with and without the words in turn."""
    cfg = MoEConfig(**{**dict(hidden_size=264, ffn_size=200, num_experts=4, top_k=2, dtype="float32"), **fields})
    rank = OneRank(cfg, max_tokens=90)
    for tokens, addressed, more in [(90, 1, {}), (31, 0, {}), (57, 1, dict(static_ffn_in=1, h_tma=1)), (0, 1, {}),
                                    (75, 1, dict(sorted_rows=1, block_m=128)), (40, 1, dict(programs=3))]:
        x, out = rank.forward(tokens, addressed=bool(addressed), save=tokens > 0, **more)
        check_call(rank, cfg, x, out)
    if cfg.top_k == 2 and not cfg.shared_experts:  # top-1, its GEMM2 tiles storing the output
        top1 = OneRank(MoEConfig(**{**cfg.__dict__, "top_k": 1}), max_tokens=90)
        for tokens, direct in [(90, 1), (33, 0)]:
            x, out = top1.forward(tokens, addressed=True, direct_out=direct)
            check_call(top1, top1.cfg, x, out)


@pytest.mark.parametrize("word", [torch.zeros(1), torch.zeros(1, 1, dtype=torch.int64),
                                  torch.zeros(0, dtype=torch.int64)])
def test_the_row_copy_and_the_kernel_refuse_an_address_word_that_is_not_int64_words(word):
    """x_at / io must be int64 words in one dimension on x's device, as many as the kernel reads
    (the row copy one, the fused kernel two: x's and out's), refused by name before any launch."""
    x, slot_row, recv = torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.int32), torch.zeros(3, 8)
    with pytest.raises(ValueError, match="x_at: expected at least 1 int64 word"):
        sort_rows(x, slot_row, recv, x_at=word)
    with pytest.raises(ValueError, match="io: expected at least 2 int64 word"):  # fused_kernel_args' check
        check_words("io", torch.zeros(1, dtype=torch.int64) if word.dtype == torch.int64 else word, 2, x.device)
    check_words("io", torch.zeros(2, dtype=torch.int64), 2, x.device)


def test_sort_rows_puts_each_kept_slot_s_row_where_the_plan_says():
    """recv[slot_row[t, k]] = x[t] for kept slots; a dropped slot's row (-1) writes nothing."""
    T, K, H = 9, 3, 40
    x = torch.randn(T, H)
    slot_row = torch.randperm(40)[:T * K].view(T, K).int()
    slot_row[2, 1] = slot_row[7, 0] = -1
    recv = torch.full((40, H), float("nan"))
    sort_rows(x, slot_row, recv)
    kept = slot_row >= 0
    rows = slot_row[kept].long()
    assert torch.equal(recv[rows], x[:, None].expand(T, K, H)[kept])
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[rows] = False
    assert recv[untouched].isnan().all()
    with pytest.raises(ValueError, match="slot_row: expected contiguous int32"):
        sort_rows(x, slot_row.long(), recv)
    with pytest.raises(ValueError, match="recv: expected contiguous torch.float32 rows of 40"):
        sort_rows(x, slot_row, recv[:, :32])


def split_parts_expected(rank, launch_fields) -> tuple[int, int]:
    """(GEMM2 tiles, parts each) the f_split rule gives rank's last call (64-row tiles of the
    geometry's block_n): the most parts, a power of two up to f_split, with tiles x parts within
    the programs and the partial slots, and at least an f-tile a part."""
    geo, f_split, programs = rank.geo, launch_fields["f_split"], launch_fields["programs"]
    per_expert = rank.plan.send_counts[:geo.local_experts].long()  # world 1: rows of each expert
    tiles = int(((per_expert + 63) // 64).sum()) * -(-geo.hidden // geo.block_n)
    slots = min(programs, geo.split_slots, rank.ws.scratch.out_partials.numel() // (64 * geo.block_n))
    parts = 1
    while 2 * parts <= f_split and tiles * 2 * parts <= slots and 2 * parts <= geo.ffn_tiles:
        parts *= 2
    return tiles, parts


@pytest.mark.parametrize("fields", LAUNCH_VARIANTS)
def test_few_gemm2_tiles_split_their_k_loop_in_parts(fields):
    """f_split: a call with few GEMM2 tiles splits each tile's K loop (the FFN's 5 f-tiles of 128)
    in the most parts the programs hold, each part waiting for its own f-tiles of h (4 parts: runs
    of 1, 1, 1 and 2; never 8 parts, which would leave parts without an f-tile, however many
    programs); the last part done sums the parts' partials and sends. Outputs as the
    reference's, the parts counted on every split tile's ticket (this call's epoch, the parts) and
    on no other; partial sums poisoned before each call, so none is read unwritten. Calls of no
    split (too many tiles for the programs), of h rows through TMA and of no tokens between; and
    a workspace with no partial slots (a layer whose launches never split) never splits."""
    cfg = MoEConfig(**{**dict(hidden_size=264, ffn_size=520, num_experts=4, top_k=2, dtype="float32"), **fields})
    unsplit = OneRank(cfg, max_tokens=8)
    x, out = unsplit.forward(1, f_split=8, programs=36)
    assert int(unsplit.status[0]) == 0
    assert rel_err(out, unsplit.reference(x)) <= 1e-5
    rank = OneRank(cfg, max_tokens=90, split_slots=SPLIT_SLOTS)
    tickets = rank.ws.scratch.out_tickets
    seen = set()
    for tokens, f_split, programs, h_tma in [(1, 8, 36, 0), (3, 2, 32, 1), (0, 8, 32, 0), (20, 8, 32, 0),
                                             (5, 4, 9, 0), (90, 8, 32, 0), (2, 8, 32, 1), (1, 8, 128, 0)]:
        rank.ws.scratch.out_partials.fill_(float("nan"))
        epoch = int(rank.ctl[CTL_EPOCH.value])
        fields = dict(f_split=f_split, programs=programs, h_tma=h_tma)
        x, out = rank.forward(tokens, **fields)
        assert int(rank.status[0]) == 0
        if tokens:
            ref = rank.reference(x)
            assert rel_err(out, ref) <= 1e-5
        tiles, parts = split_parts_expected(rank, fields) if tokens else (0, 1)
        now = (tickets >> 8) == epoch
        assert int(now.sum()) == (tiles if parts > 1 else 0)
        if parts > 1:
            assert (tickets[:tiles] == (epoch << 8) + parts).all()
        seen.add(parts)
    assert seen == {1, 2, 4}


def test_static_gemm1_tiles_are_refused_across_ranks_and_between_interpreted_programs():
    geo = Geometry.for_config(MoEConfig(hidden_size=32, ffn_size=32, num_experts=4, top_k=1), 2, 16)
    with pytest.raises(ValueError, match="static_ffn_in=1 at world_size=2"):
        LaunchConfig(programs=2, block_m=64, block_n=geo.block_n, static_ffn_in=1).check(geo)
    with pytest.raises(ValueError, match="h_tma=1 at world_size=2"):
        LaunchConfig(programs=2, block_m=64, block_n=geo.block_n, h_tma=1).check(geo)
    with pytest.raises(ValueError, match="sorted_rows=1 at world_size=2"):
        LaunchConfig(programs=2, block_m=64, block_n=geo.block_n, sorted_rows=1).check(geo)
    cfg = MoEConfig(hidden_size=32, ffn_size=32, num_experts=2, top_k=1, dtype="float32")
    with pytest.raises(ValueError, match="static_ffn_in=1 in the Triton interpreter needs programs=1"):
        OneRank(cfg, max_tokens=8).forward(4, programs=2, static_ffn_in=1)


@pytest.mark.parametrize("span", [3, 128])
def test_combine_span_must_be_a_power_of_two_the_kernel_can_unroll(span):
    cfg = MoEConfig(hidden_size=32, ffn_size=32, num_experts=2, top_k=1, dtype="float32")
    with pytest.raises(ValueError, match=f"combine_span={span}"):
        OneRank(cfg, max_tokens=8).forward(4, combine_span=span)


class PartsScratch(NamedTuple):  # the fields of workspace.Scratch sum_parts reads
    out_partials: torch.Tensor
    out_tickets: torch.Tensor


class PartsMeta(NamedTuple):  # the fields of fused_moe.Meta sum_parts reads
    BM: tl.constexpr
    BN_OUT: tl.constexpr


@triton.jit
def _sum_parts_probe(acc_ptr, valid_ptr, out_ptr, last_ptr, slot, part, parts, epoch, scratch, meta):
    BM: tl.constexpr = meta.BM
    cell = tl.arange(0, BM)[:, None] * meta.BN_OUT + tl.arange(0, meta.BN_OUT)[None, :]
    valid = tl.load(valid_ptr + tl.arange(0, BM)) != 0
    acc, last = sum_parts(tl.load(acc_ptr + cell), valid, slot, part, parts, scratch, epoch, meta)
    tl.store(out_ptr + cell, acc)
    tl.store(last_ptr, last.to(tl.int32))


def test_the_last_part_of_a_split_tile_sums_every_part_in_part_order():
    """sum_parts, a tile's 4 parts run one after another in each of the 24 orders, over a ticket an
    earlier call left (an older epoch, its parts counted): only the part that comes last is told
    so, and it returns every part's partial summed in part order on the valid rows, the same bits
    whatever the order (partials of different magnitudes, so another order would show); the
    others get their own sums back; the ticket ends at this call's epoch and its parts."""
    BM, BN, parts, slot, epoch = 64, 128, 4, 2, 9
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    partials = torch.randn(parts, BM, BN, generator=gen) * 10.0 ** torch.tensor([-3.0, 3.0, 0.0, 2.0])[:, None, None]
    valid = torch.arange(BM) < 37
    expected = ((partials[0] + partials[1]) + partials[2]) + partials[3]
    for order in itertools.permutations(range(parts)):
        scratch = PartsScratch(torch.full((4 * parts * BM * BN,), float("nan")),
                               torch.tensor([0, 0, ((epoch - 1) << 8) + parts, 5], dtype=torch.int64))
        for i, part in enumerate(order):
            out, last = torch.full((BM, BN), float("nan")), torch.zeros(1, dtype=torch.int32)
            _sum_parts_probe[(1,)](partials[part].contiguous(), valid.int(), out, last, slot, part, parts, epoch,
                                   scratch, PartsMeta(tl.constexpr(BM), tl.constexpr(BN)))
            assert int(last) == (i == parts - 1)
            assert torch.equal(out[valid], expected[valid] if i == parts - 1 else partials[part][valid])
        assert scratch.out_tickets.tolist() == [0, 0, (epoch << 8) + parts, 5]


def test_partial_sums_are_sized_only_for_a_launch_override_that_splits():
    """partial_slots, which the flash backend builds its geometry with: 8 MiB of fp32 partial
    sums (and a ticket a slot) when the launch_override asks for a split; none for any other
    layer, whose launches never split (a value of another type is left to LaunchConfig)."""
    assert partial_slots(None) == partial_slots({"stages": 3}) == partial_slots({"f_split": 1}) == 0
    assert partial_slots({"f_split": "2"}) == 0
    assert partial_slots({"f_split": 2}) == SPLIT_SLOTS
    cfg = MoEConfig(hidden_size=32, ffn_size=32, num_experts=2, top_k=1)
    for override, nbytes in [({"f_split": 8}, 8 << 20), (None, 0)]:
        buffers = Geometry.for_config(cfg, 1, 8, partial_slots(override)).local_buffers(torch.bfloat16)
        assert buffers["out_partials"] == ((nbytes // 4,), torch.float32)
        assert buffers["out_tickets"] == ((nbytes // 4 // (64 * 256),), torch.int64)


@pytest.mark.parametrize("f_split", [0, 3, 16])
def test_gemm2_split_must_be_a_power_of_two_up_to_8(f_split):
    cfg = MoEConfig(hidden_size=32, ffn_size=32, num_experts=2, top_k=1, dtype="float32")
    with pytest.raises(ValueError, match=f"f_split={f_split}"):
        OneRank(cfg, max_tokens=8).forward(4, f_split=f_split)


@pytest.mark.parametrize("block_t", [16, 48, 256])
def test_combine_tile_height_must_be_a_power_of_two_up_to_the_expert_tile(block_t):
    cfg = MoEConfig(hidden_size=32, ffn_size=32, num_experts=2, top_k=1, dtype="float32")
    with pytest.raises(ValueError, match=f"block_t={block_t}"):
        OneRank(cfg, max_tokens=8).forward(4, block_m=128, block_t=block_t)


@pytest.mark.parametrize("block_m", [32, 96])
def test_expert_tile_height_must_be_a_power_of_two_multiple_of_the_chunk(block_m):
    cfg = MoEConfig(hidden_size=32, ffn_size=32, num_experts=2, top_k=1, dtype="float32")
    with pytest.raises(ValueError, match=f"block_m={block_m}"):
        OneRank(cfg, max_tokens=8).forward(4, block_m=block_m)


def test_missing_peer_times_out_with_status():
    """Ranks 1 and 2 never run: rank 0's wait for their count words gives up and says which wait
    and the first rank it missed."""
    cfg = MoEConfig(hidden_size=32, ffn_size=32, num_experts=6, top_k=2, dtype="float32")
    rank = OneRank(cfg, max_tokens=16, world=3)
    rank.forward(9, timeout_s=0.05)
    status = rank.status.tolist()
    assert status[:3] == [1, WAIT_COUNTS.value, 1] and status[5] == 1  # (timed out, wait, peer, ..., epoch)
    assert int(rank.ctl[0]) == 2  # the program still left cleanly and opened the next epoch


@pytest.mark.parametrize("shared", [0, 1])
def test_a_call_past_the_last_epoch_runs_no_task_and_says_so_until_restarted(shared):
    """Flags number calls up to EPOCH_LAST (h flags as int32; count words as epoch << 32 in an
    int64): past it they would wrap, and a wait would pass on an earlier call's flag (a count word
    no peer published passed the count wait at epoch 2**31). A launch there computes nothing and names
    why; restart_epochs opens epoch 1 again, every flag and counter zeroed."""
    cfg = MoEConfig(hidden_size=48, ffn_size=80, num_experts=4, top_k=2, dtype="float32", shared_experts=shared)
    rank = OneRank(cfg, max_tokens=40)
    x, out = rank.forward(40, save=True)  # flags and counters of epoch 1 written
    rank.ctl[0] = EPOCH_LAST.value
    x, out = rank.forward(33)
    check_call(rank, cfg, x, out)  # the last call a flag can number runs
    x, out = rank.forward(33)
    assert out.isnan().all()
    assert describe_timeout(rank.status.tolist(), 0) == (
        f"fused MoE kernel on rank 0 computed nothing in call {2**31}: its flags number calls up to {2**31 - 1} (the "
        "layer restarts them before then, except where its forwards are replayed from a CUDA graph the caller "
        "captured, which it cannot count): build the layer again")
    assert rank.ctl.tolist() == [2**31 + 1, 0, 0, 0]  # (rewound all the same)
    rank.status.zero_()
    rank.ws.restart_epochs()
    assert rank.ctl.tolist() == [1, 0, 0, 0]
    ws = rank.ws
    assert not any(t.any() for t in (ws.sym.count_words.local, ws.sym.chunk_flags.local, ws.sym.combine_counts.local,
                                     ws.scratch.h_flags, ws.scratch.shared_h_flags, ws.scratch.shared_y_flags,
                                     ws.scratch.comb_expect, ws.scratch.out_tickets))
    # every integer buffer (flag or counter, a later one too) but the status and ctl words
    words = [getattr(ws.sym, n).local for n in ws.geo.symmetric_buffers(torch.float32)]
    words += [getattr(ws.scratch, n) for n in ws.geo.local_buffers(torch.float32) if n not in ("status", "ctl")]
    assert not any(t.any() for t in words if not t.is_floating_point())
    for tokens in (40, 0, 17, 40):
        x, out = rank.forward(tokens, save=tokens > 0)
        check_call(rank, cfg, x, out)


@pytest.mark.parametrize("peer_rows,wait", [(24, WAIT_CHUNK), (0, WAIT_COMBINE)])
def test_a_peer_that_stops_after_publishing_its_counts_is_named_with_the_wait(peer_rows, wait):
    """Rank 1 announces its rows for this call, then never runs: rank 0 gives up waiting for the
    rows it announced (peer_rows > 0), or, if it announced none, for the expert outputs rank 0's
    tokens should get back from it; either way the status word names the wait and rank 1, and the
    kernel still leaves with the next epoch open."""
    cfg = MoEConfig(hidden_size=32, ffn_size=32, num_experts=4, top_k=2, dtype="float32")
    rank = OneRank(cfg, max_tokens=24, world=2)
    rank.peer_published(1, peer_rows)
    rank.forward(24, timeout_s=0.05)
    status = rank.status.tolist()
    assert status[:3] == [1, wait.value, 1] and status[5] == 1
    assert rank.ctl.tolist() == [2, 0, 0, 0]


class ProbeDims(NamedTuple):  # the fields of fused_moe.Dims the tile decode reads
    world: int
    local_experts: int


class ProbeMeta(NamedTuple):  # the fields of fused_moe.Meta the tile decode reads
    BM: tl.constexpr
    CHUNK: tl.constexpr
    W_POW2: tl.constexpr
    L_POW2: tl.constexpr


@triton.jit
def _expert_tile_probe(q_ptr, words, out_ptr, dims, meta):
    BM: tl.constexpr = meta.BM
    q = tl.load(q_ptr + tl.program_id(0))
    t = expert_tile(q, tile_table(words, dims, meta), dims.world, meta)
    i = tl.arange(0, BM)
    base = out_ptr + tl.program_id(0) * 4 * BM
    tl.store(base + i, tl.where(t.valid, t.src, -1))
    tl.store(base + BM + i, tl.where(t.valid, t.row, -1))
    tl.store(base + 2 * BM + i, tl.where(t.valid, t.chunk, -1))
    tl.store(base + 3 * BM + i, tl.where(t.valid, t.e, -1))


def expected_expert_tiles(counts, BM, CHUNK):
    """counts [W, L] -> per expert tile: rows (src, row in src region, chunk), expert by expert."""
    W, L = counts.shape
    tiles = []
    for e in range(L):
        rows = []
        for s in range(W):
            region = sum(-(-int(counts[s, e2]) // CHUNK) * CHUNK for e2 in range(e))
            rows += [(s, region + r, r // CHUNK) for r in range(int(counts[s, e]))]
        tiles += [(e, rows[i:i + BM]) for i in range(0, len(rows), BM)]
    return tiles


@pytest.mark.parametrize("W,L", [(1, 4), (3, 5), (4, 2), (8, 3)])
@pytest.mark.parametrize("BM", [8, 16, 32])
def test_expert_tiles_gather_rows_across_sources(W, L, BM):
    """The tile decode covers every received row exactly once, expert by expert, source by source,
    for tiles smaller than, equal to and larger than the dispatch chunk."""
    CHUNK = 16
    counts = torch.randint(0, 40, (W, L))
    counts[0, 0] = 0  # an empty pair
    words = (torch.full((W, L), 7, dtype=torch.int64) << 32) | counts
    tiles = expected_expert_tiles(counts, BM, CHUNK)
    q = torch.arange(len(tiles), dtype=torch.int32)
    out = torch.full((len(tiles), 4, BM), -2, dtype=torch.int32)
    c = tl.constexpr
    meta = ProbeMeta(c(BM), c(CHUNK), c(triton.next_power_of_2(W)), c(triton.next_power_of_2(L)))
    _expert_tile_probe[(len(tiles),)](q, words, out, ProbeDims(W, L), meta)
    for t, (e, rows) in enumerate(tiles):
        got = [tuple(out[t, :3, i].tolist()) for i in range(len(rows))]
        assert got == rows
        assert (out[t, 3, :len(rows)] == e).all() and (out[t, 0, len(rows):] == -1).all()


def rank_runs_whole_kernel(rank, world, cfg_dict, max_tokens, bufs, weights, inputs, launch_fields):
    """One rank of the fused kernel in this process; weights: every full weight by name;
    launch_fields: LaunchConfig's fields besides block_n (one program unless given); odd calls save
    GEMM1's outputs (Saved, room for every row any source could send) -> [(rel err, status,
    epoch, None or (what it sent: x and its plan's send_slot, pos_start, send_counts, slot_w),
    saved.pre, saved.shared_pre), GEMM2 tiles split in parts (tickets at the call's epoch))]."""
    cfg = MoEConfig.from_dict(cfg_dict)
    geo = Geometry.for_config(cfg, world, max_tokens, partial_slots(launch_fields))
    ws = Workspace.allocate(geo, cfg.torch_dtype, "p2p", "cpu", RankBuffers(bufs, rank))
    L = geo.local_experts
    mine = slice(rank * L, (rank + 1) * L)
    experts = kernel_weights(weights, cfg, mine)
    router = {name: t for name, t in weights.items() if name in ("router_bias", "e_score_correction_bias")}
    positions = ExpertPlacement.contiguous(cfg.num_experts, world).positions()
    launch = LaunchConfig(**{"programs": 1, "block_n": geo.block_n, **launch_fields})
    results = []
    f_in, fs_in = cfg.ffn_in_size, cfg.shared_ffn_in_size
    for call, x in enumerate(inputs[rank]):
        r = route(x, weights["router_weight"], cfg, **router)
        plan, _ = routing_plan(r, positions, geo, geo.send_order(rank), ws.scratch.comb_expect)
        out = torch.full_like(x, float("nan"))
        saved = None
        if call % 2:
            saved = Saved(torch.full((world * max_tokens * min(cfg.top_k, L), f_in), float("nan")),
                          torch.full((len(x), fs_in), float("nan")))
        call_epoch = int(ws.scratch.ctl[CTL_EPOCH.value])
        launch_fused(x, out, experts, plan, ws, launch, config=cfg, rank=rank, timeout_s=120.0, saved=saved)
        ref = routed_reference(x, r, weights, cfg)
        sent = (x, plan.send_slot, plan.pos_start, plan.send_counts, plan.slot_w)
        results.append((rel_err(out, ref) if len(x) else 0.0, int(ws.scratch.status[0]), int(ws.scratch.ctl[0]),
                        saved and (sent, *saved), int(((ws.scratch.out_tickets >> 8) == call_epoch).sum())))
    return results


@pytest.mark.parametrize("world,top_k,activation,block_m,variant", [
    (2, 2, "swiglu", 64, {}), (2, 3, "relu", 128, {}), (3, 1, "gelu", 64, {}),
    (2, 2, "clamped_swiglu", 64, dict(expert_bias=True, weight_on_input=True, routing="topk_sigmoid",
                                      renormalize=False)),
    (3, 2, "swiglu", 64, dict(shared_experts=1, shared_expert_gate=True, shared_ffn_size=40)),
    (2, 2, "swiglu", 64, dict(hidden_size=320, combine_span=2)), (4, 2, "swiglu", 64, {}),
    (8, 2, "swiglu", 64, {}), (2, 2, "swiglu", 64, dict(ffn_size=512, f_split=4, programs=16))])
def test_whole_kernel_across_ranks_in_processes(dist_pools, world, top_k, activation, block_m, variant):
    """The multi-rank protocol (counts, dispatch to peers, tiles across sources, combine counters,
    epochs) with each rank's kernel in its own process, on shared-memory 'symmetric' buffers; and
    the expert variants whose rows are scaled before they are sent (weight_on_input), shared
    experts computed beside the routed ones, combine tasks of two column tiles (of 3), and GEMM2
    tiles split over the FFN in parts (f_split; the rule of test_few_gemm2_tiles_split_their_k_loop_in_parts)
    before their rows go back; up to 8 ranks, a node's worth (each sending to every peer, ranks
    with no tokens in some calls)."""
    variant = dict(variant)
    launch_fields = {"block_m": block_m, **{name: variant.pop(name) for name in ("combine_span", "f_split", "programs")
                                            if name in variant}}
    cfg = MoEConfig(**{**dict(hidden_size=32, ffn_size=48, num_experts=2 * world, top_k=top_k,
                              activation=activation, dtype="float32"), **variant})
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    H = cfg.hidden_size
    weights = {name: torch.randn(shape, generator=gen) / shape[-2 if len(shape) > 1 else -1] ** 0.5
               for name, shape in cfg.weight_shapes().items()}
    calls = [[37, 0, 40, 9], [5, 40, 0, 9], [19, 3, 1, 9], [0, 12, 40, 2], [8, 1, 0, 33], [40, 40, 2, 0], [1, 7, 13, 1],
             [22, 0, 6, 40]][:world]  # per rank, 4 epochs; zeros too
    inputs = [[torch.randn(t, H, generator=gen) for t in ts] for ts in calls]
    bufs = symmetric_copies(Geometry.for_config(cfg, world, 40), cfg.torch_dtype, shared_memory=True)
    results = dist_pools(world).run(rank_runs_whole_kernel, cfg.to_dict(), 40, bufs, weights, inputs,
                                    launch_fields)
    for rank_results in results:
        assert [(status, epoch) for _, status, epoch, _, _ in rank_results] == [(0, 2), (0, 3), (0, 4), (0, 5)]
        assert max(err for err, _, _, _, _ in rank_results) <= 1e-5
        assert (sum(split for *_, split in rank_results) > 0) == ("f_split" in launch_fields)
    for call in (1, 3):  # the calls that saved GEMM1's outputs: each rank's rows, in its experts' order
        sent = [rank_results[call][3][0] for rank_results in results]
        for dest, rank_results in enumerate(results):
            _, pre, shared_pre = rank_results[call][3]
            want = expected_pre(cfg, weights, dest, sent)
            if len(want):
                assert rel_err(pre[:len(want)], want) <= 1e-5
            assert pre[len(want):].isnan().all()
            if cfg.shared_experts and len(sent[dest][0]):
                assert rel_err(shared_pre, expected_shared_pre(cfg, weights, sent[dest][0])) <= 1e-5


def test_nvshmem_modules_are_initialised_only_when_loaded_for_that_transport(monkeypatch):
    """Triton reports each module it loads; only one loaded inside nvshmem_launch() (the kernel of
    transport 'nvshmem', on its first launch) gets nvshmemx_cumodule_init, and a failure raises."""
    calls = []
    bindings = types.SimpleNamespace(cumodule_init=lambda m: calls.append(m) or 0)
    monkeypatch.setitem(sys.modules, "nvshmem", types.SimpleNamespace(bindings=bindings))
    monkeypatch.setitem(sys.modules, "nvshmem.bindings", bindings)
    hooks = []
    monkeypatch.setattr(triton.knobs.runtime, "kernel_load_end_hook", types.SimpleNamespace(add=hooks.append))
    monkeypatch.setattr(transport, "_module_hook_installed", False)
    with transport.nvshmem_launch():
        (hook,) = hooks
        hook(0x1000, None, "fused_moe_kernel", {}, "h1")
        hook(0x2000, None, "fused_moe_kernel", {}, "h2")  # one load per launch: not this one
    hook(0x3000, None, "fused_moe_kernel", {}, "h3")  # a p2p kernel
    assert calls == [0x1000]
    bindings.cumodule_init = lambda m: 7
    with pytest.raises(RuntimeError, match="nvshmemx_cumodule_init failed"), transport.nvshmem_launch():
        hook(0x4000, None, "fused_moe_kernel", {}, "h4")
    assert len(hooks) == 1  # installed once


def test_nvshmem_transport_heap_adds_a_staging_row_per_token_slot():
    cfg = MoEConfig(hidden_size=256, ffn_size=128, num_experts=8, top_k=2)
    geo = Geometry.for_config(cfg, 4, 1000)
    p2p, nv = geo.symmetric_buffers(torch.bfloat16), geo.symmetric_buffers(torch.bfloat16, "nvshmem")
    assert set(nv) - set(p2p) == {"send_x"} and nv["send_x"] == ((1000 * 2, 256), torch.bfloat16)
    assert all(dtype == torch.int64 for name, (_, dtype) in p2p.items() if "count" in name or "flag" in name)


@pytest.mark.parametrize("fields", [dict(top_k=2, num_experts=8, expert_bias=True),
                                    dict(top_k=2, num_experts=8, activation="clamped_swiglu", expert_bias=True,
                                         routing="topk_softmax", router_bias=True),
                                    dict(top_k=1, num_experts=4, weight_on_input=True, routing="topk_sigmoid",
                                         renormalize=False),
                                    dict(top_k=3, num_experts=8, weight_on_input=True, expert_bias=True),
                                    dict(top_k=10, num_experts=16),
                                    dict(top_k=3, num_experts=8, routing="sigmoid_grouped", n_group=4, topk_group=2,
                                         routed_scaling_factor=2.5),
                                    dict(top_k=2, num_experts=8, routing="topk_softmax", router_bias=True),
                                    dict(top_k=2, num_experts=4, ffn_size=200, expert_bias=True, shared_experts=1,
                                         shared_ffn_size=136),
                                    dict(top_k=2, num_experts=4, ffn_size=136, activation="clamped_swiglu",
                                         expert_bias=True, shared_experts=1, shared_ffn_size=200)])
def test_whole_kernel_with_every_routing_and_expert_variant(fields):
    """The kernel takes whatever the router picked (up to 16 experts a token, weights that need not
    sum to 1) and the expert variants: biases, gpt-oss's clamped SwiGLU, the weight on the input;
    and expert widths past one 128-column tile, not a multiple of it (gate/up pairs of 8)."""
    cfg = MoEConfig(**{"hidden_size": 40, "ffn_size": 48, "dtype": "float32", **fields})
    rank = OneRank(cfg, max_tokens=30)
    for tokens in (30, 7):
        x, out = rank.forward(tokens)
        assert int(rank.status[0]) == 0
        ref = rank.reference(x)
        assert rel_err(out, ref) <= 1e-5


def _random_config(rng: random.Random) -> MoEConfig:
    """A config drawn from what MoEConfig takes: sizes off the tiles (multiples of 8, as the
    kernel's rows must be), 1-17 experts, top-k up to 8, every activation and routing, and each
    option (router bias, capacity, expert biases, weight on input, shared experts) by chance."""
    while True:
        experts, routing = rng.randint(1, 17), rng.choice(ROUTINGS)
        fields = dict(hidden_size=8 * rng.randint(3, 25), ffn_size=8 * rng.randint(1, 25), num_experts=experts,
                      top_k=rng.randint(1, min(8, experts)), dtype="float32", routing=routing,
                      activation=rng.choice(ACTIVATIONS),
                      router_bias=rng.random() < 0.3, expert_bias=rng.random() < 0.3,
                      weight_on_input=rng.random() < 0.3,
                      capacity_factor=rng.choice([None, None, 0.3, 0.6, 1.3]))
        if routing == "sigmoid_grouped":
            groups = rng.choice([g for g in range(1, experts + 1) if experts % g == 0])
            fields.update(n_group=groups, topk_group=rng.randint(1, groups))
        if rng.random() < 0.3:
            fields.update(shared_experts=rng.randint(1, 2), shared_ffn_size=8 * rng.randint(1, 20),
                          shared_expert_gate=rng.random() < 0.5)
        try:
            return MoEConfig(**fields)
        except ValueError:  # a combination the config refuses (a grouping top-k cannot fill): draw again
            continue


def _random_launch(rng: random.Random, geo: Geometry, top_k_1: bool) -> dict:
    """One of launch_variants' launches for a few programs, its tile sizes, depth, order and
    variants redrawn among those LaunchConfig.check takes for geo."""
    while True:
        programs = rng.choice([1, 2, 5, 16])
        fields = dataclasses.asdict(rng.choice(launch_variants(geo, torch.float32, programs)))
        fields.update(block_m=rng.choice([64, 128]), block_n=rng.choice([128, 256]), stages=rng.randint(1, 4),
                      group=rng.choice([1, 2, 8]), combine_span=rng.choice([1, 2, 4]),
                      f_split=rng.choice([1, 1, 2, 4]), h_tma=int(rng.random() < 0.4),
                      sorted_rows=int(rng.random() < 0.4), direct_out=int(top_k_1 and rng.random() < 0.5),
                      dispatch_programs=rng.randint(1, programs))
        fields["block_t"] = rng.choice([t for t in (32, 64, 128) if t <= fields["block_m"]])
        if fields["static_ffn_in"]:  # (the interpreter runs programs one after another: one program)
            fields.update(programs=1, dispatch_programs=1)
        try:
            LaunchConfig(**fields).check(geo)
            return fields
        except ValueError:
            continue


@pytest.mark.parametrize("draw", range(4))
def test_a_random_config_and_launch_match_the_reference_each_run(draw):
    """Drawn afresh every run (the seed printed): a config, a geometry with or without split GEMM2
    tiles, and three calls of random token counts (0 and 1 among them) under random launches,
    training forwards among them; out matches the float64 reference and a training forward's
    saved GEMM1 outputs match the reference's, written nowhere past the kept rows."""
    rng = random.Random(fresh_seed())
    cfg = _random_config(rng)
    max_tokens = rng.choice([1, 7, 33, 65, 130])
    rank = OneRank(cfg, max_tokens=max_tokens, split_slots=rng.choice([0, SPLIT_SLOTS]))
    for _ in range(3):
        tokens = rng.choice([0, 1, max_tokens, rng.randint(0, max_tokens)])
        launch, save = _random_launch(rng, rank.geo, cfg.top_k == 1 and not cfg.shared_experts), rng.random() < 0.5
        rank.ws.sym.recv_x.local.fill_(float("nan"))  # (sorted rows are copied there: none stale)
        x, out = rank.forward(tokens, save=save, addressed=rng.random() < 0.3, **launch)
        assert int(rank.status[0]) == 0, (cfg, launch)
        if tokens == 0:
            continue
        ref = rank.reference(x)
        assert (rel_err(out, ref) <= 1e-5) if ref.norm() else out.abs().max() == 0, (cfg, launch)
        if save:
            p = rank.plan
            pre = expected_pre(cfg, rank.weights, 0, [(x, p.send_slot, p.pos_start, p.send_counts, p.slot_w)])
            assert pre.norm() == 0 or rel_err(rank.saved.pre[:len(pre)], pre) <= 1e-5, (cfg, launch)
            assert rank.saved.pre[len(pre):].isnan().all(), (cfg, launch)


@pytest.mark.parametrize("fields", [dict(shared_experts=1), dict(shared_experts=2, shared_ffn_size=24,
                                                                 shared_expert_gate=True, activation="gelu"),
                                    dict(shared_experts=1, shared_expert_gate=True, routing="sigmoid_grouped",
                                         n_group=2, topk_group=1, routed_scaling_factor=2.5)])
@pytest.mark.parametrize("block_m,block_n", [(64, 128), (128, 256)])
def test_shared_experts_are_tasks_of_the_kernel(fields, block_m, block_n):
    """The shared experts' FFN (and its gate) over this rank's tokens runs as tasks of the same
    launch, and the combine adds it; calls of either tile size share the epoch-tagged flags."""
    cfg = MoEConfig(hidden_size=384, ffn_size=48, num_experts=8, top_k=2, dtype="float32", **fields)
    rank = OneRank(cfg, max_tokens=150)
    for tokens in (150, 33, 0, 77):
        x, out = rank.forward(tokens, block_m=block_m, block_n=block_n, programs=2)
        assert int(rank.status[0]) == 0
        if tokens:
            ref = rank.reference(x)
            assert rel_err(out, ref) <= 1e-5


def _flash_backend_over(layer, rank: OneRank, override: dict | None) -> FlashBackend:
    """A FlashBackend of `layer` whose workspace is rank's (one rank, no GPU): what _launch reads."""
    backend = object.__new__(FlashBackend)
    backend.__dict__.update(
        layer=layer, geo=rank.geo, ws=rank.ws, send_order=rank.geo.send_order(0, "cpu"), programs=1, resident=True,
        trace=None, failed=None, rt=types.SimpleNamespace(failed=None),
        options=types.SimpleNamespace(launch_override=override, timeout_s=1.0),
        status_host=torch.zeros_like(rank.ws.scratch.status), status_ready=types.SimpleNamespace(record=lambda s: None),
        io=torch.zeros(2, dtype=torch.int64))
    return backend


def test_a_launch_refused_before_its_routing_plan_leaves_the_layer_usable():
    """An override the call's launch refuses is checked before the routing plan adds the call's
    rows to the counts later launches wait for: the next launch runs, right."""
    cfg = MoEConfig(hidden_size=32, ffn_size=32, num_experts=2, top_k=1, dtype="float32", activation="relu")
    layer = MoELayer(cfg, seed=random.randrange(2**31))  # backend torch: its router and weights
    rank = OneRank(cfg, max_tokens=16)
    backend, x = _flash_backend_over(layer, rank, {"block_t": 3}), torch.randn(8, 32)
    with pytest.raises(ValueError, match="block_t=3"):
        backend._launch(x, "the caller's stream")
    assert backend.failed is None and not rank.ws.scratch.comb_expect.any()
    backend.options.launch_override = None
    ref = layer(x)
    out, _, _ = backend._launch(x, "the caller's stream")
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    out, _, saved = backend._launch(x, "the caller's stream", saving=((8, cfg.ffn_in_size), None))  # a training one
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5 and saved.pre.shape == (8, cfg.ffn_in_size)


def test_a_call_past_the_last_epoch_publishes_no_count_to_its_peers():
    """It waits for nothing, so the call after it could overwrite the parity slot a peer still
    reads for the last numbered call (this rank two calls ahead) with a wrapped epoch (a review
    showed 0x7fffffff00000007 become 0x800000010000000d). The count words stay as they were."""
    cfg = MoEConfig(hidden_size=48, ffn_size=80, num_experts=4, top_k=2, dtype="float32")
    rank = OneRank(cfg, max_tokens=40, world=2)
    peer_words = rank.ws.allocator.scratch["count_words"]  # what rank 0 writes into rank 1's
    peer_words[1, 0] = (EPOCH_LAST.value << 32) | 7  # rank 1 still reads its last numbered call
    before = peer_words.clone()
    for epoch in (EPOCH_LAST.value + 1, EPOCH_LAST.value + 2):
        rank.status.zero_()
        rank.ctl[0] = epoch
        rank.forward(33)
        assert describe_timeout(rank.status.tolist(), 0).startswith(f"fused MoE kernel on rank 0 computed nothing "
                                                                    f"in call {epoch}")
        assert torch.equal(peer_words, before)


def test_the_backend_restarts_the_call_numbers_every_epoch_restart_forwards(monkeypatch):
    """FlashBackend counts the forwards that reach it outside a capture; before the one past
    EPOCH_RESTART (EPOCH_LAST: as many as a flag can number) it checks that no rank's launch
    failed, waits for every rank (a barrier after the device's queued work), zeroes the flags and
    opens call number 1, then waits again. The outputs stay right across restarts."""
    cfg = MoEConfig(hidden_size=32, ffn_size=48, num_experts=4, top_k=2, dtype="float32")
    layer = MoELayer(cfg, seed=fresh_seed())  # backend torch: its router and weights
    rank = OneRank(cfg, max_tokens=16)
    backend, barriers = _flash_backend_over(layer, rank, None), []
    backend.__dict__.update(rt=types.SimpleNamespace(failed=None, barrier=lambda: barriers.append(int(rank.ctl[0]))),
                            heap=types.SimpleNamespace(freed=False), last_stream=None, device_index=0, forwards=0,
                            status_ready=types.SimpleNamespace(query=lambda: False, record=lambda s: None))
    assert FlashBackend.EPOCH_RESTART == EPOCH_LAST.value
    backend.EPOCH_RESTART = 3
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "the caller's stream")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    epochs = []
    for tokens in (16, 5, 16, 0, 9, 16, 16, 3):
        x = torch.randn(tokens, 32)
        with torch.no_grad():
            out, _, _ = backend._launch(x, backend._before_forward())
            if tokens:
                assert rel_err(out, layer(x)) <= 1e-5
        epochs.append(int(rank.ctl[0]))  # the next call's number
    assert epochs == [2, 3, 4, 2, 3, 4, 2, 3]
    assert barriers == [4, 1, 4, 1]  # around each restart: the flags zeroed in between
    # A failed launch before a restart raises first (every rank, once they have compared), where a
    # rank raising alone would leave the others in the barrier: nothing zeroed, no barrier entered.
    backend.forwards = 3
    rank.status[:6] = torch.tensor([1, WAIT_COUNTS.value, 1, -1, -1, 3])
    flags = [t.clone() for t in (rank.ctl, rank.ws.scratch.comb_expect, rank.ws.sym.chunk_flags.local)]
    with pytest.raises(FusedKernelError, match="timed out in call 3 waiting for count words"):
        backend._before_forward()
    assert barriers == [4, 1, 4, 1] and int(rank.ctl[0]) == 3
    assert all(torch.equal(a, b) for a, b in zip(flags, (rank.ctl, rank.ws.scratch.comb_expect,
                                                          rank.ws.sym.chunk_flags.local)))


@pytest.mark.parametrize("world,refused,launched,failed", [(2, None, [0], None), (2, "weights", [], "w_in is (1, 2)"),
                                                         (2, "launch", [0], "block_t=3"), (1, None, [], None),
                                                         (1, "weights", [], None)])
def test_a_forward_refused_under_no_grad_serves_the_peers_unless_it_cannot(world, refused, launched, failed):
    """Under no_grad the peers of a rank whose forward is refused were not told: its kernel runs
    with no tokens of its own, so the rows they sent its experts are computed. Where an expert
    weight is wrong it cannot (it routed with, and read, those weights: a wrong shape raised there,
    in place of the forward's error), nor where that launch is refused: its peers end at timeout_s,
    and the layer is failed here, naming why. Its error is raised either way. At world 1 there is
    no peer to serve: nothing is launched."""
    cfg = MoEConfig(hidden_size=32, ffn_size=32, num_experts=2 * world, top_k=1)
    wrong = ValueError("w_in is (1, 2) torch.bfloat16 on cpu; this layer's is ..")
    asked = []

    def weights_problem(names):
        asked.append(names)
        return wrong if refused == "weights" else None

    def launch(x, stream):
        launches.append(x.shape[0])
        if refused == "launch":
            raise ValueError("block_t=3: expected a power of two")

    layer = types.SimpleNamespace(world_size=world, rank=world - 1, config=cfg, device=torch.device("cpu"),
                                  _weights_problem=weights_problem)
    backend, launches = object.__new__(FlashBackend), []
    backend.__dict__.update(layer=layer, geo=Geometry.for_config(cfg, world, 8), failed=None,
                            rt=types.SimpleNamespace(failed=None), _before_forward=lambda: "the caller's stream",
                            _launch=launch)
    error = wrong if refused == "weights" else ValueError("x has 9 tokens; max_tokens_per_rank=8")
    with pytest.raises(ValueError) as raised:
        backend.forward(torch.randn(9, 32), error)
    assert raised.value is error and launches == launched
    assert asked == ([EXPERT_WEIGHTS] if world > 1 else [])  # only the weights that compute the peers' rows
    assert backend.rt.failed == backend.failed
    if failed is None:
        assert backend.failed is None
    else:
        assert f"rank 1: its forward was refused ({error})" in backend.failed and failed in backend.failed


@pytest.mark.parametrize("world", [1, 2])
def test_a_launch_refused_after_its_routing_plan_marks_the_layer_failed_naming_why(world):
    """A launch whose arguments are refused once the plan has added its rows (a strided w_out
    here, which the layer's own check refuses before any of this) left the counts ahead of what
    would arrive: the next correct forward waited for rows that never came until timeout_s.
    The layer is marked failed instead, naming the cause (FusedKernelError at its next forward).
    So is the runtime where peers' kernels wait for this rank's rows (world > 1: teardown stays
    local); at world 1 nothing waits, and its heaps are freed as usual (a tuning setting whose
    kernel does not fit the GPU leaves the other settings' layers to be freed)."""
    cfg = MoEConfig(hidden_size=32, ffn_size=32, num_experts=2, top_k=1, dtype="float32", activation="relu")
    layer = MoELayer(cfg, seed=random.randrange(2**31))
    object.__setattr__(layer, "world_size", world)  # what the refusal reads of the layer's ranks
    rank = OneRank(cfg, max_tokens=16)
    backend = _flash_backend_over(layer, rank, None)
    layer.w_out = torch.nn.Parameter(layer.w_out.detach().transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="w_out: expected a contiguous tensor"):
        backend._launch(torch.randn(8, 32), "the caller's stream")
    assert rank.ws.scratch.comb_expect.any()  # the plan had added its rows
    with pytest.raises(FusedKernelError, match="refused after its routing plan was made.*w_out: expected a contig"):
        backend.raise_if_failed(block=False)
    assert backend.rt.failed == (backend.failed if world > 1 else None)
