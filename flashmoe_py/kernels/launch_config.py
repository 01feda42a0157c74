"""How the fused kernel is launched for a call: one frozen, validated LaunchConfig, chosen by a
pure function of the geometry, the call's token count, the dtype and the GPU's SM count
(choose_launch), with explicit overrides for tuning (bench/tune.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import Geometry

SWITCHES = ("static_ffn_in", "h_tma", "sorted_rows", "direct_out")  # the fields that are 0 or 1
FIELDS = ("programs", "block_m", "block_n", "num_warps", "stages", "group", "dispatch_programs", "block_t",
          "combine_span", "f_split", *SWITCHES)
MAX_COMBINE_SPAN = 64  # combine column tiles of one task (hidden 8,192 in tiles of 128)
MAX_F_SPLIT = 8  # parts of one GEMM2 tile's K loop
SPLIT_SLOTS = 128  # GEMM2 parts a call may hold partial sums for (8 MiB: Geometry.split_slots)
# Rows an expert (on average) at which choose_launch's launch changes, one of the three ways a call's
# token count reaches its launch (the others: SORTED_MIN_SLOTS, WIDE_COMBINE_TOKENS): at world 1 the
# static GEMM1 order (STATIC_ROWS) and the taller bf16 tiles (TALL_ROWS); from LARGE_ROWS the taller
# tiles on several ranks, and combine tasks of several column tiles and the dispatch overlap; from
# SORTED_ROWS the sorted rows (with enough slots and columns).
STATIC_ROWS, TALL_ROWS, LARGE_ROWS, SORTED_ROWS = 64, 64, 128, 384
# Tokens a call from which the combine tasks of a world-1 call with LARGE_ROWS rows an expert take
# four column tiles instead of two (the token count where it was measured: below it, untried).
WIDE_COMBINE_TOKENS = 4096
# GEMM1 columns (2F for gated experts, F otherwise) from which choose_launch copies the rows into
# expert order (sorted_rows): the copy costs ~400 / columns of GEMM1's time, the TMA loop saves
# 5-7% of it (kernels/sorted_rows.py); and the slots (tokens x top-k) a call needs for it to pay.
SORTED_MIN_COLUMNS, SORTED_MIN_SLOTS = 8192, 4096


@dataclass(frozen=True)
class LaunchConfig:
    """programs: persistent programs (one per SM by default: every program must be resident at
    once; two an SM, at 4 warps and 64-row tiles, were 14-35% slower: bench/NOTES.md item 68);
    block_m: rows of an expert tile; block_n: columns of a GEMM2 tile (the combine tile width
    times a power of two); num_warps, stages: per program, and the K loops' pipeline depth;
    group: expert tiles that neighbouring programs work on together (L2 reuse of weights);
    dispatch_programs: programs that send the dispatch chunks before joining the compute queue;
    block_t: tokens of a combine tile (a power of two from the geometry's block_t up to block_m:
    one combine tile reads one shared-expert tile); combine_span: combine column tiles (of the
    geometry's block_n) one combine task takes, its slots' routing read and its counters waited
    for once for all of them (1: a task per column tile); static_ffn_in: 1 to take the GEMM1 tiles
    in a static order, program p tiles p, p + programs, .. of the queue's order, each with its own
    K loop (no queue atomic per tile), 0 from the task queue; world 1 only, where those tiles wait
    for nothing (`auto` there from 64 rows an expert: choose_launch); it needs every program
    resident at once (kernels/fused_moe.py's docstring says why, and what a program held back
    does). Flattening those tiles into one loop (bench/gemm1_loop.py), a static order for the
    GEMM2 tiles, and wide last tiles were measured and dropped (bench/NOTES.md items 38, 55, 60).
    h_tma: 1 to load a GEMM2 tile's h rows as TMA boxes, 0 to gather them row by row; world 1
    only, where a tile's rows are one block (with several ranks they can come from several
    sources). sorted_rows: 1 to copy the token rows into expert order before the launch
    (kernels/sorted_rows.py), so that a GEMM1 tile's rows are one block, loaded as TMA boxes; 0
    to gather them from x row by row; world 1 only (`auto` there for bf16 experts of SORTED_ROWS
    rows or more whose GEMM1 is at least SORTED_MIN_COLUMNS wide, gated experts of 4,096, in calls
    of at least SORTED_MIN_SLOTS slots: tokens x top-k).
    f_split: the most parts a GEMM2 tile's K loop (over the FFN, in whole GEMM1 column tiles) may
    be split into, a power of two up to MAX_F_SPLIT; the kernel takes, per call, the most parts up
    to it that keep the call's GEMM2 tiles times parts within the programs, the workspace's
    partial slots and the FFN's column tiles (few tiles: decode), each part a task that waits for
    its own columns of h only; the last part to finish sums every part's fp32 sum in part order
    and sends the rows (kernels/fused_moe_details/expert_ffn.py). 1: never split, and choose_launch
    keeps 1: on one H100, f_split=8 against it at 1 / 8 tokens, mixtral -6.2% / +0.5%, gpt_oss
    +5.0% / +0.4%, qwen3 +2.5% / +1.2% (bench/NOTES.md items 87, 89; meant for decode's 64-row
    tiles: with 128-row tiles its sum spills registers). A workspace holds the partial sums only
    when its launches may split (partial_slots).
    direct_out: 1 to have each GEMM2 tile store its rows, times their routing weights, straight
    into out: the combine of a top-1 layer is one scaled row a token, so the call has no combine
    tasks; 0 to send the rows to the combine; world 1, top-1 and no shared experts only (with
    capacity the launcher zeroes out first: a dropped token has no row); `auto` wherever it
    applies."""

    programs: int
    block_m: int
    block_n: int
    num_warps: int = 8
    stages: int = 3
    group: int = 8
    dispatch_programs: int | None = None
    block_t: int = Geometry.block_t
    combine_span: int = 1
    f_split: int = 1
    static_ffn_in: int = 0
    h_tma: int = 0
    sorted_rows: int = 0
    direct_out: int = 0

    def __post_init__(self) -> None:
        for name in ("programs", "block_m", "block_n", "num_warps", "stages", "group", "block_t", "combine_span",
                     "f_split"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LaunchConfig.{name}={value!r}: expected a positive int")
        if self.dispatch_programs is None:
            object.__setattr__(self, "dispatch_programs", self.programs)
        if not 1 <= self.dispatch_programs <= self.programs:
            raise ValueError(f"dispatch_programs={self.dispatch_programs}: expected 1..programs={self.programs}")
        for name in SWITCHES:
            value = getattr(self, name)
            if type(value) is not int or value not in (0, 1):  # not bool, not float
                raise ValueError(f"LaunchConfig.{name}={value!r}: expected 0 or 1")
        if self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps={self.num_warps}: expected a power of two")
        if self.combine_span & (self.combine_span - 1) or self.combine_span > MAX_COMBINE_SPAN:
            raise ValueError(f"combine_span={self.combine_span}: expected a power of two up to {MAX_COMBINE_SPAN} "
                             "(the kernel unrolls its column tiles)")
        if self.f_split & (self.f_split - 1) or self.f_split > MAX_F_SPLIT:
            raise ValueError(f"f_split={self.f_split}: expected a power of two up to {MAX_F_SPLIT}")

    def check(self, geo: Geometry) -> LaunchConfig:
        """Raise ValueError unless the tiles fit the geometry's buffers and counters; -> self."""
        bm = self.block_m
        if bm < geo.min_block_m or bm % geo.chunk or bm & (bm - 1):
            raise ValueError(f"block_m={bm}: expected a power of two, at least {geo.min_block_m} and a "
                             f"multiple of the dispatch chunk ({geo.chunk})")
        ratio = self.block_n // geo.block_n
        if self.block_n % geo.block_n or ratio & (ratio - 1):
            raise ValueError(f"block_n={self.block_n}: expected {geo.block_n} times a power of two")
        bt = self.block_t
        if bt < geo.block_t or bt > bm or bt & (bt - 1):
            # the trace holds one row per combine tile of geo.block_t tokens
            raise ValueError(f"block_t={bt}: expected a power of two from {geo.block_t} to block_m={bm}")
        if self.static_ffn_in and geo.world_size != 1:
            raise ValueError(f"static_ffn_in=1 at world_size={geo.world_size}: only at world 1, where GEMM1 "
                             "tiles wait for no other rank's rows")
        if self.h_tma and geo.world_size != 1:
            raise ValueError(f"h_tma=1 at world_size={geo.world_size}: only at world 1, where a GEMM2 tile's "
                             "rows all come from one source")
        if self.sorted_rows and geo.world_size != 1:
            raise ValueError(f"sorted_rows=1 at world_size={geo.world_size}: only at world 1, where a GEMM1 tile's "
                             "rows are all this rank's own")
        if self.direct_out and (geo.world_size != 1 or geo.top_k != 1 or geo.shared_ffn):
            raise ValueError(f"direct_out=1 at world_size={geo.world_size}, top_k={geo.top_k}, shared ffn "
                             f"{geo.shared_ffn}: only at world 1, top-1 and without shared experts, where a "
                             "token's output is one expert row")
        return self


def partial_slots(override: dict | None) -> int:
    """Geometry.split_slots for a layer launched with `override` (its launch_override): SPLIT_SLOTS
    when it asks for f_split > 1 (choose_launch never does yet), else none (8 MiB a layer saved);
    a value of another type is LaunchConfig's to refuse."""
    f_split = (override or {}).get("f_split", 1)
    return SPLIT_SLOTS if type(f_split) is int and f_split > 1 else 0


def choose_launch(geo: Geometry, tokens: int, dtype: torch.dtype, sm_count: int,
                  override: dict | None = None, resident: bool = True) -> LaunchConfig:
    """The launch for a call of `tokens` tokens on a GPU of `sm_count` SMs; `override` fixes any of
    FIELDS instead (tuning; `programs` other than sm_count keeps the GEMM1 tiles on the queue
    unless static_ffn_in is asked for too: the static order needs every program resident at once,
    which the SM count alone does not promise for more programs than SMs). resident: every
    program can be resident at once (the GPU is this process's alone); False keeps every tile on
    the queue, whose order needs no program to have started. Checked against the geometry."""
    # Taller expert tiles, and twice as wide GEMM2 tiles, once an expert gets enough rows (on
    # average) to fill them: fewer re-reads of its weights and of h, more math per byte loaded.
    # fp32 keeps 64 x 128: its tiles would not fit shared memory. At world 1 from 64 rows an
    # expert, where each expert's rows fill at least half a tall tile: one H100, 64-124 rows an
    # expert, 128 x 256 tiles with 3 stages against 64 x 256 with 4, same call: -6.0 to -12.6% on
    # five random shapes (4,608 x 5,888 with 23 experts at 512 tokens 1,501 -> 1,356 us), gpt_oss
    # at 2,048 tokens -7.2%, qwen3 at 1,024 -0.9% (bench/NOTES.md item 99). On several ranks a
    # tall tile waits for more chunks before it starts: from 128 rows there, as measured before.
    rows_per_expert = tokens * geo.top_k // geo.local_experts
    bf16 = dtype == torch.bfloat16
    tall = bf16 and rows_per_expert >= (TALL_ROWS if geo.world_size == 1 else LARGE_ROWS)
    large = rows_per_expert >= LARGE_ROWS and bf16
    # Then, for experts narrower than the hidden size (dispatch bytes weigh more against their
    # GEMMs), half the programs send the dispatch chunks while the rest compute the expert tiles
    # that have arrived. 2xH200, 4,096-16,384 tokens, 64 of 132 programs against all: qwen3
    # -5..-6%, deepseek -1..-3%, but mixtral (ffn 3.5x hidden) +2..+4%. One rank sends nothing
    # (its tiles read x itself).
    overlap = large and geo.ffn < geo.hidden and geo.world_size > 1
    # Fewer rows (decode) in bf16: the GEMMs stream weights, so GEMM2 tiles twice as wide and a
    # fourth stage keep more weight bytes in flight per SM (160 KB of shared memory at 64 rows).
    # One H200, 128 tokens, against 64 x 128 with 3 stages: gpt_oss -13%, qwen3 -16%, mixtral -7%.
    # fp32 tiles hold twice the bytes: two stages (a gated GEMM1 box, 64 x 256 fp32, needs 295 KB
    # of shared memory at three, 213 KB at two).
    # Combine tasks of two column tiles once there are many tokens, at world 1: one H200, 4,096 and
    # 16,384 tokens, against one: 5 of 6 pairs faster (-0.3..-2.4%, one +0.8%; -0.9% on the
    # geometric mean), a small gain beside the ~2% spread of one setting between runs (bench/NOTES.md
    # item 52). Four from WIDE_COMBINE_TOKENS tokens: one H100, against two, in turn: mixtral and
    # qwen3 at 16,384 -0.8 / -0.4%, gpt_oss at 4,096 -0.4%, 2,816 x 6,912 with 35 experts at top-2
    # at 4,096 / 16,384 +0.1 / -1.3%, 4,352 x 5,120 with 60 at top-2 at 16,384 -0.5% (bench/NOTES.md
    # item 109). Not measured on several GPUs, where a task's one wait covers rows from more sources.
    # At world 1, with 64 or more rows an expert, the GEMM1 tiles in a static order, each program
    # its own (no queue atomic per tile). One H200, against the queue, same call: mixtral / qwen3 /
    # gpt_oss at 4,096 tokens -4.1% / -4.1% / -6.4%, at 16,384 -1.0% / -0.8% / -2.9%; qwen3 and
    # gpt_oss at 2,048 -2.5..-3.4%, deepseek_v3 (64 rows) +0.3..+1.0%; at 128 tokens no difference
    # (+-0.9%), so decode keeps the queue (bench/NOTES.md item 55). It needs every program resident
    # at once (LaunchConfig), as a GPU of its own gives: not when `resident` is False.
    # At world 1, for bf16 experts at least twice as wide as hidden (GEMM2's K loop long), h
    # rows through TMA boxes (fp32: not measured). One H200, two runs each, against gathered
    # rows: mixtral (ffn 3.5x hidden) at 4,096 / 16,384 tokens -2.8% / -1.5% (2,048: +1.4%,
    # within that point's run-to-run spread); gpt_oss (1x) +0.6..+3.1% and qwen3 (0.375x)
    # +0.3..+1.0% (bench/NOTES.md item 57).
    # At world 1, from SORTED_ROWS rows an expert in bf16, the token rows copied into expert order by a kernel
    # before the launch, GEMM1 reading them as TMA boxes, where GEMM1 is at least SORTED_MIN_COLUMNS
    # wide (gated experts of 4,096; non-gated ones of 8,192, by the copy's cost, not measured).
    # One H200, against gathering them, two calls: mixtral (gated, F 14,336) at 2,048 / 4,096 /
    # 16,384 tokens -2.1 / -0.8 / -1.5% and -2.8 / -4.3 / -2.6%; a random shape of F 5,888 with 9
    # experts -6.1..-0.1%, one with 23 experts -0.8 / +0.2%; gpt_oss (F 2,880) -0.5..+3.8%, qwen3
    # (768) +2.1% (bench/NOTES.md item 90). From SORTED_MIN_SLOTS slots a call (tokens x top-k):
    # one H100, the copy's slower below at all four points of 128-256 rows an expert and 1,024-
    # 3,072 slots (+1.4..+2.7%: mixtral at 512 / 1,024 tokens, 5,888-wide shapes at 1,024), faster
    # or even from 4,096 at 8 of 10 (mixtral at 2,048 / 4,096 / 16,384 -6.6 / -7.6 / -2.7%, 3,328 x
    # 7,424 with 75 experts at top-1, 218 rows, -5.3%; +1.2% and +1.9% at the other two) (item 100).
    # From SORTED_ROWS rows an expert: one H100 (with the direct output, item 102), the copy
    # against gathering, same call: slower at three of four points of 136-273 rows (4,352 x 5,120
    # with 60 experts at 136 / 273 rows +1.7..+1.8% / +1.2%, 3,328 x 7,424 with 75 at top-1, 218
    # rows, +0.8..+1.1%; 2,816 x 6,912 with 35, 234 rows, -0.3%), faster at six of seven from 455
    # (4,864 x 5,888 with 9 at 455 / 910 rows -1.1 / -10.7%, the 35 experts at 468 / 936 -2.6 /
    # -1.6%, mixtral at 1,024 / 4,096 -5.0 / -4.9%; the 60 experts at 546 +0.7%) (bench/NOTES.md
    # item 104).
    # At world 1, top-1, without shared experts, GEMM2 tiles store their weighted rows into the
    # output and no combine task runs (direct_out). One H100, against the combine, same call:
    # 3,328 x 7,424 with 75 experts at 4,096 / 16,384 tokens -1.5 / -3.8%, 3,840 x 4,096 with 161
    # experts at 2,048 / 16,384 -0.8 / -6.5% (bench/NOTES.md item 102).
    override = dict(override or {})
    unknown = sorted(set(override) - set(FIELDS))
    if unknown:
        raise ValueError(f"launch override {unknown}: expected fields of {FIELDS}")
    programs = override.get("programs", sm_count)  # LaunchConfig checks it
    block_m = override.get("block_m", 128 if tall else 64)  # LaunchConfig checks an override
    chosen = {"block_m": block_m, "block_n": 2 * geo.block_n if bf16 else geo.block_n,
              # the pipeline depth follows the tile height, an override's too (64 rows: decode's)
              "stages": (3 if type(block_m) is int and block_m >= 128 else 4) if bf16 else 2,
              "dispatch_programs": max(1, programs // 2) if overlap and type(programs) is int else None,
              "combine_span": (4 if tokens >= WIDE_COMBINE_TOKENS else 2) if large and geo.world_size == 1 else 1,
              "static_ffn_in": int(resident and programs == sm_count and geo.world_size == 1
                                   and rows_per_expert >= STATIC_ROWS),
              "h_tma": int(bf16 and geo.world_size == 1 and geo.ffn >= 2 * geo.hidden),
              "sorted_rows": int(bf16 and geo.world_size == 1 and rows_per_expert >= SORTED_ROWS
                                 and tokens * geo.top_k >= SORTED_MIN_SLOTS
                                 and geo.ffn * (2 if geo.gated else 1) >= SORTED_MIN_COLUMNS),
              "direct_out": int(geo.world_size == 1 and geo.top_k == 1 and not geo.shared_ffn)}
    return LaunchConfig(**{"programs": programs, **chosen, **override}).check(geo)


def launch_variants(geo: Geometry, dtype: torch.dtype, sm_count: int, override: dict | None = None,
                    resident: bool = True) -> list[LaunchConfig]:
    """Every launch choose_launch can give a call of 0 to geo.max_tokens tokens (its arguments
    otherwise as given), each once, fewest tokens first: the token counts where its rows an
    expert reach STATIC_ROWS, TALL_ROWS, LARGE_ROWS and SORTED_ROWS, where its slots reach
    SORTED_MIN_SLOTS, WIDE_COMBINE_TOKENS itself, and none."""
    reach = [-(-rows * geo.local_experts // geo.top_k)
             for rows in (STATIC_ROWS, TALL_ROWS, LARGE_ROWS, SORTED_ROWS)]
    reach += [-(-SORTED_MIN_SLOTS // geo.top_k), WIDE_COMBINE_TOKENS]
    launches = []
    for tokens in [0, *sorted(t for t in reach if t <= geo.max_tokens)]:
        launch = choose_launch(geo, tokens, dtype, sm_count, override, resident)
        if launch not in launches:
            launches.append(launch)
    return launches
