"""The fresh-machine main job: the benchmark's CPU mode runs end to end and writes valid JSON."""

import importlib
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from dist_pool import free_port
from seeds import fresh_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {"config", "tokens_per_rank", "world", "backend", "routing", "median_us", "host_us", "rel_err",
            "floor_us", "device", "date", "commit", "ok", "preset"}


def test_cpu_benchmark_runs_and_its_json_validates(tmp_path):
    out = tmp_path / "bench.json"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={port}", os.path.join(ROOT, "bench", "layer.py"),
                           "--tokens", "16", "40", "--routing", "uniform", "zipf", "--iters", "2",
                           "--input-sets", "1", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "median_us" in proc.stdout  # the table
    assert (tmp_path / "bench.png").stat().st_size > 0  # the plot, beside the JSON
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
                           f"--master-port={free_port()}", str(script)],
                          env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROWS 1 torch True 2" in proc.stdout


def _bench_module(name: str):
    """bench/<name>.py as a module."""
    bench = os.path.join(ROOT, "bench")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(bench)


def _kernel_profile():
    return _bench_module("kernel_profile")


def _summarize():
    """bench/kernel_profile.py's summarize."""
    return _kernel_profile().summarize


def test_idle_gaps_are_the_span_less_the_union_of_activities():
    """Two steps: overlapping kernels on two streams count once; the longest gaps come first, with
    the activities either side."""
    kernels = [("a", 0.0, 10.0), ("b", 5.0, 10.0),   # busy 0-15 (overlap counted once)
               ("c", 20.0, 5.0),                     # a 5 us gap after b
               ("d", 24.0, 1.0),                     # inside c
               ("e", 40.0, 10.0)]                    # a 15 us gap after c: the span ends at 50
    g = _kernel_profile().idle_gaps(kernels, steps=2, top=1)
    assert g["span_us"] == 25.0 and g["busy_us"] == 15.0 and g["idle_us"] == 10.0
    assert g["gaps"] == [{"us": 15.0, "after": "c", "before": "e"}]


def test_a_kernel_trace_is_summarised_per_task_kind():
    summarize = _summarize()
    # (program, kind, start, ready, done, end) in ns: two programs, kernel from t=1000 to t=11000.
    trace = [[0, 5, 1000, 1000, 1000, 1000], [1, 5, 1000, 1000, 1000, 3000],  # count-word waits
             [0, 1, 1000, 1000, 1000, 2000], [1, 0, 1000, 1000, 1000, 1500],  # a chunk, the counts
             [0, 2, 2000, 2500, 5500, 6000], [1, 2, 3000, 3500, 8500, 9000],  # ffn_in tiles: 4, 6 us
             [0, 4, 6000, 7000, 10000, 11000],                                 # one combine tile
             [-1, -1, -1, -1, -1, -1]]                                         # a row no task wrote
    s = summarize(trace)
    assert s["span_us"] == 10.0 and s["programs"] == 2
    assert s["kinds"]["ffn_in"] == {"n": 2, "first_start_us": 1.0, "last_end_us": 8.0, "median_us": 5.0,
                                    "sum_us": 10.0, "wait_us": 0.5, "math_us": 4.0, "tail_us": 0.5}
    assert s["kinds"]["combine"]["wait_us"] == 1.0 and s["kinds"]["combine"]["tail_us"] == 1.0
    assert s["kinds"]["wait_counts"]["sum_us"] == 2.0 and "ffn_out" not in s["kinds"]
    assert s["busy"] == (1.0 + 0.5 + 10.0 + 5.0) / 20.0
    assert s["idle_end_us"] == 1.0  # program 1's last task ends at 9 us of the kernel's 11


def test_an_empty_trace_is_an_error():
    import pytest
    with pytest.raises(ValueError, match="no rows"):
        _summarize()([[-1, -1, -1, -1, -1, -1]])


def _bench_layer_module():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import layer
    return layer


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without GPUs")
@pytest.mark.parametrize("backend", ["flash", "flash_nvshmem"])
def test_the_fused_backends_on_a_cpu_say_they_need_gpus(backend):
    """Before: an error about init(nvshmem=True), an argument the user never passed."""
    with pytest.raises(SystemExit, match=f"backend {backend} needs CUDA GPUs"):
        _bench_layer_module().main(["--backends", "torch", backend])


@pytest.mark.parametrize("argv, said", [
    (["--tokens", "16", "0"], "--tokens 0: expected at least 1"),
    (["--iters", "0"], "--iters 0: expected at least 1"),
    (["--input-sets", "0"], "--input-sets 0: expected at least 1"),
    (["--random", "-2"], "--random -2: expected at least 0"),
    (["--energy-seconds", "nan"], "--energy-seconds nan: expected at least 0"),
    (["--preset", "bogus"], "--preset bogus: not a preset"),
    (["--preset"], "--preset without a preset needs --custom or --random"),
    (["--custom", "48", "80", "6", "9"], "--custom 48 80 6 9: MoEConfig.top_k=9 is invalid"),
    (["--frozen-experts"], "--frozen-experts time training steps: add --fwd-bwd"),
    (["--user-graph"], "--user-graph times backend flash"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'")])
def test_the_benchmark_refuses_flags_that_would_time_nothing_or_fail_later(argv, said, capsys):
    """--tokens 0 wrote a FAILED row and exited 0, --iters 0 took the default, --frozen-experts
    without --fwd-bwd added no rows, --preset bogus was a KeyError, --dtype float16 and a --custom
    shape the config refuses a traceback on every rank: each is a usage error now."""
    with pytest.raises(SystemExit):
        _bench_layer_module().parse_args(argv)
    assert said in capsys.readouterr().err


def test_random_shapes_are_drawn_within_the_issue_s_ranges_and_repeat_by_seed():
    layer = _bench_layer_module()
    shapes = layer.random_shapes(40, seed=3, dtype="bfloat16")
    assert len(shapes) == 40 and shapes == layer.random_shapes(40, seed=3, dtype="bfloat16")
    assert shapes != layer.random_shapes(40, seed=4, dtype="bfloat16")
    for name, cfg in shapes:
        assert 2048 <= cfg.hidden_size <= 7168 and 512 <= cfg.ffn_size <= 14336
        assert 8 <= cfg.num_experts <= 256 and 1 <= cfg.top_k <= 8
        assert cfg.num_experts * 3 * cfg.hidden_size * cfg.ffn_size * 2 <= 16e9
        assert name == f"random_{cfg.hidden_size}x{cfg.ffn_size}_e{cfg.num_experts}k{cfg.top_k}"


def test_the_floor_counts_shared_experts():
    layer = _bench_layer_module()
    from flashmoe_py import PRESETS
    cfg = PRESETS["deepseek_v3"]
    ceilings = {"bf16_tflops": 800.0, "hbm_gbps": 4000.0}
    routed_only = cfg.replace(shared_experts=0)
    for tokens in (128, 16384):
        assert layer.floor_us(cfg, tokens, 1, ceilings) > layer.floor_us(routed_only, tokens, 1, ceilings)
    # 16,384 tokens are compute-bound: the shared FFN adds 2 * T * H * 3 * 2048 FLOPs
    extra = 2 * 16384 * cfg.hidden_size * 3 * 2048 / (800.0 * 1e6)
    assert abs(layer.floor_us(cfg, 16384, 1, ceilings) - layer.floor_us(routed_only, 16384, 1, ceilings)
               - extra) < 1e-6 * extra


def test_the_link_term_counts_one_copy_a_token_to_each_other_rank_it_needs():
    """Not one a slot: a token whose k experts sit on two ranks crosses to at most those two (its
    outputs combined there come back as one row each)."""
    layer = _bench_layer_module()
    from flashmoe_py import PRESETS
    cfg, ceilings = PRESETS["qwen3_30b_a3b"], {"bf16_tflops": 800.0, "hbm_gbps": 4000.0, "a2a_gbps": 100.0}
    remote = 1 - math.comb(64, 8) / math.comb(128, 8)  # world 2: the other rank holds 64 of the 128
    assert abs(layer.remote_ranks(128, 64, 8, 2) - remote) < 1e-12 and layer.remote_ranks(8, 1, 2, 8) < 2
    link = layer.floor_terms(cfg, 4096, 2, ceilings)[2]
    assert abs(link - 2 * 4096 * remote * cfg.hidden_size * 2 / 100e3) < 1e-9 * link
    assert layer.floor_terms(cfg, 4096, 1, ceilings)[2] == 0.0


def test_a_training_step_s_floor_counts_two_more_all_to_alls_not_four():
    """A forward moves the slot rows twice over NVLink (dispatch, combine); the backward twice more
    (dy to the experts, the rows' gradients back): max(3 compute, 3 HBM, 2 NVLink), not 3 x the
    forward's floor. At world 1 (no link) the two are the same."""
    layer = _bench_layer_module()
    from flashmoe_py import PRESETS
    cfg = PRESETS["qwen3_30b_a3b"]
    ceilings = {"bf16_tflops": 800.0, "hbm_gbps": 4000.0, "a2a_gbps": 100.0}
    compute, hbm, link = layer.floor_terms(cfg, 16384, 4, ceilings)
    assert link > max(compute, hbm)  # a link-bound point
    assert layer.floor_us(cfg, 16384, 4, ceilings, passes=3) == max(3 * compute, 3 * hbm, 2 * link)
    assert layer.floor_us(cfg, 16384, 1, ceilings, passes=3) == 3 * layer.floor_us(cfg, 16384, 1, ceilings)
    # the experts frozen: no weight-gradient GEMMs, the same two all-to-alls more
    assert layer.floor_us(cfg, 16384, 4, ceilings, passes=2) == max(2 * compute, 2 * hbm, 2 * link)


def test_the_checked_tokens_reach_the_last_tile_and_capacity_is_checked_against_every_token():
    """With capacity the drops depend on every token's routing and the capacity on their count:
    the reference of the checked tokens alone failed a right layer past CHECK_TOKENS tokens
    (0.14 at 1,024 in a review's run)."""
    layer = _bench_layer_module()
    from flashmoe_py import MoEConfig, MoELayer
    cfg = MoEConfig(hidden_size=32, ffn_size=48, num_experts=8, top_k=2, dtype="float32")
    picked = layer.checked_tokens(16384)
    assert picked[0] == 0 and picked[-1] == 16383 and len(picked) == layer.CHECK_TOKENS
    assert torch.equal(layer.checked_tokens(100), torch.arange(100))
    capped = cfg.replace(capacity_factor=1.0)
    moe = MoELayer(capped, seed=5)
    x = torch.randn(1024, 32, generator=torch.Generator().manual_seed(6))
    picked = layer.checked_tokens(1024)
    with torch.no_grad():
        out = moe(x)[picked]
    assert layer.rel_err(out, layer.reference_rows(x, picked, capped, moe.full_weight_dict())) <= 1e-5


def nan_on_one_rank(rank, world):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import layer
    return layer.max_over_ranks(float("nan") if rank == world - 1 else 1e-3, torch.device("cpu"))


def test_an_unwritten_row_s_nan_error_is_not_lost_in_the_max_over_ranks(dist_pools):
    """gloo's MAX keeps or drops a NaN by rank order (NCCL's drops it): NaN counts as inf."""
    assert dist_pools(2).run(nan_on_one_rank) == [float("inf")] * 2


def test_the_summary_compares_flash_with_the_fastest_peer_at_each_point():
    _bench_layer_module()
    import summary

    def row(backend, tokens, us, ok=True):
        return {"preset": "p", "routing": "uniform", "tokens_per_rank": tokens, "backend": backend,
                "median_us": us, "ok": ok, "floor_us": 50.0}

    rows = [row("flash", 128, 100.0), row("triton_kernels", 128, 80.0), row("torch", 128, 200.0),
            row("flash", 1024, 100.0), row("torch", 1024, 125.0),
            row("flash", 4096, 100.0), row("triton_kernels", 4096, 125.0, ok=False), row("torch", 4096, 150.0),
            row("flash", 16384, 100.0)]  # no peer has a row: incomplete where they ran elsewhere in the preset
    pts = summary.outcomes(rows, "flash", ["torch"])["compared"]
    assert [(q["tokens"], q["best"], q["speedup"], q["of_floor"]) for q in pts] == [
        (128, "torch", 2.0, 0.5), (1024, "torch", 1.25, 0.5), (4096, "torch", 1.5, 0.5)]
    assert abs(summary.geomean([2.0, 0.5]) - 1.0) < 1e-12
    # a peer that failed its check, or has no row where it has rows elsewhere (it refused the config, its
    # run crashed): the point is incomplete, not flash against the next-slowest peer
    got = summary.outcomes(rows, "flash", ["triton_kernels", "torch"])
    assert [(q["tokens"], q["best"], q["speedup"]) for q in got["compared"]] == [(128, "triton_kernels", 0.8)]
    assert [(q["tokens"], q["failed_peers"]) for q in got["incomplete"]] == [
        (1024, ["triton_kernels"]), (4096, ["triton_kernels"]), (16384, ["triton_kernels", "torch"])]
    # a peer that refuses a whole preset (symm_mem: expert biases) is no peer there, not a missing one
    other = [{**r, "preset": "q"} for r in rows if r["tokens_per_rank"] == 1024]
    got = summary.outcomes(rows + other, "flash", ["triton_kernels", "torch"])
    assert [(q["preset"], q["tokens"], q["best"]) for q in got["compared"]] == [("p", 128, "triton_kernels"),
                                                                               ("q", 1024, "torch")]


def _summary_rows():
    _bench_layer_module()
    import summary

    def row(backend, us, ok=True, world=2, device="NVIDIA H200", tokens=128, **extra):
        return {"preset": "p", "routing": "uniform", "tokens_per_rank": tokens, "backend": backend, "world": world,
                "device": device, "median_us": us if ok else None, "ok": ok, "floor_us": 50.0, "rel_err": 0.0,
                "commit": "abc", **extra}
    return summary, row


def test_the_summary_keeps_worlds_and_devices_apart_and_refuses_two_rows_of_a_backend(capsys, tmp_path):
    summary, row = _summary_rows()
    rows = [row("flash", 100.0, world=2), row("torch", 80.0, world=4),           # other worlds: no point
            row("flash", 100.0, world=8, device="NVIDIA H100"), row("torch", 300.0, world=8),  # other devices
            row("flash", 100.0, tokens=512), row("torch", 200.0, tokens=512)]   # one world, one device: compared
    pts = summary.outcomes(rows, "flash", ["torch"])["compared"]
    assert [(q["tokens"], q["world"], q["device"], q["speedup"]) for q in pts] == [(512, 2, "NVIDIA H200", 2.0)]
    with pytest.raises(ValueError, match="two flash rows .*commits abc and def"):
        summary.outcomes(rows + [row("flash", 90.0, tokens=512, commit="def")], "flash", ["torch"])
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"rows": rows + [row("flash", 90.0, tokens=512, commit="def")]}))
    with pytest.raises(SystemExit, match="two flash rows"):
        summary.main([str(path)])


def test_the_summary_counts_every_point_a_file_left_out_and_refuses_rows_of_two_runs(capsys, tmp_path):
    """A point where flash has no row is counted incomplete; one of a preset where no peer has a
    row (the peers refused its features, or their file did not come back: the rows cannot tell
    which) unpeered; neither is dropped from the count beside the geometric mean. Rows of one
    point from two commits or of two configs (two custom shapes of one name) are refused, as two
    rows of one backend are. Files of flash's rows alone have no point to compare."""
    summary, row = _summary_rows()
    rows = [row("flash", 100.0), row("torch", 200.0),
            row("torch", 50.0, tokens=512),                                            # flash's row lost
            row("flash", 100.0, preset="q", tokens=4096), row("flash", 80.0, preset="q")]  # no torch row in q
    got = summary.outcomes(rows, "flash", ["torch"])
    assert [q["tokens"] for q in got["compared"]] == [128]
    assert [(q["preset"], q["tokens"], q["failed_peers"]) for q in got["incomplete"]] == [("p", 512, ["flash"])]
    assert [(q["preset"], q["tokens"]) for q in got["unpeered"]] == [("q", 4096), ("q", 128)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"rows": rows}))
    summary.main([str(path)])
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("UNPEERED") for line in out) == 2
    assert "over 1 points" in out[-1] and "0 points where flash failed, 1 incomplete" in out[-1]
    assert "2 with no peer's row in their preset" in out[-1]
    path.write_text(json.dumps({"rows": [r for r in rows if r["backend"] == "flash"]}))
    with pytest.raises(SystemExit, match="no point has rows of both flash and one of"):
        summary.main([str(path)])
    with pytest.raises(ValueError, match="flash and torch rows at p uniform 128 tokens.* differ in commit"):
        summary.outcomes([row("flash", 100.0), row("torch", 200.0, commit="def")], "flash", ["torch"])
    with pytest.raises(ValueError, match="differ in config"):
        summary.outcomes([row("flash", 100.0, config={"hidden_size": 2048}),
                          row("torch", 200.0, config={"hidden_size": 7168})], "flash", ["torch"])


def test_the_summary_counts_a_point_where_flash_failed(capsys, tmp_path):
    summary, row = _summary_rows()
    rows = [row("flash", 100.0), row("torch", 200.0), row("symm_mem", 150.0),
            row("flash", None, ok=False, tokens=512, rel_err=0.3), row("torch", 50.0, tokens=512),
            row("flash", 100.0, tokens=4096), row("torch", 50.0, tokens=4096, mode="fwd+bwd", backward="saved")]
    got = summary.outcomes(rows, "flash", ["torch", "symm_mem"])
    assert [q["tokens"] for q in got["failed"]] == [512]
    assert [(q["tokens"], q["best"]) for q in got["compared"]] == [(128, "symm_mem")]
    # fwd+bwd rows are not peers of forward ones: flash's forward at 4,096 has none
    assert [(q["tokens"], q["failed_peers"]) for q in got["incomplete"]] == [(4096, ["torch", "symm_mem"])]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"rows": rows}))
    summary.main([str(path)])  # default peers: those with rows, symm_mem included
    out = capsys.readouterr().out
    assert "symm_mem" in out.splitlines()[0] and "FAILED" in out
    assert "over 1 points" in out and "1 points where flash failed, 1 incomplete" in out


def test_the_summary_compares_training_steps_of_one_backward_apart_from_forwards(capsys, tmp_path):
    """--fwd-bwd saved: flash's training steps with backward="saved" against the peers' with the
    same backward, and the lowest fraction of the floor (issue 19's 70%); forward rows and other
    backwards are not their peers, and a training step that failed its check is counted failed."""
    summary, row = _summary_rows()
    step = dict(mode="fwd+bwd", backward="saved")
    rows = [row("flash", 100.0), row("torch", 150.0),                                   # forwards
            row("flash", 300.0, **step), row("torch", 450.0, **step),                    # compared
            row("torch", 200.0, backward="autograd", mode="fwd+bwd"),                     # another backward
            row("flash", None, ok=False, tokens=512, rel_err=0.2, **step), row("torch", 900.0, tokens=512, **step)]
    got = summary.outcomes(rows, "flash", ["torch"], "saved")
    assert [(q["tokens"], q["speedup"], q["of_floor"]) for q in got["compared"]] == [(128, 1.5, 50.0 / 300.0)]
    assert [q["tokens"] for q in got["failed"]] == [512]
    assert [q["speedup"] for q in summary.outcomes(rows, "flash", ["torch"])["compared"]] == [1.5]  # forwards
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"rows": rows}))
    summary.main([str(path), "--fwd-bwd", "saved"])
    last = capsys.readouterr().out.splitlines()[-1]
    assert "1.500x over 1 points" in last and "lowest fraction of the floor 17% (p, 128 tokens)" in last
    assert "1 points where flash failed" in last
    # steps with the experts frozen (--frozen-experts) are their own comparison, not a second row
    frozen = [row("flash", 200.0, frozen="experts", **step), row("torch", 250.0, frozen="experts", **step)]
    assert [q["speedup"] for q in summary.outcomes(rows + frozen, "flash", ["torch"], "saved")["compared"]] == [1.5]
    assert [q["speedup"] for q in summary.outcomes(rows + frozen, "flash", ["torch"], "saved", True)["compared"]] \
        == [1.25]


def summary_of_runs(summary, runs: list[list[dict]], tmp_path) -> list:
    """Each run's rows written to a file of its own, then summary.main over them, a --run each -> the paths."""
    paths = []
    for i, rows in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps({"rows": rows}))
    summary.main([a for p in paths for a in ("--run", str(p))])
    return paths


def test_the_summary_of_several_runs_takes_each_point_s_median_ratio(capsys, tmp_path):
    """--run a run's files, once a run: each ratio comes from one run; a point's verdict is the
    median of its runs' ratios, with the runs where flash was behind counted; a point one run did
    not compare is counted, not dropped. A run whose files mix two runs is refused, as one run's."""
    summary, row = _summary_rows()

    def run(commit, us_128, us_512, us_4096=None):  # torch at 100 us everywhere
        rows = [row("flash", us_128, commit=commit), row("torch", 100.0, commit=commit),
                row("flash", us_512, tokens=512, commit=commit), row("torch", 100.0, tokens=512, commit=commit)]
        if us_4096 is not None:
            rows += [row("flash", us_4096, tokens=4096, commit=commit), row("torch", 100.0, tokens=4096, commit=commit)]
        return rows

    runs = [run("a", 80.0, 104.0, 50.0), run("b", 125.0, 101.0), run("c", 50.0, 90.0, 200.0)]
    pts = summary.across_runs(runs, "flash", ["torch"])
    got = {q["tokens"]: q for q in pts}
    assert got[128]["speedups"] == [1.25, 0.8, 2.0] and got[128]["median"] == 1.25 and got[128]["behind"] == 1
    assert got[512]["median"] == pytest.approx(100 / 101) and got[512]["behind"] == 2  # behind at its median
    assert got[4096]["speedups"] == [2.0, 0.5] and got[4096]["median"] == 1.25 and got[4096]["runs"] == 3
    paths = summary_of_runs(summary, runs, tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "runs: 1: commit a; 2: commit b; 3: commit c"
    assert "over 3 points and 3 runs; median below 1.0x at 1 (p 512); behind in every run at 0" in out[-1]
    assert "1 points compared in fewer runs than given" in out[-1]
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps({"rows": runs[0] + [row("flash", 90.0, commit="b")]}))
    with pytest.raises(SystemExit, match="two flash rows"):
        summary.main(["--run", str(mixed), "--run", str(paths[1])])
    with pytest.raises(SystemExit):  # files of one run and --run runs together: which is which?
        summary.main([str(paths[0]), "--run", str(paths[1])])


def test_several_runs_list_what_each_run_did_not_compare_and_refuse_what_is_not_one_point(capsys, tmp_path):
    """Across runs a point is listed with every run's outcome: a run where flash failed, where a
    peer another run compared it with is missing (its file not given), or with no row there, gives
    no ratio, and "behind in every run" needs every run's. Routing tells points apart in the table
    and the verdict. Refused: two configs under one name in two runs, and one run given twice."""
    summary, row = _summary_rows()

    def run(commit, flash_us, peer_us=80.0, peer="triton_kernels", **extra):  # torch at 100 us, a peer faster
        rows = [row("flash", flash_us, ok=flash_us is not None, commit=commit, date=commit, **extra),
                row("torch", 100.0, commit=commit, date=commit, **extra)]
        return rows + ([row(peer, peer_us, commit=commit, date=commit, **extra)] if peer else [])

    runs = [run("a", 90.0), run("b", None), run("c", 95.0, peer=None)]  # behind, failed, no triton_kernels
    (q,) = summary.across_runs(runs, "flash", ["triton_kernels", "torch"])
    assert q["each"] == [80.0 / 90.0, "failed", "incomplete"] and q["speedups"] == [80.0 / 90.0]
    assert q["behind"] == 1 and q["runs"] == 3
    paths = summary_of_runs(summary, runs, tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert out[2].split()[-3:] == ["0.889x", "failed", "incomplete"]
    assert "behind in every run at 0; 1 points compared in fewer runs than given (flash failed in some run at 1)" \
        in out[-2]
    assert out[-1] == ("note: triton_kernels has rows in some runs only (their points are incomplete in the others); "
                       "--peers torch compares each run with the peers every run has")
    # a point flash failed in every run is listed, with no median
    again = tmp_path / "again.json"
    again.write_text(json.dumps({"rows": run("d", None)}))
    summary.main(["--run", str(paths[1]), "--run", str(again)])
    out = capsys.readouterr().out.splitlines()
    assert out[2].split()[-4:] == ["-", "0/0", "failed", "failed"]
    assert out[-1] == "no point compared in any run; 1 points compared in fewer runs than given (flash failed in " \
        "some run at 1)"
    # routing: two points at one preset and token count, told apart
    zipf = [run("e", 50.0, routing="zipf")[0], run("e", 100.0, routing="zipf")[1]]
    pts = summary.across_runs([run("e", 100.0, peer=None) + zipf], "flash", ["torch"])
    assert [(q["routing"], q["median"]) for q in pts] == [("uniform", 1.0), ("zipf", 2.0)]
    assert summary.point_name(pts[1]) == "p zipf 128" and summary.point_name(pts[0]) == "p 128"
    with pytest.raises(ValueError, match="different configs in runs 1 and 2"):
        summary.across_runs([run("f", 90.0, config={"hidden_size": 2048}),
                             run("g", 90.0, config={"hidden_size": 7168})], "flash", ["torch"])
    with pytest.raises(SystemExit, match="runs 1 and 2 both hold rows of commit a"):
        summary.main(["--run", str(paths[0]), "--run", str(paths[0])])


def test_the_benchmark_table_marks_a_row_that_failed_a_check_and_its_worse_error(capsys):
    """A row that passed before its timing and failed after it (rel_err_timed) is printed FAIL with
    that error, not as the passing row it was before."""
    layer = _bench_layer_module()
    base = {"preset": "p", "routing": "uniform", "tokens_per_rank": 128, "backend": "flash", "median_us": 3000.0,
            "floor_us": 1230.0, "rel_err": 3.7e-3}
    rows = [{**base, "rel_err_timed": 0.5, "ok": False}, {**base, "rel_err_timed": 3.8e-3, "ok": True}]
    layer.print_table(rows, {}, {"device": "d", "comm": "gloo", "torch": "t", "commit": "c", "date": "now"}, 1)
    lines = capsys.readouterr().out.splitlines()[-2:]
    assert lines[0].endswith("5.0e-01 FAIL") and lines[1].endswith("3.8e-03 ok")


def test_the_plot_draws_a_line_per_backend_mode_and_backward_with_the_mode_s_floor(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import plot

    def row(backend, tokens, us, floor, ok=True, **extra):
        return {"preset": "p", "routing": "uniform", "tokens_per_rank": tokens, "backend": backend,
                "median_us": us, "floor_us": floor, "ok": ok, **extra}
    bwd = {"mode": "fwd+bwd"}
    rows = [row("torch", 16, 10.0, 1.0), row("torch", 32, 20.0, 2.0),
            row("torch", 16, 30.0, 3.0, backward="saved", **bwd), row("torch", 32, 60.0, 6.0, backward="saved", **bwd),
            row("torch", 16, 40.0, 3.0, backward="autograd", **bwd),
            row("torch", 32, 99.0, 6.0, ok=False, backward="autograd", **bwd),  # failed: not drawn
            row("symm_mem", 16, 12.0, 1.0, mode="1d+regroup")]
    lines, floor = plot.lines_of(rows, "p", "uniform", "forward")
    assert lines == {"torch": [(16, 10.0), (32, 20.0)], "symm_mem (1d+regroup)": [(16, 12.0)]}
    assert floor == {16: 1.0, 32: 2.0}
    lines, floor = plot.lines_of(rows, "p", "uniform", "fwd+bwd")
    assert lines == {"torch/saved": [(16, 30.0), (32, 60.0)], "torch/autograd": [(16, 40.0)]}
    assert floor == {16: 3.0, 32: 6.0}
    meta = {"device": "cpu", "world": 2, "date": "2026-12-05T00:00:00", "commit": "abc"}
    out = plot.plot({"meta": meta, "rows": rows}, str(tmp_path / "latency.png"))
    assert os.path.getsize(out) > 0


def test_wgrad_probe_checks_against_float32_per_expert_and_a_skipped_tile_fails():
    """bench/wgrad_probe.py's reference_err: a variant's output against each expert's float32
    product; an output a variant left NaN (its poisoned buffer) or stale fails."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import wgrad_probe

    gen = torch.Generator().manual_seed(5)
    counts = torch.tensor([5, 0, 17, 3])
    a = torch.randn(25, 24, generator=gen).to(torch.bfloat16)
    b = torch.randn(25, 40, generator=gen).to(torch.bfloat16)
    fns, _ = wgrad_probe.variants(a, b, counts)
    for name, (fn, args) in fns.items():
        out, poisoned = wgrad_probe.checked_output(fn, args, (4, 24, 40), a.dtype)
        assert poisoned and wgrad_probe.reference_err(out, a, b, counts.tolist()) <= 1e-2, name
        assert wgrad_probe.checked_err(fn, args, a, b, counts.tolist()) <= 1e-2, name
    out = fns["grouped"][0](*fns["grouped"][1]).clone()
    out[2, :8] = float("nan")  # a tile never written into the NaN-filled output
    assert not wgrad_probe.reference_err(out, a, b, counts.tolist()) <= 1e-2
    out[2] = out[0]  # another expert's values left behind
    assert wgrad_probe.reference_err(out, a, b, counts.tolist()) > 1e-2


def test_forward_and_backward_rows_are_checked_against_float64_autograd(tmp_path):
    """--fwd-bwd: each backend with a backward gets a row per backward asked for, mode 'fwd+bwd',
    whose every gradient (x's, the router's, each expert weight's, summed over the ranks) was
    compared with autograd through the reference at the timed size, before and after it was timed
    (world 2, gloo); with --frozen-experts a second row each, the experts' weights frozen (x's and
    the router's gradients checked)."""
    out = tmp_path / "bench.json"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={port}", os.path.join(ROOT, "bench", "layer.py"), "--tokens", "24",
                           "--iters", "2", "--input-sets", "1", "--fwd-bwd", "--backwards", "autograd", "saved",
                           "--frozen-experts", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r.get("mode"), r.get("backward"), r.get("frozen")) for r in rows] == [
        (None, None, None), ("fwd+bwd", "autograd", None), ("fwd+bwd", "autograd", "experts"),
        ("fwd+bwd", "saved", None), ("fwd+bwd", "saved", "experts")]
    assert all(r["ok"] and r["rel_err"] <= 1e-5 and r["median_us"] > 0 and r["host_us"] > 0 for r in rows)
    for r in rows[1:]:
        assert r["checked"] == "every gradient" and r["rel_err_timed"] <= 1e-5, r
        assert r["step_peak_bytes"] is None, r  # GPU memory: measured on CUDA only
        trained = {"x", "router_weight"} | (set() if r.get("frozen") else {"w_in", "w_out"})
        assert set(r["rel_errs"]) == trained, r["rel_errs"]
        assert max(r["rel_errs"].values()) <= r["rel_err"] and r["tokens_routed_otherwise"] == 0, r
    assert "torch/saved +bwd" in proc.stdout and "torch/saved frozen +bwd" in proc.stdout
    assert set(rows[1]["speedup"]) == {"torch/autograd", "torch/autograd frozen", "torch/saved", "torch/saved frozen"}


@pytest.mark.parametrize("dtype,errors,want", [
    ("float32", {"float64": 2e-5, "float32": 3e-6}, (3e-6, True)),  # float32 arithmetic's own distance
    ("float32", {"float64": 2e-5, "float32": 2e-5}, (2e-5, False)),  # the float32 reference agrees: wrong
    ("float32", {"float64": 4e-6}, (4e-6, True)),  # within the bar: the float32 reference not taken
    ("bfloat16", {"float32": 2e-2}, (2e-2, False))])  # bf16 layers: against float32 only, as before
def test_a_float32_step_over_the_bar_is_compared_with_the_float32_reference_too(monkeypatch, dtype, errors, want):
    """A review's find: with routing steered one-hot, a float32 layer's router gradient was
    1.1e-5 from float64 autograd (the bar 1e-5) and bit for bit the float32 reference's, which is
    as far from float64 (a saturated softmax): the row said FAILED. Such a step is compared with
    the float32 reference too, and passes where it matches it; both errors are kept."""
    layer_module = _bench_layer_module()
    asked = []

    def lean_grad_errors(layer, x, dy, dtype, report):
        name = {torch.float64: "float64", torch.float32: "float32"}[dtype]
        asked.append(name)
        report["tokens_routed_otherwise"] = 0
        return {"x": errors[name], "router_weight": errors[name] / 2}

    monkeypatch.setattr(layer_module, "lean_grad_errors", lean_grad_errors)
    monkeypatch.setattr(layer_module, "max_over_ranks", lambda value, device: value)  # one rank, no process group
    layer = types.SimpleNamespace(config=types.SimpleNamespace(dtype=dtype), world_size=1, zero_grad=lambda **k: None)
    x = torch.zeros(2, 4)
    worst, errs, errs32, routed = layer_module.step_errors(layer, x, x, torch.device("cpu"), 1e-2 if dtype == "bfloat16"
                                                           else 1e-5)
    assert asked == list(errors) and (worst, worst <= (1e-2 if dtype == "bfloat16" else 1e-5)) == want
    assert errs["x"] == errors[asked[0]] and routed == 0
    assert errs32 == ({"x": errors["float32"], "router_weight": errors["float32"] / 2} if len(asked) == 2 else None)


def test_training_steps_are_profiled_with_their_backward():
    """bench/kernel_profile.py --fwd-bwd: torch.profiler over forward + backward steps (world 2,
    gloo, backend torch, backward 'saved'), its table showing the backward's ops, a row per input
    shapes with --shapes; --custom profiles that shape in the preset's dtype."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={port}", os.path.join(ROOT, "bench", "kernel_profile.py"),
                           "--preset", "tiny", "--custom", "48", "80", "6", "3", "--backend", "torch", "--tokens", "24",
                           "--iters", "2", "--fwd-bwd", "--backward", "saved", "--shapes"],
                          env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "totals over 2 training steps (forward + backward)" in proc.stdout
    assert "_ExplicitBackward" in proc.stdout  # the 'saved' backward's autograd node ran and was timed
    assert "Input Shapes" in proc.stdout
    assert "### custom_48x80_e6k3 torch tokens=24 world=2" in proc.stdout
    assert "[24, 48]" in proc.stdout  # x's shape: the custom hidden size, not tiny's


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernel in the interpreter")
@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("epilogue,rows_per_expert,sorted_rows", [("stg", 24, False), ("stg", 24, True),
                                                                    ("tma", 32, False)])
def test_gemm1_loop_study_matches_float32(flatten, epilogue, rows_per_expert, sorted_rows):
    """bench/gemm1_loop.py's kernel, both schedules: gathered rows (or the rows copied in expert
    order, through TMA) @ paired w_in, SwiGLU, against the float32 reference, every row of two
    experts; fp32 dots in the interpreter. Stores by thread with a part-full last row tile (whose
    sorted box reads the next expert's rows); the TMA store (full tiles only) at a multiple of BM."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import torch

    import gemm1_loop
    x, w, rows, tiles = gemm1_loop.problem(2, 64, 256, rows_per_expert, 16, "cpu", dtype=torch.float32)
    gemm1_loop.check_epilogue(tiles, 16, epilogue)
    h = torch.full((rows.shape[0], 256), float("nan"))
    gemm1_loop.launch(x, w, rows, tiles, h, flatten, sms=3, BM=16, BF=128, BK=32, epilogue=epilogue,
                      x_sorted=x[rows.long()] if sorted_rows else None)
    ref = gemm1_loop.reference(x, w, rows, rows_per_expert, torch.arange(rows.shape[0]))
    assert float((h - ref).norm() / ref.norm()) <= 1e-5


def test_gemm1_loop_tma_epilogue_refuses_part_full_tiles():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import torch

    import gemm1_loop
    _, _, _, tiles = gemm1_loop.problem(2, 64, 256, 24, 16, "cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="full tiles"):
        gemm1_loop.check_epilogue(tiles, 16, "tma")
    gemm1_loop.check_epilogue(tiles, 16, "stg")


def test_gemm1_ws_checks_its_operands_before_any_launch():
    """bench/gemm1_gluon.py's warp-specialised GEMM1 stores whole 64-row boxes of h and needs two
    ring stages: a part-full tile (96 rows an expert: 64 + 32) or one stage is refused by check_ws,
    full tiles pass it; gemm1_ws refuses an h that is not half w_in's width."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import torch

    import gemm1_gluon
    import gemm1_loop
    _, w, _, _ = gemm1_loop.problem(2, 64, 128, 96, 16, "cpu", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="every tile must have 64 rows"):
        gemm1_gluon.check_ws(w, gemm1_loop.row_tiles(2, 96, 64, "cpu"))
    full = gemm1_loop.row_tiles(2, 128, 64, "cpu")
    gemm1_gluon.check_ws(w, full)
    with pytest.raises(ValueError, match="stages=1 at least 2"):
        gemm1_gluon.check_ws(w, full, stages=1)
    x, w, rows, _ = gemm1_loop.problem(2, 64, 128, 128, 16, "cpu", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="expected h's to be half"):
        gemm1_gluon.gemm1_ws(x, w, rows, full, torch.empty(rows.shape[0], 256, dtype=torch.bfloat16), sms=1)


def test_tune_settings_are_positional_or_named_over_auto():
    _bench_layer_module()
    import tune
    assert tune.parse_setting("auto") == {}
    assert tune.parse_setting("128,8,3,8,256") == dict(block_m=128, num_warps=8, stages=3, group=8, block_n=256)
    assert tune.parse_setting("block_t=64,stages=4") == dict(block_t=64, stages=4)


def test_tune_takes_presets_and_named_random_shapes():
    _bench_layer_module()
    import tune
    assert [n for n, _ in tune.tuned_shapes(None, 0, None, 0)] == ["mixtral_8x7b"]
    every = [n for n, _ in tune.tuned_shapes(None, 3, None, 0)]
    assert len(every) == 3 and all(n.startswith("random_") for n in every)
    picked = tune.tuned_shapes(["qwen3_30b_a3b"], 3, [every[1]], 0)
    assert [n for n, _ in picked] == ["qwen3_30b_a3b", every[1]]
    assert picked[1][1].dtype == "bfloat16"
    with pytest.raises(ValueError, match="--only"):
        tune.tuned_shapes(None, 3, ["random_1x1_e1k1"], 0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels in the interpreter")
def test_backward_kernels_bench_checks_every_variant_against_float64():
    """bench/backward_kernels.py on a small config: every token-sum tile and the router gradient,
    each beside its torch steps, within 1e-5 of float64; token_sum's own tiles restored after."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import backward_kernels
    from flashmoe_py import MoEConfig
    from flashmoe_py.kernels import token_sum

    tiles = (token_sum.BLOCK_TOKENS, token_sum.BLOCK_TOKENS_MANY_EXPERTS, token_sum.BLOCK_COLS, token_sum.NUM_WARPS)
    cfg = MoEConfig(hidden_size=160, ffn_size=32, num_experts=72, top_k=3, dtype="bfloat16")
    rows = backward_kernels.bench_config("small", cfg, 70, iters=1, input_sets=2, rounds=2, device="cpu")
    assert {(r["op"], r["variant"]) for r in rows} >= {("token_sum", "torch"), ("token_sum", "chosen tiles"),
                                                        ("router_grad", "torch"), ("router_grad", "kernel")}
    assert len(rows) == len(backward_kernels.TOKEN_SUM_TILES) + 5
    assert all(r["ok"] and r["rel_err"] <= 1e-5 and r["floor_us"] > 0 for r in rows)
    assert all(0 < r["min_us"] <= r["median_us"] <= r["max_us"] for r in rows)
    assert tiles == (token_sum.BLOCK_TOKENS, token_sum.BLOCK_TOKENS_MANY_EXPERTS, token_sum.BLOCK_COLS,
                     token_sum.NUM_WARPS)


def test_wgrad_probe_variants_are_each_expert_s_product_over_its_rows():
    """bench/wgrad_probe.py's layouts (padded groups, bmm over rows padded to the busiest expert)
    give every expert's a^T b over its own rows, an expert with none included (zeros)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import wgrad_probe

    gen = torch.Generator().manual_seed(7)
    counts = torch.tensor([5, 0, 17, 3, 11])
    a = torch.randn(int(counts.sum()), 24, generator=gen).to(torch.bfloat16)
    b = torch.randn(int(counts.sum()), 40, generator=gen).to(torch.bfloat16)
    ends = torch.cumsum(counts, 0).tolist()
    want = torch.stack([a[e - n:e].double().t() @ b[e - n:e].double() for n, e in zip(counts.tolist(), ends)])
    fns, pad = wgrad_probe.variants(a, b, counts)
    assert pad == 5 * 17 - int(counts.sum())
    for name, (fn, args) in fns.items():
        got = fn(*args).double()
        assert got.shape == want.shape and (got - want).norm() / want.norm() <= 1e-2, name
        assert torch.equal(got[1], torch.zeros_like(got[1])), name



@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs expert_dgrad in the interpreter")
def test_dgrad_probe_checks_each_variant_against_float32_and_reports_its_rows(tmp_path):
    """bench/dgrad_probe.py's check finds expert_dgrad's rows right and one wrong row wrong; the
    probes' rows carry the ratio to the floor and their check, and a failed check is exit code 1."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import dgrad_probe
    import wgrad_probe

    from flashmoe_py.kernels.expert_dgrad import DgradTiles, expert_dgrad

    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([5, 0, 17, 3])
    a, w = torch.randn(25, 32, generator=gen), torch.randn(4, 48, 32, generator=gen)
    out = expert_dgrad(a, w, torch.cumsum(counts, 0).to(torch.int32), shape=DgradTiles(32, 64, 32, 2, 4))
    assert dgrad_probe.reference_err(out, a, w, counts.tolist()) <= 1e-5
    out[7] = a[7] @ w[0].t()  # a row of expert 2 given expert 0's product
    assert dgrad_probe.reference_err(out, a, w, counts.tolist()) > 1e-2
    rows = []
    wgrad_probe.report(rows, {"preset": "p", "tokens": 8, "skew": 0.0, "gemm": "g"}, counts,
                       {"grouped": 10.0, "mine": 5.0}, {"grouped": 0.0, "mine": 0.5}, 4.0)
    assert [(r["variant"], r["ok"], r["of_floor"]) for r in rows] == [("grouped", True, 0.4), ("mine", False, 0.8)]
    assert wgrad_probe.finish(rows, str(tmp_path / "rows.json")) == 1
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 2
    args = wgrad_probe.probe_parser("", ["qwen3_30b_a3b"]).parse_args(["--tokens", "64", "96", "--skew", "0", "1"])
    points = list(wgrad_probe.probe_points(args, torch.Generator().manual_seed(0)))
    assert [(p["tokens"], p["skew"]) for p, *_ in points] == [(64, 0.0), (64, 1.0), (96, 0.0), (96, 1.0)]
    for point, (H, F, f_in, E), counts, S in points:
        assert (H, F, f_in, E) == (2048, 768, 1536, 128) and int(counts.sum()) == S == point["tokens"] * 8
    assert wgrad_probe.product_floor_us(1, 1, 1, 1) > 0
    compute_bound = 2.0 * 2 ** 20 * 4096 * 4096 / wgrad_probe.TFLOPS * 1e6
    assert wgrad_probe.product_floor_us(2 ** 20, 4096, 4096, 1) == compute_bound


class _Board:
    """A fake energy counter that rises 250 mJ a call of its `call`."""

    def __init__(self):
        self.mj, self.calls = 7000, 0

    def millijoules(self):
        return self.mj

    def call(self):
        self.mj += 250
        self.calls += 1


def _energy_bench(monkeypatch, board, other_rank=()):
    """bench/layer.py with a fake board and a second rank whose values for max_over_ranks come from
    other_rank, in order (none: one rank), and no CUDA synchronisation -> (the module, the list of
    values this rank passed to max_over_ranks: one entry a collective call)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import layer
    other, collectives = iter(other_rank), []

    def max_over_ranks(value, device):
        collectives.append(value)
        return max(value, next(other, value))
    monkeypatch.setattr(layer, "max_over_ranks", max_over_ranks)
    monkeypatch.setattr(layer, "meter_for", lambda device: board)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    return layer, collectives


def test_energy_per_call_is_the_median_of_loops_of_one_call_count_on_every_rank(monkeypatch):
    """--energy-seconds S: ENERGY_LOOPS loops, each of S / ENERGY_LOOPS at the point's median time
    (so the same count on every rank: a call may be collective); the counter's rise a call."""
    board = _Board()
    layer, collectives = _energy_bench(monkeypatch, board)
    got = layer.energy_row(board.call, 0.03, 1000.0, torch.device("cuda"))
    assert board.calls == 30 and layer.ENERGY_LOOPS == 3  # 10 calls of 1 ms a loop
    assert got["joules_per_call"] == 0.25 and got["energy_loop_us"] > 0
    assert len(collectives) == 4  # has a counter, a read failed, the two medians: the same on every rank
    assert layer.energy_row(board.call, 0.0, 1000.0, torch.device("cuda")) == {} and board.calls == 30
    assert len(collectives) == 4  # seconds 0: no collective at all


def test_no_energy_anywhere_when_a_rank_has_no_counter(monkeypatch):
    """A rank without a counter (a CPU, or a GPU without NVML): no rank loops and no row gets
    joules_per_call; a counter that fails mid-way: every rank loops, no row gets it either."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import energy
    assert energy.meter_for(torch.device("cpu")) is None
    board = _Board()
    layer, collectives = _energy_bench(monkeypatch, board, other_rank=[1.0])  # the other rank has no meter
    assert layer.energy_row(board.call, 0.03, 1000.0, torch.device("cuda")) == {} and board.calls == 0
    assert len(collectives) == 1
    layer, collectives = _energy_bench(monkeypatch, board, other_rank=[0.0, 1.0])  # its counter failed
    assert layer.energy_row(board.call, 0.03, 1000.0, torch.device("cuda")) == {} and board.calls == 30
    assert len(collectives) == 2
    row = {"median_us": 5.0, "joules_per_call": 1.0, "energy_loop_us": 6.0}
    assert layer.without_energy(row) == {"median_us": 5.0}  # a derived row measures its own


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_gpu_s_energy_counter_counts_a_loop_of_products():
    """The board's counter rises faster over half a second of bf16 products than over half a
    second idle, by more than 100 W (a handle to another, idle GPU would not)."""
    import time
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import energy
    meter = energy.meter_for(torch.device("cuda", torch.cuda.current_device()))
    assert meter is not None, "no NVML energy counter for this GPU"
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def watts(work):
        torch.cuda.synchronize()
        mj, t0 = meter.millijoules(), time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            work()
            torch.cuda.synchronize()
        return (meter.millijoules() - mj) / 1e3 / (time.perf_counter() - t0)

    idle = watts(lambda: time.sleep(0.01))
    busy = watts(lambda: [a @ a for _ in range(10)])
    assert busy > idle + 100 and busy < 3000, (idle, busy)


def tune_point_on_cpu(rank, world, broken: bool | str) -> list[dict]:
    """bench/tune.py's tuned_point with backend torch standing in for the fused layer (a setting
    only names the layer here); with broken, the second setting's layer returns zeros; with
    broken="too big", its forward raises Triton's OutOfResources, as a kernel that does not fit
    the GPU's shared memory does at its first launch."""
    import types
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import layer as bench_layer
    import tune
    import flashmoe_py as fm

    class Stand(fm.MoELayer):
        def __init__(self, cfg, backend, max_tokens_per_rank, seed, launch_override):
            super().__init__(cfg, seed=seed)
            self.setting = launch_override
            self.backend.close = lambda: None

        def forward(self, x):
            if broken == "too big" and self.setting:
                from triton.runtime.errors import OutOfResources
                raise OutOfResources(245800, 232448, "shared memory")
            out = super().forward(x)
            return torch.zeros_like(out) if broken and self.setting else out

    tune.fm = types.SimpleNamespace(MoELayer=Stand, reference_forward=fm.reference_forward)
    try:
        rt = types.SimpleNamespace(rank=rank, device=torch.device("cpu"))
        return tune.tuned_point("tiny", fm.preset("tiny"), 300, [{}, {"stages": 2}],
                                types.SimpleNamespace(rounds=2, iters=2), bench_layer.Timer(rt.device), rt, world)
    finally:
        tune.fm = fm


@pytest.mark.parametrize("broken", [False, True])
def test_tune_checks_each_setting_before_and_after_timing_them_in_turn(dist_pools, broken):
    """Tokens spread to the last tile, checked again on a warm call after the rounds; a setting
    that fails either check is not ok (and tune.py exits 1)."""
    rows = dist_pools(1).run(tune_point_on_cpu, broken)[0]
    assert [r.get("stages") for r in rows] == [None, 2]
    assert all(r["median_us"] > 0 and r["rel_err_timed"] is not None for r in rows)
    assert [r["ok"] for r in rows] == [True, not broken], rows


def test_tune_a_setting_whose_kernel_does_not_fit_is_a_failed_row_and_the_others_are_timed(dist_pools):
    """A setting past the GPU's shared memory (stages=5 at 128 x 256 tiles: 245,800 bytes of
    232,448) ended the whole run in its traceback, the other settings untimed: it is a row of
    its own now, not ok, naming why, with no time."""
    rows = dist_pools(1).run(tune_point_on_cpu, "too big")[0]
    assert [r.get("stages") for r in rows] == [None, 2]
    fits, too_big = rows
    assert fits["ok"] and fits["median_us"] > 0 and fits["rel_err"] < 1e-2 and "error" not in fits
    assert not too_big["ok"] and too_big["median_us"] is None and too_big["rel_err"] is None
    assert "shared memory, Required: 245800" in too_big["error"]


def test_a_skewed_row_s_floor_is_its_own_routing_s_and_none_without_it():
    """Uniform routing's expected touched experts and busiest rank do not hold under zipf (qwen3 at
    128 tokens touches 24 of its 128 experts): a row's floor comes from its own routing's load, and
    a skewed row without one has none."""
    layer = _bench_layer_module()
    from flashmoe_py import PRESETS
    cfg = PRESETS["qwen3_30b_a3b"]
    ceilings = {"bf16_tflops": 800.0, "hbm_gbps": 4000.0, "a2a_gbps": 100.0}
    few = {"tokens": [128], "rows": [1024], "touched": [24], "link_rows": [0]}
    rows = [{"config": cfg.to_dict(), "tokens_per_rank": 128, "routing": routing, "median_us": 500.0, **extra}
            for routing, extra in (("uniform", {}), ("zipf", {}), ("zipf", {"load": few}))]
    for row in rows:
        layer.add_derived(row, 1, ceilings)
    assert rows[0]["floor_us"] > 0 and rows[1]["floor_us"] is None and rows[1]["tflops"] > 0
    # 128 tokens are HBM-bound: 24 experts' weights, x read and out written
    hbm = (24 * (cfg.ffn_in_size + cfg.ffn_size) + 2 * 128) * cfg.hidden_size * 2 / 4000e3
    assert abs(rows[2]["floor_us"] - hbm) < 1e-9 * hbm and hbm < 0.25 * rows[0]["floor_us"]


def test_the_hbm_term_counts_what_must_move_at_the_faster_measured_rate():
    """The physical floor's HBM term: the touched experts' weights, x and out, not the gathered
    rows or the expert outputs (an implementation need not pass them through HBM), at the faster
    of the copy rate and the read rate (weights are only read: a weight-bound point measured
    103% of a floor at the copy rate)."""
    layer = _bench_layer_module()
    from flashmoe_py import PRESETS
    cfg = PRESETS["mixtral_8x7b"]
    H, bytes_el = cfg.hidden_size, 2
    weights = cfg.num_experts * (cfg.ffn_in_size + cfg.ffn_size) * H * bytes_el
    copy = {"bf16_tflops": 800.0, "hbm_gbps": 3000.0}
    read = {**copy, "hbm_read_gbps": 3300.0}
    for tokens in (128, 2048):  # every expert touched
        moved = weights + 2 * tokens * H * bytes_el
        assert abs(layer.floor_terms(cfg, tokens, 1, copy)[1] - moved / 3000e3) < 1e-9 * moved
        assert abs(layer.floor_terms(cfg, tokens, 1, read)[1] - moved / 3300e3) < 1e-9 * moved
    slow_read = {**copy, "hbm_read_gbps": 2000.0}  # a read rate under the copy's: the copy's
    assert layer.floor_terms(cfg, 128, 1, slow_read)[1] == layer.floor_terms(cfg, 128, 1, copy)[1]


def routing_loads(rank, world):
    """routing_load of a layer whose experts 0-3 sit on rank 0 and 4-7 on rank 1, on inputs steered
    so that every token picks its experts among a few: each rank's figures, and the routing."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import layer as bench
    from flashmoe_py import MoEConfig, MoELayer
    cfg = MoEConfig(hidden_size=32, ffn_size=16, num_experts=8, top_k=2, dtype="float32")
    moe = MoELayer(cfg, seed=3)
    x = bench.steer_routing(moe, torch.randn(40 + 9 * rank, 32, generator=torch.Generator().manual_seed(rank)),
                            "zipf", seed=5)
    experts = moe.route(x).experts
    every = [None] * world
    torch.distributed.all_gather_object(every, experts.tolist())
    return bench.routing_load(moe, x), every


def test_routing_load_counts_each_rank_s_rows_touched_experts_and_link_rows(dist_pools):
    (load, every), _ = dist_pools(2).run(routing_loads)
    on = [0, 0, 0, 0, 1, 1, 1, 1]  # expert -> rank (contiguous placement)
    slots = [e for tokens in every for token in tokens for e in token]
    assert load["tokens"] == [40, 49]
    assert load["rows"] == [sum(on[e] == r for e in slots) for r in (0, 1)]
    assert load["touched"] == [len({e for e in slots if on[e] == r}) for r in (0, 1)]
    sent = [sum(any(on[e] != src for e in token) for token in every[src]) for src in (0, 1)]
    assert load["link_rows"] == [sent[0] + sent[1]] * 2  # rank 0 sends sent[0] and receives sent[1]
    assert 0 < min(load["touched"]) and sum(load["touched"]) < 8  # zipf: some expert untouched


def point_with_three_input_sets(rank, world):
    """bench_point at 6 tokens over three input sets -> (its row's load, each set's routing_load)."""
    bench = _bench_layer_module()
    from flashmoe_py import MoEConfig
    seen, real = [], bench.routing_load
    bench.routing_load = lambda layer, x: seen.append(real(layer, x)) or seen[-1]
    cfg = MoEConfig(hidden_size=32, ffn_size=16, num_experts=8, top_k=1, dtype="float32")
    args = bench.parse_args(["--tokens", "6", "--iters", "1", "--input-sets", "3"])
    (row,) = bench.bench_point(cfg, "torch", "uniform", 6, world, rank, torch.device("cpu"), args, 7, {})
    bench.routing_load = real
    return row["load"], seen


def test_a_point_s_floor_takes_the_routing_of_every_input_set_it_is_timed_over(dist_pools):
    """The median runs over every input set, the floor took the first set's routing only (at 128
    tokens deepseek_v3's sets touch 246-255 of 256 experts): now each set's load, averaged."""
    (load, seen), = dist_pools(1).run(point_with_three_input_sets)
    assert len(seen) == 3 and load["touched"] == [sum(each["touched"][0] for each in seen) / 3]
    assert len({each["touched"][0] for each in seen}) > 1  # 6 tokens over 8 experts: these sets differ
    assert _bench_layer_module().mean_load([{"rows": [1, 4]}, {"rows": [2, 8]}]) == {"rows": [1.5, 6.0]}


def test_symm_mem_regroups_only_the_rows_that_arrived_by_expert_then_source():
    """The 1-D shuffle's arrivals (by source, each source's rows by local expert, sources at their
    own offsets with gaps between) are taken in (expert, source) order, and nothing else is."""
    symm_mem_ep = _bench_module("symm_mem_ep")
    gen = torch.Generator().manual_seed(7)
    W, L = 3, 4
    recv_counts = torch.randint(0, 5, (W, L), generator=gen)
    recv_counts[1] = 0  # a source that sent nothing
    src_start = torch.tensor([0, 40, 50])  # worst-case slots: gaps after each source's rows
    perm, ends = symm_mem_ep.regroup_by_expert(recv_counts, src_start)
    want = [int(src_start[s]) + int(recv_counts[s, :e].sum()) + i
            for e in range(L) for s in range(W) for i in range(int(recv_counts[s, e]))]
    assert perm.tolist() == want
    assert ends.dtype == torch.int32 and ends.tolist() == torch.cumsum(recv_counts.sum(0), 0).tolist()


def test_symm_mem_is_skipped_by_name_at_one_rank(tmp_path):
    """torch's symmetric memory refuses a group of one: that backend is left out, saying why, and
    the others run."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "layer.py"), "--backends", "symm_mem", "torch",
                           "--tokens", "16", "--iters", "1", "--input-sets", "1", "--out", str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend symm_mem skipped: torch's symmetric memory needs 2 or more ranks" in proc.stderr
    assert [r["backend"] for r in json.loads(out.read_text())["rows"]] == ["torch"]


def test_routing_load_counts_only_the_slots_capacity_keeps():
    layer = _bench_layer_module()
    from flashmoe_py import MoEConfig, MoELayer
    moe = MoELayer(MoEConfig(hidden_size=32, ffn_size=16, num_experts=8, top_k=2, dtype="float32",
                             capacity_factor=0.5), seed=fresh_seed())
    x = torch.randn(64, 32)
    r = moe.route(x)
    load = layer.routing_load(moe, x)
    assert load["rows"] == [int(r.kept.sum())] < [128]
    assert load["touched"] == [len(set(r.experts[r.kept].tolist()))]


def test_symm_mem_regroups_nothing_where_nothing_arrived():
    symm_mem_ep = _bench_module("symm_mem_ep")
    perm, ends = symm_mem_ep.regroup_by_expert(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([0, 10]))
    assert perm.numel() == 0 and ends.tolist() == [0, 0, 0]
