"""The fresh-machine main job: the benchmark's CPU mode runs end to end and writes valid JSON."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {"config", "tokens_per_rank", "world", "backend", "routing", "median_us", "rel_err",
            "floor_us", "device", "date", "commit", "ok", "preset"}


def test_cpu_benchmark_runs_and_its_json_validates(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29611"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-port=29611", os.path.join(ROOT, "bench", "layer.py"),
                           "--tokens", "16", "40", "--routing", "uniform", "zipf", "--iters", "2",
                           "--input-sets", "1", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "median_us" in proc.stdout  # the table
    data = json.loads(out.read_text())
    assert data["meta"]["world"] == 2 and data["meta"]["comm"] == "gloo"
    rows = data["rows"]
    assert len(rows) == 4  # 2 token counts x 2 routings x the torch backend
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["ok"] and row["rel_err"] <= 1e-5 and row["median_us"] > 0
        assert row["device"] == "cpu" and row["backend"] == "torch"


APART = """
import os, sys
sys.path.insert(0, {bench!r})
import layer
rows = layer.run_apart(layer.parse_args(["--tokens", "16", "--iters", "1", "--input-sets", "1"]), "torch")
if os.environ["RANK"] == "0":
    print("ROWS", len(rows), rows[0]["backend"], rows[0]["ok"], rows[0]["world"])
"""


def test_a_backend_runs_apart_in_child_processes_under_torchrun(tmp_path):
    """How symm_mem is benchmarked beside the fused kernel: each torchrun rank starts a child that
    joins a group of its own (not torchrun's agent store) and hands its rows back."""
    script = tmp_path / "apart.py"
    script.write_text(APART.format(bench=os.path.join(ROOT, "bench")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-port=29623", str(script)],
                          env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROWS 1 torch True 2" in proc.stdout
