"""The fused kernel's bounded wait (kernels/transport.wait_at_least) as Triton compiles it for sm_90,
offline (no GPU needed): every warp of a program leaves the polling loop in the same round. The
loop's acquire hands each word's value to every thread through shared memory between barriers, so
a warp that left a round early would meet the other warps' barriers out of step and the program
would hang (it did on an H200 when each thread gave up on its own clock: bench/NOTES.md item 78).

These read the PTX. A Triton that lowered the loop differently would fail them, and that is the
point: the wait's uniformity rests on this lowering."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a process of its own: the test session runs kernels in the interpreter, which compiles none.
COMPILE = r"""
import json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flashmoe_py.kernels.transport import wait_at_least

@triton.jit
def probe(flags, status, out, limit, WORDS: tl.constexpr):
    w = tl.arange(0, WORDS)
    short = wait_at_least(flags + w, w < WORDS - 1, 1, limit, status, "gpu", True)
    tl.store(out + w, short.to(tl.int32))

ptx = {}
for words, warps in json.loads(sys.argv[1]):
    src = ASTSource(fn=probe, constexprs={"WORDS": words},
                    signature={"flags": "*i32", "status": "*i64", "out": "*i32", "limit": "i64", "WORDS": "constexpr"})
    build = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx[f"{words} words, {warps} warps"] = build.asm["ptx"]
print(json.dumps(ptx))
"""

# A GEMM2 tile's h flags (fewer than a warp's threads: each value is held by many threads) and a
# rank's count words at 256 experts (one a thread at 8 warps).
CASES = [(8, 4), (8, 8), (256, 4), (256, 8)]


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, str]:
    script = tmp_path_factory.mktemp("wait_ptx") / "compile_wait.py"  # @triton.jit wants a source file
    script.write_text(COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script), json.dumps(CASES)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def polling_loop(ptx: str) -> str:
    """The body of the build's one loop: from its header label to the branch back to it."""
    headers = re.findall(r"^(\$L__BB\d+_\d+):\s*// =>This Inner Loop Header", ptx, re.M)
    assert len(headers) == 1, f"expected the wait's one loop, found headers {headers}"
    start = ptx.index(headers[0] + ":")
    back = re.search(rf"bra(\.uni)?\s+{re.escape(headers[0])};", ptx[start:])
    assert back, "the loop's back edge"
    return ptx[start:start + back.end()]


@pytest.mark.parametrize("case", [f"{w} words, {n} warps" for w, n in CASES])
def test_every_warp_decides_the_next_round_from_shared_memory(builds, case):
    """Between the last reads of the clock, the status word and the flags and the branch back,
    a barrier and a shared-memory read: what each thread read reaches the decision only through
    the reduction over the whole program (in_any_thread). Before it, over 8 words, nothing came
    between: each warp went round again on its own threads' reads."""
    loop = polling_loop(builds[case])
    last_barrier = max(m.end() for m in re.finditer(r"bar\.sync\s+0;", loop))
    tail = loop[last_barrier:]
    assert "ld.shared" in tail, tail
    assert not re.search(r"%globaltimer|ld\.volatile|ld\.global|atom\.", tail), tail


@pytest.mark.parametrize("case", [f"{w} words, {n} warps" for w, n in CASES])
def test_the_clock_and_the_status_word_are_read_inside_the_loop(builds, case):
    """The loop still gives up on the GPU's clock and on a recorded failure (a volatile read)."""
    loop = polling_loop(builds[case])
    assert "%globaltimer" in loop and "ld.volatile.global" in loop
