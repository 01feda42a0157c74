"""The fused kernel's GEMM1 (gathered token rows @ w_in, SwiGLU, h stored) as a warp-specialised
Gluon kernel, for bench/gemm1_loop.py to time beside the Triton loop it has (issue 17, item 66).

In the Triton loop every thread both gathers rows (cp.async) and issues the products, so each K step
has CTA-wide barriers around its stages (29.6% of the GEMM1 loop's warp samples in the fused kernel
are stalls there, item 66 c), and a tile's epilogue idles the tensor cores. Here:

  producer    4 warps: each K step, the tile's rows gathered from x into a ring stage by cp.async
              (each thread's copies arrive on the stage's mbarrier when done: no CTA barrier),
              and w_in's [BK, 2 * BF] box by one TMA;
  consumers   2 warp groups, each a tile of BM = 64 rows in turn (tiles 2 j and 2 j + 1 of the
              program's list): the products from the ring, then SwiGLU and h out through a TMA
              store while the other group's products run.

An order barrier makes the two consumers' K loops alternate, so that no consumer waits on a ring
barrier more than one phase ahead of it (a parity wait further ahead would pass at once). The
layout is gemm1_loop.py's: x [T, H], rows [R] int32, tiles [row tiles, 3] int32 (expert, first
row, rows; every tile full: the epilogue stores whole boxes), w_in [E, H, 2F] in pairs of BF gate
and BF up columns, h [R, F].

Built offline for sm_90 (bench/gemm1_loop.py --offline). On one H200 (bench/NOTES.md item 67 a) it
was correct (1.7e-3 from the reference) and slower than the Triton loops: mixtral 12,365 us against
12,059 nested and 11,155 flattened; the two narrow shapes 1,307 / 1,354 against the faster Triton
schedule's 1,123 / 1,212."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

BM = gl.constexpr(64)  # rows of a consumer's tile (a warp group's [64, 2 * BF] accumulator: 128 registers a thread)
PRODUCER_WARPS = gl.constexpr(4)


@aggregate
class Gemm1Parts:
    """What every partition reads: the operands, the ring of stages and the barriers."""
    x_ptr: gl.tensor
    rows_ptr: gl.tensor
    tiles_ptr: gl.tensor
    num_row_tiles: gl.tensor
    H: gl.tensor
    w_desc: tma.tensor_descriptor
    h_desc: tma.tensor_descriptor
    a_bufs: gl.shared_memory_descriptor
    b_bufs: gl.shared_memory_descriptor
    h_bufs: gl.shared_memory_descriptor
    ready: gl.shared_memory_descriptor
    empty: gl.shared_memory_descriptor
    order: gl.shared_memory_descriptor
    GROUP: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, x_ptr, rows_ptr, tiles_ptr, num_row_tiles, H, w_desc, h_desc, a_bufs, b_bufs, h_bufs, ready,
                 empty, order, GROUP):
        self.x_ptr, self.rows_ptr, self.tiles_ptr = x_ptr, rows_ptr, tiles_ptr
        self.num_row_tiles, self.H = num_row_tiles, H
        self.w_desc, self.h_desc = w_desc, h_desc
        self.a_bufs, self.b_bufs, self.h_bufs = a_bufs, b_bufs, h_bufs
        self.ready, self.empty, self.order = ready, empty, order
        self.GROUP = gl.constexpr(GROUP)


@gluon.jit
def _tile(p, t, n_f):
    """Tile t (row tiles in groups of GROUP walked column by column) -> (expert, first row, f-tile)."""
    per_group = p.GROUP * n_f
    first = (t // per_group) * p.GROUP
    size = gl.minimum(p.num_row_tiles - first, p.GROUP)
    rt = first + (t % per_group) % size
    return gl.load(p.tiles_ptr + 3 * rt), gl.load(p.tiles_ptr + 3 * rt + 1), (t % per_group) // size


@gluon.jit
def _producer(p, unused: gl.constexpr):
    BK: gl.constexpr = p.a_bufs.type.shape[2]
    S: gl.constexpr = p.a_bufs.type.shape[0]
    W2: gl.constexpr = p.w_desc.block_type.shape[1]  # 2 * BF
    gather: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    n_f = p.h_desc.shape[1] // (W2 // 2)
    steps = p.H // BK
    m = gl.arange(0, BM, layout=gl.SliceLayout(1, gather))
    kk = gl.arange(0, BK, layout=gl.SliceLayout(0, gather))
    pos = 0
    for t in range(gl.program_id(0), p.num_row_tiles * n_f, gl.num_programs(0)):
        e, r0, j = _tile(p, t, n_f)
        src = gl.load(p.rows_ptr + r0 + m).to(gl.int64) * p.H
        for k in range(steps):
            s = pos % S
            mbarrier.wait(p.empty.index(s), ((pos // S) & 1) ^ 1)
            bar = p.ready.index(s)
            mbarrier.expect(bar, p.w_desc.block_type.nbytes)  # one arrival, with the box's bytes
            tma.async_copy_global_to_shared(p.w_desc, [e * p.H + k * BK, j * W2], bar, p.b_bufs.index(s))
            async_copy.async_copy_global_to_shared(p.a_bufs.index(s), p.x_ptr + src[:, None] + (k * BK + kk)[None, :])
            async_copy.mbarrier_arrive(bar, increment_count=False)  # one arrival a thread, once its copies land
            pos += 1


@gluon.jit
def _consumer(p, c: gl.constexpr):
    BK: gl.constexpr = p.a_bufs.type.shape[2]
    S: gl.constexpr = p.a_bufs.type.shape[0]
    W2: gl.constexpr = p.w_desc.block_type.shape[1]
    BF: gl.constexpr = W2 // 2
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, W2, 16])
    n_f = p.h_desc.shape[1] // BF
    steps = p.H // BK
    h_buf = p.h_bufs.index(c)
    j = 0  # this consumer's tiles so far: its tile j is the program's tile 2 j + c
    for t in range(gl.program_id(0) + c * gl.num_programs(0), p.num_row_tiles * n_f, 2 * gl.num_programs(0)):
        e, r0, f = _tile(p, t, n_f)
        if c == 1:
            mbarrier.wait(p.order.index(0), j & 1)
        else:
            mbarrier.wait(p.order.index(1), (j - 1) & 1, pred=j > 0)
        acc = gl.zeros((BM, W2), dtype=gl.float32, layout=acc_layout)
        pos = (2 * j + c) * steps
        for k in range(steps):
            s = pos % S
            mbarrier.wait(p.ready.index(s), (pos // S) & 1)
            fence_async_shared()  # the rows came by cp.async (generic proxy); the products read them async
            acc = warpgroup_mma(p.a_bufs.index(s), p.b_bufs.index(s), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(p.empty.index((pos + S - 1) % S), pred=k > 0)
            pos += 1
        mbarrier.arrive(p.order.index(c))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(p.empty.index((pos + S - 1) % S))
        gate, up = acc.reshape(BM, 2, BF).permute(0, 2, 1).split()
        h = gate / (1.0 + gl.exp(-gate)) * up
        tma.store_wait(pendings=0)  # the previous tile's store has read h_buf
        h_buf.store(h.to(p.h_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(p.h_desc, [r0, f * BF], h_buf)
        j += 1
    tma.store_wait(pendings=0)


@gluon.jit(do_not_specialize=["num_row_tiles"])  # one row tile would make it a constexpr
def gemm1_ws_kernel(x_ptr, rows_ptr, tiles_ptr, num_row_tiles, H, w_desc, h_desc, STAGES: gl.constexpr,
                    GROUP: gl.constexpr, BK: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                    PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """One persistent program an SM: consumer 0 in the kernel's 4 warps, consumer 1 and the
    producer in workers (launch: gemm1_ws)."""
    dtype: gl.constexpr = w_desc.dtype
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BK], dtype)
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], a_layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    h_bufs = gl.allocate_shared_memory(h_desc.dtype, [2] + h_desc.block_type.shape, h_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=32 * PRODUCER_WARPS + 1)  # each producer thread, and the box
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(order.index(i), count=1)
    p = Gemm1Parts(x_ptr, rows_ptr, tiles_ptr, num_row_tiles, H, w_desc, h_desc, a_bufs, b_bufs, h_bufs, ready,
                   empty, order, GROUP)
    gl.warp_specialize([(_consumer, (p, 0)), (_consumer, (p, 1)), (_producer, (p, 0))], [4, PRODUCER_WARPS],
                       [CONSUMER_REGS, PRODUCER_REGS])


def check_ws(w, tiles, BK: int = 64, stages: int = 4) -> None:
    """Raise ValueError unless gemm1_ws can run these operands: hidden a multiple of BK, 2F of 256
    (pairs of 128 gate and 128 up columns), at least two ring stages (one would deadlock: a stage is
    released once the next one's products are issued), every tile of BM rows (whole boxes of h are
    stored). Reads tiles on the host: call it once, outside any timing."""
    E, H, F2 = w.shape
    if H % BK or F2 % 256 or stages < 2:
        raise ValueError(f"gemm1_ws: hidden {H} must be a multiple of BK={BK}, 2F={F2} of 256, stages={stages} "
                         "at least 2")
    if bool((tiles[:, 2] != BM.value).any()):
        raise ValueError(f"gemm1_ws: every tile must have {BM.value} rows")


def gemm1_ws(x, w, rows, tiles, h, sms: int, warmup: bool = False, BK: int = 64, stages: int = 4,
             consumer_regs: int = 224, producer_regs: int = 56):
    """One launch (or, warmup, its compile only) writing h [R, F] from gemm1_loop.problem's
    operands (check_ws first: this only launches, so that a timed call does not wait for the GPU).
    Row tiles are walked in groups of 16 (1,024 rows, as the Triton loop's 8 tiles of 128)."""
    E, H, F2 = w.shape
    if h.shape[1] * 2 != F2:
        raise ValueError(f"gemm1_ws: h has {h.shape[1]} columns, w_in {F2}: expected h's to be half")
    lay = lambda shape: gl.NVMMASharedLayout.get_default_for(shape, gl.bfloat16)  # noqa: E731
    w_desc = TensorDescriptor.from_tensor(w.view(E * H, F2), [BK, 256], lay([BK, 256]))
    h_desc = TensorDescriptor.from_tensor(h, [BM.value, 128], lay([BM.value, 128]))
    args = (x, rows, tiles, tiles.shape[0], H, w_desc, h_desc, stages, 16, BK, consumer_regs, producer_regs)
    if warmup:
        return gemm1_ws_kernel.warmup(*args, num_warps=4, grid=(sms, ))
    return gemm1_ws_kernel[(sms, )](*args, num_warps=4)


if __name__ == "__main__":
    raise SystemExit("run through bench/gemm1_loop.py (--offline builds it, a GPU run times it)")
