"""The persistent fused MoE kernel: dispatch -> expert FFN -> combine in one launch per GPU.

Work is two queues of tasks per GPU, each taken in increasing order from its atomic counter:

    front:   [publish counts] [dispatch chunk ...]
    compute: [shared_in tile ...] [shared_out tile ...] [ffn_in tile ...] [ffn_out tile ...] [combine tile ...]

The first DISPATCH_PROGRAMS programs take front tasks until none are left, then join the others on
the compute queue; the rest start on it at once, so expert tiles whose rows have arrived are
computed while later chunks are still on their way. Sources send chunks expert by expert
(the routing plan's order, kernels/plan.py), which is the order destinations take their expert
tiles in.

  publish counts  tell every destination how many rows of each of its experts this rank sends;
  dispatch_chunk  copy up to CHUNK token rows of one (destination, expert) pair into the destination's
                  receive slots, then raise that chunk's arrival flag there (other ranks only);
  ffn_in_tile     BM rows of one local expert, gathered across source regions once their chunks
                  have arrived, this rank's own rows straight from x:
                  h = act(x_rows @ w_in[e][:, f-tile]) -> h_buf;
  ffn_out_tile    y = h_rows @ w_out[e][:, n-tile], streaming over f-tiles as their flags rise,
                  written straight into each row's source rank, whose per-chunk row counters a
                  program bumps one tile later (count_tile_rows): after its next tile's GEMM, so
                  the rows drain over NVLink while it computes, or before it takes a combine tile;
  shared_in_tile  (shared experts) BM of this rank's tokens: h_s = act(x @ shared_w_in[:, f-tile]),
                  and with a shared gate, its sigmoid(x . g) per token; local, no waits: done while
                  this rank's rows are still on their way to and from the experts;
  shared_out_tile y_s = h_s @ shared_w_out[:, n-tile] (times the gate) once h_s is written;
  combine_tile    for BT of this rank's tokens and SPAN n-tiles: wait for its k expert rows (and
                  the shared output), weighted sum.

An expert's tiles span all sources, so its weights are read once per BM rows it received in all,
not once per source. Weight tiles come through the tensor memory accelerator (TMA: Weights),
token rows through gathered loads.

Deadlock freedom: front tasks wait on nothing, and some program takes them from the start; a compute
task waits only on front tasks (here or on other GPUs), on compute tasks with smaller ids here, or
on tasks of other GPUs that wait only on smaller phases there; ids are handed out in order, so a
waited-on task has already been taken by a running program. Every wait is bounded (wait_limit
nanoseconds of the GPU's clock; rounds in the interpreter); a timeout records (code, wait, peer,
pair, chunk, epoch) in the status word and closes the task queues (their counters jump past the
end), so every program stops taking tasks, and waits in progress give up at once.

At world 1 from 64 rows an expert (STATIC_IN, LaunchConfig.static_ffn_in) the ffn_in tiles leave
the compute queue: program p takes tiles p, p + P, .. in the queue's order, each with its own K
loop, before joining the queue for the rest (saving an atomic per tile). They wait for nothing
(their rows are x's), so the argument holds while every program is resident at once, as one
program per SM on a GPU of its own gives; a program held back makes the ffn_out tiles that wait
for its tiles end the call at the timeout, not hang it.

Trace (TRACE=True, for bench/kernel_profile.py): each program stamps this GPU's nanosecond clock
around its tasks: row pid of the trace holds (pid, WAITED_COUNTS, front done three times, counts
acquired), row num_programs + task holds (pid, kind, start, ready, math done, end) with kind one of the
TASK_* codes (compute tasks numbered after the front tasks): ready when the task's waits are
over, math done after its GEMM loop (combine: after its weighted sum; front tasks: both = start).

Epochs: ctl[CTL_EPOCH] holds the call number (from 1). Flags store it, so none is reset. Count words are
double-buffered by epoch parity: a fast peer may publish call n+1's counts while a slow program
here still reads call n's. Combine counters only grow; the source compares them with its own
running total of rows it expects (comb_expect, advanced by the routing plan before each call).

The words of ctl and status, the wait codes and the trace layout are named in kernels/layout.py;
the buffers are bundled as kernels/workspace.py describes. Shorthands in this file: W ranks, L
local experts, H hidden, F ffn, S rows of one source's region (Geometry.source_rows), MAXC chunks
per (source, expert) pair, K top_k, NF / NN / NN_OUT GEMM1 / combine / GEMM2 column tiles.
"""

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..gate_up import PAIR_MAX, pair_width
from .layout import (CTL_COMPUTE_TASKS, CTL_EPOCH, CTL_FRONT_TASKS, CTL_PROGRAMS_DONE, QUEUES_CLOSED,
                     STATUS_EPOCH, STATUS_EXPERT, STATUS_FAILED, STATUS_PEER, STATUS_TILE, STATUS_WAIT,
                     TASK_COMBINE, TASK_DISPATCH, TASK_FFN_IN, TASK_FFN_OUT, TASK_SHARED_IN, TASK_SHARED_OUT,
                     TRACE_COLS, WAIT_CHUNK,
                     WAIT_COMBINE, WAIT_COUNTS, WAIT_HIDDEN, WAITED_COUNTS)
from .transport import (NVSHMEM, TRANSPORTS, add_count, clock_ns, nvshmem_device_library, nvshmem_launch,
                        order_counts, puts_complete, rows_landed, rows_sent, rows_target, send_tile,
                        set_count_words, signal, wait_at_least)

ACT_CODES = {"swiglu": 0, "gelu": 1, "relu": 2, "clamped_swiglu": 3}
# The interpreter runs no PTX, so has no clock: its waits count polling rounds instead (about 0.7 ms
# each on a CPU for a wait on a few words).
INTERPRETER_ROUNDS_PER_S = 1000
# TMA reads rows of 16-byte multiples: hidden and ffn sizes in multiples of 8 (bf16) elements.
TMA_ROW_MULTIPLE = 8


class Biases(NamedTuple):
    """The weights of Weights that are plain tensors, as the kernel takes them (Triton 3.6's
    launcher takes tensor descriptors only as arguments of their own, not inside a tuple)."""

    b_in: torch.Tensor
    b_out: torch.Tensor
    shared_gate: torch.Tensor


class Weights(NamedTuple):
    """This rank's expert weights, as the kernel's stages see them (fused_moe_kernel builds it from
    its descriptor arguments and Biases): w_in [L, H, F_in] and w_out [L, F, H] as tensor descriptors,
    so their tiles are loaded by the tensor memory accelerator (TMA) and zero-filled past each
    expert's edges ([1, BK, BF] and [1, BK, BN_OUT] blocks; F_in = 2F for the gated activations:
    gate columns, then up columns); the biases b_in [L, F_in] and b_out [L, H] (Meta.HAS_BIAS); the
    shared experts (Meta.SHARED), one FFN of width Fs: shared_w_in [1, H, Fs_in] and shared_w_out
    [1, Fs, H] descriptors as the experts', and the gate's weights shared_gate [H] (SHARED_GATE).
    What a config lacks is some other tensor or descriptor, unread."""

    w_in: TensorDescriptor
    w_out: TensorDescriptor
    b_in: torch.Tensor
    b_out: torch.Tensor
    shared_w_in: TensorDescriptor
    shared_w_out: TensorDescriptor
    shared_gate: torch.Tensor


class Saved(NamedTuple):
    """What a training forward keeps for backward="saved" (Meta.SAVE; otherwise other tensors,
    unwritten): pre [R, F_in], GEMM1's output before the activation (biases and input weights
    in; gated: the layer's gate/up pairs) of every row this rank's experts receive, in the
    experts' numbering: local expert, then source rank, then the row's place in its (source,
    expert) pair; R at least the rows received (every source's T * min(K, L) bounds it);
    shared_pre [T, Fs_in], the shared experts' own, per token."""

    pre: torch.Tensor
    shared_pre: torch.Tensor


class Dims(NamedTuple):
    """The layer's sizes on this rank (Geometry): ranks, local experts, hidden, ffn, rows of one
    source's region at a destination (S), chunks per (source, expert) pair (MAXC), the shared
    experts' width (Fs; 0 without), and this rank."""

    world: int
    local_experts: int
    hidden: int
    ffn: int
    source_rows: int
    max_chunks: int
    shared_ffn: int
    rank: int


class Meta(NamedTuple):
    """Compile-time settings, each a tl.constexpr: TOP_K (K_POW2 its power of two); ACT (ACT_CODES),
    GATED (gate and up columns, in pairs of PAIR columns of w_in and SHARED_PAIR of shared_w_in:
    gate_up.py), SWIGLU_ALPHA and SWIGLU_LIMIT of clamped_swiglu; HAS_BIAS (expert biases);
    WEIGHT_ON_INPUT (a slot's routing weight scales the expert's input, not its output); PRECISION
    of fp32 dots; E_POW2, W_POW2, L_POW2 powers of two >= W * L, W, L; tiles BM (expert rows), CHUNK
    (dispatch rows), BN (combine columns), BN_OUT (GEMM2 columns), BF (GEMM1 columns), BK (K step),
    BT (combine tokens), SPAN (combine column tiles of one combine task), NF_POW2 (>= GEMM1 column
    tiles); SHARED, SHARED_GATE (shared experts, their sigmoid gate) and NFS_POW2 (>= their GEMM1
    column tiles); STAGES of the K loops; GROUP of expert tiles taken together; STATIC_IN (world 1
    only): the GEMM1 tiles in a static order (the queue's, program by program), before the compute
    queue, which then holds the other tasks; TRANSPORT (transport.TRANSPORTS); ON_GPU: compiled for a GPU
    (not the Triton interpreter, which runs no PTX: no clock, no fences); TRACE: record task
    timestamps; SAVE: GEMM1's outputs before the activation into Saved; APPROX_ACT: bf16 data, whose
    activations may take the GPU's approximate sigmoid (_times_sigmoid); PEER_SCOPE: the memory
    scope of the words and rows ranks exchange, "sys" (other GPUs read and write them), or "gpu" at
    world 1, where no other GPU takes part and a GPU-scope fence or atomic suffices (cheaper than a
    system-scope one, which each GEMM2 tile's row count and each combine tile's wait would pay)."""

    TOP_K: tl.constexpr
    K_POW2: tl.constexpr
    ACT: tl.constexpr
    GATED: tl.constexpr
    PAIR: tl.constexpr
    SHARED_PAIR: tl.constexpr
    SWIGLU_ALPHA: tl.constexpr
    SWIGLU_LIMIT: tl.constexpr
    HAS_BIAS: tl.constexpr
    WEIGHT_ON_INPUT: tl.constexpr
    PRECISION: tl.constexpr
    E_POW2: tl.constexpr
    W_POW2: tl.constexpr
    L_POW2: tl.constexpr
    BM: tl.constexpr
    CHUNK: tl.constexpr
    BN: tl.constexpr
    BN_OUT: tl.constexpr
    BF: tl.constexpr
    BK: tl.constexpr
    BT: tl.constexpr
    SPAN: tl.constexpr
    NF_POW2: tl.constexpr
    SHARED: tl.constexpr
    SHARED_GATE: tl.constexpr
    NFS_POW2: tl.constexpr
    STAGES: tl.constexpr
    GROUP: tl.constexpr
    STATIC_IN: tl.constexpr
    TRANSPORT: tl.constexpr
    ON_GPU: tl.constexpr
    TRACE: tl.constexpr
    SAVE: tl.constexpr
    APPROX_ACT: tl.constexpr
    PEER_SCOPE: tl.constexpr


class TileTable(NamedTuple):
    """This call's expert tiles, from the count words (_tile_table): counts [W_POW2, L_POW2] int32
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
    """One BM-row expert tile (_expert_tile): local expert e, its tile index c within e, per
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
def _report_timeout(scratch, wait, pe, expert, tile, epoch):
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
def _grouped(t, rows, cols, GROUP: tl.constexpr):
    """Task t of a rows x cols grid of tiles -> (row, col), taking GROUP rows at a time column by
    column: programs running side by side share a few row tiles and a few weight tiles in L2,
    instead of every program streaming a different slice of an expert's weights from HBM."""
    first = (t // (GROUP * cols)) * GROUP
    size = tl.minimum(rows - first, GROUP)
    r = t - first * cols
    return first + r % size, r // size


@triton.jit
def _activate(gate, up, meta):
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
def publish_counts(sym, plan, dims, epoch, rank, meta):
    """Write (epoch << 32 | rows) for every (destination, local expert) into the destination's
    count words [2, W, L] (parity slot epoch % 2, row `rank`)."""
    W, L = dims.world, dims.local_experts
    set_count_words(sym.count_words, plan.send_counts, ((epoch % 2) * W + rank) * L, W, L, epoch,
                    meta.E_POW2, meta.TRANSPORT)


@triton.jit
def dispatch_chunk(q, x_ptr, plan, sym, dims, epoch, rank, meta):
    """Copy send chunk q (CHUNK rows of one (dest, expert) pair) to the destination; raise its flag.
    P2P stores the rows there directly; NVSHMEM gathers them into send_x (local, symmetric; rows
    in sorted-slot order) and puts them as one block that carries the flag. Chunks for this rank
    itself are not copied: its expert tiles read those rows from x (ffn_in_tile). WEIGHT_ON_INPUT:
    each row goes out times its slot's routing weight (rounded to x's dtype, as the models do)."""
    H, S, L, MAXC = dims.hidden, dims.source_rows, dims.local_experts, dims.max_chunks
    CHUNK: tl.constexpr = meta.CHUNK
    pos = tl.load(plan.chunk_pos + q)
    if (pos >= 0) & (pos // L != rank):
        c = tl.load(plan.chunk_c + q)
        count = tl.load(plan.send_counts + pos)
        i = tl.arange(0, CHUNK)
        valid = c * CHUNK + i < count
        slot = tl.load(plan.pos_start + pos).to(tl.int64) + c * CHUNK + i
        routed = tl.load(plan.send_slot + slot, mask=valid, other=0)  # token * TOP_K + choice
        tok = (routed // meta.TOP_K).to(tl.int64)
        if meta.WEIGHT_ON_INPUT:
            w = tl.load(plan.slot_w + routed, mask=valid, other=0.0)
        dest, e = pos // L, pos % L
        row = (rank * S + tl.load(plan.region_off + pos) + c * CHUNK + i).to(tl.int64)
        dst, row = rows_target(sym.recv_x, dest, sym.send_x, row, slot, meta.TRANSPORT)
        for n0 in range(0, H, meta.BN):
            cols = n0 + tl.arange(0, meta.BN)
            m = valid[:, None] & (cols[None, :] < H)
            v = tl.load(x_ptr + tok[:, None] * H + cols[None, :], mask=m)
            if meta.WEIGHT_ON_INPUT:
                v = (v.to(tl.float32) * w[:, None]).to(x_ptr.dtype.element_ty)
            tl.store(dst + row[:, None] * H + cols[None, :], v, mask=m)
        rows = tl.minimum(count - c * CHUNK, CHUNK).to(tl.int64)
        ELT: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth // 8
        rows_sent(sym.chunk_flags, (rank * L + e) * MAXC + c, epoch, dest,
                  sym.recv_x.local + (rank * S + tl.load(plan.region_off + pos) + c * CHUNK) * H,
                  sym.send_x + tl.min(slot) * H, rows * H * ELT, meta.TRANSPORT)


@triton.jit
def _count_table(words, W, L, W_POW2: tl.constexpr, L_POW2: tl.constexpr):
    """[W_POW2, L_POW2] int32 rows each source sends to each local expert (count words, acquired)."""
    src = tl.arange(0, W_POW2)[:, None]
    e = tl.arange(0, L_POW2)[None, :]
    m = (src < W) & (e < L)
    return (tl.load(words + src * L + e, mask=m, other=0, volatile=True) & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _tile_table(words, dims, meta):
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
def _expert_tile(q, table, W, meta):
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


@triton.jit
def _k_loop(acc, a_rows, valid, desc, e, col, K, meta):
    """acc [BM, N] fp32 + the rows a_rows [BM] (row starts of K elements; rows where valid) @ the
    [K, N] block of expert e of the 3-D descriptor desc from column col, BK at a time (TMA boxes
    [1, BK, N])."""
    BK: tl.constexpr = meta.BK
    N: tl.constexpr = acc.shape[1]
    for k0 in tl.range(0, K, BK, num_stages=meta.STAGES):
        k = k0 + tl.arange(0, BK)
        a = tl.load(a_rows[:, None] + k[None, :], mask=valid[:, None] & (k < K)[None, :], other=0.0,
                    cache_modifier=".cg")
        acc = tl.dot(a, desc.load([e, k0, col]).reshape(BK, N), acc, input_precision=meta.PRECISION)
    return acc


@triton.jit
def _gemm_in(a_rows, valid, w_in, e, j, H, meta, PAIR: tl.constexpr):
    """GEMM1 of one tile: a_rows [BM] row starts of H elements (rows where valid) @ expert e of
    the descriptor w_in, FFN columns j*BF.. -> (gate, up) [BM, BF] fp32 (up: gate again unless
    GATED). GATED: w_in holds gate and up in pairs of PAIR columns (gate_up.py), so the gate
    columns of tile j and their up columns are the 2*BF columns from 2*j*BF: one TMA box and one
    tensor-core product [BM, 2*BF], whose registers then split into gate and up in place."""
    BF: tl.constexpr = meta.BF
    WIDTH: tl.constexpr = 2 * BF if meta.GATED else BF
    acc = _k_loop(tl.zeros((meta.BM, WIDTH), dtype=tl.float32), a_rows, valid, w_in, e, (j * WIDTH).to(tl.int32),
                  H, meta)
    if meta.GATED:
        pairs = acc.reshape(meta.BM, BF // PAIR, 2, PAIR).permute(0, 2, 1, 3).reshape(meta.BM, 2, BF)
        gate, up = pairs.permute(0, 2, 1).split()
    else:
        gate = acc
        up = acc
    return gate, up


@triton.jit
def _save_pre(pre, rows, valid, gate, up, f, F, PAIR: tl.constexpr, meta):
    """pre[rows, FFN columns f] := gate, and (GATED) their up columns := up, [BM, BF] fp32 each,
    in pre's dtype; pre holds F_in columns a row (gated: gate/up pairs of PAIR columns)."""
    r = rows.to(tl.int64)[:, None]
    m = valid[:, None] & (f < F)[None, :]
    if meta.GATED:
        col = _pair_col(f, PAIR)
        gate_at = pre + r * (2 * F) + col[None, :]
        tl.store(gate_at, gate.to(pre.dtype.element_ty), mask=m)
        tl.store(gate_at + PAIR, up.to(pre.dtype.element_ty), mask=m)
    else:
        tl.store(pre + r * F + f[None, :], gate.to(pre.dtype.element_ty), mask=m)


@triton.jit
def _pair_col(f, PAIR: tl.constexpr):
    """FFN column f's gate column in a last dimension of gate/up pairs (its up column: + PAIR)."""
    return 2 * PAIR * (f // PAIR) + f % PAIR


@triton.jit
def _gemm_out(a_rows, valid, w_out, e, col, F, meta):
    """GEMM2 of one tile: a_rows [BM] row starts of F elements (rows where valid) @ expert e of
    the descriptor w_out, columns col.. -> [BM, BN_OUT] fp32."""
    return _k_loop(tl.zeros((meta.BM, meta.BN_OUT), dtype=tl.float32), a_rows, valid, w_out, e, col, F, meta)


@triton.jit
def ffn_in_tile(q, j, held, x_ptr, plan, table, weights, sym, scratch, saved, dims, epoch, wait_limit, rank, meta):
    """h[rows of expert tile q, f-tile j] = act(x_rows @ w_in[e][:, f-tile]) once the rows arrived
    (table: the call's TileTable; weights: Weights): rows from other ranks from recv_x once their
    chunks' flags rise, this rank's own rows straight from x (ffn_in_rows). held: the h flag of
    this program's previous GEMM1 tile, not raised yet (-1: none); ffn_in_rows raises it. -> (ready,
    done) clock stamps when TRACE (module docstring), else zeros, and the flag now held: this
    tile's, or still `held` if the rows never came (a timeout, reported)."""
    W, L, MAXC = dims.world, dims.local_experts, dims.max_chunks
    t = _expert_tile(q, table, W, meta)
    n_short = 0
    if meta.W_POW2 > 1:  # at world 1 every row is x's own: no chunk to wait for
        own = t.valid & (t.src == rank)
        flags = sym.chunk_flags.local + (t.src * L + t.e) * MAXC + t.chunk
        short = wait_at_least(flags, t.valid & ~own, epoch, wait_limit, scratch.status, meta.PEER_SCOPE,
                              meta.ON_GPU)
        n_short = tl.sum(short.to(tl.int32))
        if n_short > 0:
            _report_timeout(scratch, WAIT_CHUNK, tl.min(tl.where(short, t.src, W)), t.e, q, epoch)
    ready = clock_ns() if meta.TRACE else 0
    done = ready
    if n_short == 0:
        done = ffn_in_rows(t, q, j, held, x_ptr, plan, weights, sym, scratch, saved, dims, epoch, rank, meta)
        held = (q * tl.cdiv(dims.ffn, meta.BF) + j).to(tl.int64)
    return ready, done, held


@triton.jit
def ffn_in_rows(t, q, j, held, x_ptr, plan, weights, sym, scratch, saved, dims, epoch, rank, meta):
    """The work of ffn_in_tile once expert tile t (ExpertTile q) has its rows: this rank's own rows
    straight from x (by the plan's token of each slot), never copied, others' from recv_x; GEMM1,
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
    first_own = tl.load(plan.pos_start + rank * L + t.e)  # the pair (this rank, e)'s first sorted slot
    routed = tl.load(plan.send_slot + first_own + t.pair_row, mask=own, other=0)  # token * TOP_K + choice
    tok = (routed // meta.TOP_K).to(tl.int64)
    a_rows = tl.where(own, x_ptr + tok * H, sym.recv_x.local + r * H)  # [BM] row starts
    f = j * BF + tl.arange(0, BF)
    fmask = f < F
    gate, up = _gemm_in(a_rows, t.valid, weights.w_in, t.e, j, H, meta, meta.PAIR)
    done = clock_ns() if meta.TRACE else 0
    _raise_held(held, scratch, epoch)
    if meta.WEIGHT_ON_INPUT:
        scale = tl.where(own, tl.load(plan.slot_w + routed, mask=own, other=1.0), 1.0)[:, None]
        gate = gate * scale
        up = up * scale
    if meta.HAS_BIAS:
        b_in = weights.b_in + t.e.to(tl.int64) * (2 * F if meta.GATED else F)
        g = _pair_col(f, meta.PAIR) if meta.GATED else f
        gate += tl.load(b_in + g, mask=fmask, other=0.0).to(tl.float32)[None, :]
        if meta.GATED:
            up += tl.load(b_in + g + meta.PAIR, mask=fmask, other=0.0).to(tl.float32)[None, :]
    if meta.SAVE:
        rows = t.base + t.c * meta.BM + tl.arange(0, meta.BM)
        _save_pre(saved.pre, rows, t.valid, gate, up, f, F, meta.PAIR, meta)
    h = _activate(gate, up, meta)
    tl.store(scratch.h + r[:, None] * F + f[None, :], h.to(scratch.h.dtype.element_ty),
             mask=t.valid[:, None] & fmask[None, :])
    return done


@triton.jit
def _raise_held(held, scratch, epoch):
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
def ffn_out_tile(q, n, pend, table, weights, sym, scratch, dims, epoch, wait_limit, rank, meta):
    """y[rows of expert tile q, n-tile (BN_OUT columns)] = h_rows @ w_out[e][:, n-tile] once all
    f-tiles of h are written, sent into each row's source rank (its combine_y region for this rank
    mirrors recv_x). The program's previous tile (pend: PendingTile) is counted between this
    tile's GEMM and its sends. -> (the tile left to count, a PendingTile; ready, done clock stamps
    when TRACE, else zeros).

    P2P stores the rows there; NVSHMEM stages the tile in recv_x's rows of the tile (their x is
    consumed: every f-tile of h is done) and puts each row from its own thread."""
    W, H, F, S = dims.world, dims.hidden, dims.ffn, dims.source_rows
    BN_OUT: tl.constexpr = meta.BN_OUT
    NF = tl.cdiv(F, meta.BF)
    t = _expert_tile(q, table, W, meta)
    r = (t.src * S + t.row).to(tl.int64)
    acc = tl.zeros((meta.BM, BN_OUT), dtype=tl.float32)
    f_tiles = tl.arange(0, meta.NF_POW2)
    short = wait_at_least(scratch.h_flags + q * NF + f_tiles, f_tiles < NF, epoch.to(tl.int32), wait_limit,
                          scratch.status, "gpu", meta.ON_GPU)
    ok = tl.sum(short.to(tl.int32)) == 0
    ready = clock_ns() if meta.TRACE else 0
    if ok:
        acc = _gemm_out(scratch.h + r * F, t.valid, weights.w_out, t.e, (n * BN_OUT).to(tl.int32), F, meta)
    done = clock_ns() if meta.TRACE else 0
    acc = _add_out_bias(acc, t.e, n, weights, H, meta)
    if not ok:
        _report_timeout(scratch, WAIT_HIDDEN, rank, t.e, q, epoch)
    else:
        if pend.e >= 0:
            count_tile_rows(pend, sym, dims, rank, meta)
        _send_out(acc, t, r, n, sym, S, H, rank, meta)
    pend = PendingTile(tl.where(ok, t.e, pend.e), tl.where(ok, t.c, pend.c), tl.where(ok, t.per_src, pend.per_src),
                       tl.where(ok, t.first, pend.first), tl.where(ok, n, pend.n))
    return pend, ready, done


@triton.jit
def _add_out_bias(acc, e, n, weights, H, meta):
    """acc [BM, BN_OUT] of GEMM2 column tile n of expert e, plus b_out's columns when HAS_BIAS."""
    if meta.HAS_BIAS:
        cols = n * meta.BN_OUT + tl.arange(0, meta.BN_OUT)
        acc += tl.load(weights.b_out + e.to(tl.int64) * H + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _send_out(acc, t, r, n, sym, S, H, rank, meta):
    """GEMM2 column tile n of expert tile t into each valid row's source rank (its combine_y rows
    for this rank mirror recv_x). recv_x's rows r of this tile are the staging space: their x is
    consumed (every f-tile of h is done) and the source sends nothing new into them before these
    rows reach it."""
    send_tile(acc, sym.combine_y, (rank * S + t.row).to(tl.int64), tl.where(t.valid, t.src, rank),
              sym.recv_x.local, r, t.valid, n * meta.BN_OUT, H, meta.BN_OUT, meta.TRANSPORT)


@triton.jit
def shared_in_tile(m, j, x_ptr, weights, scratch, saved, dims, tokens, epoch, meta):
    """h_s[tokens m*BM.., f-tile j] = act(x @ shared_w_in[:, f-tile]) for this rank's own tokens;
    the tile j = 0 also stores each token's shared gate, sigmoid(x . shared_gate), when there is
    one. Nothing to wait for."""
    H, FS = dims.hidden, dims.shared_ffn
    BF: tl.constexpr = meta.BF
    BK: tl.constexpr = meta.BK
    t = m * meta.BM + tl.arange(0, meta.BM)
    valid = t < tokens
    rows = x_ptr + t.to(tl.int64) * H
    gate, up = _gemm_in(rows, valid, weights.shared_w_in, 0, j, H, meta, meta.SHARED_PAIR)
    f = j * BF + tl.arange(0, BF)
    if meta.SAVE:
        _save_pre(saved.shared_pre, t, valid, gate, up, f, FS, meta.SHARED_PAIR, meta)
    tl.store(scratch.shared_h + t.to(tl.int64)[:, None] * FS + f[None, :],
             _activate(gate, up, meta).to(scratch.shared_h.dtype.element_ty), mask=valid[:, None] & (f < FS)[None, :])
    if meta.SHARED_GATE:
        if j == 0:
            logit = tl.zeros((meta.BM,), dtype=tl.float32)
            for k0 in range(0, H, BK):
                k = k0 + tl.arange(0, BK)
                a = tl.load(rows[:, None] + k[None, :], mask=valid[:, None] & (k < H)[None, :], other=0.0)
                g = tl.load(weights.shared_gate + k, mask=k < H, other=0.0)
                logit += tl.sum(a.to(tl.float32) * g.to(tl.float32)[None, :], axis=1)
            tl.store(scratch.shared_scale + t, tl.sigmoid(logit), mask=valid)
    signal(scratch.shared_h_flags + m * tl.cdiv(FS, BF) + j, epoch.to(tl.int32), "gpu")


@triton.jit
def shared_out_tile(m, n, weights, scratch, dims, tokens, epoch, wait_limit, rank, meta):
    """y_s[tokens m*BM.., n-tile] = h_s @ shared_w_out[:, n-tile] (times the shared gate) once every
    f-tile of h_s is written. -> ready clock stamp when TRACE, else zero."""
    H, FS = dims.hidden, dims.shared_ffn
    BN_OUT: tl.constexpr = meta.BN_OUT
    NFS = tl.cdiv(FS, meta.BF)
    f_tiles = tl.arange(0, meta.NFS_POW2)
    short = wait_at_least(scratch.shared_h_flags + m * NFS + f_tiles, f_tiles < NFS, epoch.to(tl.int32),
                          wait_limit, scratch.status, "gpu", meta.ON_GPU)
    ready = clock_ns() if meta.TRACE else 0
    if tl.sum(short.to(tl.int32)) > 0:
        _report_timeout(scratch, WAIT_HIDDEN, rank, -1, m, epoch)
    else:
        t = m * meta.BM + tl.arange(0, meta.BM)
        valid = t < tokens
        acc = _gemm_out(scratch.shared_h + t.to(tl.int64) * FS, valid, weights.shared_w_out, 0,
                        (n * BN_OUT).to(tl.int32), FS, meta)
        if meta.SHARED_GATE:
            acc = acc * tl.load(scratch.shared_scale + t, mask=valid, other=0.0)[:, None]
        cols = n * BN_OUT + tl.arange(0, BN_OUT)
        tl.store(scratch.shared_y + t.to(tl.int64)[:, None] * H + cols[None, :],
                 acc.to(scratch.shared_y.dtype.element_ty), mask=valid[:, None] & (cols < H)[None, :])
        signal(scratch.shared_y_flags + m * tl.cdiv(H, meta.BN) + n, epoch.to(tl.int32), "gpu")
    return ready


@triton.jit
def _shared_task(s, n_sin, n_rows, x_ptr, weights, scratch, saved, dims, tokens, epoch, wait_limit, rank, meta):
    """Shared-expert task s: shared_in tiles first, then shared_out tiles, each grid grouped as the
    experts' are. -> ready clock stamp when TRACE. Compiled only with shared experts."""
    ready = clock_ns() if meta.TRACE else 0
    if meta.SHARED:
        if s < n_sin:
            m, j = _grouped(s, n_rows, tl.cdiv(dims.shared_ffn, meta.BF), meta.GROUP)
            shared_in_tile(m, j, x_ptr, weights, scratch, saved, dims, tokens, epoch, meta)
        else:
            m, n = _grouped(s - n_sin, n_rows, tl.cdiv(dims.hidden, meta.BN_OUT), meta.GROUP)
            ready = shared_out_tile(m, n, weights, scratch, dims, tokens, epoch, wait_limit, rank, meta)
    return ready


@triton.jit
def combine_tile(tt, n0, out_ptr, plan, sym, scratch, dims, tokens, epoch, wait_limit, meta):
    """out[tokens, n-tiles] = sum_k w[t, k] * y[slot(t, k), n-tile] (+ y_s[tokens, n-tile]) for BT
    tokens and the SPAN column tiles of BN from n0 (those < NN), once each slot's chunk counters
    have reached the rows this rank expects in them (one wait for all BT x TOP_K slots and SPAN
    columns, then every row's load of a column tile can be in flight at once), and the shared
    output's tiles are written. Each column tile reads its slots' rows and weights per k as [BT]
    vectors in the tile's own row layout (a [BT, TOP_K] table split per k would cost a layout
    conversion through shared memory per k: +10% on qwen3 at SPAN 1, bench/NOTES.md item 52).
    -> (ready, done) clock stamps when TRACE."""
    W, H, S = dims.world, dims.hidden, dims.source_rows
    NN = tl.cdiv(H, meta.BN)
    TOP_K: tl.constexpr = meta.TOP_K
    BT: tl.constexpr = meta.BT
    BN: tl.constexpr = meta.BN
    SPAN: tl.constexpr = meta.SPAN
    t = tt * BT + tl.arange(0, BT)
    tmask = t < tokens
    k = tl.arange(0, meta.K_POW2)
    slots = t.to(tl.int64)[:, None] * TOP_K + k[None, :]
    dest = tl.load(plan.slot_dest + slots, mask=tmask[:, None] & (k[None, :] < TOP_K), other=-1)
    live = dest >= 0
    chunk = tl.load(plan.slot_chunk + slots, mask=live, other=0).to(tl.int64)
    expect = tl.load(scratch.comb_expect + chunk, mask=live, other=0)
    span = n0 + tl.arange(0, SPAN)
    if SPAN == 1:
        short = wait_at_least(sym.combine_counts.local + chunk * NN + n0, live, expect, wait_limit, scratch.status,
                              meta.PEER_SCOPE, meta.ON_GPU)
        missing = tl.min(tl.where(short, dest, W))  # the lowest rank whose rows did not come back (W: none)
    else:
        words = (chunk * NN)[:, :, None] + span[None, None, :]
        short = wait_at_least(sym.combine_counts.local + words, live[:, :, None] & (span < NN)[None, None, :],
                              expect[:, :, None], wait_limit, scratch.status, meta.PEER_SCOPE, meta.ON_GPU)
        missing = tl.min(tl.where(short, dest[:, :, None], W))
    if meta.SHARED:  # the shared output tiles holding these tokens and columns (BT | BM, BN | BN_OUT)
        flags = scratch.shared_y_flags + (tt * BT) // meta.BM * NN + (span * BN) // meta.BN_OUT
        if tl.sum(wait_at_least(flags, span < NN, epoch.to(tl.int32), wait_limit, scratch.status, "gpu",
                                meta.ON_GPU).to(tl.int32)) > 0:
            _report_timeout(scratch, WAIT_HIDDEN, -1, -1, tt, epoch)
    ready = clock_ns() if meta.TRACE else 0
    for c in tl.static_range(SPAN):
        if n0 + c < NN:
            cols = (n0 + c) * BN + tl.arange(0, BN)
            cmask = cols < H
            acc = tl.zeros((BT, BN), dtype=tl.float32)
            if meta.SHARED:
                acc += tl.load(scratch.shared_y + t.to(tl.int64)[:, None] * H + cols[None, :],
                               mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            for kk in tl.static_range(TOP_K):
                s = t.to(tl.int64) * TOP_K + kk
                d = tl.load(plan.slot_dest + s, mask=tmask, other=-1)
                ok = d >= 0
                row = tl.load(plan.slot_row + s, mask=ok, other=0).to(tl.int64)
                if meta.WEIGHT_ON_INPUT:  # the weight went in with the rows: their outputs add as they are
                    w = tl.where(ok, 1.0, 0.0)
                else:
                    w = tl.load(plan.slot_w + s, mask=ok, other=0.0)
                y = tl.load(sym.combine_y.local + (d.to(tl.int64) * S + row)[:, None] * H + cols[None, :],
                            mask=ok[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")
                acc += w[:, None] * y.to(tl.float32)
            tl.store(out_ptr + t.to(tl.int64)[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=tmask[:, None] & cmask[None, :])
    done = clock_ns() if meta.TRACE else 0
    if missing < W:
        _report_timeout(scratch, WAIT_COMBINE, missing, -1, tt, epoch)
    return ready, done


@triton.jit
def static_ffn_in_tiles(n_in, n_tiles, trace_row, x_ptr, plan, table, weights, sym, scratch, saved, dims, epoch,
                        wait_limit, rank, meta):
    """STATIC_IN (world 1): this program's GEMM1 tasks i = program, program + P, .. < n_in (the
    queue's grouped order), each as the queue runs one (ffn_in_tile: its own K loop, the previous
    tile's h flag raised after it), without the queue's atomic per task. Those tiles wait for
    nothing (their rows are x's), so the static order cannot deadlock while every program runs.
    trace_row: the trace row of task 0. -> the h flag of the program's last tile, still held."""
    NF = tl.cdiv(dims.ffn, meta.BF)
    P = tl.num_programs(0)
    held = tl.full((), -1, tl.int64)
    for i in range(tl.program_id(0), n_in, P):
        start = clock_ns() if meta.TRACE else 0
        q, j = _grouped(i, n_tiles, NF, meta.GROUP)
        ready, done, held = ffn_in_tile(q, j, held, x_ptr, plan, table, weights, sym, scratch, saved, dims, epoch,
                                        wait_limit, rank, meta)
        _stamp(scratch.trace, trace_row + i, TASK_FFN_IN, start, ready, done, meta.TRACE)
    return held


@triton.jit(do_not_specialize=["tokens", "wait_limit", "send_chunks", "dispatch_programs"])
def fused_moe_kernel(x_ptr, out_ptr, w_in, w_out, shared_w_in, shared_w_out, biases, plan, sym, scratch, saved,
                     dims, tokens, wait_limit, send_chunks, dispatch_programs, meta):
    """See the module docstring. x, out: [tokens, H]; w_in .. shared_w_out: the descriptors of
    Weights, biases: Biases; plan: kernels/plan.RoutingPlan; sym: workspace.Symmetric; scratch:
    workspace.Scratch; saved: Saved; dims: Dims; send_chunks: entries of plan.chunk_pos; dispatch_programs:
    programs that start on the front queue; wait_limit: nanoseconds (meta.ON_GPU) or rounds any
    one wait may last; meta: Meta."""
    weights = Weights(w_in, w_out, biases.b_in, biases.b_out, shared_w_in, shared_w_out, biases.shared_gate)
    rank = dims.rank
    W, L, H, F = dims.world, dims.local_experts, dims.hidden, dims.ffn
    NF = tl.cdiv(F, meta.BF)
    NN = tl.cdiv(H, meta.BN)  # combine column tiles (and combine counters per chunk)
    NN_OUT = tl.cdiv(H, meta.BN_OUT)  # GEMM2 column tiles
    ctl = scratch.ctl
    epoch = tl.load(ctl + CTL_EPOCH)
    n_front = 1 + send_chunks
    P = tl.num_programs(0)
    task = tl.cast(n_front, tl.int64)
    if tl.program_id(0) < dispatch_programs:
        task = tl.atomic_add(ctl + CTL_FRONT_TASKS, 1, sem="relaxed")
    while task < n_front:
        start = clock_ns() if meta.TRACE else 0
        if task == 0:
            publish_counts(sym, plan, dims, epoch, rank, meta)
        else:
            dispatch_chunk(task - 1, x_ptr, plan, sym, dims, epoch, rank, meta)
        _stamp(scratch.trace, P + task, tl.minimum(task, TASK_DISPATCH), start, start, start, meta.TRACE)
        task = tl.atomic_add(ctl + CTL_FRONT_TASKS, 1, sem="relaxed")

    # What every source sends to this rank's experts this call: a word is current once its epoch
    # field reaches this call's (a source cannot be two calls ahead of this rank).
    words = sym.count_words.local + (epoch % 2) * W * L
    start = clock_ns() if meta.TRACE else 0
    idx = tl.arange(0, meta.E_POW2)
    pairs = idx < W * L
    short = wait_at_least(words + idx, pairs, epoch << 32, wait_limit, scratch.status, meta.PEER_SCOPE, meta.ON_GPU)
    n_short = tl.sum(short.to(tl.int32))
    if n_short > 0:
        _report_timeout(scratch, WAIT_COUNTS, tl.min(tl.where(short, idx // L, W)), -1, -1, epoch)
    healthy = n_short == 0  # a sum: the same in every warp (the counts are not to be used otherwise)
    _stamp(scratch.trace, tl.program_id(0), WAITED_COUNTS, start, start, start, meta.TRACE)
    table = _tile_table(words, dims, meta)
    n_tiles = tl.sum(table.tiles)
    n_in = n_tiles * NF
    n_out = n_tiles * NN_OUT
    NN_COMB = tl.cdiv(NN, meta.SPAN)  # combine tasks per BT tokens
    n_comb = tl.cdiv(tokens, meta.BT) * NN_COMB
    n_rows = tl.cdiv(tokens, meta.BM)  # shared-expert row tiles
    n_sin = n_rows * tl.cdiv(dims.shared_ffn, meta.BF) if meta.SHARED else 0
    n_sout = n_rows * NN_OUT if meta.SHARED else 0
    n_shared = n_sin + n_sout
    first_ffn = P + n_front + n_shared  # the trace row of the first GEMM1 task
    # The h flag of this program's last GEMM1 tile, raised late (ffn_in_rows; -1: none): before
    # any other kind of task, which may wait for it, and at the end.
    held = tl.full((), -1, tl.int64)
    if meta.STATIC_IN:
        held = static_ffn_in_tiles(tl.where(healthy, n_in, 0), n_tiles, first_ffn, x_ptr, plan, table, weights, sym,
                                   scratch, saved, dims, epoch, wait_limit, rank, meta)
    skip = n_in if meta.STATIC_IN else 0  # queue ids past the shared tasks
    # This program's GEMM2 tile whose rows are not counted yet (none while pend.e < 0).
    pend = PendingTile(tl.full((), -1, tl.int32), tl.full((), 0, tl.int64), tl.zeros((meta.W_POW2,), dtype=tl.int32),
                       tl.zeros((meta.W_POW2,), dtype=tl.int32), tl.full((), 0, tl.int64))
    task = n_front + tl.atomic_add(ctl + CTL_COMPUTE_TASKS, 1, sem="relaxed")
    while (task < n_front + n_shared + n_in + n_out + n_comb - skip) & healthy:
        start = clock_ns() if meta.TRACE else 0
        ready = start
        done = start
        q = task - n_front - n_shared
        if meta.STATIC_IN:
            q = tl.where(q < 0, q, q + skip)
        q_task = q  # the task's id past the front and shared tasks
        if (held >= 0) & ((q < 0) | (q >= n_in)):
            held = _raise_held(held, scratch, epoch)
        if q < 0:  # only with shared experts
            ready = _shared_task(q + n_shared, n_sin, n_rows, x_ptr, weights, scratch, saved, dims, tokens, epoch,
                                 wait_limit, rank, meta)
            done = clock_ns() if meta.TRACE else 0
        elif q < n_in:
            if not meta.STATIC_IN:  # else the static loop took every GEMM1 tile: this is never reached
                q, j = _grouped(q, n_tiles, NF, meta.GROUP)
                ready, done, held = ffn_in_tile(q, j, held, x_ptr, plan, table, weights, sym, scratch, saved, dims,
                                                epoch, wait_limit, rank, meta)
        elif q < n_in + n_out:
            q, n = _grouped(q - n_in, n_tiles, NN_OUT, meta.GROUP)
            pend, ready, done = ffn_out_tile(q, n, pend, table, weights, sym, scratch, dims, epoch, wait_limit,
                                             rank, meta)
        else:
            if pend.e >= 0:  # combine tiles wait for counts: none may be left pending behind them
                count_tile_rows(pend, sym, dims, rank, meta)
                pend = PendingTile(tl.full((), -1, tl.int32), pend.c, pend.per_src, pend.first, pend.n)
            q -= n_in + n_out
            ready, done = combine_tile(q // NN_COMB, (q % NN_COMB) * meta.SPAN, out_ptr, plan, sym, scratch, dims,
                                       tokens, epoch, wait_limit, meta)
        q = q_task
        kind = tl.where(q < n_in, TASK_FFN_IN, tl.where(q < n_in + n_out, TASK_FFN_OUT, TASK_COMBINE))
        kind = tl.where(q < -n_sout, TASK_SHARED_IN, tl.where(q < 0, TASK_SHARED_OUT, kind))
        _stamp(scratch.trace, first_ffn + q, kind, start, ready, done, meta.TRACE)
        task = n_front + tl.atomic_add(ctl + CTL_COMPUTE_TASKS, 1, sem="relaxed")

    _raise_held(held, scratch, epoch)
    if pend.e >= 0:
        count_tile_rows(pend, sym, dims, rank, meta)
    puts_complete(meta.TRANSPORT)
    # The last program out rewinds the task counters and opens the next epoch.
    if tl.atomic_add(ctl + CTL_PROGRAMS_DONE, 1, sem="acq_rel") == P - 1:
        tl.store(ctl + CTL_FRONT_TASKS, 0)
        tl.store(ctl + CTL_PROGRAMS_DONE, 0)
        tl.store(ctl + CTL_COMPUTE_TASKS, 0)
        tl.store(ctl + CTL_EPOCH, epoch + 1)


def fused_kernel_args(x, out, experts: dict, plan, ws, launch, *, config, rank: int, timeout_s: float,
                      trace: torch.Tensor | None = None, saved: Saved | None = None) -> tuple[tuple, dict]:
    """Check shapes and build fused_moe_kernel's arguments for one forward -> (args, kwargs;
    kwargs hold the constexpr-free launch options num_warps and, for NVSHMEM, extern_libs).

    x, out: [T, H]; experts: this rank's expert weights by name, w_in [L, H, F_in], w_out [L, F, H]
    and, when config.expert_bias, b_in [L, F_in], b_out [L, H] (gated: w_in, b_in and shared_w_in
    in the layer's gate/up pairs, gate_up.py; x's dtype and device; rows of
    16-byte multiples, as TMA needs: hidden and ffn multiples of 8, checked by the layer);
    config: the layer's MoEConfig; plan: a
    kernels/plan.RoutingPlan of x; ws: the layer's workspace.Workspace; launch: a
    launch_config.LaunchConfig; timeout_s: how long any one wait in the kernel may last (on
    GPUs by the GPU's clock; in the interpreter, INTERPRETER_ROUNDS_PER_S polling rounds a
    second); trace: None, or [geo.trace_rows(T, launch.programs), TRACE_COLS] int64 that receives
    the kernel's task timestamps (module docstring; bench/kernel_profile.py); saved: None, or the
    Saved tensors this launch fills for backward="saved" (x's dtype and device: pre [R, F_in]
    with R at least the rows this rank's experts receive; shared_pre [T, Fs_in] with shared
    experts)."""
    geo = ws.geo
    T, H = x.shape
    W, L, F = geo.world_size, geo.local_experts, geo.ffn
    gated = config.gated
    w_in, w_out = experts["w_in"], experts["w_out"]
    expect = {"x": (x, (T, geo.hidden)), "out": (out, (T, H)), "w_in": (w_in, (L, H, F * (2 if gated else 1))),
              "w_out": (w_out, (L, F, H))}
    if config.expert_bias:
        expect.update(b_in=(experts["b_in"], (L, F * (2 if gated else 1))), b_out=(experts["b_out"], (L, H)))
    FS = config.shared_width
    if FS:
        expect.update(shared_w_in=(experts["shared_w_in"], (H, FS * (2 if gated else 1))),
                      shared_w_out=(experts["shared_w_out"], (FS, H)))
    if config.shared_expert_gate:
        expect["shared_gate_weight"] = (experts["shared_gate_weight"], (1, H))
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor of shape {shape}, got "
                             f"{tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}")
    if T > geo.max_tokens:
        raise ValueError(f"{T} tokens exceed max_tokens_per_rank={geo.max_tokens}")
    if H % TMA_ROW_MULTIPLE or F % TMA_ROW_MULTIPLE or FS % TMA_ROW_MULTIPLE:
        raise ValueError(f"hidden={H}, ffn={F}, shared ffn={FS}: the weights' TMA loads need multiples of "
                         f"{TMA_ROW_MULTIPLE}")
    if geo.block_f % PAIR_MAX:
        raise ValueError(f"block_f={geo.block_f}: GEMM1 tiles must hold whole gate/up pairs ({PAIR_MAX} columns)")
    if FS != geo.shared_ffn:
        raise ValueError(f"the workspace holds shared experts of width {geo.shared_ffn}, the config {FS}")
    if saved is not None:
        _check_saved(saved, x, geo, config)
    if trace is not None and (trace.dtype != torch.int64 or trace.dim() != 2
                              or trace.shape[1] != TRACE_COLS.value
                              or trace.shape[0] < geo.trace_rows(T, launch.programs)):
        raise ValueError(f"trace: expected int64 [{geo.trace_rows(T, launch.programs)}, {TRACE_COLS.value}], got "
                         f"{trace.dtype} {tuple(trace.shape)}")
    launch.check(geo)
    on_gpu = x.is_cuda
    if launch.static_ffn_in and triton.knobs.runtime.interpret and launch.programs > 1:
        # a program's GEMM2 tiles wait for other programs' static GEMM1 tiles: all must run at once
        raise ValueError("static_ffn_in=1 in the Triton interpreter needs programs=1: it runs programs "
                         "one after another")
    wait_limit = int(timeout_s * (1e9 if on_gpu else INTERPRETER_ROUNDS_PER_S)) or 1
    top_k = plan.slot_dest.shape[1]
    c = tl.constexpr
    meta = Meta(TOP_K=c(top_k), K_POW2=c(triton.next_power_of_2(top_k)), ACT=c(ACT_CODES[config.activation]),
                GATED=c(gated), PAIR=c(pair_width(F)), SHARED_PAIR=c(pair_width(FS) if FS else 1),
                SWIGLU_ALPHA=c(float(config.swiglu_alpha)), SWIGLU_LIMIT=c(float(config.swiglu_limit)),
                HAS_BIAS=c(config.expert_bias), WEIGHT_ON_INPUT=c(config.weight_on_input),
                PRECISION=c("tf32x3" if x.dtype == torch.float32 else "tf32"),
                E_POW2=c(triton.next_power_of_2(W * L)), W_POW2=c(triton.next_power_of_2(W)),
                L_POW2=c(triton.next_power_of_2(L)), BM=c(launch.block_m), CHUNK=c(geo.chunk), BN=c(geo.block_n),
                BN_OUT=c(launch.block_n), BF=c(geo.block_f), BK=c(geo.block_k), BT=c(launch.block_t),
                SPAN=c(launch.combine_span),
                NF_POW2=c(triton.next_power_of_2(geo.ffn_tiles)), SHARED=c(FS > 0),
                SHARED_GATE=c(config.shared_expert_gate),
                NFS_POW2=c(triton.next_power_of_2(max(geo.shared_ffn_tiles, 1))),
                STAGES=c(launch.stages), GROUP=c(launch.group),
                STATIC_IN=c(bool(launch.static_ffn_in)),
                TRANSPORT=c(TRANSPORTS[ws.transport]), ON_GPU=c(on_gpu), TRACE=c(trace is not None),
                SAVE=c(saved is not None), APPROX_ACT=c(x.dtype == torch.bfloat16),
                PEER_SCOPE=c("gpu" if W == 1 else "sys"))
    dims = Dims(W, L, H, F, geo.source_rows, geo.max_chunks, FS, rank)
    # GEMM1 boxes: gated, a tile's gate and up columns side by side (w_in in gate_up.py's pairs)
    w_in_blocks = [1, geo.block_k, geo.block_f * (2 if gated else 1)]
    w_out_blocks = [1, geo.block_k, launch.block_n]
    w_in_desc = TensorDescriptor.from_tensor(w_in, w_in_blocks)
    w_out_desc = TensorDescriptor.from_tensor(w_out, w_out_blocks)
    if FS:  # one FFN: a descriptor of one expert
        s_in = TensorDescriptor.from_tensor(experts["shared_w_in"][None], w_in_blocks)
        s_out = TensorDescriptor.from_tensor(experts["shared_w_out"][None], w_out_blocks)
    biases = Biases(experts.get("b_in", w_in), experts.get("b_out", w_in), experts.get("shared_gate_weight", w_in))
    args = (x, out, w_in_desc, w_out_desc, s_in if FS else w_in_desc, s_out if FS else w_out_desc, biases, plan,
            ws.sym, ws.with_trace(trace), saved or Saved(out, out), dims, T, wait_limit, plan.chunk_pos.numel(),
            launch.dispatch_programs, meta)
    kwargs = {"num_warps": launch.num_warps}
    if ws.transport == "nvshmem":
        kwargs["extern_libs"] = {"libnvshmem_device": nvshmem_device_library()}
    return args, kwargs


def _check_saved(saved: Saved, x: torch.Tensor, geo, config) -> None:
    """saved's tensors: x's dtype and device, contiguous, F_in (Fs_in) columns; pre with at
    least the rows of x's slots at world 1 (where nothing else arrives), shared_pre a row per
    token."""
    T = x.shape[0]
    f_in, fs_in = config.ffn_in_size, config.shared_ffn_in_size
    rows = T * min(geo.top_k, geo.local_experts) if geo.world_size == 1 else saved.pre.shape[0]
    expect = {"pre": (saved.pre, rows, f_in)}
    if fs_in:
        expect["shared_pre"] = (saved.shared_pre, T, fs_in)
    for name, (t, least, cols) in expect.items():
        if (t.dim() != 2 or t.shape[0] < least or t.shape[1] != cols or t.dtype != x.dtype or t.device != x.device
                or not t.is_contiguous()):
            raise ValueError(f"saved.{name}: expected a contiguous {x.dtype} tensor of at least {least} rows and "
                             f"{cols} columns on {x.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")


def launch_fused(x, out, experts: dict, plan, ws, launch, *, config, rank: int, timeout_s: float,
                 trace: torch.Tensor | None = None, saved: Saved | None = None) -> None:
    """One forward's kernel launch on launch.programs programs (arguments: fused_kernel_args)."""
    args, kwargs = fused_kernel_args(x, out, experts, plan, ws, launch, config=config, rank=rank,
                                     timeout_s=timeout_s, trace=trace, saved=saved)
    with nvshmem_launch() if ws.transport == "nvshmem" else contextlib.nullcontext():
        fused_moe_kernel[(launch.programs,)](*args, **kwargs)
