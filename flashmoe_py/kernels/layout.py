"""The contract between the launcher, the symmetric heap and the fused kernel: buffer geometry,
the control and status words, the wait codes, the activation codes, the trace layout and heap
sizing.

Nothing here launches or allocates; kernels/fused_moe.py, kernels/workspace.py, heap.py and
runtime.py all read it, so it imports none of them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton.language as tl

from ..config import MoEConfig

# Meta.ACT of each activation, as the forward kernel and the backward's activation kernel take it.
ACT_CODES = {"swiglu": 0, "gelu": 1, "relu": 2, "clamped_swiglu": 3}

# ctl: [CTL_WORDS] int64, this GPU's task queues and call number.
CTL_EPOCH = tl.constexpr(0)          # the call number, from 1; flags carry it, so none is reset
# The last call number a flag can carry: h flags hold it as int32, count words as epoch << 32 in an
# int64. A launch past it computes nothing (its counts and rows are sent, none waited for) and
# reports WAIT_EPOCHS; Workspace.restart_epochs, with no launch in flight on any rank, zeroes the
# flags and opens epoch 1 again (backends/flash.py does so before its count of calls gets there).
EPOCH_LAST = tl.constexpr(2**31 - 1)
CTL_FRONT_TASKS = tl.constexpr(1)    # counter of the front queue (publish counts, dispatch chunks)
CTL_PROGRAMS_DONE = tl.constexpr(2)  # programs that finished this call; the last one rewinds
CTL_COMPUTE_TASKS = tl.constexpr(3)  # counter of the compute queue (shared, ffn_in unless static, ffn_out, combine)
CTL_WORDS = 4
QUEUES_CLOSED = tl.constexpr(1 << 40)  # added to both task counters by the first timeout

# status: [STATUS_WORDS] int64, written once, by the first wait that times out.
STATUS_FAILED = tl.constexpr(0)  # 1 once a wait timed out
STATUS_WAIT = tl.constexpr(1)    # which wait: one of the WAIT_* codes
STATUS_PEER = tl.constexpr(2)    # the rank it waited for (-1: none in particular)
STATUS_EXPERT = tl.constexpr(3)  # local expert (-1: none)
STATUS_TILE = tl.constexpr(4)    # tile (expert tile or combine token tile; -1: none)
STATUS_EPOCH = tl.constexpr(5)   # the call it happened in
STATUS_WORDS = 8

WAIT_COUNTS = tl.constexpr(1)
WAIT_CHUNK = tl.constexpr(2)
WAIT_HIDDEN = tl.constexpr(3)
WAIT_COMBINE = tl.constexpr(4)
WAIT_HIDDEN_STATIC = tl.constexpr(5)  # WAIT_HIDDEN for a GEMM1 tile of the static order (STATIC_IN)
WAIT_SHARED_HIDDEN = tl.constexpr(6)  # a shared experts' output tile for its hidden tiles
WAIT_SHARED_OUT = tl.constexpr(7)     # a combine tile for the shared experts' output tiles
WAIT_EPOCHS = tl.constexpr(8)         # no wait: the call's epoch is past EPOCH_LAST, nothing computed
WAITS = {WAIT_COUNTS.value: "count words (what each source sends)",
         WAIT_CHUNK.value: "a dispatched chunk to arrive",
         WAIT_HIDDEN.value: "a hidden tile from another program",
         WAIT_COMBINE.value: "expert outputs to come back",
         WAIT_HIDDEN_STATIC.value: "a hidden tile from another program (GEMM1 tiles in the static order)",
         WAIT_SHARED_HIDDEN.value: "the shared experts' hidden tiles from other programs",
         WAIT_SHARED_OUT.value: "the shared experts' output from other programs"}
# A static-order GEMM1 tile that never comes is most likely a program that never got an SM.
HIDDEN_HINT = ("; if other work shares this GPU's SMs (other processes under MPS, other streams), the "
               "static order of GEMM1 tiles at world 1 needs every program resident at once: pass "
               "launch_override={'static_ffn_in': 0}")

# Kernel trace (bench/kernel_profile.py): int64 rows of TRACE_COLS words, (program, kind, start,
# ready, math done, end) in this GPU's nanoseconds; kinds:
TASK_PUBLISH = tl.constexpr(0)
TASK_DISPATCH = tl.constexpr(1)
TASK_FFN_IN = tl.constexpr(2)
TASK_FFN_OUT = tl.constexpr(3)
TASK_COMBINE = tl.constexpr(4)
WAITED_COUNTS = tl.constexpr(5)
TASK_SHARED_IN = tl.constexpr(6)
TASK_SHARED_OUT = tl.constexpr(7)
TRACE_COLS = tl.constexpr(6)

# The symmetric heap: NVSHMEM maps it in granules, and keeps its own state on it.
HEAP_GRANULE = 1 << 21
HEAP_RESERVE = 64 << 20


def describe_timeout(status: list[int], rank: int) -> str | None:
    """The status words of a launch -> a sentence naming the wait that timed out, or None."""
    if not status[STATUS_FAILED.value]:
        return None
    wait, pe, expert, tile, epoch = (status[s.value] for s in (STATUS_WAIT, STATUS_PEER, STATUS_EXPERT,
                                                               STATUS_TILE, STATUS_EPOCH))
    if wait == WAIT_EPOCHS.value:
        return (f"fused MoE kernel on rank {rank} computed nothing in call {epoch}: its flags number calls up to "
                f"{EPOCH_LAST.value} (the layer restarts them before then, except where its forwards are replayed "
                "from a CUDA graph the caller captured, which it cannot count): build the layer again")
    return (f"fused MoE kernel on rank {rank} timed out in call {epoch} waiting for {WAITS.get(wait, wait)}"
            + (f" from rank {pe}" if pe >= 0 else "")
            + (f" (local expert {expert}, tile {tile})" if expert >= 0 else f" (tile {tile})" if tile >= 0 else "")
            + (HIDDEN_HINT if wait == WAIT_HIDDEN_STATIC.value else ""))


@dataclass(frozen=True)
class Geometry:
    """Tile sizes and buffer extents of one fused layer on one rank.

    chunk: rows of one dispatch chunk, the unit that carries an arrival flag; expert tiles of
    min_block_m or more rows gather rows across chunks and sources. block_n: columns of a combine
    tile, and of the combine counters; block_f, block_k: GEMM1's FFN columns and both GEMMs' K
    step; block_t: tokens of the smallest combine tile (the trace is sized for it; the launch
    may take taller ones, LaunchConfig.block_t); shared_ffn: the width of the shared experts' one FFN
    (0: none); split_slots: GEMM2 tiles of min_block_m x 2 * block_n, counting each part, that a
    call whose GEMM2 K loop is split (LaunchConfig.f_split) can hold fp32 partial sums for (fewer
    taller or wider tiles; 0: no call splits; launch_config.partial_slots); gated: GEMM1 computes
    gate and up columns (2 * ffn of them), as the gated activations do."""

    world_size: int
    local_experts: int
    max_tokens: int
    hidden: int
    ffn: int
    top_k: int
    chunk: int = 64
    min_block_m: int = 64
    block_n: int = 128
    block_f: int = 128
    block_k: int = 64
    block_t: int = 32
    shared_ffn: int = 0
    split_slots: int = 0
    gated: bool = True

    @classmethod
    def for_config(cls, config: MoEConfig, world_size: int, max_tokens: int, split_slots: int = 0) -> Geometry:
        return cls(world_size, config.local_experts(world_size), max_tokens, config.hidden_size,
                   config.ffn_size, config.top_k, shared_ffn=config.shared_width, split_slots=split_slots,
                   gated=config.ffn_in_size != config.ffn_size)

    @property
    def source_rows(self) -> int:
        """Rows of one source's region at a destination: every slot it can send there
        (max_tokens * min(top_k, L)) plus one partly filled chunk per local expert."""
        return self.max_tokens * min(self.top_k, self.local_experts) + self.local_experts * self.chunk

    @property
    def max_chunks(self) -> int:
        """Chunks one (source, expert) pair can fill (a token picks an expert at most once)."""
        return -(-max(self.max_tokens, 1) // self.chunk)

    @property
    def max_tiles(self) -> int:
        """Expert tiles a rank can have to run: every slot it can receive, in min_block_m-row
        tiles, plus one partial tile per local expert."""
        slots = self.world_size * self.max_tokens * min(self.top_k, self.local_experts)
        return -(-slots // self.min_block_m) + self.local_experts

    @property
    def ffn_tiles(self) -> int:
        """GEMM1 column tiles (block_f wide) of one expert's FFN."""
        return -(-self.ffn // self.block_f)

    @property
    def shared_ffn_tiles(self) -> int:
        """GEMM1 column tiles of the shared experts' FFN (0 without)."""
        return -(-self.shared_ffn // self.block_f)

    @property
    def row_tiles(self) -> int:
        """Tiles of min_block_m of this rank's own tokens (the shared experts' tiles)."""
        return -(-self.max_tokens // self.min_block_m)

    @property
    def hidden_tiles(self) -> int:
        """Combine column tiles (block_n wide) of the hidden size; one combine counter each."""
        return -(-self.hidden // self.block_n)

    def symmetric_buffers(self, dtype: torch.dtype, transport: str = "p2p") -> dict:
        """{name: (shape, dtype)} every rank holds at the same symmetric address (flags and
        counters are uint64-sized: NVSHMEM signals them). Transport "nvshmem" puts from local
        symmetric memory, so it also stages the rows it sends (send_x, one row per token-slot)."""
        W, L, S, H = self.world_size, self.local_experts, self.source_rows, self.hidden
        buffers = {"recv_x": ((W, S, H), dtype), "combine_y": ((W, S, H), dtype),
                   "count_words": ((2, W, L), torch.int64),
                   "chunk_flags": ((W, L, self.max_chunks), torch.int64),
                   "combine_counts": ((W, L, self.max_chunks, self.hidden_tiles), torch.int64)}
        if transport == "nvshmem":
            buffers["send_x"] = ((self.max_tokens * self.top_k, H), dtype)
        return buffers

    def local_buffers(self, dtype: torch.dtype) -> dict:
        """{name: (shape, dtype)} of the rank's own scratch (zeroed once, reused every call):
        h, GEMM1's output, with the recv_x layout; h_flags, one per (expert tile, f-tile);
        comb_expect, the rows this rank expects back per (pair, chunk), cumulative over calls; the
        shared experts' GEMM1 output, gate and output per own token, shared_h, shared_scale,
        shared_y, and their flags per (row tile, column tile) (empty without shared experts);
        out_partials, the split GEMM2 parts' fp32 sums (split_slots tiles of min_block_m x
        2 * block_n), and out_tickets, a word per split tile counting its parts done."""
        W, L = self.world_size, self.local_experts
        T = self.max_tokens if self.shared_ffn else 0
        tiles = self.row_tiles if self.shared_ffn else 0
        return {"h": ((W, self.source_rows, self.ffn), dtype),
                "h_flags": ((self.max_tiles, self.ffn_tiles), torch.int32),
                "comb_expect": ((W, L, self.max_chunks), torch.int64),
                "ctl": ((CTL_WORDS,), torch.int64), "status": ((STATUS_WORDS,), torch.int64),
                "shared_h": ((T, self.shared_ffn), dtype), "shared_scale": ((T,), torch.float32),
                "shared_y": ((T, self.hidden), dtype),
                "shared_h_flags": ((tiles, self.shared_ffn_tiles), torch.int32),
                "shared_y_flags": ((tiles, self.hidden_tiles), torch.int32),
                "out_partials": ((self.split_slots * self.min_block_m * 2 * self.block_n,), torch.float32),
                "out_tickets": ((self.split_slots,), torch.int64)}

    def send_order(self, rank: int, device=None) -> torch.Tensor:
        """[W * L] int64: the (destination, expert slot) pairs, as destination * L + slot, in the
        order `rank` sends their chunks: slot by slot (the order destinations compute their experts
        in), and for each, to destinations rank, rank + 1, ... (mod W), so not every source sends to
        the same GPU at once."""
        W, L = self.world_size, self.local_experts
        dests = (rank + torch.arange(W, device=device)) % W
        return (dests * L + torch.arange(L, device=device)[:, None]).reshape(W * L)

    def trace_rows(self, tokens: int, programs: int) -> int:
        """Rows of a kernel trace of one forward with `tokens` tokens: one per program, one per task
        (a split GEMM2 tile's parts are one task each: at most split_slots in all)."""
        pairs = self.world_size * self.local_experts
        shared = -(-tokens // self.min_block_m) * (self.shared_ffn_tiles + self.hidden_tiles) if self.shared_ffn else 0
        return (programs + 1 + -(-tokens * self.top_k // self.chunk) + pairs
                + self.max_tiles * (self.ffn_tiles + self.hidden_tiles) + self.split_slots + shared
                + -(-tokens // self.block_t) * self.hidden_tiles)


def heap_bytes(buffers: dict) -> int:
    """Heap bytes for {name: (shape, dtype)}, each buffer rounded up to NVSHMEM's granule, plus
    NVSHMEM's reserve."""
    total = HEAP_RESERVE
    for shape, dtype in buffers.values():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        total += -(-size // HEAP_GRANULE) * HEAP_GRANULE
    return total


def heap_bytes_for(config: MoEConfig, world_size: int, max_tokens_per_rank: int, transport: str = "p2p") -> int:
    """Heap bytes one fused layer needs (transport: "p2p" or "nvshmem")."""
    geo = Geometry.for_config(config, world_size, max_tokens_per_rank)
    return heap_bytes(geo.symmetric_buffers(config.torch_dtype, transport))


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
