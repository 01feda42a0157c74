"""Device-side transport for the fused kernel: peer addresses on the NVSHMEM symmetric heap ("p2p").

The stages call only these functions to reach another GPU, so a second transport (the NVSHMEM
device API) can replace them without touching the stages.

Protocol: a producer stores its payload with ordinary stores, makes every thread's stores precede
a release atomic at system scope (`tl.debug_barrier()` then `signal` or a release `atomic_add`), and
the consumer acquires the same word at system scope before loading the payload (with `.cg`, past
the L1, which is not coherent with stores from other GPUs). Flags carry the call's epoch and
counters only grow, so none needs a reset."""

import triton
import triton.language as tl


@triton.jit
def peer(table_ptr, pe):
    """The int64 base address of a symmetric buffer on PE `pe` (table_ptr: [world] int64); callers
    cast it with `.to(tl.pointer_type(dtype))`. NVSHMEM aligns allocations far beyond 16 bytes;
    saying so lets the compiler vectorise accesses through the pointer."""
    return tl.multiple_of(tl.load(table_ptr + pe), 16)


@triton.jit
def signal(flag_ptr, value):
    """Publish `value` at a (possibly remote) flag after this program's preceding stores."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, value, sem="release", scope="sys")


@triton.jit
def wait_all_at_least(counter_ptrs, mask, targets, spin_limit):
    """Spin until every masked counter reaches its target, at most `spin_limit` rounds. -> 1 if so."""
    pending = tl.sum(tl.where(mask, (tl.atomic_add(counter_ptrs, 0, mask=mask, sem="acquire", scope="sys")
                                     < targets).to(tl.int32), 0))
    spins = 0
    while (pending > 0) & (spins < spin_limit):
        pending = tl.sum(tl.where(mask, (tl.atomic_add(counter_ptrs, 0, mask=mask, sem="acquire",
                                                       scope="sys") < targets).to(tl.int32), 0))
        spins += 1
    return (pending == 0).to(tl.int32)


@triton.jit
def wait_all_equal(flag_ptrs, mask, value, spin_limit):
    """Spin until every masked flag equals `value`, at most `spin_limit` rounds. -> 1 if they do."""
    pending = tl.sum(tl.where(mask, (tl.atomic_add(flag_ptrs, 0, mask=mask, sem="acquire", scope="sys")
                                     != value).to(tl.int32), 0))
    spins = 0
    while (pending > 0) & (spins < spin_limit):
        pending = tl.sum(tl.where(mask, (tl.atomic_add(flag_ptrs, 0, mask=mask, sem="acquire",
                                                       scope="sys") != value).to(tl.int32), 0))
        spins += 1
    return (pending == 0).to(tl.int32)
