"""The routed experts' FFN tiles of the fused kernel: the K loops over TMA weight boxes, the
activations, GEMM1 tiles (h = act(x_rows @ w_in), from the queue or in the static order) and GEMM2
tiles (y = h_rows @ w_out, sent to each row's source and counted there)."""

import triton
import triton.language as tl

from ..launch_config import MAX_F_SPLIT
from ..layout import WAIT_CHUNK, WAIT_HIDDEN, WAIT_HIDDEN_STATIC
from ..transport import (NVSHMEM, add_count, async_proxy_fence, clock_ns, order_counts, rows_landed, send_tile, signal,
                         wait_at_least)
from .tasks import PendingTile, expert_tile, report_timeout

SPLIT_STEPS = tl.constexpr(MAX_F_SPLIT.bit_length())  # split_parts tries 2, 4, .. MAX_F_SPLIT parts


@triton.jit
def activate(gate, up, meta):
    """gate/up: [BM, BF] fp32 accumulators -> activation in fp32 (up unused unless gated)."""
    if meta.ACT == 0:  # swiglu
        return _times_sigmoid(gate, gate, meta) * up
    elif meta.ACT == 1:  # gelu, exact erf form
        return 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    elif meta.ACT == 2:  # relu
        return tl.maximum(gate, 0.0)
    else:  # clamped_swiglu (gpt-oss): gate <= limit, |up| <= limit, gate * sigmoid(alpha * gate) * (up + 1)
        limit = tl.full((), meta.SWIGLU_LIMIT, tl.float32)
        alpha = tl.full((), meta.SWIGLU_ALPHA, tl.float32)
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return _times_sigmoid(gate, alpha * gate, meta) * (up + 1.0)


@triton.jit
def _times_sigmoid(a, z, meta):
    """a * sigmoid(z), fp32. APPROX_ACT on a GPU: sigmoid(z) = (1 + tanh(z / 2)) / 2 through the
    GPU's tanh.approx (one special-function op; tanh's error, 2^-11 relative, puts sigmoid within
    ~3e-4 absolute, below the rounding of the bf16 h it feeds), instead of an exp and a full-range
    division (two special-function ops and their range checks: about 14 instructions an element
    against 5 in the epilogue of every GEMM1 tile)."""
    if meta.ON_GPU and meta.APPROX_ACT:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.5 * z], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return a * (0.5 * t + 0.5)
    else:
        return a / (1.0 + tl.exp(-z))


@triton.jit
def _k_loop(acc, a_rows, valid, desc, e, col, k_lo, k_hi, K, meta, a_desc=None, a_row0=0):
    """acc [BM, N] fp32 + the rows a_rows [BM] (row starts of K elements; rows where valid),
    elements k_lo..k_hi of each (k_lo a multiple of BK), @ those rows of the [K, N] block of expert
    e of the 3-D descriptor desc from column col, BK at a time (TMA boxes [1, BK, N]). With a_desc
    (a 2-D descriptor, boxes [BM, BK]) the rows are its BM consecutive rows from a_row0 instead,
    through TMA too: rows past the valid ones are read (and their products never used), rows
    past a_desc's end are zeros."""
    BK: tl.constexpr = meta.BK
    N: tl.constexpr = acc.shape[1]
    for k0 in tl.range(k_lo, k_hi, BK, num_stages=meta.STAGES):
        if a_desc is None:
            k = k0 + tl.arange(0, BK)
            a = tl.load(a_rows[:, None] + k[None, :], mask=valid[:, None] & (k < K)[None, :], other=0.0,
                        cache_modifier=".cg")
        else:
            a = a_desc.load([a_row0, k0])
        acc = tl.dot(a, desc.load([e, k0, col]).reshape(BK, N), acc, input_precision=meta.PRECISION)
    return acc


@triton.jit
def gemm_in(a_rows, valid, w_in, e, j, H, meta, PAIR: tl.constexpr, a_desc=None, a_row0=0):
    """GEMM1 of one tile: a_rows [BM] row starts of H elements (rows where valid) @ expert e of
    the descriptor w_in, FFN columns j*BF.. -> (gate, up) [BM, BF] fp32 (up: gate again unless
    GATED). GATED: w_in holds gate and up in pairs of PAIR columns (gate_up.py), so the gate
    columns of tile j and their up columns are the 2*BF columns from 2*j*BF: one TMA box and one
    tensor-core product [BM, 2*BF], whose registers then split into gate and up in place."""
    BF: tl.constexpr = meta.BF
    WIDTH: tl.constexpr = 2 * BF if meta.GATED else BF
    acc = _k_loop(tl.zeros((meta.BM, WIDTH), dtype=tl.float32), a_rows, valid, w_in, e, (j * WIDTH).to(tl.int32),
                  0, H, H, meta, a_desc, a_row0)
    if meta.GATED:
        pairs = acc.reshape(meta.BM, BF // PAIR, 2, PAIR).permute(0, 2, 1, 3).reshape(meta.BM, 2, BF)
        gate, up = pairs.permute(0, 2, 1).split()
    else:
        gate = acc
        up = acc
    return gate, up


@triton.jit
def save_pre(pre, rows, valid, gate, up, f, F, PAIR: tl.constexpr, meta):
    """pre[rows, FFN columns f] := gate, and (GATED) their up columns := up, [BM, BF] fp32 each,
    in pre's dtype; pre holds F_in columns a row (gated: gate/up pairs of PAIR columns)."""
    r = rows.to(tl.int64)[:, None]
    m = valid[:, None] & (f < F)[None, :]
    if meta.GATED:
        col = pair_col(f, PAIR)
        gate_at = pre + r * (2 * F) + col[None, :]
        tl.store(gate_at, gate.to(pre.dtype.element_ty), mask=m)
        tl.store(gate_at + PAIR, up.to(pre.dtype.element_ty), mask=m)
    else:
        tl.store(pre + r * F + f[None, :], gate.to(pre.dtype.element_ty), mask=m)


@triton.jit
def pair_col(f, PAIR: tl.constexpr):
    """FFN column f's gate column in a last dimension of gate/up pairs (its up column: + PAIR)."""
    return 2 * PAIR * (f // PAIR) + f % PAIR


@triton.jit
def gemm_out(a_rows, valid, w_out, e, col, f_lo, f_hi, F, meta, a_desc=None, a_row0=0):
    """GEMM2 of one tile, or of one part of its K loop: a_rows [BM] row starts of F elements (rows
    where valid), or a_desc's BM rows from a_row0 (_k_loop), their elements f_lo..f_hi, @ those
    rows of expert e of the descriptor w_out, columns col.. -> [BM, BN_OUT] fp32."""
    return _k_loop(tl.zeros((meta.BM, meta.BN_OUT), dtype=tl.float32), a_rows, valid, w_out, e, col, f_lo, f_hi, F,
                   meta, a_desc, a_row0)


@triton.jit
def ffn_in_tile(q, j, held, x_ptr, plan, table, weights, sym, scratch, saved, dims, epoch, wait_limit, rank, meta):
    """h[rows of expert tile q, f-tile j] = act(x_rows @ w_in[e][:, f-tile]) once the rows arrived
    (table: the call's TileTable; weights: Weights): rows from other ranks from recv_x once their
    chunks' flags rise, this rank's own rows straight from x (ffn_in_rows). held: the h flag of
    this program's previous GEMM1 tile, not raised yet (-1: none); ffn_in_rows raises it. -> (ready,
    done) clock stamps when TRACE (kernels/fused_moe.py's module docstring), else zeros, and the flag now held: this
    tile's, or still `held` if the rows never came (a timeout, reported)."""
    W, L, MAXC = dims.world, dims.local_experts, dims.max_chunks
    t = expert_tile(q, table, W, meta)
    n_short = 0
    if meta.W_POW2 > 1:  # at world 1 every row is x's own: no chunk to wait for
        own = t.valid & (t.src == rank)
        flags = sym.chunk_flags.local + (t.src * L + t.e) * MAXC + t.chunk
        short = wait_at_least(flags, t.valid & ~own, epoch, wait_limit, scratch.status, meta.PEER_SCOPE,
                              meta.ON_GPU)
        n_short = tl.sum(short.to(tl.int32))
        if n_short > 0:
            report_timeout(scratch, WAIT_CHUNK, tl.min(tl.where(short, t.src, W)), t.e, q, epoch)
    ready = clock_ns() if meta.TRACE else 0
    done = ready
    if n_short == 0:
        done = ffn_in_rows(t, j, held, x_ptr, plan, weights, sym, scratch, saved, dims, epoch, rank, meta)
        held = (q * tl.cdiv(dims.ffn, meta.BF) + j).to(tl.int64)
    return ready, done, held


@triton.jit
def ffn_in_rows(t, j, held, x_ptr, plan, weights, sym, scratch, saved, dims, epoch, rank, meta):
    """The work of ffn_in_tile once expert tile t has its rows: this rank's own rows
    straight from x (by the plan's token of each slot), others' from recv_x; with SORTED_IN (world
    1) every row from recv_x, where a kernel before the launch copied them, as TMA boxes; GEMM1,
    then the h flag `held` of the program's previous GEMM1 tile raised (unless -1), biases,
    activation, h stored. The tile's own h flag is left to the caller: raised one tile late, its
    release finds the stores it orders long done, where raised at once it waits for them to reach
    L2 while the tensor cores idle. -> the clock after the GEMM when TRACE. The last f-tile's
    columns past F are zeros (the descriptor's edge) and never stored. WEIGHT_ON_INPUT: own rows'
    products are scaled by their slots' weights here (x W is linear in x), other ranks' rows came
    scaled (dispatch_chunk). SAVE: gate and up (biases in) also into saved.pre, in pairs."""
    L, H, F, S = dims.local_experts, dims.hidden, dims.ffn, dims.source_rows
    BF: tl.constexpr = meta.BF
    own = t.valid & (t.src == rank)
    r = (t.src * S + t.row).to(tl.int64)
    if meta.W_POW2 == 1:  # the pair (this rank, e)'s first sorted slot: the rows of the experts before e
        first_own = t.base
    else:
        first_own = tl.load(plan.pos_start + rank * L + t.e)
    f = j * BF + tl.arange(0, BF)
    fmask = f < F
    routed = tl.zeros_like(t.row)  # token * TOP_K + choice of each own row, where read
    if (meta.SORTED_IN == 0) | meta.WEIGHT_ON_INPUT:
        routed = tl.load(plan.send_slot + first_own + t.pair_row, mask=own, other=0)
    if meta.SORTED_IN:  # world 1: the rows were copied into recv_x in expert order before the launch
        row0 = tl.min(tl.where(t.valid, r, 2**62)).to(tl.int32)  # the box's rows past the valid ones: unused
        gate, up = gemm_in(sym.recv_x.local + r * H, t.valid, weights.w_in, t.e, j, H, meta, meta.PAIR,
                           weights.x_rows, row0)
    else:
        tok = (routed // meta.TOP_K).to(tl.int64)
        a_rows = tl.where(own, x_ptr + tok * H, sym.recv_x.local + r * H)  # [BM] row starts
        gate, up = gemm_in(a_rows, t.valid, weights.w_in, t.e, j, H, meta, meta.PAIR)
    done = clock_ns() if meta.TRACE else 0
    raise_held(held, scratch, epoch)
    if meta.WEIGHT_ON_INPUT:
        scale = tl.where(own, tl.load(plan.slot_w + routed, mask=own, other=1.0), 1.0)[:, None]
        gate = gate * scale
        up = up * scale
    if meta.HAS_BIAS:
        bias_in = weights.bias_in + t.e.to(tl.int64) * (2 * F if meta.GATED else F)
        g = pair_col(f, meta.PAIR) if meta.GATED else f
        gate += tl.load(bias_in + g, mask=fmask, other=0.0).to(tl.float32)[None, :]
        if meta.GATED:
            up += tl.load(bias_in + g + meta.PAIR, mask=fmask, other=0.0).to(tl.float32)[None, :]
    if meta.SAVE:
        rows = t.base + t.c * meta.BM + tl.arange(0, meta.BM)
        save_pre(saved.pre, rows, t.valid, gate, up, f, F, meta.PAIR, meta)
    h = activate(gate, up, meta)
    tl.store(scratch.h + r[:, None] * F + f[None, :], h.to(scratch.h.dtype.element_ty),
             mask=t.valid[:, None] & fmask[None, :])
    return done


@triton.jit
def raise_held(held, scratch, epoch):
    """Raise the h flag `held` (a GEMM1 tile's, kept back by its program: ffn_in_rows) unless it is
    -1 (none) -> -1, nothing held."""
    if held >= 0:
        signal(scratch.h_flags + held, epoch.to(tl.int32), "gpu")  # h and its readers: this GPU
    return tl.full((), -1, tl.int64)


@triton.jit
def count_tile_rows(pend, sym, dims, rank, meta):
    """The rows of a sent GEMM2 tile (pend: PendingTile; SPLIT = BN_OUT / BN combine column tiles
    of BN: n * SPLIT .., those < NN) are counted at their sources: once every thread's rows have
    landed, one count per (source, chunk) run of the tile's rows and combine column tile. P2P adds
    them all at once, behind one fence at PEER_SCOPE (transport.order_counts); NVSHMEM signals them
    one by one from one thread. Counters are kept per combine column tile whatever the GEMM2 tile
    width, so calls with different widths share them. BM: a power-of-two multiple of CHUNK."""
    L, MAXC = dims.local_experts, dims.max_chunks
    NN = tl.cdiv(dims.hidden, meta.BN)
    BM: tl.constexpr = meta.BM
    CHUNK: tl.constexpr = meta.CHUNK
    SPLIT: tl.constexpr = meta.BN_OUT // meta.BN
    e, c, n = pend.e, pend.c, pend.n
    rows_landed(meta.TRANSPORT)
    tl.debug_barrier()
    order_counts(meta.TRANSPORT, meta.ON_GPU, meta.PEER_SCOPE)
    lo = tl.maximum(c * BM - pend.first, 0)  # the tile's rows of each source, in the pair's numbering
    hi = tl.minimum((c + 1) * BM - pend.first, pend.per_src)
    s_idx = tl.arange(0, meta.W_POW2)
    if meta.TRANSPORT == NVSHMEM:
        for s in range(meta.W_POW2):
            lo_s = tl.sum(tl.where(s_idx == s, lo, 0))
            hi_s = tl.sum(tl.where(s_idx == s, hi, 0))
            for k in range(lo_s // CHUNK, (hi_s + CHUNK - 1) // CHUNK):
                rows = (tl.minimum(hi_s, (k + 1) * CHUNK) - tl.maximum(lo_s, k * CHUNK)).to(tl.int64)
                for half in tl.static_range(SPLIT):
                    if n * SPLIT + half < NN:
                        slot = ((rank * L + e) * MAXC + k).to(tl.int64) * NN + n * SPLIT + half
                        add_count(sym.combine_counts, slot, rows, s, True, meta.TRANSPORT, meta.ON_GPU,
                                  meta.PEER_SCOPE)
    else:
        KMAX: tl.constexpr = 2 * BM // CHUNK  # chunks a tile's rows of one source can touch, and more
        k = (lo // CHUNK)[:, None] + tl.arange(0, KMAX)[None, :]
        rows = tl.minimum(hi[:, None], (k + 1) * CHUNK) - tl.maximum(lo[:, None], k * CHUNK)
        live = rows > 0
        pe = tl.where(live, s_idx[:, None], rank)  # a valid rank for every element
        for half in tl.static_range(SPLIT):
            if n * SPLIT + half < NN:
                slot = ((rank * L + e) * MAXC + k).to(tl.int64) * NN + n * SPLIT + half
                add_count(sym.combine_counts, slot, rows.to(tl.int64), pe, live, meta.TRANSPORT, meta.ON_GPU,
                          meta.PEER_SCOPE)


@triton.jit
def ffn_out_tile(q, n, part, parts, pend, table, weights, h_rows, out_ptr, plan, sym, scratch, dims, epoch, wait_limit,
                 rank, meta):
    """y[rows of expert tile q, n-tile (BN_OUT columns)] = h_rows @ w_out[e][:, n-tile] once the
    f-tiles of h it reads are written, sent into each row's source rank (its combine_y region for
    this rank mirrors recv_x). parts > 1 (f_split): this task is part `part` of the K loop, the
    FFN's f-tiles split in `parts` runs (split_range), waiting for those f-tiles' h flags only;
    the part that finishes last sums them all (sum_parts) and sends. The program's previous tile
    (pend: PendingTile) is counted between this tile's GEMM and its sends (split: by the part that
    sends). h_rows (read with
    H_TMA only): scratch.h as a [W * S, F] descriptor, boxes [BM, BK]; at world 1 a tile's rows
    are consecutive there (one source). DIRECT_OUT: the rows go to out ([tokens, H]) instead, each
    times its routing weight (_store_out), and are counted all the same (the combine counters are
    cumulative over calls: a later call launched without it expects every earlier call's counts).
    -> (the tile left to count, a PendingTile; ready, done clock stamps when TRACE, else zeros).

    P2P stores the rows there; NVSHMEM stages the tile in recv_x's rows of the tile (their x is
    consumed: every f-tile of h is done) and puts each row from its own thread."""
    W, H, F, S = dims.world, dims.hidden, dims.ffn, dims.source_rows
    BN_OUT: tl.constexpr = meta.BN_OUT
    NF = tl.cdiv(F, meta.BF)
    t = expert_tile(q, table, W, meta)
    r = (t.src * S + t.row).to(tl.int64)
    acc = tl.zeros((meta.BM, BN_OUT), dtype=tl.float32)
    f_tiles = tl.arange(0, meta.NF_POW2)
    if meta.F_SPLIT > 1:
        j_lo, j_hi = split_range(part, parts, NF)
        wanted = (f_tiles >= j_lo) & (f_tiles < j_hi)
        f_lo = j_lo * meta.BF
        f_hi = tl.minimum(j_hi * meta.BF, F)
    else:
        wanted = f_tiles < NF
        f_lo = 0
        f_hi = F
    short = wait_at_least(scratch.h_flags + q * NF + f_tiles, wanted, epoch.to(tl.int32), wait_limit,
                          scratch.status, "gpu", meta.ON_GPU)
    ok = tl.sum(short.to(tl.int32)) == 0
    ready = clock_ns() if meta.TRACE else 0
    if ok:
        if meta.H_TMA:  # world 1: the tile's rows are one block, loaded through TMA
            async_proxy_fence(meta.ON_GPU)  # h came from other programs' stores
        acc = gemm_out(scratch.h + r * F, t.valid, weights.w_out, t.e, (n * BN_OUT).to(tl.int32), f_lo, f_hi, F,
                       meta, h_rows if meta.H_TMA else None, tl.min(r).to(tl.int32))
    done = clock_ns() if meta.TRACE else 0
    last = ok  # this task sends the tile: its only part, or its last part done
    if meta.F_SPLIT > 1:
        if ok & (parts > 1):
            acc, last = sum_parts(acc, t.valid, q * tl.cdiv(H, BN_OUT) + n, part, parts, scratch, epoch, meta)
    acc = _add_out_bias(acc, t.e, n, weights, H, meta)
    if not ok:
        report_timeout(scratch, WAIT_HIDDEN_STATIC if meta.STATIC_IN else WAIT_HIDDEN, rank, t.e, q, epoch)
    elif last:
        if pend.e >= 0:
            count_tile_rows(pend, sym, dims, rank, meta)
        if meta.DIRECT_OUT:
            _store_out(acc, t, n, out_ptr, plan, H, meta)
        else:
            _send_out(acc, t, r, n, sym, S, H, rank, meta)
    pend = PendingTile(tl.where(last, t.e, pend.e), tl.where(last, t.c, pend.c),
                       tl.where(last, t.per_src, pend.per_src), tl.where(last, t.first, pend.first),
                       tl.where(last, n, pend.n))
    return pend, ready, done


@triton.jit
def split_range(part, parts, NF):
    """The f-tiles j_lo <= j < j_hi of part `part` of `parts` (at most NF) over NF f-tiles: runs
    of NF // parts or one more, none empty."""
    j_lo = (part * NF // parts).to(tl.int32)  # K offsets of TMA boxes are 32-bit
    return j_lo, ((part + 1) * NF // parts).to(tl.int32)


@triton.jit
def split_parts(out_tiles, NF, slots, F_SPLIT: tl.constexpr):
    """Parts to split each of a call's out_tiles GEMM2 tiles into: the most, a power of two up to
    F_SPLIT, with out_tiles * parts <= slots (the programs and the partial sums' slots: one wave of
    parts, each with a slot) and parts <= NF (an f-tile a part)."""
    parts = tl.full((), 1, tl.int32)
    for p in tl.static_range(1, SPLIT_STEPS):
        if (1 << p) <= F_SPLIT:
            fits = ((out_tiles << p) <= slots) & ((1 << p) <= NF)
            parts = tl.where(fits, 1 << p, parts)
    return parts


@triton.jit
def sum_parts(acc, valid, slot, part, parts, scratch, epoch, meta):
    """Part `part` of `parts` of GEMM2 tile `slot` (its index in the call, q * NN_OUT + n): acc [BM,
    BN_OUT] fp32, its sum over its f-tiles, into scratch.out_partials (rows where valid), then a
    ticket from the tile's word of scratch.out_tickets: epoch << 8 plus the parts done (brought up
    to this call's epoch by an atomic max first, so no word is ever reset). -> (the last part: every
    part's partial summed from memory in part order, its own too, so the same bits whichever part
    finishes last; another: acc as it was; and whether this part was the last)."""
    BM: tl.constexpr = meta.BM
    BN_OUT: tl.constexpr = meta.BN_OUT
    cell = tl.arange(0, BM)[:, None] * BN_OUT + tl.arange(0, BN_OUT)[None, :]
    rows = valid[:, None]
    tile = scratch.out_partials + (slot * parts).to(tl.int64) * (BM * BN_OUT)
    tl.store(tile + part * (BM * BN_OUT) + cell, acc, mask=rows)
    tl.debug_barrier()  # every thread's partial before the release below
    ticket = scratch.out_tickets + slot
    tl.atomic_max(ticket, epoch.to(tl.int64) << 8, sem="relaxed", scope="gpu")
    done = tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") & 0xFF
    last = done == parts - 1
    if last:  # every part's partial from memory, its own too: one sum order whoever is last
        acc = tl.zeros((BM, BN_OUT), dtype=tl.float32)
        for p in range(parts):
            acc += tl.load(tile + p * (BM * BN_OUT) + cell, mask=rows, other=0.0, cache_modifier=".cg")
    return acc, last


@triton.jit
def _add_out_bias(acc, e, n, weights, H, meta):
    """acc [BM, BN_OUT] of GEMM2 column tile n of expert e, plus bias_out's columns when HAS_BIAS."""
    if meta.HAS_BIAS:
        cols = n * meta.BN_OUT + tl.arange(0, meta.BN_OUT)
        acc += tl.load(weights.bias_out + e.to(tl.int64) * H + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _send_out(acc, t, r, n, sym, S, H, rank, meta):
    """GEMM2 column tile n of expert tile t into each valid row's source rank (its combine_y rows
    for this rank mirror recv_x). recv_x's rows r of this tile are the staging space: their x is
    consumed (every f-tile of h is done: this task waited for their flags, or, the last part of a
    split tile, acquired its ticket after every other part had waited for its own) and the source
    sends nothing new into them before these rows reach it."""
    send_tile(acc, sym.combine_y, (rank * S + t.row).to(tl.int64), tl.where(t.valid, t.src, rank),
              sym.recv_x.local, r, t.valid, n * meta.BN_OUT, H, meta.BN_OUT, meta.TRANSPORT)


@triton.jit
def _store_out(acc, t, n, out_ptr, plan, H, meta):
    """DIRECT_OUT (world 1, top-1, no shared experts): GEMM2 column tile n of expert tile t, acc
    [BM, BN_OUT] fp32, stored into out's rows of its valid rows' tokens, each times its slot's
    weight (1 with WEIGHT_ON_INPUT: the weight went in with the row): the whole combine of a token
    with one expert row. A row's slot is the plan's sorted slot t.base + t.pair_row (as
    ffn_in_rows reads it at world 1), and at top-1 a slot is its token."""
    BN_OUT: tl.constexpr = meta.BN_OUT
    slot = tl.load(plan.send_slot + t.base + t.pair_row, mask=t.valid, other=0).to(tl.int64)
    if not meta.WEIGHT_ON_INPUT:
        acc = acc * tl.load(plan.slot_w + slot, mask=t.valid, other=0.0)[:, None]
    cols = n * BN_OUT + tl.arange(0, BN_OUT)
    tl.store(out_ptr + slot[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t.valid[:, None] & (cols < H)[None, :])
