"""Device-side transport for the fused kernel: peer addresses on the NVSHMEM symmetric heap ("p2p").

The stages call only these functions to reach another GPU, so a second transport (the NVSHMEM
device API) can replace them without touching the stages.

Protocol: a producer stores its payload with ordinary stores, makes every thread's stores precede
a release atomic at system scope (`tl.debug_barrier()` then `signal` or a release `atomic_add`), and
the consumer acquires the same word at system scope before loading the payload (with `.cg`, past
the L1, which is not coherent with stores from other GPUs). Flags carry the call's epoch and
counters only grow, so none needs a reset, and every wait is a wait for "at least"."""

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
def wait_at_least(ptrs, mask, targets, spin_limit):
    """Spin until every masked word (flag or counter; they only grow) reaches its target, acquiring
    at system scope, at most `spin_limit` rounds. -> bool mask of the words still short (none set
    on success), so a timeout can name what it waited for."""
    short = mask & (tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope="sys") < targets)
    spins = 0
    while (tl.sum(short.to(tl.int32)) > 0) & (spins < spin_limit):
        short = mask & (tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope="sys") < targets)
        spins += 1
    return short
