"""The fused kernel's GEMM1 loop on its own, for comparing tile schedules (issue 17).

One persistent program per SM takes expert tiles in a static order (tile = program + i * programs,
groups of 8 row tiles walked column by column, as the fused kernel hands them out): BM gathered
token rows of one expert @ a [BK, 2 * BF] TMA box of w_in (gate and up in pairs of BF columns, as
the layer keeps them), SwiGLU on the accumulator, h stored. Two schedules of the same loop:

  nested      a K loop per tile, pipelined on its own (the fused kernel's today): the pipeline
              drains at every tile's end and refills at the next one's start;
  flattened   tl.range(..., flatten=True) over the tiles (as triton_kernels' persistent matmul
              does): the next tile's first loads are issued while this tile ends.

    python bench/gemm1_loop.py             # a GPU: check each against float32, time it
    python bench/gemm1_loop.py --offline   # any machine: compile for sm_90, print resources

Needs no routing: each expert's rows are drawn at random from x (rows per expert fixed)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

SCHEDULES = {"nested": False, "flattened": True}
SHAPES = [(8, 4096, 14336, 4096), (128, 2048, 768, 1024), (128, 2048, 1536, 512)]  # E, H, F, rows per expert


@triton.jit
def gemm1_kernel(x_ptr, rows_ptr, tiles_ptr, w_desc, h_ptr, num_row_tiles, H, F,
                 BM: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr, NUM_SMS: tl.constexpr,
                 FLATTEN: tl.constexpr, GROUP: tl.constexpr):
    """x [T, H]; rows [R] int32 x's row of each expert row; tiles [num_row_tiles, 3] int32
    (expert, first expert row, rows); w_desc over w_in [E, H, 2F]; h [R, F]."""
    n_f = F // BF
    for t in tl.range(tl.program_id(0), num_row_tiles * n_f, NUM_SMS, flatten=FLATTEN):
        per_group = GROUP * n_f
        first = (t // per_group) * GROUP
        size = tl.minimum(num_row_tiles - first, GROUP)
        rt = first + (t % per_group) % size
        j = (t % per_group) // size
        e = tl.load(tiles_ptr + 3 * rt)
        r0 = tl.load(tiles_ptr + 3 * rt + 1)
        m = tl.arange(0, BM)
        valid = m < tl.load(tiles_ptr + 3 * rt + 2)
        src = tl.load(rows_ptr + r0 + m, mask=valid, other=0).to(tl.int64) * H  # rows past: row 0
        a_ptrs = x_ptr + src[:, None] + tl.arange(0, BK)[None, :]
        k_tiles = tl.maximum(H // BK, 1)
        tl.assume(k_tiles > 0)  # without it the flattened loop loads A through registers
        acc = tl.zeros((BM, 2 * BF), dtype=tl.float32)
        for ki in tl.range(k_tiles):
            acc = tl.dot(tl.load(a_ptrs), w_desc.load([e, ki * BK, j * 2 * BF]).reshape(BK, 2 * BF), acc)
            a_ptrs += BK
        gate, up = acc.reshape(BM, 2, BF).permute(0, 2, 1).split()
        cols = j * BF + tl.arange(0, BF)
        tl.store(h_ptr + (r0 + m).to(tl.int64)[:, None] * F + cols[None, :],
                 (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty), mask=valid[:, None])


def problem(E: int, H: int, F: int, rows_per_expert: int, BM: int, device,
            dtype: torch.dtype = torch.bfloat16) -> tuple:
    """-> x [T, H] and w_in [E, H, 2F] (pairs of 128) in dtype, rows [E * rows_per_expert] and
    tiles [row tiles, 3] int32."""
    g = torch.Generator().manual_seed(0)
    T = E * rows_per_expert // 2
    x = torch.randn(T, H, generator=g).to(device, dtype)
    w = (torch.randn(E, H, 2 * F, generator=g) / H ** 0.5).to(device, dtype)
    rows = torch.randint(0, T, (E * rows_per_expert,), generator=g, dtype=torch.int32).to(device)
    tiles = torch.tensor([(e, e * rows_per_expert + r, min(BM, rows_per_expert - r))
                          for e in range(E) for r in range(0, rows_per_expert, BM)], dtype=torch.int32)
    return x, w, rows, tiles.to(device)


def launch(x, w, rows, tiles, h, flatten: bool, sms: int, warmup: bool = False,
           BM: int = 128, BF: int = 128, BK: int = 64, stages: int = 3):
    """One launch (or, warmup, its compile only) writing h [R, F]."""
    E, H, F2 = w.shape
    args = (x, rows, tiles, TensorDescriptor.from_tensor(w, [1, BK, 2 * BF]), h, tiles.shape[0], H, F2 // 2)
    kw = dict(BM=BM, BF=BF, BK=BK, NUM_SMS=sms, FLATTEN=flatten, GROUP=8, num_warps=8, num_stages=stages)
    if warmup:
        return gemm1_kernel.warmup(*args, grid=(sms,), **kw)
    return gemm1_kernel[(sms,)](*args, **kw)


def reference(x, w, rows, rows_per_expert: int, sample: torch.Tensor) -> torch.Tensor:
    """float32 h of the expert rows `sample` [S] -> [S, F]."""
    E, _, F2 = w.shape
    expert = sample // rows_per_expert
    a = x[rows[sample].long()].float()
    acc = torch.empty(sample.shape[0], F2, device=x.device)
    for e in range(E):
        sel = expert == e
        acc[sel] = a[sel] @ w[e].float()
    acc = acc.reshape(sample.shape[0], F2 // 256, 2, 128)
    gate, up = acc[:, :, 0].reshape(sample.shape[0], -1), acc[:, :, 1].reshape(sample.shape[0], -1)
    return torch.nn.functional.silu(gate) * up


def on_gpu(iters: int) -> None:
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for E, H, F, rpe in SHAPES:
        x, w, rows, tiles = problem(E, H, F, rpe, 128, dev)
        sample = torch.arange(0, rows.shape[0], 97, device=dev)
        ref = reference(x, w, rows, rpe, sample)
        for name, flatten in SCHEDULES.items():
            h = torch.full((rows.shape[0], F), float("nan"), dtype=torch.bfloat16, device=dev)
            launch(x, w, rows, tiles, h, flatten, sms)
            err = float((h[sample].float() - ref).norm() / ref.norm())
            assert err <= 1e-2, f"{name}: rel err {err:.1e}"
            for _ in range(3):
                launch(x, w, rows, tiles, h, flatten, sms)
            times = []
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                launch(x, w, rows, tiles, h, flatten, sms)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            us = statistics.median(times)
            tflops = 2 * rows.shape[0] * H * 2 * F / us / 1e6
            print(f"E{E} H{H} F{F} rows/expert {rpe} {name}: {us:.0f} us, {tflops:.0f} TFLOP/s, "
                  f"rel err {err:.1e}", flush=True)


def offline() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernel_build import OfflineSm90, cubin_stats
    triton.runtime.driver.set_active(OfflineSm90())
    x, w, rows, tiles = problem(8, 4096, 14336, 256, 128, "cpu")
    h = torch.empty(rows.shape[0], 14336, dtype=torch.bfloat16)
    for name, flatten in SCHEDULES.items():
        k = launch(x, w, rows, tiles, h, flatten, 132, warmup=True)
        print(name, {"shared": k.metadata.shared, **cubin_stats(k.asm["cubin"], "/tmp")})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--offline", action="store_true", help="compile for sm_90 only (no GPU needed)")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    offline() if args.offline else on_gpu(args.iters)
