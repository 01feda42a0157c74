"""Compile the fused kernel for sm_90 as the layer would launch it, on any machine (no GPU needed),
and report what the compiler made of it: instruction counts of the PTX, and from the cubin the
tensor-core (HGMMA), TMA (UTMALDG) and cp.async (LDGSTS) instructions, registers, stack and shared
memory. Triton's own ptxas and cuobjdump are used.

    python bench/kernel_build.py                                  # the preset builds, a table
    python bench/kernel_build.py --out build/ --json builds.json  # also each build's PTX and cubin

Meant for comparing builds before and after a change (write both, then diff the PTX instruction
counts): a GPU run is still the only evidence of speed."""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime import driver

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flashmoe_py import MoEConfig, preset  # noqa: E402
from flashmoe_py.backends.flash import FUSED_WEIGHTS  # noqa: E402
from flashmoe_py.kernels import fused_moe  # noqa: E402
from flashmoe_py.kernels.launch_config import choose_launch, partial_slots  # noqa: E402
from flashmoe_py.kernels.layout import Geometry  # noqa: E402
from flashmoe_py.kernels.plan import RoutingPlan  # noqa: E402
from flashmoe_py.kernels.workspace import LocalBuffers, Workspace  # noqa: E402

SM90_PROGRAMS = 132  # an H100/H200's SM count: the launch the chooser makes there
SM90_SHARED_LIMIT = 232448  # bytes of shared memory one program may use there (Triton's OutOfResources)


class OfflineSm90(CudaDriver):
    """Triton's CUDA driver with no GPU behind it: the target is sm_90, nothing is launched."""

    def __init__(self):  # the real one loads libcuda
        pass

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def zero_plan(tokens: int, geo: Geometry) -> RoutingPlan:
    """A routing plan of the right shapes and dtypes (values do not matter to the compiler)."""
    E, NS = geo.world_size * geo.local_experts, tokens * geo.top_k
    chunks = -(-NS // geo.chunk) + E
    i32 = dict(dtype=torch.int32)
    return RoutingPlan(torch.zeros(NS, **i32), *(torch.zeros(E, **i32) for _ in range(3)),
                       torch.zeros(chunks, **i32), torch.zeros(chunks, **i32),
                       *(torch.zeros(tokens, geo.top_k, **i32) for _ in range(3)),
                       torch.zeros(tokens, geo.top_k, dtype=torch.float32))


def build(cfg: MoEConfig, world: int, tokens: int, transport: str = "p2p", trace: bool = False,
          nvshmem_bitcode: str | None = None, override: dict | None = None, save: bool = False):
    """The compiled fused kernel (triton CompiledKernel) for `tokens` tokens per rank of `cfg`
    at `world` ranks, with the launch choose_launch makes on an SM90_PROGRAMS-SM GPU (override:
    LaunchConfig fields fixed instead, as MoELayer's launch_override); save: the training
    forward's build for backward="saved", which also writes GEMM1's outputs (fused_moe.Saved)."""
    geo = Geometry.for_config(cfg, world, tokens, partial_slots(override))
    ws = Workspace.allocate(geo, cfg.torch_dtype, transport, "cpu", LocalBuffers("cpu", world))
    launch = choose_launch(geo, tokens, cfg.torch_dtype, SM90_PROGRAMS, override)
    dt, L, H = cfg.torch_dtype, geo.local_experts, cfg.hidden_size
    x = torch.zeros(tokens, H, dtype=dt)
    w_in = torch.zeros(L, H, cfg.ffn_in_size, dtype=dt)
    w_out = torch.zeros(L, cfg.ffn_size, H, dtype=dt)
    trace_t = torch.zeros(geo.trace_rows(tokens, launch.programs), 6, dtype=torch.int64) if trace else None
    if transport == "nvshmem":
        fused_moe.nvshmem_device_library = lambda: nvshmem_bitcode
    experts = {"w_in": w_in, "w_out": w_out}
    shapes = cfg.weight_shapes(experts=L)
    experts.update({name: torch.zeros(shapes[name], dtype=dt) for name in FUSED_WEIGHTS
                    if name in shapes and name not in experts})
    saved = None
    if save:
        saved = fused_moe.Saved(torch.zeros(world * tokens * min(cfg.top_k, L), cfg.ffn_in_size, dtype=dt),
                                torch.zeros(tokens, max(cfg.shared_ffn_in_size, 1), dtype=dt))
    args, kwargs = fused_moe.fused_kernel_args(x, torch.empty_like(x), experts, zero_plan(tokens, geo), ws,
                                               launch, config=cfg, rank=0, timeout_s=1.0, trace=trace_t,
                                               saved=saved)
    meta = args[-1]._replace(ON_GPU=triton.language.constexpr(True))  # x is on the CPU here
    return fused_moe.fused_moe_kernel.warmup(*args[:-1], meta, grid=(launch.programs,), **kwargs), launch


def check_launcher(kernel) -> None:
    """Generate the host launcher's source as the driver would at the first launch (no compile):
    it rejects argument layouts the compiler accepts (e.g. tensor descriptors inside a tuple,
    refused by triton 3.6's launcher). Skipped, with a note, on a Triton without make_launcher
    (3.9's launcher is built differently): build with the GPU machines' 3.6 for this check."""
    try:
        from triton.backends.nvidia.driver import make_launcher
    except ImportError:
        print(f"host launcher not checked: triton {triton.__version__} has no make_launcher (3.6 has)",
              file=sys.stderr)
        return
    src = kernel.src
    arg_idx = lambda x: (src.fn.arg_names.index(x),) if isinstance(x, str) else x  # noqa: E731
    constants = {arg_idx(idx): value for idx, value in getattr(src, "constants", {}).items()}
    make_launcher(constants, dict(src.signature), getattr(kernel.metadata, "tensordesc_meta", None))


def ptx_instructions(ptx: str) -> collections.Counter:
    """Opcode (with its modifiers) -> count, over the PTX's instructions."""
    counts = collections.Counter()
    for line in ptx.splitlines():
        s = re.sub(r"//.*", "", line).strip()
        if not s or s.startswith((".", "$L", "{", "}", ")", "(")) or s.endswith(":"):
            continue
        if s.startswith("@"):
            s = s.split(None, 1)[1]
        counts[s.split()[0].rstrip(";")] += 1
    return counts


def cubin_stats(cubin: bytes, workdir: str) -> dict:
    """HGMMA / UTMALDG / LDGSTS counts, registers, stack, shared memory of a cubin (cuobjdump)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    stats = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "UTMALDG", "LDGSTS", "LDL", "STL")}
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    stats.update(zip(("registers", "stack", "shared_static", "local"), map(int, m.groups())))
    return stats


CASES = {  # name -> (config, world, tokens, transport, trace)
    "mixtral_4096": (preset("mixtral_8x7b"), 1, 4096, "p2p", False),
    "qwen3_128": (preset("qwen3_30b_a3b"), 1, 128, "p2p", False),
    "qwen3_4096": (preset("qwen3_30b_a3b"), 1, 4096, "p2p", False),
    "deepseek_4096_w2": (preset("deepseek_v3"), 2, 4096, "p2p", False),
    "deepseek_4096_w2_nvshmem": (preset("deepseek_v3"), 2, 4096, "nvshmem", False),
    "tiny_fp32_gelu": (preset("tiny", activation="gelu"), 2, 256, "p2p", False),
    "tiny_fp32_swiglu": (preset("tiny"), 2, 256, "p2p", False),
    "qwen3_4096_trace": (preset("qwen3_30b_a3b"), 1, 4096, "p2p", True),
    "gpt_oss_4096": (preset("gpt_oss_120b"), 1, 4096, "p2p", False),
    "llama4_scout_4096_w2": (preset("llama4_scout", shared_experts=0), 2, 4096, "p2p", False),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--nvshmem-bitcode", default=None,
                   help="libnvshmem_device.bc (from nvidia-nvshmem-cu13) for the nvshmem builds; skipped without")
    p.add_argument("--out", default=None, help="folder for each build's .ptx and .cubin")
    p.add_argument("--json", default=None, help="write the table's rows here")
    p.add_argument("--save", action="store_true", help="the training forward's builds (backward='saved')")
    p.add_argument("--override", default=None, type=json.loads,
                   help='LaunchConfig fields as JSON for every build, e.g. \'{"stages": 4}\'')
    args = p.parse_args()
    driver.set_active(OfflineSm90())
    workdir = args.out or os.path.join(os.environ.get("TMPDIR", "/tmp"), "flashmoe_kernel_build")
    os.makedirs(workdir, exist_ok=True)
    rows, failed = [], False
    for name in args.cases:
        cfg, world, tokens, transport, trace = CASES[name]
        if transport == "nvshmem" and not args.nvshmem_bitcode:
            continue
        kernel, launch = build(cfg, world, tokens, transport, trace, args.nvshmem_bitcode, args.override, args.save)
        check_launcher(kernel)
        ptx = kernel.asm["ptx"]
        if args.out:
            with open(os.path.join(args.out, f"{name}.ptx"), "w") as f:
                f.write(ptx)
        row = {"case": name, "save": args.save, "override": args.override, "triton": triton.__version__,
               "block_m": launch.block_m, "block_n": launch.block_n, "num_warps": launch.num_warps,
               "stages": launch.stages, "f_split": launch.f_split,
               "shared": kernel.metadata.shared,
               "ptx_instructions": sum(ptx_instructions(ptx).values()), **cubin_stats(kernel.asm["cubin"], workdir)}
        if args.out:
            os.replace(os.path.join(workdir, "kernel.cubin"), os.path.join(args.out, f"{name}.cubin"))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if row["shared"] > SM90_SHARED_LIMIT:
            print(f"{name}: {row['shared']} bytes of shared memory exceed the {SM90_SHARED_LIMIT} an H100/H200 "
                  "program has: it would not launch there", file=sys.stderr)
            failed = True
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
