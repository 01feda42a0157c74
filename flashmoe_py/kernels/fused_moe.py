"""The persistent fused MoE kernel: dispatch -> expert FFN -> combine in one launch per GPU.

Work is two queues of tasks per GPU, each taken in increasing order from its atomic counter:

    front:   [publish counts] [dispatch chunk ...]
    compute: [ffn_in tile ...] [ffn_out tile ...] [combine tile ...]

The first DISPATCH_PROGRAMS programs take front tasks until none are left, then join the others on
the compute queue; the rest start on it at once, so expert tiles whose rows have arrived are
computed while later chunks are still on their way. Sources send chunks expert by expert
(the routing plan's order, kernels/plan.py), which is the order destinations take their expert
tiles in.

  publish counts  tell every destination how many rows of each of its experts this rank sends;
  dispatch_chunk  copy up to CHUNK token rows of one (destination, expert) pair into the destination's
                  receive slots, then raise that chunk's arrival flag there;
  ffn_in_tile     BM rows of one local expert, gathered across source regions, once their chunks
                  have arrived: h = act(x_rows @ w_in[e][:, f-tile]) -> h_buf;
  ffn_out_tile    y = h_rows @ w_out[e][:, n-tile], streaming over f-tiles as their flags rise,
                  written straight into each row's source rank, whose per-chunk row counters a
                  program bumps one tile later (count_tile_rows): after its next tile's GEMM, so
                  the rows drain over NVLink while it computes, or before it takes a combine tile;
  combine_tile    for BT of this rank's tokens and one n-tile: wait for its k expert rows, weighted sum.

An expert's tiles span all sources, so its weights are read once per BM rows it received in all,
not once per source.

Deadlock freedom: front tasks wait on nothing, and some program takes them from the start; a compute
task waits only on front tasks (here or on other GPUs), on compute tasks with smaller ids here, or
on tasks of other GPUs that wait only on smaller phases there; ids are handed out in order, so a
waited-on task has already been taken by a running program. Every wait is bounded (wait_limit
nanoseconds of the GPU's clock; rounds in the interpreter); a timeout records (code, wait, peer,
pair, chunk, epoch) in the status word and closes the task queues (their counters jump past the
end), so every program stops taking tasks, and waits in progress give up at once.

Trace (TRACE=True, for bench/kernel_profile.py): each program stamps this GPU's nanosecond clock
around its tasks: row pid of the trace holds (pid, WAITED_COUNTS, front done three times, counts
acquired), row num_programs + task holds (pid, kind, start, ready, math done, end) with kind one of the
TASK_* codes (compute tasks numbered after the front tasks): ready when the task's waits are
over, math done after its GEMM loop (combine: after its weighted sum; front tasks: both = start).

Epochs: ctl[0] holds the call number (from 1). Flags store it, so none is reset. Count words are
double-buffered by epoch parity: a fast peer may publish call n+1's counts while a slow program
here still reads call n's. Combine counters only grow; the source compares them with its own
running total of rows it expects (comb_expect, advanced by the routing plan before each call).
"""

import contextlib

import torch
import triton
import triton.language as tl

from .transport import (NVSHMEM, TRANSPORTS, add_count, clock_ns, nvshmem_device_library, nvshmem_launch,
                        order_counts, puts_complete, rows_landed, rows_sent, rows_target, send_tile,
                        set_count_words, signal, wait_at_least)

# Status word codes for the wait that timed out (Python reads .value).
WAIT_COUNTS = tl.constexpr(1)
WAIT_CHUNK = tl.constexpr(2)
WAIT_HIDDEN = tl.constexpr(3)
WAIT_COMBINE = tl.constexpr(4)
ACT_CODES = {"swiglu": 0, "gelu": 1, "relu": 2}
# The interpreter runs no PTX, so has no clock: its waits count polling rounds instead (about 0.7 ms
# each on a CPU for a wait on a few words).
INTERPRETER_ROUNDS_PER_S = 1000
# Trace row kinds.
TASK_PUBLISH = tl.constexpr(0)
TASK_DISPATCH = tl.constexpr(1)
TASK_FFN_IN = tl.constexpr(2)
TASK_FFN_OUT = tl.constexpr(3)
TASK_COMBINE = tl.constexpr(4)
WAITED_COUNTS = tl.constexpr(5)
TRACE_COLS = tl.constexpr(6)  # int64 words per trace row
QUEUES_CLOSED = tl.constexpr(1 << 40)  # added to the task counters by the first timeout


@triton.jit
def _stamp(trace_ptr, row, kind, start, ready, done, TRACE: tl.constexpr):
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
def _report_timeout(status_ptr, ctl_ptr, wait, pe, expert, tile, epoch):
    """status = [1, wait, peer rank, local expert, tile, epoch]; the first timeout wins, and closes
    both task queues (every later take from their counters is past the end), so programs stop
    taking tasks without reading the status word for each."""
    if tl.atomic_cas(status_ptr, tl.cast(0, tl.int64), tl.cast(1, tl.int64), sem="relaxed") == 0:
        tl.store(status_ptr + 1, wait)
        tl.store(status_ptr + 2, pe)
        tl.store(status_ptr + 3, expert)
        tl.store(status_ptr + 4, tile)
        tl.store(status_ptr + 5, epoch)
        tl.atomic_add(ctl_ptr + 1, QUEUES_CLOSED, sem="relaxed")
        tl.atomic_add(ctl_ptr + 3, QUEUES_CLOSED, sem="relaxed")


@triton.jit
def _grouped(t, rows, cols, GROUP: tl.constexpr):
    """Task t of a rows x cols grid of tiles -> (row, col), taking GROUP rows at a time column by
    column: programs running side by side share a few row tiles and a few weight tiles in L2,
    instead of every program streaming a different slice of an expert's weights from HBM."""
    first = (t // (GROUP * cols)) * GROUP
    size = tl.minimum(rows - first, GROUP)
    r = t - first * cols
    return first + r % size, r // size


@triton.jit
def _activate(gate, up, ACT: tl.constexpr):
    """gate/up: [BM, BF] fp32 accumulators -> activation in fp32 (up unused unless swiglu)."""
    if ACT == 0:  # swiglu
        return gate / (1.0 + tl.exp(-gate)) * up
    elif ACT == 1:  # gelu, exact erf form
        return 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:  # relu
        return tl.maximum(gate, 0.0)


@triton.jit
def publish_counts(count_peers, count_ptr, send_counts_ptr, epoch, rank, W, L, E_POW2: tl.constexpr,
                   TRANSPORT: tl.constexpr):
    """Write (epoch << 32 | rows) for every (destination, local expert) into the destination's
    count words [2, W, L] (parity slot epoch % 2, row `rank`)."""
    set_count_words(count_peers, count_ptr, send_counts_ptr, ((epoch % 2) * W + rank) * L, W, L, epoch,
                    E_POW2, TRANSPORT)


@triton.jit
def dispatch_chunk(q, x_ptr, send_tok_ptr, pos_start_ptr, send_counts_ptr, region_off_ptr,
                   chunk_pos_ptr, chunk_c_ptr, recv_x_peers, chunk_flag_peers, recv_x_ptr, send_x_ptr,
                   chunk_flag_ptr, epoch, rank, H, S, L, MAXC,
                   CHUNK: tl.constexpr, BN: tl.constexpr, TRANSPORT: tl.constexpr):
    """Copy send chunk q (CHUNK rows of one (dest, expert) pair) to the destination; raise its flag.
    P2P stores the rows there directly; NVSHMEM gathers them into send_x (local, symmetric; rows
    in sorted-slot order) and puts them as one block that carries the flag."""
    pos = tl.load(chunk_pos_ptr + q)
    if pos >= 0:
        c = tl.load(chunk_c_ptr + q)
        count = tl.load(send_counts_ptr + pos)
        i = tl.arange(0, CHUNK)
        valid = c * CHUNK + i < count
        slot = tl.load(pos_start_ptr + pos).to(tl.int64) + c * CHUNK + i
        tok = tl.load(send_tok_ptr + slot, mask=valid, other=0).to(tl.int64)
        dest, e = pos // L, pos % L
        row = (rank * S + tl.load(region_off_ptr + pos) + c * CHUNK + i).to(tl.int64)
        dst, row = rows_target(recv_x_peers, dest, send_x_ptr, row, slot, TRANSPORT)
        for n0 in range(0, H, BN):
            cols = n0 + tl.arange(0, BN)
            m = valid[:, None] & (cols[None, :] < H)
            v = tl.load(x_ptr + tok[:, None] * H + cols[None, :], mask=m)
            tl.store(dst + row[:, None] * H + cols[None, :], v, mask=m)
        rows = tl.minimum(count - c * CHUNK, CHUNK).to(tl.int64)
        ELT: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth // 8
        rows_sent(chunk_flag_peers, chunk_flag_ptr, (rank * L + e) * MAXC + c, epoch, dest,
                  recv_x_ptr + (rank * S + tl.load(region_off_ptr + pos) + c * CHUNK) * H,
                  send_x_ptr + tl.min(slot) * H, rows * H * ELT, TRANSPORT)


@triton.jit
def _count_table(words, W, L, W_POW2: tl.constexpr, L_POW2: tl.constexpr):
    """[W_POW2, L_POW2] int32 rows each source sends to each local expert (count words, acquired)."""
    src = tl.arange(0, W_POW2)[:, None]
    e = tl.arange(0, L_POW2)[None, :]
    m = (src < W) & (e < L)
    return (tl.load(words + src * L + e, mask=m, other=0, volatile=True) & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _tile_table(words, W, L, BM: tl.constexpr, CHUNK: tl.constexpr, W_POW2: tl.constexpr,
                L_POW2: tl.constexpr):
    """The count words (acquired), as each program keeps them in registers for the call ->
    counts [W_POW2, L_POW2] int32: rows each source sends each local expert; tiles [L_POW2]:
    BM-row tiles of each expert; cum [L_POW2]: their inclusive prefix sum (expert tiles are
    numbered expert by expert); first [W_POW2, L_POW2]: each pair's first row in its expert's
    numbering (rows numbered source by source); region [W_POW2, L_POW2]: each pair's offset in
    its source's region (pairs CHUNK-aligned, expert by expert)."""
    counts = _count_table(words, W, L, W_POW2, L_POW2)
    tiles = (tl.sum(counts, axis=0) + BM - 1) // BM
    padded = (counts + CHUNK - 1) // CHUNK * CHUNK
    return counts, tiles, tl.cumsum(tiles, 0), tl.cumsum(counts, 0) - counts, tl.cumsum(padded, 1) - padded


@triton.jit
def _expert_sources(q, counts, tiles, cum, first_all, region_all, L_POW2: tl.constexpr):
    """Expert tile q of a _tile_table -> (local expert e, tile index c within e, and per source
    rank [W_POW2]: rows of e it sent, the first of them in e's numbering, their offset in its
    region)."""
    e_idx = tl.arange(0, L_POW2)
    e = tl.sum((cum <= q).to(tl.int32))
    pick = e_idx == e
    c = q - tl.sum(tl.where(pick, cum - tiles, 0))
    per_src = tl.sum(tl.where(pick[None, :], counts, 0), axis=1)
    first = tl.sum(tl.where(pick[None, :], first_all, 0), axis=1)
    region = tl.sum(tl.where(pick[None, :], region_all, 0), axis=1)
    return e, c, per_src, first, region


@triton.jit
def _expert_tile(q, counts, tiles, cum, first_all, region_all, W, BM: tl.constexpr, CHUNK: tl.constexpr,
                 W_POW2: tl.constexpr, L_POW2: tl.constexpr):
    """Expert tile q (BM rows) of a _tile_table -> (e, c, per_src, first as _expert_sources, and
    per row: source rank, row in that source's region, CHUNK-chunk of the (source, e) pair,
    valid)."""
    e, c, per_src, first, region = _expert_sources(q, counts, tiles, cum, first_all, region_all, L_POW2)
    j = c * BM + tl.arange(0, BM)
    valid = j < tl.sum(per_src)
    s_idx = tl.arange(0, W_POW2)[None, :]
    src = tl.sum(((first[None, :] <= j[:, None]) & (s_idx < W)).to(tl.int32), axis=1) - 1
    pick = s_idx == src[:, None]
    r = j - tl.sum(tl.where(pick, first[None, :], 0), axis=1)
    row = tl.sum(tl.where(pick, region[None, :], 0), axis=1) + r
    return e, c, per_src, first, src, row, r // CHUNK, valid


@triton.jit
def ffn_in_tile(q, j, counts, tiles, cum, first_all, region_all, recv_x_ptr, w_in_ptr, h_ptr, chunk_flag_ptr,
                h_flag_ptr, status_ptr, ctl_ptr, epoch, wait_limit, W, L, H, F, S, MAXC, NF,
                ACT: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr,
                CHUNK: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr, W_POW2: tl.constexpr, L_POW2: tl.constexpr,
                STAGES: tl.constexpr, PTX: tl.constexpr, TRACE: tl.constexpr):
    """h[rows of expert tile q, f-tile j] = act(x_rows @ w_in[e][:, f-tile]) once the rows arrived
    (counts .. region_all: the call's _tile_table). -> (ready, done) clock stamps when TRACE
    (module docstring), else zeros."""
    e, _, _, _, src, row, chunk, valid = _expert_tile(q, counts, tiles, cum, first_all, region_all, W, BM,
                                                      CHUNK, W_POW2, L_POW2)
    flags = chunk_flag_ptr + (src * L + e) * MAXC + chunk
    short = wait_at_least(flags, valid, epoch, wait_limit, status_ptr, "sys", PTX)
    ready = clock_ns() if TRACE else 0
    done = ready
    if tl.sum(short.to(tl.int32)) > 0:
        _report_timeout(status_ptr, ctl_ptr, WAIT_CHUNK, tl.min(tl.where(short, src, W)), e, q, epoch)
    else:
        r = (src * S + row).to(tl.int64)
        f = j * BF + tl.arange(0, BF)
        fmask = f < F
        F_IN = F * (2 if GATED else 1)
        w_base = w_in_ptr + e.to(tl.int64) * H * F_IN
        gate = tl.zeros((BM, BF), dtype=tl.float32)
        up = tl.zeros((BM, BF), dtype=tl.float32)
        for k0 in tl.range(0, H, BK, num_stages=STAGES):
            k = k0 + tl.arange(0, BK)
            kmask = k < H
            a = tl.load(recv_x_ptr + r[:, None] * H + k[None, :], mask=valid[:, None] & kmask[None, :],
                        other=0.0, cache_modifier=".cg")
            wm = kmask[:, None] & fmask[None, :]
            b = tl.load(w_base + k[:, None] * F_IN + f[None, :], mask=wm, other=0.0)
            gate = tl.dot(a, b, gate, input_precision=PRECISION)
            if GATED:
                b2 = tl.load(w_base + k[:, None] * F_IN + F + f[None, :], mask=wm, other=0.0)
                up = tl.dot(a, b2, up, input_precision=PRECISION)
        done = clock_ns() if TRACE else 0
        h = _activate(gate, up, ACT)
        tl.store(h_ptr + r[:, None] * F + f[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=valid[:, None] & fmask[None, :])
        signal(h_flag_ptr + q * NF + j, epoch.to(tl.int32), "gpu")  # h and its readers: this GPU
    return ready, done


@triton.jit
def count_tile_rows(e, c, per_src, first, n, comb_count_peers, comb_count_ptr, rank, L, MAXC, NN,
                    BM: tl.constexpr, CHUNK: tl.constexpr, W_POW2: tl.constexpr, SPLIT: tl.constexpr,
                    TRANSPORT: tl.constexpr, PTX: tl.constexpr):
    """Tile c of local expert e (per_src, first: _expert_sources), its rows of GEMM2 column tile n
    (SPLIT combine column tiles of BN: n * SPLIT .., those < NN) sent by ffn_out_tile, are counted
    at their sources: once every thread's rows have landed, one count per (source, chunk) run of
    the tile's rows and combine column tile. P2P adds them all at once, behind one system-scope
    fence (PTX: transport.order_counts); NVSHMEM signals them one by one from one thread.
    Counters are kept per combine column tile whatever the GEMM2 tile width, so calls with
    different widths share them. BM: a power-of-two multiple of CHUNK."""
    rows_landed(TRANSPORT)
    tl.debug_barrier()
    order_counts(TRANSPORT, PTX)
    lo = tl.maximum(c * BM - first, 0)  # the tile's rows of each source, in the pair's numbering
    hi = tl.minimum((c + 1) * BM - first, per_src)
    s_idx = tl.arange(0, W_POW2)
    if TRANSPORT == NVSHMEM:
        for s in range(W_POW2):
            lo_s = tl.sum(tl.where(s_idx == s, lo, 0))
            hi_s = tl.sum(tl.where(s_idx == s, hi, 0))
            for k in range(lo_s // CHUNK, (hi_s + CHUNK - 1) // CHUNK):
                rows = (tl.minimum(hi_s, (k + 1) * CHUNK) - tl.maximum(lo_s, k * CHUNK)).to(tl.int64)
                for half in tl.static_range(SPLIT):
                    if n * SPLIT + half < NN:
                        slot = ((rank * L + e) * MAXC + k).to(tl.int64) * NN + n * SPLIT + half
                        add_count(comb_count_peers, comb_count_ptr, slot, rows, s, True, TRANSPORT, PTX)
    else:
        KMAX: tl.constexpr = 2 * BM // CHUNK  # chunks a tile's rows of one source can touch, and more
        k = (lo // CHUNK)[:, None] + tl.arange(0, KMAX)[None, :]
        rows = tl.minimum(hi[:, None], (k + 1) * CHUNK) - tl.maximum(lo[:, None], k * CHUNK)
        live = rows > 0
        pe = tl.where(live, s_idx[:, None], rank)  # a valid rank for every element
        for half in tl.static_range(SPLIT):
            if n * SPLIT + half < NN:
                slot = ((rank * L + e) * MAXC + k).to(tl.int64) * NN + n * SPLIT + half
                add_count(comb_count_peers, comb_count_ptr, slot, rows.to(tl.int64), pe, live, TRANSPORT, PTX)


@triton.jit
def ffn_out_tile(q, n, pend_e, pend_c, pend_rows, pend_first, pend_n, counts, tiles, cum, first_all, region_all,
                 h_ptr, w_out_ptr, h_flag_ptr, combine_y_peers, comb_count_peers, recv_x_ptr, combine_y_ptr,
                 comb_count_ptr, status_ptr, ctl_ptr, epoch, wait_limit, rank, W, L, H, F, S, MAXC, NF,
                 NN, PRECISION: tl.constexpr, BM: tl.constexpr, CHUNK: tl.constexpr, BN: tl.constexpr,
                 BN_OUT: tl.constexpr, BK: tl.constexpr,
                 W_POW2: tl.constexpr, L_POW2: tl.constexpr, NF_POW2: tl.constexpr,
                 STAGES: tl.constexpr, TRANSPORT: tl.constexpr, PTX: tl.constexpr, TRACE: tl.constexpr):
    """y[rows of expert tile q, n-tile (BN_OUT columns)] = h_rows @ w_out[e][:, n-tile] once all f-tiles of h are
    written, sent into each row's source rank (its combine_y region for this rank mirrors
    recv_x). The program's previous tile (pend_*: count_tile_rows's e, c, per_src, first, n;
    pend_e < 0: none) is counted between this tile's GEMM and its sends. -> (the tile left to
    count, as pend_*; ready, done clock stamps when TRACE, else zeros).

    P2P stores the rows there; NVSHMEM stages the tile in recv_x's rows of the tile (their x is
    consumed: every f-tile of h is done) and puts each row from its own thread."""
    e, c, per_src, first, src, row, chunk, valid = _expert_tile(q, counts, tiles, cum, first_all, region_all,
                                                                W, BM, CHUNK, W_POW2, L_POW2)
    r = (src * S + row).to(tl.int64)
    cols = n * BN_OUT + tl.arange(0, BN_OUT)
    cmask = cols < H
    w_base = w_out_ptr + e.to(tl.int64) * F * H
    acc = tl.zeros((BM, BN_OUT), dtype=tl.float32)
    f_tiles = tl.arange(0, NF_POW2)
    short = wait_at_least(h_flag_ptr + q * NF + f_tiles, f_tiles < NF, epoch.to(tl.int32), wait_limit,
                          status_ptr, "gpu", PTX)
    ok = tl.sum(short.to(tl.int32)) == 0
    ready = clock_ns() if TRACE else 0
    if ok:
        for k0 in tl.range(0, F, BK, num_stages=STAGES):
            f = k0 + tl.arange(0, BK)
            fmask = f < F
            a = tl.load(h_ptr + r[:, None] * F + f[None, :], mask=valid[:, None] & fmask[None, :],
                        other=0.0, cache_modifier=".cg")
            b = tl.load(w_base + f[:, None] * H + cols[None, :], mask=fmask[:, None] & cmask[None, :],
                        other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    done = clock_ns() if TRACE else 0
    if not ok:
        _report_timeout(status_ptr, ctl_ptr, WAIT_HIDDEN, rank, e, q, epoch)
    else:
        if pend_e >= 0:
            count_tile_rows(pend_e, pend_c, pend_rows, pend_first, pend_n, comb_count_peers, comb_count_ptr,
                            rank, L, MAXC, NN, BM, CHUNK, W_POW2, BN_OUT // BN, TRANSPORT, PTX)
        # recv_x's rows of this tile are the staging space: their x is consumed (every f-tile of h
        # is done) and the source sends nothing new into them before these rows reach it.
        send_tile(acc, combine_y_peers, combine_y_ptr, (rank * S + row).to(tl.int64),
                  tl.where(valid, src, rank), recv_x_ptr, r, valid, n * BN_OUT, H, BN_OUT, TRANSPORT)
    return (tl.where(ok, e, pend_e), tl.where(ok, c, pend_c), tl.where(ok, per_src, pend_rows),
            tl.where(ok, first, pend_first), tl.where(ok, n, pend_n), ready, done)


@triton.jit
def combine_tile(tt, n, out_ptr, combine_y_ptr, comb_count_ptr, comb_expect_ptr, slot_dest_ptr,
                 slot_row_ptr, slot_flag_ptr, slot_w_ptr, status_ptr, ctl_ptr, epoch, wait_limit, T, H, S,
                 NN, W, TOP_K: tl.constexpr, K_POW2: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
                 PTX: tl.constexpr, TRACE: tl.constexpr):
    """out[tokens, n-tile] = sum_k w[t, k] * y[slot(t, k), n-tile] for BT tokens, once each slot's
    chunk counter has reached the rows this rank expects in it (one wait for all BT x TOP_K slots,
    then every row's load can be in flight at once). -> (ready, done) clock stamps when TRACE."""
    t = tt * BT + tl.arange(0, BT)
    tmask = t < T
    cols = n * BN + tl.arange(0, BN)
    cmask = cols < H
    k = tl.arange(0, K_POW2)
    slots = t.to(tl.int64)[:, None] * TOP_K + k[None, :]
    dest = tl.load(slot_dest_ptr + slots, mask=tmask[:, None] & (k[None, :] < TOP_K), other=-1)
    live = dest >= 0
    chunk = tl.load(slot_flag_ptr + slots, mask=live, other=0).to(tl.int64)
    expect = tl.load(comb_expect_ptr + chunk, mask=live, other=0)
    short = wait_at_least(comb_count_ptr + chunk * NN + n, live, expect, wait_limit, status_ptr, "sys", PTX)
    missing = tl.min(tl.where(short, dest, W))  # the lowest rank whose rows did not come back (W: none)
    ready = clock_ns() if TRACE else 0
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for kk in tl.static_range(TOP_K):
        s = t.to(tl.int64) * TOP_K + kk
        d = tl.load(slot_dest_ptr + s, mask=tmask, other=-1)
        ok = d >= 0
        row = tl.load(slot_row_ptr + s, mask=ok, other=0).to(tl.int64)
        w = tl.load(slot_w_ptr + s, mask=ok, other=0.0)
        y = tl.load(combine_y_ptr + (d.to(tl.int64) * S + row)[:, None] * H + cols[None, :],
                    mask=ok[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")
        acc += w[:, None] * y.to(tl.float32)
    done = clock_ns() if TRACE else 0
    if missing < W:
        _report_timeout(status_ptr, ctl_ptr, WAIT_COMBINE, missing, -1, tt, epoch)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])
    return ready, done


@triton.jit(do_not_specialize=["T", "wait_limit", "rank", "SEND_CHUNKS", "DISPATCH_PROGRAMS"])
def fused_moe_kernel(
        x_ptr, out_ptr, w_in_ptr, w_out_ptr,
        send_tok_ptr, pos_start_ptr, send_counts_ptr, region_off_ptr, chunk_pos_ptr, chunk_c_ptr,
        slot_dest_ptr, slot_row_ptr, slot_flag_ptr, slot_w_ptr, comb_expect_ptr,
        recv_x_peers, combine_y_peers, count_peers, chunk_flag_peers, comb_count_peers,
        recv_x_ptr, combine_y_ptr, count_ptr, chunk_flag_ptr, comb_count_ptr, send_x_ptr,
        h_ptr, h_flag_ptr, ctl_ptr, status_ptr, trace_ptr,
        T, wait_limit, rank, W, L, H, F, S, MAXC, SEND_CHUNKS, DISPATCH_PROGRAMS,
        TOP_K: tl.constexpr, K_POW2: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr,
        E_POW2: tl.constexpr, W_POW2: tl.constexpr, L_POW2: tl.constexpr, BM: tl.constexpr,
        CHUNK: tl.constexpr,
        BN: tl.constexpr, BN_OUT: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
        NF_POW2: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr, TRANSPORT: tl.constexpr,
        PTX: tl.constexpr, TRACE: tl.constexpr):
    """See the module docstring. Shapes (E = W * L pairs in (rank, slot) order, K = TOP_K):
    x, out: [T, H]; w_in: [L, H, F_in]; w_out: [L, F, H];
    send_tok: [T*K] int32 (token of each sorted slot); pos_start, send_counts, region_off: [E] int32;
    chunk_pos, chunk_c: [SEND_CHUNKS] int32 (-1 padded); slot_dest/row/flag: [T, K] int32, slot_w
    fp32; comb_expect: [W, L, MAXC] int64 rows expected back per chunk, cumulative over calls;
    symmetric: recv_x/combine_y [W, S, H]; count words [2, W, L] int64; chunk flags [W, L, MAXC]
    int64; combine counters [W, L, MAXC, NN] int64; send_x [T*K, H] (TRANSPORT NVSHMEM; any
    buffer otherwise); local: h [W, S, F]; h flags [MAXQ, NF] int32; ctl: [4] int64 (epoch, front
    task counter, programs done, compute task counter); status: [8] int64; trace: [num_programs +
    tasks, TRACE_COLS] int64 (TRACE). PTX: the GPU runs PTX (not the interpreter), so a release
    fence can publish several counts (transport.order_counts) and waits are bounded by the GPU's
    clock; wait_limit: nanoseconds (PTX) or rounds a wait may last."""
    NF = tl.cdiv(F, BF)
    NN = tl.cdiv(H, BN)  # combine column tiles (and combine counters per chunk)
    NN_OUT = tl.cdiv(H, BN_OUT)  # GEMM2 column tiles
    epoch = tl.load(ctl_ptr)
    n_front = 1 + SEND_CHUNKS
    P = tl.num_programs(0)
    task = tl.cast(n_front, tl.int64)
    if tl.program_id(0) < DISPATCH_PROGRAMS:
        task = tl.atomic_add(ctl_ptr + 1, 1, sem="relaxed")
    while task < n_front:
        start = clock_ns() if TRACE else 0
        if task == 0:
            publish_counts(count_peers, count_ptr, send_counts_ptr, epoch, rank, W, L, E_POW2, TRANSPORT)
        else:
            dispatch_chunk(task - 1, x_ptr, send_tok_ptr, pos_start_ptr, send_counts_ptr,
                           region_off_ptr, chunk_pos_ptr, chunk_c_ptr, recv_x_peers, chunk_flag_peers,
                           recv_x_ptr, send_x_ptr, chunk_flag_ptr, epoch, rank, H, S, L, MAXC, CHUNK, BN,
                           TRANSPORT)
        _stamp(trace_ptr, P + task, tl.minimum(task, TASK_DISPATCH), start, start, start, TRACE)
        task = tl.atomic_add(ctl_ptr + 1, 1, sem="relaxed")

    # What every source sends to this rank's experts this call: a word is current once its epoch
    # field reaches this call's (a source cannot be two calls ahead of this rank).
    words = count_ptr + (epoch % 2) * W * L
    start = clock_ns() if TRACE else 0
    idx = tl.arange(0, E_POW2)
    pairs = idx < W * L
    short = wait_at_least(words + idx, pairs, epoch << 32, wait_limit, status_ptr, "sys", PTX)
    n_short = tl.sum(short.to(tl.int32))
    if n_short > 0:
        _report_timeout(status_ptr, ctl_ptr, WAIT_COUNTS, tl.min(tl.where(short, idx // L, W)), -1, -1, epoch)
    healthy = n_short == 0  # a sum: the same in every warp (the counts are not to be used otherwise)
    _stamp(trace_ptr, tl.program_id(0), WAITED_COUNTS, start, start, start, TRACE)
    counts, tiles, cum, first_all, region_all = _tile_table(words, W, L, BM, CHUNK, W_POW2, L_POW2)
    n_tiles = tl.sum(tiles)
    n_in = n_tiles * NF
    n_out = n_tiles * NN_OUT
    n_comb = tl.cdiv(T, BT) * NN
    # This program's GEMM2 tile whose rows are not counted yet (count_tile_rows's arguments; none
    # while pend_e < 0).
    pend_e = tl.full((), -1, tl.int32)
    pend_c = tl.full((), 0, tl.int64)
    pend_rows = tl.zeros((W_POW2,), dtype=tl.int32)
    pend_first = tl.zeros((W_POW2,), dtype=tl.int32)
    pend_n = tl.full((), 0, tl.int64)
    task = n_front + tl.atomic_add(ctl_ptr + 3, 1, sem="relaxed")
    while (task < n_front + n_in + n_out + n_comb) & healthy:
        start = clock_ns() if TRACE else 0
        ready = start
        done = start
        q = task - n_front
        if q < n_in:
            q, j = _grouped(q, n_tiles, NF, GROUP)
            ready, done = ffn_in_tile(q, j, counts, tiles, cum, first_all, region_all, recv_x_ptr, w_in_ptr,
                                      h_ptr, chunk_flag_ptr, h_flag_ptr, status_ptr, ctl_ptr, epoch, wait_limit,
                                      W, L, H, F, S, MAXC, NF, ACT, GATED, PRECISION, BM, CHUNK, BF, BK, W_POW2,
                                      L_POW2, STAGES, PTX, TRACE)
        elif q < n_in + n_out:
            q, n = _grouped(q - n_in, n_tiles, NN_OUT, GROUP)
            pend_e, pend_c, pend_rows, pend_first, pend_n, ready, done = ffn_out_tile(
                q, n, pend_e, pend_c, pend_rows, pend_first, pend_n, counts, tiles, cum, first_all, region_all,
                h_ptr, w_out_ptr, h_flag_ptr, combine_y_peers, comb_count_peers, recv_x_ptr, combine_y_ptr,
                comb_count_ptr, status_ptr, ctl_ptr, epoch, wait_limit, rank, W, L, H, F, S, MAXC, NF, NN,
                PRECISION, BM, CHUNK, BN, BN_OUT, BK, W_POW2, L_POW2, NF_POW2, STAGES, TRANSPORT, PTX, TRACE)
        else:
            if pend_e >= 0:  # combine tiles wait for counts: none may be left pending behind them
                count_tile_rows(pend_e, pend_c, pend_rows, pend_first, pend_n, comb_count_peers,
                                comb_count_ptr, rank, L, MAXC, NN, BM, CHUNK, W_POW2, BN_OUT // BN,
                                TRANSPORT, PTX)
                pend_e = tl.full((), -1, tl.int32)
            q -= n_in + n_out
            ready, done = combine_tile(q // NN, q % NN, out_ptr, combine_y_ptr, comb_count_ptr, comb_expect_ptr,
                                       slot_dest_ptr, slot_row_ptr, slot_flag_ptr, slot_w_ptr, status_ptr,
                                       ctl_ptr, epoch, wait_limit, T, H, S, NN, W, TOP_K, K_POW2, BT, BN, PTX,
                                       TRACE)
        q = task - n_front
        kind = tl.where(q < n_in, TASK_FFN_IN, tl.where(q < n_in + n_out, TASK_FFN_OUT, TASK_COMBINE))
        _stamp(trace_ptr, P + task, kind, start, ready, done, TRACE)
        task = n_front + tl.atomic_add(ctl_ptr + 3, 1, sem="relaxed")

    if pend_e >= 0:
        count_tile_rows(pend_e, pend_c, pend_rows, pend_first, pend_n, comb_count_peers, comb_count_ptr, rank,
                        L, MAXC, NN, BM, CHUNK, W_POW2, BN_OUT // BN, TRANSPORT, PTX)
    puts_complete(TRANSPORT)
    # The last program out rewinds the task counters and opens the next epoch.
    if tl.atomic_add(ctl_ptr + 2, 1, sem="acq_rel") == P - 1:
        tl.store(ctl_ptr + 1, 0)
        tl.store(ctl_ptr + 2, 0)
        tl.store(ctl_ptr + 3, 0)
        tl.store(ctl_ptr, epoch + 1)


def launch_fused(x, out, w_in, w_out, plan, sym: dict, peers: dict, h, h_flags, comb_expect, ctl,
                 status, *, geo, activation: str, rank: int, timeout_s: float, programs: int,
                 block_m: int = 64, block_n: int | None = None, num_warps: int = 8, stages: int = 3,
                 group: int = 8, dispatch_programs: int | None = None,
                 transport: str = "p2p", trace: torch.Tensor | None = None):
    """Check shapes and launch one forward.

    x, out: [T, H]; w_in: [L, H, F_in]; w_out: [L, F, H] (one dtype); plan: a RoutingPlan;
    sym: this rank's symmetric buffers by name (geo.symmetric_buffers); peers: the same names ->
    [W] int64 peer base addresses; h: [W, S, F] x.dtype; h_flags: [MAXQ, NF] int32;
    comb_expect: [W, L, MAXC] int64; ctl: [4] int64; status: [8] int64; all on x's device.
    timeout_s: how long any one wait in the kernel may last (on GPUs by the GPU's clock; in the
    interpreter, INTERPRETER_ROUNDS_PER_S polling rounds a second). block_m: rows per expert tile (64 or 128; geo.MAXQ is sized for 64); block_n: columns per GEMM2
    tile (geo.BN, the default, or a power-of-two multiple of it); group: expert tiles that
    neighbouring programs work on together (L2 reuse of weights); dispatch_programs: programs that
    send the dispatch chunks before joining the compute queue (1..programs; default all of them);
    transport: "p2p" or "nvshmem"
    (kernels/transport.py; sym then also holds send_x); trace: None, or [geo.trace_rows(T, programs),
    TRACE_COLS] int64 that receives the kernel's task timestamps (module docstring; bench/kernel_profile.py)."""
    T, H = x.shape
    W, L, F = geo.world_size, geo.local_experts, geo.ffn
    gated = activation == "swiglu"
    expect = {"x": (x, (T, H)), "out": (out, (T, H)), "w_in": (w_in, (L, H, F * (2 if gated else 1))),
              "w_out": (w_out, (L, F, H)), "h": (h, (W, geo.S, F)), "h_flags": (h_flags, (geo.MAXQ, geo.NF)),
              "comb_expect": (comb_expect, (W, L, geo.MAXC)), "ctl": (ctl, (4,))}
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor of shape {shape}, got "
                             f"{tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}")
    if T > geo.max_tokens:
        raise ValueError(f"{T} tokens exceed max_tokens_per_rank={geo.max_tokens}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport={transport!r}; choose one of {sorted(TRANSPORTS)}")
    if trace is not None and (trace.dtype != torch.int64 or trace.dim() != 2
                              or trace.shape[1] != TRACE_COLS.value
                              or trace.shape[0] < geo.trace_rows(T, programs)):
        raise ValueError(f"trace: expected int64 [{geo.trace_rows(T, programs)}, {TRACE_COLS.value}], got "
                         f"{trace.dtype} {tuple(trace.shape)}")
    if block_m < geo.BM_MIN or block_m % geo.CHUNK or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m}: expected a power of two, at least {geo.BM_MIN} and a multiple "
                         f"of the dispatch chunk ({geo.CHUNK})")
    block_n = geo.BN if block_n is None else block_n
    if block_n % geo.BN or not triton.next_power_of_2(block_n // geo.BN) == block_n // geo.BN:
        raise ValueError(f"block_n={block_n}: expected {geo.BN} times a power of two")
    dispatch_programs = programs if dispatch_programs is None else dispatch_programs
    if not 1 <= dispatch_programs <= programs:
        raise ValueError(f"dispatch_programs={dispatch_programs}: expected 1..programs={programs}")
    if not timeout_s > 0 or timeout_s == float("inf"):
        raise ValueError(f"timeout_s={timeout_s}: expected a positive, finite number of seconds")
    wait_limit = int(timeout_s * (1e9 if x.is_cuda else INTERPRETER_ROUNDS_PER_S)) or 1
    nvshmem = transport == "nvshmem"
    precision = "tf32x3" if x.dtype == torch.float32 else "tf32"
    extra = {"extern_libs": {"libnvshmem_device": nvshmem_device_library()}} if nvshmem else {}
    with nvshmem_launch() if nvshmem else contextlib.nullcontext():
        fused_moe_kernel[(programs,)](
            x, out, w_in, w_out,
            plan.send_tok, plan.pos_start, plan.send_counts, plan.region_off, plan.chunk_pos, plan.chunk_c,
            plan.slot_dest, plan.slot_row, plan.slot_flag, plan.slot_w, comb_expect,
            peers["recv_x"], peers["combine_y"], peers["count_words"], peers["chunk_flags"],
            peers["combine_counts"],
            sym["recv_x"], sym["combine_y"], sym["count_words"], sym["chunk_flags"], sym["combine_counts"],
            sym["send_x"] if nvshmem else sym["recv_x"],
            h, h_flags, ctl, status, status if trace is None else trace,
            T, wait_limit, rank, W, L, H, F, geo.S, geo.MAXC, plan.chunk_pos.numel(), dispatch_programs,
            TOP_K=plan.slot_dest.shape[1], K_POW2=triton.next_power_of_2(plan.slot_dest.shape[1]), ACT=ACT_CODES[activation], GATED=gated, PRECISION=precision,
            E_POW2=triton.next_power_of_2(W * L), W_POW2=triton.next_power_of_2(W),
            L_POW2=triton.next_power_of_2(L), BM=block_m, CHUNK=geo.CHUNK, BN=geo.BN, BN_OUT=block_n, BF=geo.BF, BK=geo.BK,
            BT=geo.BT, NF_POW2=triton.next_power_of_2(geo.NF), STAGES=stages, GROUP=group,
            TRANSPORT=TRANSPORTS[transport], PTX=x.is_cuda, TRACE=trace is not None, num_warps=num_warps, **extra)
