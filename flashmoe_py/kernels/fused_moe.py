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
  ffn_out_tile    y = h_rows @ w_out[e][:, n-tile] once every f-tile of its rows' h is flagged,
                  written straight into each row's source rank, whose per-chunk row counters a
                  program bumps one tile later (count_tile_rows): after its next tile's GEMM, so
                  the rows drain over NVLink while it computes, or before it takes a combine tile;
                  with few such tiles (decode; LaunchConfig.f_split) each is split over the
                  f-tiles into parts, tasks of their own, each waiting for its own f-tiles' h;
                  the last part done sums all parts' fp32 partials in part order and sends;
  shared_in_tile  (shared experts) BM of this rank's tokens: h_s = act(x @ shared_w_in[:, f-tile]),
                  and with a shared gate, its sigmoid(x . g) per token; local, no waits: done while
                  this rank's rows are still on their way to and from the experts;
  shared_out_tile y_s = h_s @ shared_w_out[:, n-tile] (times the gate) once h_s is written;
  combine_tile    for BT of this rank's tokens and SPAN n-tiles: wait for its k expert rows (and
                  the shared output), weighted sum.

An expert's tiles span all sources, so its weights are read once per BM rows it received in all,
not once per source. Weight tiles come through the tensor memory accelerator (TMA: Weights),
token rows through gathered loads, except at world 1 for wide experts: GEMM2's h rows (H_TMA), and
GEMM1's token rows once a kernel before the launch has copied them into expert order (SORTED_IN):
one source, so a tile's rows are one block, loaded as TMA boxes too.

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
program per SM on a GPU of its own gives; a program held back (another process's kernels under
MPS, say) delays the ffn_out tiles that wait for its tiles, and if it stays out longer than the
wait limit they end the call at the timeout: no hang. The launcher keeps the queue where it knows
SMs are shared (backends/flash.py).

Trace (TRACE=True, for bench/kernel_profile.py): each program stamps this GPU's nanosecond clock
around its tasks: row pid of the trace holds (pid, WAITED_COUNTS, front done three times, counts
acquired), row num_programs + task holds (pid, kind, start, ready, math done, end) with kind one of the
TASK_* codes (compute tasks numbered after the front tasks): ready when the task's waits are
over, math done after its GEMM loop (combine: after its weighted sum; front tasks: both = start).

Epochs: ctl[CTL_EPOCH] holds the call number (from 1 to layout.EPOCH_LAST; a launch past it computes nothing and
reports WAIT_EPOCHS, until Workspace.restart_epochs). Flags store it, so none is reset between calls. Count words are
double-buffered by epoch parity: a fast peer may publish call n+1's counts while a slow program
here still reads call n's. Combine counters only grow; the source compares them with its own
running total of rows it expects (comb_expect, advanced by the routing plan before each call).

This file holds the kernel's main loop, its bundles and its launcher; the tasks' device functions
are in fused_moe_details/, one family per module (tasks, dispatch, expert_ffn, shared_experts,
combine). The words of ctl and status, the wait codes and the trace layout are named in
kernels/layout.py; the buffers are bundled as kernels/workspace.py describes. Shorthands: W ranks, L
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
from .fused_moe_details.combine import combine_tile
from .fused_moe_details.dispatch import dispatch_chunk, publish_counts
from .fused_moe_details.expert_ffn import count_tile_rows, ffn_in_tile, ffn_out_tile, raise_held, split_parts
from .fused_moe_details.shared_experts import shared_task
from .fused_moe_details.tasks import PendingTile, grouped, report_timeout, stamp, tile_table
from .layout import (ACT_CODES, CTL_COMPUTE_TASKS, CTL_EPOCH, CTL_FRONT_TASKS, CTL_PROGRAMS_DONE, EPOCH_LAST,
                     TASK_COMBINE, TASK_DISPATCH, TASK_FFN_IN, TASK_FFN_OUT, TASK_SHARED_IN, TASK_SHARED_OUT,
                     TRACE_COLS, WAITED_COUNTS, WAIT_COUNTS, WAIT_EPOCHS)
from .addresses import check_words, rebase
from .sorted_rows import compile_sort_rows, sort_rows
from .transport import TRANSPORTS, clock_ns, nvshmem_device_library, nvshmem_launch, puts_complete, wait_at_least

# The interpreter runs no PTX, so has no clock: its waits count polling rounds instead (about 0.7 ms
# each on a CPU for a wait on a few words).
INTERPRETER_ROUNDS_PER_S = 1000
# TMA reads rows of 16-byte multiples: hidden and ffn sizes in multiples of 8 (bf16) elements.
TMA_ROW_MULTIPLE = 8


class Biases(NamedTuple):
    """The weights of Weights that are plain tensors, as the kernel takes them (Triton 3.6's
    launcher takes tensor descriptors only as arguments of their own, not inside a tuple)."""

    bias_in: torch.Tensor
    bias_out: torch.Tensor
    shared_gate: torch.Tensor


class Weights(NamedTuple):
    """This rank's expert weights, as the kernel's stages see them (fused_moe_kernel builds it from
    its descriptor arguments and Biases): w_in [L, H, F_in] and w_out [L, F, H] as tensor descriptors,
    so their tiles are loaded by the tensor memory accelerator (TMA) and zero-filled past each
    expert's edges ([1, BK, BF] and [1, BK, BN_OUT] blocks; gated: F_in = 2F, gate and up columns in
    pairs of PAIR (gate_up.py), a GEMM1 block [1, BK, 2 * BF]); the biases bias_in [L, F_in] and
    bias_out [L, H] (Meta.HAS_BIAS); the shared experts (Meta.SHARED), one FFN of width Fs:
    shared_w_in [1, H, Fs_in] and shared_w_out [1, Fs, H] descriptors as the experts', and the
    gate's weights shared_gate [1, H] (SHARED_GATE); x_rows, recv_x as a [W * S, H] descriptor
    (boxes [BM, BK]), GEMM1's token rows with Meta.SORTED_IN. What a config lacks, or a launch
    does not read, is some other tensor or descriptor, unread."""

    w_in: TensorDescriptor
    w_out: TensorDescriptor
    bias_in: torch.Tensor
    bias_out: torch.Tensor
    shared_w_in: TensorDescriptor
    shared_w_out: TensorDescriptor
    shared_gate: torch.Tensor
    x_rows: TensorDescriptor


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
    experts' width (Fs; 0 without), this rank, and the GEMM2 tiles (counting each part) whose
    partial sums fit the workspace's out_partials at this launch's tile size (LaunchConfig.f_split;
    the kernel also keeps them within its programs)."""

    world: int
    local_experts: int
    hidden: int
    ffn: int
    source_rows: int
    max_chunks: int
    shared_ffn: int
    rank: int
    split_slots: int


class Meta(NamedTuple):
    """Compile-time settings, each a tl.constexpr: TOP_K (K_POW2 its power of two); ACT (ACT_CODES),
    GATED (gate and up columns, in pairs of PAIR columns of w_in and SHARED_PAIR of shared_w_in:
    gate_up.py), SWIGLU_ALPHA and SWIGLU_LIMIT of clamped_swiglu; HAS_BIAS (expert biases);
    WEIGHT_ON_INPUT (a slot's routing weight scales the expert's input, not its output); PRECISION
    of fp32 dots; E_POW2, W_POW2, L_POW2 powers of two >= W * L, W, L; tiles BM (expert rows), CHUNK
    (dispatch rows), BN (combine columns), BN_OUT (GEMM2 columns), BF (GEMM1 columns), BK (K step),
    BT (combine tokens), SPAN (combine column tiles of one combine task), NF_POW2 (>= GEMM1 column
    tiles); SHARED, SHARED_GATE (shared experts, their sigmoid gate) and NFS_POW2 (>= their GEMM1
    column tiles); STAGES of the K loops; GROUP of expert tiles taken together; F_SPLIT: the most
    parts a GEMM2 tile's K loop is split into (LaunchConfig.f_split); STATIC_IN (world 1
    only): the GEMM1 tiles in a static order (the queue's, program by program), before the compute
    queue, which then holds the other tasks; H_TMA (world 1 only): GEMM2 loads a tile's h rows,
    one block, through TMA (h_rows) instead of gathering them; SORTED_IN (world 1 only): GEMM1
    loads a tile's token rows, copied into recv_x in expert order before the launch
    (kernels/sorted_rows.py), through TMA too (Weights.x_rows); DIRECT_OUT (world 1, top-1, no
    shared experts): GEMM2 tiles store their rows, weighted, into out, and no combine tasks run
    (LaunchConfig.direct_out); TRANSPORT (transport.TRANSPORTS);
    ON_GPU: compiled for a GPU (not the Triton interpreter, which runs no PTX: no clock, no
    fences); TRACE: record task timestamps; SAVE: GEMM1's outputs before the activation into
    Saved; APPROX_ACT: bf16 data, whose activations may take the GPU's approximate sigmoid
    (_times_sigmoid); PEER_SCOPE: the memory scope of the words and rows ranks exchange, "sys"
    (other GPUs read and write them), or "gpu" at world 1, where no other GPU takes part and a
    GPU-scope fence or atomic suffices (cheaper than a system-scope one, which each GEMM2 tile's
    row count and each combine tile's wait would pay); IO_AT: x and out are the tensors whose
    addresses the kernel's io words hold (kernels/addresses.py), not its x and out arguments."""

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
    F_SPLIT: tl.constexpr
    STATIC_IN: tl.constexpr
    H_TMA: tl.constexpr
    SORTED_IN: tl.constexpr
    DIRECT_OUT: tl.constexpr
    TRANSPORT: tl.constexpr
    ON_GPU: tl.constexpr
    TRACE: tl.constexpr
    SAVE: tl.constexpr
    APPROX_ACT: tl.constexpr
    PEER_SCOPE: tl.constexpr
    IO_AT: tl.constexpr


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
        q, j = grouped(i, n_tiles, NF, meta.GROUP)
        ready, done, held = ffn_in_tile(q, j, held, x_ptr, plan, table, weights, sym, scratch, saved, dims, epoch,
                                        wait_limit, rank, meta)
        stamp(scratch.trace, trace_row + i, TASK_FFN_IN, start, ready, done, meta.TRACE)
    return held


@triton.jit(do_not_specialize=["tokens", "wait_limit", "send_chunks", "dispatch_programs"])
def fused_moe_kernel(x_ptr, out_ptr, io, w_in, w_out, shared_w_in, shared_w_out, biases, x_rows, h_rows, plan, sym,
                     scratch, saved, dims, tokens, wait_limit, send_chunks, dispatch_programs, meta):
    """See the module docstring. x, out: [tokens, H], or with IO_AT the tensors of their shape,
    dtype and alignment at the addresses in io ([2] int64: x's, out's); w_in .. shared_w_out: the descriptors of
    Weights, biases: Biases; x_rows: Weights.x_rows; h_rows: scratch.h as a [W * S, F]
    descriptor (boxes [BM, BK]), GEMM2's rows with H_TMA (another descriptor, unread, without);
    plan: kernels/plan.RoutingPlan; sym: workspace.Symmetric; scratch: workspace.Scratch; saved:
    Saved; dims: Dims; send_chunks: entries of plan.chunk_pos; dispatch_programs: programs that
    start on the front queue; wait_limit: nanoseconds (meta.ON_GPU) or rounds any one wait may
    last; meta: Meta."""
    weights = Weights(w_in, w_out, biases.bias_in, biases.bias_out, shared_w_in, shared_w_out, biases.shared_gate,
                      x_rows)
    x_ptr = rebase(x_ptr, io, meta.IO_AT)
    out_ptr = rebase(out_ptr, io + 1, meta.IO_AT)
    rank = dims.rank
    W, L, H, F = dims.world, dims.local_experts, dims.hidden, dims.ffn
    NF = tl.cdiv(F, meta.BF)
    NN = tl.cdiv(H, meta.BN)  # combine column tiles (and combine counters per chunk)
    NN_OUT = tl.cdiv(H, meta.BN_OUT)  # GEMM2 column tiles
    ctl = scratch.ctl
    epoch = tl.load(ctl + CTL_EPOCH)
    late = epoch > EPOCH_LAST  # its flags would wrap: no count is waited for and nothing computed
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
        stamp(scratch.trace, P + task, tl.minimum(task, TASK_DISPATCH), start, start, start, meta.TRACE)
        task = tl.atomic_add(ctl + CTL_FRONT_TASKS, 1, sem="relaxed")

    # What every source sends to this rank's experts this call: a word is current once its epoch
    # field reaches this call's (a source cannot be two calls ahead of this rank).
    words = sym.count_words.local + (epoch % 2) * W * L
    start = clock_ns() if meta.TRACE else 0
    idx = tl.arange(0, meta.E_POW2)
    pairs = idx < tl.where(late, 0, W * L)
    short = wait_at_least(words + idx, pairs, epoch << 32, wait_limit, scratch.status, meta.PEER_SCOPE, meta.ON_GPU)
    n_short = tl.sum(short.to(tl.int32))
    if (n_short > 0) | late:  # (one report for both: a second inlined here spilled registers in Triton 3.6)
        report_timeout(scratch, tl.where(late, WAIT_EPOCHS, WAIT_COUNTS),
                       tl.where(late, -1, tl.min(tl.where(short, idx // L, W))), -1, -1, epoch)
    # a sum: the same in every warp (the counts are not to be used otherwise)
    healthy = (n_short == 0) & ~late
    stamp(scratch.trace, tl.program_id(0), WAITED_COUNTS, start, start, start, meta.TRACE)
    table = tile_table(words, dims, meta)
    n_tiles = tl.sum(table.tiles)
    n_in = n_tiles * NF
    parts = 1  # parts of each GEMM2 tile's K loop
    if meta.F_SPLIT > 1:
        parts = split_parts(n_tiles * NN_OUT, NF, tl.minimum(dims.split_slots, P), meta.F_SPLIT)
    n_out = n_tiles * NN_OUT * parts
    NN_COMB = tl.cdiv(NN, meta.SPAN)  # combine tasks per BT tokens
    n_comb = 0 if meta.DIRECT_OUT else tl.cdiv(tokens, meta.BT) * NN_COMB
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
            held = raise_held(held, scratch, epoch)
        if q < 0:  # only with shared experts
            ready = shared_task(q + n_shared, n_sin, n_rows, x_ptr, weights, scratch, saved, dims, tokens, epoch,
                                 wait_limit, meta)
            done = clock_ns() if meta.TRACE else 0
        elif q < n_in:
            if not meta.STATIC_IN:  # else the static loop took every GEMM1 tile: this is never reached
                q, j = grouped(q, n_tiles, NF, meta.GROUP)
                ready, done, held = ffn_in_tile(q, j, held, x_ptr, plan, table, weights, sym, scratch, saved, dims,
                                                epoch, wait_limit, rank, meta)
        elif q < n_in + n_out:
            q, n = grouped(q - n_in, n_tiles, NN_OUT * parts, meta.GROUP)
            pend, ready, done = ffn_out_tile(q, n // parts, n % parts, parts, pend, table, weights, h_rows, out_ptr,
                                             plan, sym, scratch, dims, epoch, wait_limit, rank, meta)
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
        stamp(scratch.trace, first_ffn + q, kind, start, ready, done, meta.TRACE)
        task = n_front + tl.atomic_add(ctl + CTL_COMPUTE_TASKS, 1, sem="relaxed")

    raise_held(held, scratch, epoch)
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
                      trace: torch.Tensor | None = None, saved: Saved | None = None,
                      io: torch.Tensor | None = None) -> tuple[tuple, dict]:
    """Check shapes and build fused_moe_kernel's arguments for one forward -> (args, kwargs;
    kwargs hold the constexpr-free launch options num_warps and, for NVSHMEM, extern_libs).

    x, out: [T, H]; experts: this rank's expert weights by name, w_in [L, H, F_in], w_out [L, F, H]
    and, when config.expert_bias, bias_in [L, F_in], bias_out [L, H] (gated: w_in, bias_in and shared_w_in
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
    experts); io: None, or [2] int64 words on x's device holding the addresses of the x and out
    the kernel reads and writes instead (x and out then stand in for tensors of their shape, dtype
    and alignment: kernels/addresses.py; a CUDA graph's replays write the words)."""
    geo = ws.geo
    T, H = x.shape
    W, L, F = geo.world_size, geo.local_experts, geo.ffn
    gated = config.gated
    w_in, w_out = experts["w_in"], experts["w_out"]
    expect = {"x": (x, (T, geo.hidden)), "out": (out, (T, H)), "w_in": (w_in, (L, H, F * (2 if gated else 1))),
              "w_out": (w_out, (L, F, H))}
    if config.expert_bias:
        expect.update(bias_in=(experts["bias_in"], (L, F * (2 if gated else 1))),
                      bias_out=(experts["bias_out"], (L, H)))
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
    if io is not None:
        check_words("io", io, 2, x.device)
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
                STAGES=c(launch.stages), GROUP=c(launch.group), F_SPLIT=c(launch.f_split),
                STATIC_IN=c(bool(launch.static_ffn_in)), H_TMA=c(bool(launch.h_tma)),
                SORTED_IN=c(bool(launch.sorted_rows)), DIRECT_OUT=c(bool(launch.direct_out)),
                TRANSPORT=c(TRANSPORTS[ws.transport]), ON_GPU=c(on_gpu), TRACE=c(trace is not None),
                SAVE=c(saved is not None), APPROX_ACT=c(x.dtype == torch.bfloat16),
                PEER_SCOPE=c("gpu" if W == 1 else "sys"), IO_AT=c(io is not None))
    # a split tile's partial sums: BM x BN_OUT fp32 each, packed in out_partials
    split_slots = min(geo.split_slots, ws.scratch.out_partials.numel() // (launch.block_m * launch.block_n))
    dims = Dims(W, L, H, F, geo.source_rows, geo.max_chunks, FS, rank, split_slots)
    # GEMM1 boxes: gated, a tile's gate and up columns side by side (w_in in gate_up.py's pairs)
    w_in_blocks = [1, geo.block_k, geo.block_f * (2 if gated else 1)]
    w_out_blocks = [1, geo.block_k, launch.block_n]
    w_in_desc = TensorDescriptor.from_tensor(w_in, w_in_blocks)
    w_out_desc = TensorDescriptor.from_tensor(w_out, w_out_blocks)
    if FS:  # one FFN: a descriptor of one expert
        s_in = TensorDescriptor.from_tensor(experts["shared_w_in"][None], w_in_blocks)
        s_out = TensorDescriptor.from_tensor(experts["shared_w_out"][None], w_out_blocks)
    biases = Biases(experts.get("bias_in", w_in), experts.get("bias_out", w_in),
                    experts.get("shared_gate_weight", w_in))
    scratch = ws.with_trace(trace)
    # GEMM2's h rows as TMA boxes, with h_tma (otherwise another descriptor, unread)
    h_rows = (TensorDescriptor.from_tensor(scratch.h.view(-1, F), [launch.block_m, geo.block_k]) if launch.h_tma
              else w_out_desc)
    # GEMM1's token rows as TMA boxes, with sorted_rows (launch_fused copies them there first)
    x_rows = (TensorDescriptor.from_tensor(ws.sym.recv_x.local.view(-1, H), [launch.block_m, geo.block_k])
              if launch.sorted_rows else w_out_desc)
    args = (x, out, plan.chunk_pos if io is None else io,  # (io unread without IO_AT)
            w_in_desc, w_out_desc, s_in if FS else w_in_desc, s_out if FS else w_out_desc, biases, x_rows, h_rows,
            plan, ws.sym, scratch, saved or Saved(out, out), dims, T, wait_limit, plan.chunk_pos.numel(),
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
                 trace: torch.Tensor | None = None, saved: Saved | None = None, io: torch.Tensor | None = None) -> None:
    """One forward's kernel launch on launch.programs programs (arguments: fused_kernel_args);
    with launch.sorted_rows, after the kernel that copies x's rows into recv_x in expert order;
    where zeroed_out, after out is zeroed (with io, the out io names must come zeroed)."""
    args, kwargs = fused_kernel_args(x, out, experts, plan, ws, launch, config=config, rank=rank,
                                     timeout_s=timeout_s, trace=trace, saved=saved, io=io)
    if zeroed_out(launch, config) and io is None:
        out.zero_()
    if launch.sorted_rows:
        sort_rows(x, plan.slot_row, ws.sym.recv_x.local, x_at=io)
    with nvshmem_launch() if ws.transport == "nvshmem" else contextlib.nullcontext():
        fused_moe_kernel[(launch.programs,)](*args, **kwargs)


def zeroed_out(launch, config) -> bool:
    """Whether launch_fused's out must be zeros before its kernel: launch.direct_out with a
    capacity, where a dropped token's row is written by no expert tile."""
    return bool(launch.direct_out) and config.capacity_factor is not None


def compile_fused(x, out, experts: dict, plan, ws, launch, *, config, rank: int, timeout_s: float,
                  saved: Saved | None = None, io: torch.Tensor | None = None) -> None:
    """Compile launch_fused's kernel variant for these arguments and load its module, launching
    nothing (on a GPU; the interpreter compiles nothing). A variant is fixed by the launch, the
    rank and the dtypes, not by the token count: x may have no rows."""
    if triton.knobs.runtime.interpret:
        return
    args, kwargs = fused_kernel_args(x, out, experts, plan, ws, launch, config=config, rank=rank,
                                     timeout_s=timeout_s, saved=saved, io=io)
    # loaded here, a module of transport "nvshmem" is initialised here too (nvshmem_launch's hook)
    with nvshmem_launch() if ws.transport == "nvshmem" else contextlib.nullcontext():
        compiled = fused_moe_kernel.warmup(*args, grid=(launch.programs,), **kwargs)
        compiled.run  # noqa: B018 (a property: reading it loads the module, Triton's CompiledKernel._init_handles)
    if launch.sorted_rows:
        compile_sort_rows(x, plan.slot_row, ws.sym.recv_x.local, x_at=io)
