"""The fused kernel's front tasks: publish this rank's row counts to every destination, and send
the dispatch chunks of token rows."""

import triton
import triton.language as tl

from ..layout import EPOCH_LAST
from ..transport import rows_sent, rows_target, set_count_words


@triton.jit
def publish_counts(sym, plan, dims, epoch, rank, meta):
    """Write (epoch << 32 | rows) for every (destination, local expert) into the destination's
    count words [2, W, L] (parity slot epoch % 2, row `rank`). None past layout.EPOCH_LAST: such a
    call waits for nothing, so the next one could write the slot a peer still reads for the last
    numbered call (a source two calls ahead), with a wrapped epoch."""
    W, L = dims.world, dims.local_experts
    if epoch <= EPOCH_LAST:
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
        first = (rank * S + tl.load(plan.region_off + pos) + c * CHUNK).to(tl.int64)  # the chunk's row there
        dst, row = rows_target(sym.recv_x, dest, sym.send_x, first + i, slot, meta.TRANSPORT)
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
                  sym.recv_x.local + first * H,
                  sym.send_x + tl.min(slot) * H, rows * H * ELT, meta.TRANSPORT)
