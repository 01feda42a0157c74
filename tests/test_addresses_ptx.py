"""kernels/addresses.rebase as Triton compiles it for sm_90, offline (no GPU needed): a kernel that
reads its rows through an address word (X_AT) compiles for a GPU and keeps the load and store
widths it has reading them through its argument. sort_rows' copy stands in for the kernels that
rebase (the router's, the fused kernel's): without rebase's alignment hint its loads turn scalar.

The interpreter runs jit functions as Python, so it neither checks what a GPU build refuses (a
global that is not a constexpr) nor vectorises anything: both are read from the PTX here."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a process of its own: the test session runs kernels in the interpreter, which compiles none.
COMPILE = r"""
import collections, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flashmoe_py.kernels.sorted_rows import BLOCK_COLS, BLOCK_SLOTS, NUM_WARPS, sort_rows_kernel

signature = {"x_ptr": "*bf16", "x_at": "*i64", "slot_row_ptr": "*i32", "recv_ptr": "*bf16", "NS": "i32",
             "H": "i32", "TOP_K": "constexpr", "BS": "constexpr", "BH": "constexpr", "X_AT": "constexpr"}
aligned = [["tt.divisibility", 16]]  # as a launch specialises 16-byte aligned pointers and H % 16 == 0
widths = {}
for x_at in (0, 1):
    src = ASTSource(fn=sort_rows_kernel, signature=signature,
                    constexprs={"TOP_K": 2, "BS": BLOCK_SLOTS, "BH": BLOCK_COLS, "X_AT": x_at},
                    attrs={(i,): aligned for i in (0, 1, 2, 3, 5)})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS}).asm["ptx"]
    count = collections.Counter()
    for op, width in re.findall(r"\b(ld|st)\.global(?:\.[a-z0-9]+)*?(?:\.(v[248]))?\.b(?:16|32|64)\b", ptx):
        count[f"{op}.{width or 'v1'}"] += 1
    widths[x_at] = dict(count)
print(json.dumps(widths))
"""


@pytest.fixture(scope="module")
def widths(tmp_path_factory) -> dict[str, dict[str, int]]:
    script = tmp_path_factory.mktemp("addresses_ptx") / "compile_rebase.py"  # @triton.jit wants a source file
    script.write_text(COMPILE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_the_copy_moves_16_bytes_a_load_and_a_store(widths):
    assert widths["0"].get("ld.v4", 0) > 0 and widths["0"].get("st.v4", 0) > 0, widths


def test_reading_through_the_address_word_keeps_every_width(widths):
    direct, through_word = dict(widths["0"]), dict(widths["1"])
    direct["ld.v1"] = direct.get("ld.v1", 0) + 1  # the word itself: one scalar int64 load
    assert through_word == direct, widths
