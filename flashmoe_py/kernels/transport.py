"""How the fused kernel reaches other GPUs: two transports over the NVSHMEM symmetric heap.

P2P ("p2p", TRANSPORT=0): peer addresses. A producer stores its payload with ordinary stores
through the peer's mapped address, makes every thread's stores precede a release at system scope
(`tl.debug_barrier()`, then `signal`, or `order_counts` and relaxed atomics), and the consumer
acquires the same word at system scope before loading the payload (with `.cg`, past the L1,
which is not coherent with stores from other GPUs). NVLink peers only. At world 1 the fused
kernel passes GPU scope instead (Meta.PEER_SCOPE): no other GPU takes part.

NVSHMEM ("nvshmem", TRANSPORT=1): NVSHMEM's device library (libnvshmem_device.bc, linked when the
kernel is compiled; each loaded module is initialised for NVSHMEM before its first launch). Payload
goes from local symmetric memory with puts (`put_signal_block`: one block-wide put whose signal
lands after its data; `put_rows`: one put per thread), flags and counters are set or added with
`signal_remote`, and `quiet` completes a thread's puts. Reaches any PE NVSHMEM reaches.

The kernel's stages reach other GPUs only through the verbs at the end of this file
(`set_count_words`, `rows_target` + `rows_sent`, `send_tile` + `rows_landed` + `order_counts` +
`add_count`, `puts_complete`), which take symmetric buffers as workspace.SymBuffer (this rank's
copy and the peer address table) and TRANSPORT as a constexpr. Either way, waits are local:
acquire loads of this rank's symmetric flags (`wait_at_least`, bounded by the GPU's clock). Flags
carry the call's epoch and counters only grow, so none needs a reset, and every wait is a wait for
"at least"."""

import os

import triton
import triton.language as tl
from triton.language import core

P2P = tl.constexpr(0)
NVSHMEM = tl.constexpr(1)
TRANSPORTS = {"p2p": 0, "nvshmem": 1}
SIGNAL_SET = tl.constexpr(9)   # NVSHMEM_SIGNAL_SET / NVSHMEM_SIGNAL_ADD in NVSHMEM 3.x's headers
SIGNAL_ADD = tl.constexpr(10)


@triton.jit
def peer(table_ptr, pe, dtype: tl.constexpr):
    """A symmetric buffer's base on PE `pe` (table_ptr: [world] int64 addresses) as a pointer to
    `dtype`. NVSHMEM aligns allocations far beyond 16 bytes. Saying so of the pointer, after the
    integer-to-pointer cast (which forgets what was known of the integer), is what lets the
    compiler use 16-byte stores through it: without it every bf16 element went over NVLink as its
    own 2-byte store."""
    return tl.multiple_of(tl.load(table_ptr + pe).to(tl.pointer_type(dtype)), 16)


@triton.jit
def signal(flag_ptr, value, SCOPE: tl.constexpr):
    """Publish `value` at a flag after this program's preceding stores, released at SCOPE ("sys"
    for a flag other GPUs read or that this program's stores to other GPUs must precede, "gpu"
    for a flag only this GPU reads, of stores to this GPU)."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, value, sem="release", scope=SCOPE)


@triton.jit
def clock_ns():
    """This GPU's global nanosecond clock (PTX %globaltimer), int64. PTX only: not in the interpreter."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                     pack=1)


PROGRAM_LANES = tl.constexpr(1024)  # a tensor this long spans every warp of a program (up to 32 warps)


@triton.jit
def in_any_thread(flag):
    """flag: an int1 scalar that may differ between a program's threads -> whether any thread has it
    set, the same in every thread. A reduction over a tensor that spans every warp crosses warps
    (shared memory); one over a tensor shorter than a warp (a wait's few flags) reduces within each
    warp only. The move through inline PTX keeps the compiler from taking the tensor for one
    value. GPU only."""
    lanes = tl.arange(0, PROGRAM_LANES)
    each = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [lanes * 0 + flag.to(tl.int32)], dtype=tl.int32,
                                     is_pure=False, pack=1)
    return tl.max(each, axis=0) > 0


@triton.jit
def wait_at_least(ptrs, mask, targets, limit, status_ptr, SCOPE: tl.constexpr, ON_GPU: tl.constexpr):
    """Spin until every masked word (flag or counter; they only grow) reaches its target, acquiring
    at SCOPE ("sys" for words other GPUs write, "gpu" for this GPU's own). Bounded: gives up after
    `limit` nanoseconds of the GPU's clock (ON_GPU), or `limit` rounds in the Triton interpreter
    (which runs no PTX, so has no clock), and at once when the kernel's status word (status_ptr,
    layout.STATUS_FAILED) records a failure, so a program
    whose wait depends on a failed one leaves with it. -> bool mask of the words still short (none
    set on success), so a timeout can name what it waited for."""
    short = mask & (tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope=SCOPE) < targets)
    start = clock_ns() if ON_GPU else tl.cast(0, tl.int64)
    waited = tl.cast(0, tl.int64)  # rounds, in the interpreter
    give_up = tl.full((), 0, tl.int1)
    # Every warp must leave the loop in the same round: the loop holds barriers (over fewer words
    # than threads, one thread acquires each word and hands its value to the others through
    # shared memory), and a warp that left a round early would meet the others' barriers out of
    # step: the program hangs (seen on an H200: bench/NOTES.md item 78). `short` is the same in
    # every thread; the clock and the status word each thread reads itself, so giving up is
    # decided for the whole program (in_any_thread). The sum below crosses warps only for words
    # spread over several warps. (tests/test_wait_ptx.py reads the compiled loop.)
    while tl.sum(tl.where(give_up, 0, short.to(tl.int32))) > 0:
        failed = tl.load(status_ptr, volatile=True) != 0
        short = mask & (tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope=SCOPE) < targets)
        if ON_GPU:
            give_up = in_any_thread(failed | (clock_ns() - start >= limit))
        else:  # the interpreter runs a program as one thread
            waited += 1
            give_up = failed | (waited >= limit)
    return short


@triton.jit
def async_proxy_fence(ON_GPU: tl.constexpr):
    """After acquiring a flag for data other programs wrote with ordinary stores: make that data
    visible to this thread's TMA loads (the async proxy; PTX fence.proxy.async.global), which the
    acquire alone orders for ordinary loads only. Nothing in the interpreter (no PTX)."""
    if ON_GPU:
        tl.inline_asm_elementwise("fence.proxy.async.global;\n mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


# NVSHMEM device functions. Triton's extern calls take no pointer arguments and return a value:
# addresses go as int64, void functions are declared to return an int32 that nobody reads. A
# scalar extern call runs in every thread of the program: *_block calls are collective over the
# program (NVSHMEM elects one thread for their signal), others are issued from one thread.

def _extern(symbol, args, types, ret, semantic):
    cast = [core.cast(a, t, _semantic=semantic) for a, t in zip(args, types)]
    return core.extern_elementwise("", "", cast, {tuple(types): (symbol, ret)}, is_pure=False,
                                   _semantic=semantic)


@core.extern
def _putmem_signal_nbi_block(dst, src, nbytes, sig, value, op, pe, _semantic=None):
    return _extern("nvshmemx_putmem_signal_nbi_block", [dst, src, nbytes, sig, value, op, pe],
                   [core.int64] * 4 + [core.uint64, core.int32, core.int32], core.int32, _semantic)


@core.extern
def _putmem_nbi(dst, src, nbytes, pe, _semantic=None):
    return _extern("nvshmem_putmem_nbi", [dst, src, nbytes, pe],
                   [core.int64] * 3 + [core.int32], core.int32, _semantic)


@core.extern
def _signal_op(sig, value, op, pe, _semantic=None):
    return _extern("nvshmemx_signal_op", [sig, value, op, pe],
                   [core.int64, core.uint64, core.int32, core.int32], core.int32, _semantic)


@core.extern
def quiet(_semantic=None):
    """Complete this thread's outstanding puts (nvshmem_quiet)."""
    return _extern("nvshmem_quiet", [], [], core.int32, _semantic)


@core.extern
def _thread_id(_semantic=None):
    return _extern("llvm.nvvm.read.ptx.sreg.tid.x", [], [], core.int32, _semantic)


@triton.jit
def put_signal_block(dst, src, nbytes, sig, value, op, pe):
    """Whole program: copy nbytes from local symmetric `src` to `dst` on PE `pe` (dst, sig: this
    rank's addresses of the symmetric buffers), then apply `op` (SIGNAL_SET/ADD) with `value` to
    the uint64 word `sig` there, after the data. Every thread must call it (no divergent branch)."""
    _putmem_signal_nbi_block(dst, src, nbytes, sig, value, op, pe)


@triton.jit
def put_rows(dst, src, nbytes, pe):
    """Per element (each thread its own): copy nbytes from local symmetric `src` to `dst` on `pe`
    (tensors of addresses, sizes and PEs; nbytes 0 for nothing). Complete with quiet()."""
    _putmem_nbi(dst, src, nbytes, pe)


@triton.jit
def signal_remote(sig, value, op, pe):
    """From one thread of the program: apply `op` with `value` to the uint64 word `sig` on `pe`,
    after this thread's earlier puts to `pe` (call quiet() and tl.debug_barrier() first when
    other threads' puts must land before it)."""
    if _thread_id() == 0:
        _signal_op(sig, value, op, pe)


# Host side of transport "nvshmem": the device library and per-module initialisation.

_init_next_load = False  # set by nvshmem_launch() while a kernel of that transport launches
_module_hook_installed = False


def nvshmem_device_library() -> str:
    """Path of libnvshmem_device.bc (from the NVSHMEM that nvshmem4py uses); RuntimeError if none."""
    import nvshmem.core as nv
    try:
        path = nv.find_device_bitcode_library()
    except Exception as e:  # nvshmem4py raises its own error types
        raise RuntimeError(f"transport='nvshmem' needs NVSHMEM's device bitcode "
                           f"(libnvshmem_device.bc, from nvidia-nvshmem-cu13): {e}") from e
    if not os.path.isfile(path):
        raise RuntimeError(f"transport='nvshmem': {path} does not exist")
    return path


def _init_module(module, function, name, metadata_group, hash) -> None:
    """Triton calls this after loading each compiled module; the fused kernel of transport
    'nvshmem' needs nvshmemx_cumodule_init on its module before it runs."""
    global _init_next_load
    if _init_next_load:
        import nvshmem.bindings as bindings
        status = bindings.cumodule_init(int(module))
        if status not in (0, None):
            raise RuntimeError(f"nvshmemx_cumodule_init failed for {name} (status {status})")
        _init_next_load = False


class nvshmem_launch:
    """Context for launching a kernel of transport 'nvshmem': a module Triton loads inside it
    (its first launch on this device) is initialised for NVSHMEM before it runs."""

    def __enter__(self):
        global _init_next_load, _module_hook_installed
        if not _module_hook_installed:
            triton.knobs.runtime.kernel_load_end_hook.add(_init_module)
            _module_hook_installed = True
        _init_next_load = True
        return self

    def __exit__(self, *exc):
        global _init_next_load
        _init_next_load = False


# The verbs the kernel's stages call; TRANSPORT (a constexpr) picks how each is done.

@triton.jit
def set_count_words(words, send_counts_ptr, first_word, W, L, epoch, E_POW2: tl.constexpr,
                    TRANSPORT: tl.constexpr):
    """For every (destination d, local expert e) pair p = d * L + e < W * L: word first_word + e
    of the int64 count words (words: SymBuffer) on PE d := epoch << 32 | send_counts[p]."""
    if TRANSPORT == NVSHMEM:
        for p in range(W * L):
            rows = tl.load(send_counts_ptr + p).to(tl.int64)
            signal_remote(words.local + first_word + p % L, (epoch << 32) | rows, SIGNAL_SET, p // L)
    else:
        pos = tl.arange(0, E_POW2)
        valid = pos < W * L
        dest = pos // L
        counts = tl.load(send_counts_ptr + pos, mask=valid, other=0).to(tl.int64)
        base = tl.load(words.peers + dest, mask=valid, other=0).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(base + first_word + pos % L, (epoch << 32) | counts, mask=valid, sem="release",
                       scope="sys")


@triton.jit
def rows_target(buf, pe, staging_ptr, row, slot, TRANSPORT: tl.constexpr):
    """Where a stage stores rows bound for row `row` of symmetric buffer `buf` (SymBuffer) on PE
    pe -> (base, row index): p2p straight into pe's copy; nvshmem into local symmetric staging at
    `slot`, for rows_sent to put."""
    if TRANSPORT == NVSHMEM:
        return staging_ptr, slot
    else:
        return peer(buf.peers, pe, staging_ptr.dtype.element_ty), row


@triton.jit
def rows_sent(flags, flag_off, value, pe, dst_ptr, staged_ptr, nbytes, TRANSPORT: tl.constexpr):
    """After rows were stored via rows_target: set the int64 flag at flag_off of `flags`
    (SymBuffer) on PE pe to `value` once they have landed. nvshmem first puts the staged block
    (nbytes from staged_ptr to dst_ptr, this rank's address of the destination rows) and carries
    the flag with it."""
    if TRANSPORT == NVSHMEM:
        tl.debug_barrier()  # the staged rows are in memory before any thread puts them
        put_signal_block(dst_ptr, staged_ptr, nbytes, flags.local + flag_off, value, SIGNAL_SET, pe)
    else:
        signal(peer(flags.peers, pe, tl.int64) + flag_off, value, "sys")


@triton.jit
def send_tile(tile, buf, dst_rows, pes, stage_ptr, stage_rows, valid, col0, H, BN: tl.constexpr,
              TRANSPORT: tl.constexpr):
    """tile: [BM, BN] -> columns col0.. of rows dst_rows [BM] of symmetric [*, H] buffer `buf`
    (SymBuffer), row i on PE pes[i] (valid rows only). p2p stores straight there; nvshmem stores
    the tile into local symmetric rows stage_rows first (left untouched until rows_landed) and
    puts each row from its own thread. The rows may still be in flight when this returns:
    rows_landed, then tl.debug_barrier(), before counting them."""
    dst_ptr = buf.local
    dtype = dst_ptr.dtype.element_ty
    cols = col0 + tl.arange(0, BN)
    mask = valid[:, None] & (cols[None, :] < H)
    if TRANSPORT == NVSHMEM:
        ELT: tl.constexpr = dtype.primitive_bitwidth // 8
        tl.store(stage_ptr + stage_rows[:, None] * H + cols[None, :], tile.to(dtype), mask=mask)
        tl.debug_barrier()
        width = (tl.minimum(H - col0, BN) * ELT).to(tl.int64)
        put_rows(dst_ptr + dst_rows * H + col0, stage_ptr + stage_rows * H + col0,
                 tl.where(valid, width, 0), pes)
    else:
        dst = peer(buf.peers, pes, dtype)
        tl.store(dst[:, None] + dst_rows[:, None] * H + cols[None, :], tile.to(dtype), mask=mask)


@triton.jit
def rows_landed(TRANSPORT: tl.constexpr):
    """This thread's rows sent by send_tile have landed (nvshmem: its puts completed). p2p stores
    need nothing here: add_count's release orders them before the count."""
    if TRANSPORT == NVSHMEM:
        quiet()


@triton.jit
def order_counts(TRANSPORT: tl.constexpr, ON_GPU: tl.constexpr, SCOPE: tl.constexpr):
    """After rows_landed and tl.debug_barrier(): the program's rows precede the add_count calls
    that follow. p2p: one release fence at SCOPE (PTX fence.acq_rel.sys, or .gpu where no other
    GPU takes part in the call: world 1) in every thread;
    after it, relaxed atomics publish this thread's earlier stores, and those of the program's
    other threads made visible to it by the barrier, as release atomics would. ON_GPU=False (the
    Triton interpreter, which runs no PTX): nothing; add_count then releases each atomic."""
    if TRANSPORT == P2P:
        if ON_GPU:
            if SCOPE == "gpu":
                tl.inline_asm_elementwise("fence.acq_rel.gpu;\n mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                          is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise("fence.acq_rel.sys;\n mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                          is_pure=False, pack=1)


@triton.jit
def add_count(counters, offset, value, pe, mask, TRANSPORT: tl.constexpr, ON_GPU: tl.constexpr,
              SCOPE: tl.constexpr):
    """The int64 counter at `offset` of `counters` (SymBuffer) on PE pe += value where mask, after
    this program's earlier stores and puts have landed (rows_landed, tl.debug_barrier() and
    order_counts first: p2p adds are relaxed behind its fence, or each a release without one),
    atomic at SCOPE (order_counts').
    p2p: offset, value, pe and mask may be tensors (one add per element); nvshmem: scalars,
    signalled from one thread."""
    if TRANSPORT == NVSHMEM:
        if mask:
            signal_remote(counters.local + offset, value, SIGNAL_ADD, pe)
    else:
        base = tl.load(counters.peers + pe).to(tl.pointer_type(tl.int64))  # single words: no alignment to declare
        if ON_GPU:
            tl.atomic_add(base + offset, value, mask=mask, sem="relaxed", scope=SCOPE)
        else:
            tl.atomic_add(base + offset, value, mask=mask, sem="release", scope=SCOPE)


@triton.jit
def puts_complete(TRANSPORT: tl.constexpr):
    """Before a program ends: its outstanding puts have completed (nothing to do for p2p stores)."""
    if TRANSPORT == NVSHMEM:
        quiet()
