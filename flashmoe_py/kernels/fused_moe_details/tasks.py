"""The fused kernel's expert tiles and task helpers: the call's expert tiles from the count words
(TileTable, ExpertTile), the grouped order of tile tasks, the tile a GEMM2 task leaves to count
(PendingTile), and each task's trace stamps and timeout report. The queues' numbering itself is
kernels/fused_moe.py's."""

from typing import NamedTuple

import triton
import triton.language as tl

from ..layout import (CTL_COMPUTE_TASKS, CTL_FRONT_TASKS, QUEUES_CLOSED, STATUS_EPOCH, STATUS_EXPERT, STATUS_FAILED,
                      STATUS_PEER, STATUS_TILE, STATUS_WAIT, TRACE_COLS)
from ..transport import clock_ns


class TileTable(NamedTuple):
    """This call's expert tiles, from the count words (tile_table): counts [W_POW2, L_POW2] int32
    rows each source sends each local expert; tiles [L_POW2] BM-row tiles of each expert; cum their
    inclusive prefix sum (tiles are numbered expert by expert); first [W_POW2, L_POW2] each pair's
    first row in its expert's numbering (rows numbered source by source); region [W_POW2, L_POW2]
    each pair's offset in its source's region (pairs CHUNK-aligned, expert by expert)."""

    counts: tl.tensor
    tiles: tl.tensor
    cum: tl.tensor
    first: tl.tensor
    region: tl.tensor


class ExpertTile(NamedTuple):
    """One BM-row expert tile (expert_tile): local expert e, its tile index c within e, per
    source [W_POW2] the rows of e it sent (per_src) and the first of them in e's numbering; per
    row [BM]: source rank, row in that source's region, row within the (source, e) pair and its
    CHUNK-chunk, valid; base: the rows of the experts before e (Saved numbers e's rows from
    there)."""

    e: tl.tensor
    c: tl.tensor
    per_src: tl.tensor
    first: tl.tensor
    src: tl.tensor
    row: tl.tensor
    pair_row: tl.tensor
    chunk: tl.tensor
    valid: tl.tensor
    base: tl.tensor


class PendingTile(NamedTuple):
    """A GEMM2 tile whose rows are sent but not yet counted at their sources (count_tile_rows):
    ExpertTile's e, c, per_src, first, and its GEMM2 column tile n; none while e < 0."""

    e: tl.tensor
    c: tl.tensor
    per_src: tl.tensor
    first: tl.tensor
    n: tl.tensor


@triton.jit
def stamp(trace_ptr, row, kind, start, ready, done, TRACE: tl.constexpr):
    """Trace row `row` := (this program, kind, start, ready, done, now) when tracing."""
    if TRACE:
        p = trace_ptr + row.to(tl.int64) * TRACE_COLS
        tl.store(p, tl.program_id(0).to(tl.int64))
        tl.store(p + 1, tl.cast(kind, tl.int64))
        tl.store(p + 2, start)
        tl.store(p + 3, ready)
        tl.store(p + 4, done)
        tl.store(p + 5, clock_ns())


@triton.jit
def report_timeout(scratch, wait, pe, expert, tile, epoch):
    """status := [1, wait, peer rank, local expert, tile, epoch] (layout.STATUS_*); the first
    timeout wins, and closes both task queues (every later take from their counters is past the
    end), so programs stop taking tasks without reading the status word for each."""
    status = scratch.status
    if tl.atomic_cas(status + STATUS_FAILED, tl.cast(0, tl.int64), tl.cast(1, tl.int64), sem="relaxed") == 0:
        tl.store(status + STATUS_WAIT, wait)
        tl.store(status + STATUS_PEER, pe)
        tl.store(status + STATUS_EXPERT, expert)
        tl.store(status + STATUS_TILE, tile)
        tl.store(status + STATUS_EPOCH, epoch)
        tl.atomic_add(scratch.ctl + CTL_FRONT_TASKS, QUEUES_CLOSED, sem="relaxed")
        tl.atomic_add(scratch.ctl + CTL_COMPUTE_TASKS, QUEUES_CLOSED, sem="relaxed")


@triton.jit
def grouped(t, rows, cols, GROUP: tl.constexpr):
    """Task t of a rows x cols grid of tiles -> (row, col), taking GROUP rows at a time column by
    column: programs running side by side share a few row tiles and a few weight tiles in L2,
    instead of every program streaming a different slice of an expert's weights from HBM."""
    first = (t // (GROUP * cols)) * GROUP
    size = tl.minimum(rows - first, GROUP)
    r = t - first * cols
    return first + r % size, r // size


@triton.jit
def _count_table(words, W, L, W_POW2: tl.constexpr, L_POW2: tl.constexpr):
    """[W_POW2, L_POW2] int32 rows each source sends to each local expert (count words, acquired)."""
    src = tl.arange(0, W_POW2)[:, None]
    e = tl.arange(0, L_POW2)[None, :]
    m = (src < W) & (e < L)
    return (tl.load(words + src * L + e, mask=m, other=0, volatile=True) & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def tile_table(words, dims, meta):
    """The count words (acquired) -> this call's TileTable, which each program keeps in registers."""
    BM: tl.constexpr = meta.BM
    CHUNK: tl.constexpr = meta.CHUNK
    counts = _count_table(words, dims.world, dims.local_experts, meta.W_POW2, meta.L_POW2)
    tiles = (tl.sum(counts, axis=0) + BM - 1) // BM
    padded = (counts + CHUNK - 1) // CHUNK * CHUNK
    return TileTable(counts, tiles, tl.cumsum(tiles, 0), tl.cumsum(counts, 0) - counts,
                     tl.cumsum(padded, 1) - padded)


@triton.jit
def _expert_sources(q, table, L_POW2: tl.constexpr):
    """Expert tile q of a TileTable -> (local expert e, tile index c within e, and per source
    rank [W_POW2]: rows of e it sent, the first of them in e's numbering, their offset in its
    region)."""
    e_idx = tl.arange(0, L_POW2)
    e = tl.sum((table.cum <= q).to(tl.int32))
    pick = e_idx == e
    c = q - tl.sum(tl.where(pick, table.cum - table.tiles, 0))
    per_src = tl.sum(tl.where(pick[None, :], table.counts, 0), axis=1)
    first = tl.sum(tl.where(pick[None, :], table.first, 0), axis=1)
    region = tl.sum(tl.where(pick[None, :], table.region, 0), axis=1)
    return e, c, per_src, first, region


@triton.jit
def expert_tile(q, table, W, meta):
    """Expert tile q (BM rows) of a TileTable -> its ExpertTile."""
    BM: tl.constexpr = meta.BM
    e, c, per_src, first, region = _expert_sources(q, table, meta.L_POW2)
    j = c * BM + tl.arange(0, BM)
    valid = j < tl.sum(per_src)
    s_idx = tl.arange(0, meta.W_POW2)[None, :]
    src = tl.sum(((first[None, :] <= j[:, None]) & (s_idx < W)).to(tl.int32), axis=1) - 1
    pick = s_idx == src[:, None]
    r = j - tl.sum(tl.where(pick, first[None, :], 0), axis=1)
    row = tl.sum(tl.where(pick, region[None, :], 0), axis=1) + r
    base = tl.sum(tl.where(tl.arange(0, meta.L_POW2) < e, tl.sum(table.counts, axis=0), 0))
    return ExpertTile(e, c, per_src, first, src, row, r, r // meta.CHUNK, valid, base)
