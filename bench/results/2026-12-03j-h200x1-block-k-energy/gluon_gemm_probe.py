"""Probe: a warp-specialised Hopper GEMM in Gluon (one TMA producer warp, two consumer warp groups
that take alternate tiles, so one's epilogue runs while the other's products do), against
cuBLAS (torch.mm) and a plain Triton tl.dot GEMM of the fused kernel's tile (128 x 256 x 64, 8
warps), on a dense shape. C[M, N] = A[M, K] @ B[K, N], bf16 in and out, fp32 accumulation.

    python gluon_gemm_probe.py --shape 32768 28672 4096   (kept with its results, not a bench tool)
"""


import argparse
import json

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate
from triton.tools.tensor_descriptor import TensorDescriptor as TritonDescriptor


@aggregate
class Parts:
    """What every partition reads: the descriptors, the shared-memory ring and its barriers."""
    a_desc: tma.tensor_descriptor
    b_desc: tma.tensor_descriptor
    c_desc: tma.tensor_descriptor
    a_bufs: gl.shared_memory_descriptor
    b_bufs: gl.shared_memory_descriptor
    c_bufs: gl.shared_memory_descriptor
    ready: gl.shared_memory_descriptor
    empty: gl.shared_memory_descriptor
    order: gl.shared_memory_descriptor
    GROUP_M: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, order, GROUP_M):
        self.a_desc, self.b_desc, self.c_desc = a_desc, b_desc, c_desc
        self.a_bufs, self.b_bufs, self.c_bufs = a_bufs, b_bufs, c_bufs
        self.ready, self.empty, self.order = ready, empty, order
        self.GROUP_M = gl.constexpr(GROUP_M)


@gluon.jit
def tile_coords(t, M, N, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
    """Tile t in grouped order -> (row, column) offsets."""
    tiles_m = gl.cdiv(M, BM)
    tiles_n = gl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (t // per_group) * GROUP_M
    size_m = gl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (t % per_group) % size_m
    pid_n = (t % per_group) // size_m
    return pid_m * BM, pid_n * BN


@gluon.jit
def producer(p, c_unused: gl.constexpr):
    """One warp: every K step of every tile of this program, its A and B boxes into the ring."""
    BM: gl.constexpr = p.a_desc.block_type.shape[0]
    BK: gl.constexpr = p.a_desc.block_type.shape[1]
    BN: gl.constexpr = p.b_desc.block_type.shape[1]
    S: gl.constexpr = p.a_bufs.type.shape[0]
    M = p.c_desc.shape[0]
    N = p.c_desc.shape[1]
    K = p.a_desc.shape[1]
    steps = gl.cdiv(K, BK)
    tiles = gl.cdiv(M, BM) * gl.cdiv(N, BN)
    pos = 0
    for t in range(gl.program_id(0), tiles, gl.num_programs(0)):
        off_m, off_n = tile_coords(t, M, N, BM, BN, p.GROUP_M)
        for k in range(steps):
            s = pos % S
            mbarrier.wait(p.empty.index(s), ((pos // S) & 1) ^ 1)
            bar = p.ready.index(s)
            mbarrier.expect(bar, p.a_desc.block_type.nbytes + p.b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(p.a_desc, [off_m, k * BK], bar, p.a_bufs.index(s))
            tma.async_copy_global_to_shared(p.b_desc, [k * BK, off_n], bar, p.b_bufs.index(s))
            pos += 1


@gluon.jit
def consumer(p, c: gl.constexpr):
    """One warp group: this program's tiles c, c + 2, .. (of its own list): the products from the
    ring, then the tile through its own shared buffer and a TMA store, whose completion is waited
    for only before that buffer is written again."""
    BM: gl.constexpr = p.a_desc.block_type.shape[0]
    BK: gl.constexpr = p.a_desc.block_type.shape[1]
    BN: gl.constexpr = p.b_desc.block_type.shape[1]
    S: gl.constexpr = p.a_bufs.type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BN, 16])
    M = p.c_desc.shape[0]
    N = p.c_desc.shape[1]
    K = p.a_desc.shape[1]
    steps = gl.cdiv(K, BK)
    tiles = gl.cdiv(M, BM) * gl.cdiv(N, BN)
    c_buf = p.c_bufs.index(c)
    j = 0  # this consumer's tiles so far; its tile j is the program's tile 2 j + c
    for t in range(gl.program_id(0) + c * gl.num_programs(0), tiles, 2 * gl.num_programs(0)):
        off_m, off_n = tile_coords(t, M, N, BM, BN, p.GROUP_M)
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
        # The products alternate: the program's tile before this one (the other consumer's) has
        # issued all of its products, so the ring's barriers this loop waits for are at most one
        # phase ahead of it (a parity wait further ahead would pass at once).
        if c == 1:
            mbarrier.wait(p.order.index(0), j & 1)
        else:
            mbarrier.wait(p.order.index(1), (j - 1) & 1, pred=j > 0)
        pos = (2 * j + c) * steps
        for k in range(steps):
            s = pos % S
            mbarrier.wait(p.ready.index(s), (pos // S) & 1)
            acc = warpgroup_mma(p.a_bufs.index(s), p.b_bufs.index(s), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            prev = (pos + S - 1) % S
            mbarrier.arrive(p.empty.index(prev), pred=k > 0)
            pos += 1
        mbarrier.arrive(p.order.index(c))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(p.empty.index((pos + S - 1) % S))
        tma.store_wait(pendings=0)
        c_buf.store(acc.to(p.c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(p.c_desc, [off_m, off_n], c_buf)
        j += 1
    tma.store_wait(pendings=0)


@gluon.jit
def pingpong_kernel(a_desc, b_desc, c_desc, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = a_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2] + c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(order.index(i), count=1)
    p = Parts(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, order, GROUP_M)
    gl.warp_specialize([(consumer, (p, 0)), (consumer, (p, 1)), (producer, (p, 0))], [4, 1],
                       [CONSUMER_REGS, 40])


def pingpong(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, BM=128, BN=128, BK=64, stages=4, group_m=8,
             consumer_regs=232, programs=None):
    lay = lambda shape: gl.NVMMASharedLayout.get_default_for(shape, gl.bfloat16)  # noqa: E731
    a_desc = TensorDescriptor.from_tensor(a, [BM, BK], lay([BM, BK]))
    b_desc = TensorDescriptor.from_tensor(b, [BK, BN], lay([BK, BN]))
    c_desc = TensorDescriptor.from_tensor(c, [BM, BN], lay([BM, BN]))
    programs = programs or torch.cuda.get_device_properties(a.device).multi_processor_count
    return pingpong_kernel[(programs, )](a_desc, b_desc, c_desc, stages, group_m, consumer_regs, num_warps=4)


@triton.jit
def plain_kernel(a_desc, b_desc, c_desc, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr, STAGES: tl.constexpr):
    """A plain Triton GEMM of the fused kernel's tile shape: one program a tile, tl.dot over TMA
    boxes of both operands (the fused kernel gathers GEMM1's rows with cp.async), 8 warps."""
    t = tl.program_id(0)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (t // per_group) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BM) - first_m, GROUP_M)
    off_m = (first_m + (t % per_group) % size_m) * BM
    off_n = ((t % per_group) // size_m) * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, K, BK, num_stages=STAGES):
        acc = tl.dot(a_desc.load([off_m, k]), b_desc.load([k, off_n]), acc)
    c_desc.store([off_m, off_n], acc.to(tl.bfloat16))


def plain(a, b, c, BM=128, BN=256, BK=64, stages=3, group_m=8):
    M, K = a.shape
    N = b.shape[1]
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), )
    return plain_kernel[grid](TritonDescriptor.from_tensor(a, [BM, BK]), TritonDescriptor.from_tensor(b, [BK, BN]),
                              TritonDescriptor.from_tensor(c, [BM, BN]), M, N, K, BM, BN, BK, group_m, stages,
                              num_warps=8)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[32768, 28672, 4096], metavar=("M", "N", "K"))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    M, N, K = args.shape
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5
    ref = (a.float() @ b.float())
    rows = []
    variants = {"cublas": lambda c: torch.mm(a, b, out=c),
                "triton_128x256": lambda c: plain(a, b, c),
                "gluon_pingpong_128x128_s4": lambda c: pingpong(a, b, c, 128, 128, 64, 4),
                "gluon_pingpong_64x256_s4": lambda c: pingpong(a, b, c, 64, 256, 64, 4),
                "gluon_pingpong_128x128_s5": lambda c: pingpong(a, b, c, 128, 128, 64, 5)}
    flops = 2 * M * N * K
    for name, fn in variants.items():
        c = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        try:
            fn(c)
            torch.cuda.synchronize()
        except Exception as e:  # a variant that does not build or launch: reported, the others go on
            rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:400]})
            print(json.dumps(rows[-1]), flush=True)
            continue
        err = ((c.float() - ref).norm() / ref.norm()).item()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            fn(c)
            start.record()
            for _ in range(args.iters):
                fn(c)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / args.iters)
        us = sorted(times)[1]
        rows.append({"variant": name, "shape": [M, N, K], "us": us, "tflops": flops / us / 1e6, "rel_err": err})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
