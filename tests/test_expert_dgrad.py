"""The per-expert products with transposed weights (kernels/expert_dgrad.py): out[r] = a[r] w[e(r)]^T
for rows sorted by expert. In the Triton interpreter (float32, small tiles) and on a Hopper GPU
(bf16, the measured tile) against float64 products on fresh random inputs (an expert without
rows, one with one row, row tiles that reach into the next expert's rows and past the last row,
an output width that is not a multiple of the tile), the output poisoned first; everywhere, the
row-tile table and the launcher's argument checks."""

import dataclasses
import os

import pytest
import torch
from grad_reference import rel_err

from flashmoe_py.kernels.expert_dgrad import (MAX_MEAN_ROWS, TILES, DgradTiles, RowTiles, check_dgrad, expert_dgrad,
                                              suits)
from seeds import fresh_seed

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
TABLE_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the row-tile table's kernel runs on either
SMALL = DgradTiles(block_m=32, block_n=64, block_k=32, stages=2, warps=4, wide_last=False)  # the interpreter's
SMALL_WIDE = dataclasses.replace(SMALL, wide_last=True)  # an expert's last 33-48 rows in one tile

CASES = {  # counts of rows an expert, K, N
    "uneven counts, an empty expert, one row": ([70, 0, 1, 129, 64, 33], 64, 96),
    "one expert": ([50], 96, 64),
    "every expert empty but the last": ([0, 0, 0, 45], 32, 128),
    "many experts, few rows": ([3, 17, 0, 64, 65, 1, 31, 2] * 4, 64, 160),
    "K not a whole number of steps": ([20, 45], 48, 64),
}


def reference(a, w, counts):
    ends = torch.tensor(counts).cumsum(0).tolist()
    return torch.cat([a[end - n:end].double() @ w[e].double().t() for e, (n, end) in enumerate(zip(counts, ends))])


def run_case(counts, K, N, device, dtype, shape):
    g = torch.Generator(device=device).manual_seed(fresh_seed())
    S, E = sum(counts), len(counts)
    a = torch.randn(S, K, device=device, generator=g).to(dtype)
    w = torch.randn(E, N, K, device=device, generator=g).to(dtype)
    ends = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    out = torch.full((S, N), float("nan"), dtype=dtype, device=device)
    expert_dgrad(a, w, ends, shape=shape, out=out)
    return out, reference(a, w, counts)


@pytest.mark.skipif(not INTERPRETER, reason="interpreter test (the GPU test runs the measured tiles)")
@pytest.mark.parametrize("shape", [SMALL, SMALL_WIDE], ids=["block_m tiles", "wide last tiles"])
@pytest.mark.parametrize("case", CASES)
def test_each_row_gets_its_experts_product_in_the_interpreter(case, shape):
    """Within fp32's CPU bar of float64; no row left poisoned."""
    out, want = run_case(*CASES[case], "cpu", torch.float32, shape)
    assert not out.isnan().any()
    assert rel_err(out, want) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="measured for sm_90")
@pytest.mark.parametrize("wide_last", [False, True], ids=["block_m tiles", "wide last tiles"])
@pytest.mark.parametrize("n_scale", [1, 64], ids=["narrow", "wide"])
@pytest.mark.parametrize("case", CASES)
def test_each_row_gets_its_experts_product_on_the_gpu(case, n_scale, wide_last):
    """bf16 within 1e-2 of float64 with the measured tile (TILES), its last tiles wide or not, at
    counts scaled up to the tile; nothing poisoned."""
    counts, K, N = CASES[case]
    counts = [n * TILES.block_m // SMALL.block_m for n in counts]
    out, want = run_case(counts, K, N * n_scale, "cuda", torch.bfloat16,
                         dataclasses.replace(TILES, wide_last=wide_last))
    assert not out.isnan().any()
    assert rel_err(out, want) <= 1e-2


@pytest.mark.skipif(not INTERPRETER, reason="interpreter test (the GPU test runs the measured tiles)")
@pytest.mark.parametrize("shape", [SMALL, SMALL_WIDE], ids=["block_m tiles", "wide last tiles"])
@pytest.mark.parametrize("case", CASES)
def test_with_w_kn_each_row_gets_its_experts_product_untransposed(case, shape):
    """w [E, K, N] (backward="recompute"'s w_in): each row times its expert's w, fp32 CPU bar; the
    next expert's weights (here inf) never enter a box, K tail included."""
    counts, K, N = CASES[case]
    g = torch.Generator().manual_seed(fresh_seed())
    a, w = torch.randn(sum(counts), K, generator=g), torch.randn(len(counts) + 1, K, N, generator=g)
    w[-1] = float("inf")  # an expert past the last: its rows must not reach the last expert's box
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = torch.full((sum(counts), N), float("nan"))
    expert_dgrad(a, w[:-1], ends, shape=shape, out=out, w_kn=True)
    want = torch.cat([a[e - n:e].double() @ w[i].double() for i, (n, e) in enumerate(zip(counts, ends.tolist()))])
    assert rel_err(out, want) <= 1e-5


@pytest.mark.skipif(not INTERPRETER, reason="interpreter test")
def test_a_tile_reaching_into_the_next_expert_writes_only_its_own_rows():
    """Expert 0 has 10 rows, its 32-row tile reaches over expert 1's first 22: with expert 1's tiles
    taken out of the table, expert 0's rows hold its product and expert 1's stay poisoned."""
    a, w = torch.randn(40, 32), torch.randn(2, 64, 32)
    ends = torch.tensor([10, 40], dtype=torch.int32)
    tiles = RowTiles.of(ends, 40, SMALL.block_m)
    only_expert_0 = dataclasses.replace(tiles, expert=torch.where(tiles.expert == 0, 0, 2).to(torch.int32))
    out = torch.full((40, 64), float("nan"))
    expert_dgrad(a, w, ends, only_expert_0, SMALL, out)
    assert rel_err(out[:10], a[:10].double() @ w[0].double().t()) <= 1e-5
    assert out[10:].isnan().all()


@pytest.mark.skipif(not INTERPRETER, reason="interpreter test")
def test_a_wide_tile_reaching_into_the_next_expert_writes_only_its_own_rows():
    """Expert 0 has 40 rows: one wide tile of 48 rows, over expert 1's first 8; with expert 1's
    tiles taken out of the table, expert 0's rows hold its product and expert 1's stay poisoned."""
    a, w = torch.randn(72, 32), torch.randn(2, 64, 32)
    ends = torch.tensor([40, 72], dtype=torch.int32)
    tiles = RowTiles.of(ends, 72, SMALL.block_m, wide_last=True)
    assert tiles.wide[0] == 1
    only_expert_0 = dataclasses.replace(tiles, expert=torch.where(tiles.expert == 0, 0, 2).to(torch.int32))
    out = torch.full((72, 64), float("nan"))
    expert_dgrad(a, w, ends, only_expert_0, SMALL_WIDE, out)
    assert rel_err(out[:40], a[:40].double() @ w[0].double().t()) <= 1e-5
    assert out[40:].isnan().all()


def test_row_tiles_cover_every_experts_rows_once():
    """The table lists, expert by expert, a tile at every block_m rows of the expert and nothing
    else; past the last tile, the expert is E (skipped)."""
    counts = [70, 0, 1, 129, 64, 33]
    ends = torch.tensor(counts).cumsum(0).to(torch.int32).to(TABLE_DEVICE)
    tiles = RowTiles.of(ends, sum(counts), 32)
    want, start = [], 0
    for e, n in enumerate(counts):
        want += [(e, start + i) for i in range(0, n, 32)]
        start += n
    got = [(int(e), int(f)) for e, f in zip(tiles.expert, tiles.first) if e < len(counts)]
    assert got == want
    assert tiles.expert.shape[0] == len(counts) + sum(counts) // 32
    assert (tiles.expert[len(want):] == len(counts)).all()
    assert not tiles.wide.any()


def brute_force_tiles(counts: list[int], block_m: int, wide_last: bool) -> list[tuple[int, int, int]]:
    """(expert, first row, wide) of every row tile, expert by expert, as RowTiles documents them."""
    want, start = [], 0
    for e, n in enumerate(counts):
        firsts = list(range(0, n, block_m))
        wide = wide_last and n > block_m and 0 < n % block_m <= block_m // 2
        if wide:
            firsts.pop()
        want += [(e, start + f, int(wide and i == len(firsts) - 1)) for i, f in enumerate(firsts)]
        start += n
    return want


@pytest.mark.parametrize("wide_last", [False, True])
def test_the_table_holds_for_many_experts_over_many_programs(wide_last):
    """300 experts (not a power of two; the table kernel's programs then take 8 tiles each), counts
    0-400 at random."""
    g = torch.Generator().manual_seed(fresh_seed())
    counts = torch.randint(0, 400, (300,), generator=g).tolist()
    ends = torch.tensor(counts).cumsum(0).to(torch.int32).to(TABLE_DEVICE)
    tiles = RowTiles.of(ends, sum(counts), 128, wide_last)
    want = brute_force_tiles(counts, 128, wide_last)
    got = [(int(e), int(f), int(w)) for e, f, w in zip(tiles.expert, tiles.first, tiles.wide) if e < len(counts)]
    assert got == want
    assert (tiles.expert[len(want):] == len(counts)).all() and not tiles.wide[len(want):].any()


def test_wide_last_tiles_take_an_experts_last_rows_where_they_are_few():
    """With wide_last (block_m 32): where an expert's rows past its last whole 32 are 1-16, its last
    tile starts 32 before them and is wide; elsewhere the tiles are as without. Brute force over
    random counts, the bound S // block_m + E kept."""
    g = torch.Generator().manual_seed(fresh_seed())
    for _ in range(200):
        counts = torch.randint(0, 100, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        ends = torch.tensor(counts).cumsum(0).to(torch.int32).to(TABLE_DEVICE)
        tiles = RowTiles.of(ends, sum(counts), 32, wide_last=True)
        want = brute_force_tiles(counts, 32, wide_last=True)
        got = [(int(e), int(f), int(w)) for e, f, w in zip(tiles.expert, tiles.first, tiles.wide) if e < len(counts)]
        assert got == want, counts
        assert tiles.expert.shape[0] == len(counts) + sum(counts) // 32
        assert (tiles.expert[len(want):] == len(counts)).all() and not tiles.wide[len(want):].any()


def test_where_it_suits():
    """The kernel is never chosen off a Hopper GPU, for other dtypes than bf16, or above MAX_MEAN_ROWS
    rows an expert on average."""
    a, w = torch.zeros(MAX_MEAN_ROWS * 4, 64, dtype=torch.bfloat16), torch.zeros(4, 32, 64, dtype=torch.bfloat16)
    assert not suits(a, w, 4)  # on the CPU
    if HOPPER:
        assert suits(a.cuda(), w.cuda(), 4)
        assert not suits(a.float().cuda(), w.float().cuda(), 4)
        assert not suits(torch.zeros(MAX_MEAN_ROWS * 4 + 1, 64, dtype=torch.bfloat16, device="cuda"), w.cuda(), 4)


@pytest.mark.parametrize("bad, message", [
    ({"a": torch.zeros(8, 32, dtype=torch.float16)}, "share a dtype"),
    ({"w": torch.zeros(2, 16, 48)}, "must share K"),
    ({"w": torch.zeros(2, 32, 16).transpose(1, 2)}, "contiguous"),
    ({"a": torch.zeros(8, 3), "w": torch.zeros(2, 16, 3)}, "16-byte"),
    ({"ends": torch.tensor([4, 8])}, "int32"),
    ({"ends": torch.tensor([8], dtype=torch.int32)}, "E = w.shape"),
    ({"ends": torch.tensor([4, 0, 8, 0], dtype=torch.int32)[::2]}, "contiguous"),
    ({"a": torch.zeros(8 * 32 + 1)[1:].view(8, 32)}, "aligned"),
])
def test_bad_operands_are_refused_by_name(bad, message):
    args = {"a": torch.zeros(8, 32), "w": torch.zeros(2, 16, 32), "ends": torch.tensor([4, 8], dtype=torch.int32)}
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        check_dgrad(args["a"], args["w"], args["ends"])


def test_tiles_made_for_another_launch_are_refused():
    """Before any launch: tiles of another block_m, or another wide_last, than the launch's."""
    a, w = torch.zeros(8, 32), torch.zeros(2, 16, 32)
    ends = torch.tensor([4, 8], dtype=torch.int32)
    table = torch.zeros(3, 2, dtype=torch.int32)  # its contents are never read
    for block_m, wide_last in ((64, False), (SMALL.block_m, True)):
        with pytest.raises(ValueError, match="tiles were made"):
            expert_dgrad(a, w, ends, RowTiles(*table, ends, block_m, wide_last), SMALL)
    a, ends = torch.zeros(128, 32), torch.tensor([64, 128], dtype=torch.int32)  # 2 + 128 // 32 tiles
    with pytest.raises(ValueError, match="2 tiles; this launch has .* 128 rows"):  # made for fewer rows:
        expert_dgrad(a, w, ends, RowTiles(*table, ends, SMALL.block_m, False), SMALL)  # rows left unwritten


def test_a_bad_out_or_tile_shape_is_refused_before_the_table_is_made(monkeypatch):
    """Nothing is launched (here: RowTiles.of, the table's kernel) for a call that is then refused."""
    def launched(*args, **kwargs):
        raise AssertionError("RowTiles.of ran before the arguments were checked")
    monkeypatch.setattr(RowTiles, "of", launched)
    a, w = torch.zeros(8, 32), torch.zeros(2, 16, 32)
    ends = torch.tensor([4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="out must be"):
        expert_dgrad(a, w, ends, shape=SMALL, out=torch.zeros(8, 15))
    with pytest.raises(ValueError, match="block_m >= 32"):
        expert_dgrad(a, w, ends, shape=dataclasses.replace(SMALL, block_m=16, wide_last=True))


def test_row_tiles_refuse_ends_they_cannot_read():
    with pytest.raises(ValueError, match="contiguous, non-empty"):
        RowTiles.of(torch.tensor([4, 0, 8, 0], dtype=torch.int32)[::2], 8, 32)
    with pytest.raises(ValueError, match="int32"):
        RowTiles.of(torch.tensor([4, 8]), 8, 32)
