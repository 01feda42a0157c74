"""The Gluon kernel behind expert_wgrad.py (its docstring has the schedule). Imported only where it
launches: Gluon builds for a GPU, and the Triton interpreter does not run it."""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate


CONSUMER_REGS, PRODUCER_REGS = 232, 40


@aggregate
class WgradParts:
    """What every partition reads: the operands, the ring of stages and the barriers."""
    ends_ptr: gl.tensor
    num_tiles: gl.tensor
    K: gl.tensor
    a_desc: tma.tensor_descriptor
    b_desc: tma.tensor_descriptor
    out_desc: tma.tensor_descriptor
    a_bufs: gl.shared_memory_descriptor
    b_bufs: gl.shared_memory_descriptor
    out_bufs: gl.shared_memory_descriptor
    ready: gl.shared_memory_descriptor
    masked: gl.shared_memory_descriptor
    empty: gl.shared_memory_descriptor

    @gluon.constexpr_function
    def __init__(self, ends_ptr, num_tiles, K, a_desc, b_desc, out_desc, a_bufs, b_bufs, out_bufs, ready, masked,
                 empty):
        self.ends_ptr, self.num_tiles, self.K = ends_ptr, num_tiles, K
        self.a_desc, self.b_desc, self.out_desc = a_desc, b_desc, out_desc
        self.a_bufs, self.b_bufs, self.out_bufs = a_bufs, b_bufs, out_bufs
        self.ready, self.masked, self.empty = ready, masked, empty


@gluon.jit
def _tile(p, t):
    """Tile t -> (first of its expert's rows, their count, the expert, first column, row of w):
    expert-major, then column tiles fastest (neighbouring programs share a's [rows, BM] block). A
    tile is [BM, 2 BN]: each consumer's half one [1, BM, BN] box of out [E, K, N] (rows past K are
    not stored)."""
    TM: gl.constexpr = p.out_desc.block_type.shape[1]
    TN: gl.constexpr = 2 * p.out_desc.block_type.shape[2]
    n_n = gl.cdiv(p.b_desc.shape[1], TN)
    per_expert = gl.cdiv(p.K, TM) * n_n
    e = t // per_expert
    m = (t % per_expert) // n_n
    start = gl.load(p.ends_ptr + e - 1, mask=e > 0, other=0)
    end = gl.load(p.ends_ptr + e)
    return start, end - start, e, (t % per_expert % n_n) * TN, m * TM


@gluon.jit
def _zero_rows_from(buf, v):
    """Rows v.. of buf [R, W] (a stage's box of a, in shared memory) := 0, by one warp in chunks of 8
    rows x 64 columns: stores only, but for the chunk that holds row v."""
    R: gl.constexpr = buf.type.shape[0]
    W: gl.constexpr = buf.type.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [1, 1], [1, 0])
    row = gl.arange(0, 8, layout=gl.SliceLayout(1, layout))
    for i in gl.static_range(R // 8):
        if (i + 1) * 8 > v:
            for h in gl.static_range(W // 64):
                chunk = buf.slice(i * 8, 8, dim=0).slice(h * 64, 64, dim=1)
                if i * 8 >= v:
                    chunk.store(gl.zeros([8, 64], buf.dtype, layout))
                else:
                    x = chunk.load(layout)
                    chunk.store(gl.where((row < v - i * 8)[:, None], x, gl.zeros_like(x)))


@gluon.jit
def _producer(p, unused: gl.constexpr):
    S: gl.constexpr = p.a_bufs.type.shape[0]
    R: gl.constexpr = p.a_bufs.type.shape[1]
    HALF: gl.constexpr = p.b_bufs.type.shape[2]
    pos = 0
    for t in range(gl.program_id(0), p.num_tiles, gl.num_programs(0)):
        start, rows, e, col, m0 = _tile(p, t)
        for k in range(gl.cdiv(rows, R)):
            s = pos % S
            mbarrier.wait(p.empty.index(s), ((pos // S) & 1) ^ 1)
            bar = p.ready.index(s)
            mbarrier.expect(bar, p.a_desc.block_type.nbytes + 2 * p.b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(p.a_desc, [start + k * R, m0], bar, p.a_bufs.index(s))
            for c in gl.static_range(2):  # columns past b's width arrive as zeros
                tma.async_copy_global_to_shared(p.b_desc, [start + k * R, col + c * HALF], bar,
                                                p.b_bufs.index(2 * s + c))
            if rows - k * R < R:  # the box reaches into the next expert: its rows of a := 0 once landed
                mbarrier.wait(bar, (pos // S) & 1)
                _zero_rows_from(p.a_bufs.index(s), rows - k * R)
                fence_async_shared()
                gl.thread_barrier()
            mbarrier.arrive(p.masked.index(s))
            pos += 1


@gluon.jit
def _consumer(p, c: gl.constexpr):
    S: gl.constexpr = p.a_bufs.type.shape[0]
    R: gl.constexpr = p.a_bufs.type.shape[1]
    TM: gl.constexpr = p.out_desc.block_type.shape[1]
    HALF: gl.constexpr = p.out_desc.block_type.shape[2]
    OUT_BUFS: gl.constexpr = p.out_bufs.type.shape[0] // 2
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, HALF, 16])
    pos = 0
    j = 0  # the program's tiles so far
    for t in range(gl.program_id(0), p.num_tiles, gl.num_programs(0)):
        start, rows, e, col, m0 = _tile(p, t)
        steps = gl.cdiv(rows, R)
        acc = gl.zeros((TM, HALF), dtype=gl.float32, layout=acc_layout)
        for k in range(steps):
            s = pos % S
            mbarrier.wait(p.ready.index(s), (pos // S) & 1)  # the boxes landed
            if rows - k * R < R:  # and a's rows of the next expert are zeros (the producer arrives at
                mbarrier.wait(p.masked.index(s), (pos // S) & 1)  # every step: its phases stay in step)
            acc = warpgroup_mma(p.a_bufs.index(s).permute((1, 0)), p.b_bufs.index(2 * s + c), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(p.empty.index((pos + S - 1) % S), pred=k > 0)  # step k - 1's products are done
            pos += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(p.empty.index((pos + S - 1) % S), pred=steps > 0)
        out_buf = p.out_bufs.index(c * OUT_BUFS + j % OUT_BUFS)
        tma.store_wait(pendings=OUT_BUFS - 1)  # the store that last read out_buf is done
        out_buf.reshape([TM, HALF]).store(acc.to(p.out_desc.dtype))
        fence_async_shared()
        if col + c * HALF < p.b_desc.shape[1]:
            tma.async_copy_shared_to_global(p.out_desc, [e, m0, col + c * HALF], out_buf)
        j += 1
    tma.store_wait(pendings=0)


@gluon.jit(do_not_specialize=["num_tiles", "K"])
def wgrad_kernel(ends_ptr, num_tiles, K, a_desc, b_desc, out_desc, STAGES: gl.constexpr, OUT_BUFS: gl.constexpr,
                 CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """One persistent program an SM: consumer 0 (columns [0, BN) of each tile) in the kernel's 4
    warps, consumer 1 ([BN, 2 BN)) and the producer (one warp) in workers."""
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [2 * STAGES] + b_desc.block_type.shape, b_desc.layout)
    out_bufs = gl.allocate_shared_memory(out_desc.dtype, [2 * OUT_BUFS] + out_desc.block_type.shape, out_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    masked = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)  # the expect, with the three boxes' bytes
        mbarrier.init(masked.index(i), count=1)  # the producer, once a's rows past the expert are zeros
        mbarrier.init(empty.index(i), count=2)  # both consumers read the stage
    p = WgradParts(ends_ptr, num_tiles, K, a_desc, b_desc, out_desc, a_bufs, b_bufs, out_bufs, ready, masked, empty)
    gl.warp_specialize([(_consumer, (p, 0)), (_consumer, (p, 1)), (_producer, (p, 0))], [4, 1],
                       [CONSUMER_REGS, PRODUCER_REGS])


_LAYOUTS = {}  # box shape -> its shared-memory layout, made once
_COMPILED = {}  # (device, stages, out_bufs, tile) -> (the compiled kernel, the device's SMs)


def _descs(a, b, out, tile):
    BM, BN, BR = tile

    def desc(t, box):
        if box not in _LAYOUTS:
            _LAYOUTS[box] = gl.NVMMASharedLayout.get_default_for(list(box), gl.bfloat16)
        return TensorDescriptor.from_tensor(t, list(box), _LAYOUTS[box])

    return desc(a, (BR, BM)), desc(b, (BR, BN)), desc(out, (1, BM, BN))


def launch(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor, out: torch.Tensor, stages: int, out_bufs: int,
           tile: tuple[int, int, int]):
    """One launch writing out; expert_wgrad checks the operands and names the tile (BM, BN, BR:
    expert_wgrad.py's), whose boxes the descriptors carry to the kernel.
    One persistent program an SM, at most one a tile. The first call of a device and setting goes
    through Triton's launch (which works out every argument's specialisation each call); later ones
    launch the kernel it compiled directly, the form the training-step timings were taken with
    (bench/results/2026-12-04a-h200x1-expert-wgrad/NOTE.md). ends' alignment is the one
    specialisation that can change between calls: unaligned, the call goes through Triton's launch."""
    E, K, N = out.shape
    BM, BN, _ = tile
    num_tiles = E * triton.cdiv(K, BM) * triton.cdiv(N, 2 * BN)
    key = (a.device, stages, out_bufs, tuple(tile))
    if key not in _COMPILED or ends.data_ptr() % 16:
        device_sms = torch.cuda.get_device_properties(a.device).multi_processor_count
        grid = (max(1, min(device_sms, num_tiles)), )
        kernel = wgrad_kernel[grid](ends, num_tiles, K, *_descs(a, b, out, tile), stages, out_bufs, CONSUMER_REGS,
                                    PRODUCER_REGS, num_warps=4)
        if ends.data_ptr() % 16 == 0:
            _COMPILED[key] = (kernel, device_sms)
        return kernel
    kernel, device_sms = _COMPILED[key]
    kernel[(max(1, min(device_sms, num_tiles)), 1, 1)](ends, num_tiles, K, *_descs(a, b, out, tile), stages, out_bufs,
                                                       CONSUMER_REGS, PRODUCER_REGS, 4)
    return kernel
