"""The fused kernel's GEMM1 loop on its own, for comparing tile schedules (issue 17).

One persistent program per SM takes expert tiles in a static order (tile = program + i * programs,
groups of 8 row tiles walked column by column, as the fused kernel hands them out): BM gathered
token rows of one expert @ a [BK, 2 * BF] TMA box of w_in (gate and up in pairs of BF columns, as
the layer keeps them), SwiGLU on the accumulator, h stored. Two schedules of the same loop:

  nested      a K loop per tile, pipelined on its own (the fused kernel's today): the pipeline
              drains at every tile's end and refills at the next one's start;
  flattened   tl.range(..., flatten=True) over the tiles (as triton_kernels' persistent matmul
              does): the next tile's first loads are issued while this tile ends.

two ways to the rows:

  gathered    each row loaded from x by its index (cp.async by thread; the fused kernel's GEMM1
              today);
  sorted      the rows copied beforehand into expert order (x_sorted [R, H]), a tile's rows one
              block, loaded as one TMA box a K step (what the fused kernel's GEMM1 would load if
              it copied its own rows first; the copy is not timed);

and three epilogues:

  stg         each thread stores its part of the h tile (the fused kernel's today);
  tma         the tile goes out as one asynchronous TMA store (every tile full: rows per expert a
              multiple of BM);
  none        h is computed but stored nowhere (a mask false at run time): the loop's own speed.

and, on a GPU, the same GEMM1 warp-specialised in Gluon (bench/gemm1_gluon.py, `ws gluon`: a
producer warp group gathers the rows by cp.async into an mbarrier ring, two consumer warp groups
take 64-row tiles in turn, h out by TMA stores; gathered rows, every tile full).

--peer also times triton_kernels' GEMM1 (`matmul_ogs`, the same rows gathered, SwiGLU fused, its
own launch choice) on the same problem, checked the same way.

    python bench/gemm1_loop.py [--peer]    # a GPU: check each against float32, time it
    python bench/gemm1_loop.py --offline   # any machine: compile for sm_90, print resources

Needs no routing: each expert's rows are drawn at random from x (rows per expert fixed)."""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

SCHEDULES = {"nested": False, "flattened": True}
EPILOGUES = ("stg", "tma", "none")
SHAPES = [(8, 4096, 14336, 4096), (128, 2048, 768, 1024), (128, 2048, 1536, 512)]  # E, H, F, rows per expert


@triton.jit
def gemm1_kernel(x_ptr, rows_ptr, tiles_ptr, w_desc, h_ptr, h_desc, a_desc, num_row_tiles, H, F,
                 BM: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr, NUM_SMS: tl.constexpr,
                 FLATTEN: tl.constexpr, GROUP: tl.constexpr, EPILOGUE: tl.constexpr, SORTED: tl.constexpr):
    """x [T, H]; rows [R] int32 x's row of each expert row; tiles [num_row_tiles, 3] int32
    (expert, first expert row, rows); w_desc over w_in [E, H, 2F]; h [R, F], h_desc over it in
    [BM, BF] boxes; a_desc over x_sorted [R, H] = x[rows] in [BM, BK] boxes, read instead of x
    when SORTED; EPILOGUE: one of EPILOGUES."""
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
        n_rows = tl.load(tiles_ptr + 3 * rt + 2)
        valid = m < n_rows
        src = tl.load(rows_ptr + r0 + m, mask=valid, other=0).to(tl.int64) * H  # rows past: row 0
        a_ptrs = x_ptr + src[:, None] + tl.arange(0, BK)[None, :]
        k_tiles = tl.maximum(H // BK, 1)
        tl.assume(k_tiles > 0)  # without it the flattened loop loads A through registers
        acc = tl.zeros((BM, 2 * BF), dtype=tl.float32)
        for ki in tl.range(k_tiles):
            if SORTED:
                a = a_desc.load([r0, ki * BK])
            else:
                a = tl.load(a_ptrs)
            acc = tl.dot(a, w_desc.load([e, ki * BK, j * 2 * BF]).reshape(BK, 2 * BF), acc)
            a_ptrs += BK
        gate, up = acc.reshape(BM, 2, BF).permute(0, 2, 1).split()
        h = (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty)
        h_at = h_ptr + (r0 + m).to(tl.int64)[:, None] * F + (j * BF + tl.arange(0, BF))[None, :]
        if EPILOGUE == "none":
            tl.store(h_at, h, mask=valid[:, None] & (H < 0))  # H > 0: nothing stored
        elif EPILOGUE == "tma":  # full tiles only (launch): a part-full box would write the next expert's rows
            h_desc.store([r0, j * BF], h)
        else:
            tl.store(h_at, h, mask=valid[:, None])


def problem(E: int, H: int, F: int, rows_per_expert: int, BM: int, device,
            dtype: torch.dtype = torch.bfloat16) -> tuple:
    """-> x [T, H] and w_in [E, H, 2F] (pairs of 128) in dtype, rows [E * rows_per_expert] and
    tiles [row tiles, 3] int32."""
    g = torch.Generator().manual_seed(0)
    T = E * rows_per_expert // 2
    x = torch.randn(T, H, generator=g).to(device, dtype)
    w = (torch.randn(E, H, 2 * F, generator=g) / H ** 0.5).to(device, dtype)
    rows = torch.randint(0, T, (E * rows_per_expert,), generator=g, dtype=torch.int32).to(device)
    return x, w, rows, row_tiles(E, rows_per_expert, BM, device)


def row_tiles(E: int, rows_per_expert: int, BM: int, device) -> torch.Tensor:
    """-> [row tiles, 3] int32: (expert, first expert row, rows) of each tile of at most BM rows."""
    return torch.tensor([(e, e * rows_per_expert + r, min(BM, rows_per_expert - r))
                         for e in range(E) for r in range(0, rows_per_expert, BM)], dtype=torch.int32).to(device)


def launch(x, w, rows, tiles, h, flatten: bool, sms: int, warmup: bool = False, epilogue: str = "stg",
           BM: int = 128, BF: int = 128, BK: int = 64, stages: int = 3, x_sorted: torch.Tensor | None = None):
    """One launch (or, warmup, its compile only) writing h [R, F] (epilogue: one of EPILOGUES; "tma"
    takes full tiles only: check_epilogue first); x_sorted: x[rows] [R, H], read by TMA instead of
    gathering from x."""
    E, H, F2 = w.shape
    a = x_sorted if x_sorted is not None else x
    args = (x, rows, tiles, TensorDescriptor.from_tensor(w, [1, BK, 2 * BF]), h,
            TensorDescriptor.from_tensor(h, [BM, BF]), TensorDescriptor.from_tensor(a, [BM, BK]), tiles.shape[0],
            H, F2 // 2)
    kw = dict(BM=BM, BF=BF, BK=BK, NUM_SMS=sms, FLATTEN=flatten, GROUP=8, EPILOGUE=epilogue,
              SORTED=x_sorted is not None, num_warps=8, num_stages=stages)
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


def peer(x, w, rows, rows_per_expert: int):
    """-> a function running triton_kernels' GEMM1 on the problem: h [R, F] of the same rows
    (gathered by `rows`), SwiGLU fused, its weights converted as the triton_kernels baseline
    converts the layer's (triton_kernels_moe.swiglu_gemm1)."""
    from triton_kernels.matmul_ogs import GatherIndx, RoutingData, matmul_ogs
    from triton_kernels.tensor import make_ragged_tensor_metadata
    from triton_kernels_moe import swiglu_gemm1
    E, H, F2 = w.shape
    w1, b1, act = swiglu_gemm1(w, None)
    R = rows.shape[0]
    ragged = make_ragged_tensor_metadata(torch.full((E,), rows_per_expert, dtype=torch.int32, device=w.device), R)
    rdata = RoutingData(torch.ones(R, device=w.device), ragged.slice_sizes, E, 1, ragged)
    gather = GatherIndx(rows, torch.arange(R, dtype=torch.int32, device=w.device))  # k = 1: row p reads rows[p]
    return lambda: matmul_ogs(x, w1, b1, rdata, gather_indx=gather, fused_activation=act).reshape(R, F2 // 2)


def check_epilogue(tiles: torch.Tensor, BM: int, epilogue: str) -> None:
    """Raise ValueError unless `epilogue` can write these tiles: "tma" stores whole [BM, BF] boxes,
    so a part-full tile would overwrite the next expert's first rows."""
    if epilogue == "tma" and bool((tiles[:, 2] != BM).any()):
        raise ValueError(f"epilogue='tma' needs full tiles of BM={BM} rows")


def time_shape(E: int, H: int, F: int, rpe: int, sms: int, iters: int, with_peer: bool) -> None:
    """Check every schedule and epilogue (and, with_peer, triton_kernels) on one problem against
    float32 on every 97th row, then print each one's median time (calls issued back to back, as
    bench/layer.py's Timer times a layer)."""
    from layer import Timer  # bench/, beside this file
    dev = torch.device("cuda")
    x, w, rows, tiles = problem(E, H, F, rpe, 128, dev)
    for epilogue in EPILOGUES:
        check_epilogue(tiles, 128, epilogue)
    sample = torch.arange(0, rows.shape[0], 97, device=dev)
    ref = reference(x, w, rows, rpe, sample)
    runs = {f"{name} {epilogue}": functools.partial(launch, x, w, rows, tiles, flatten=flatten, sms=sms,
                                                     epilogue=epilogue)
            for name, flatten in SCHEDULES.items() for epilogue in EPILOGUES}
    x_sorted = x[rows.long()]
    runs.update({f"{name} stg sorted": functools.partial(launch, x, w, rows, tiles, flatten=flatten, sms=sms,
                                                          x_sorted=x_sorted)
                 for name, flatten in SCHEDULES.items()})
    from gemm1_gluon import BM as WS_BM, check_ws, gemm1_ws  # Gluon: imported only where it runs
    ws_tiles = row_tiles(E, rpe, WS_BM.value, dev)
    check_ws(w, ws_tiles)
    runs["ws gluon"] = functools.partial(gemm1_ws, x, w, rows, ws_tiles, sms=sms)
    if with_peer:
        runs["triton_kernels"] = peer(x, w, rows, rpe)
    for name, run in runs.items():
        h = torch.full((rows.shape[0], F), float("nan"), dtype=torch.bfloat16, device=dev)
        timed = run if name == "triton_kernels" else functools.partial(run, h)
        if name == "triton_kernels":
            h.copy_(run())  # its own output, copied here to be checked
        else:
            timed()
        err = float((h[sample].float() - ref).norm() / ref.norm())
        if not name.endswith("none"):
            assert err <= 1e-2, f"{name}: rel err {err:.1e}"
        us = statistics.median(Timer(dev).time(timed, iters, warmup=3))
        tflops = 2 * rows.shape[0] * H * 2 * F / us / 1e6
        print(f"E{E} H{H} F{F} rows/expert {rpe} {name}: {us:.0f} us, {tflops:.0f} TFLOP/s"
              + ("" if name.endswith("none") else f", rel err {err:.1e}"), flush=True)


def on_gpu(iters: int, with_peer: bool) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for E, H, F, rpe in SHAPES:
        time_shape(E, H, F, rpe, sms, iters, with_peer)


def offline() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernel_build import OfflineSm90, cubin_stats
    triton.runtime.driver.set_active(OfflineSm90())
    x, w, rows, tiles = problem(8, 4096, 14336, 256, 128, "cpu")
    h = torch.empty(rows.shape[0], 14336, dtype=torch.bfloat16)
    for name, flatten in SCHEDULES.items():
        for epilogue in EPILOGUES:
            k = launch(x, w, rows, tiles, h, flatten, 132, warmup=True, epilogue=epilogue)
            print(name, epilogue, {"shared": k.metadata.shared, **cubin_stats(k.asm["cubin"], "/tmp")})
    from gemm1_gluon import BM as WS_BM, gemm1_ws
    k = gemm1_ws(x, w, rows, row_tiles(8, 256, WS_BM.value, "cpu"), h, 132, warmup=True)
    print("ws gluon", {"shared": k.metadata.shared, **cubin_stats(k.asm["cubin"], "/tmp")})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--offline", action="store_true", help="compile for sm_90 only (no GPU needed)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peer", action="store_true", help="time triton_kernels' GEMM1 on the same problem too")
    args = p.parse_args()
    offline() if args.offline else on_gpu(args.iters, args.peer)
