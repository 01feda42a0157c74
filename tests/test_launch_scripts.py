"""The launch scripts on a machine without GPUs: stand-ins for nvidia-smi, torchrun and mpirun
record what they were asked and exit as told. A GPU check that fails, or a step nobody knows,
fails launch/gpu_checks.sh; the GPUs are counted, not nvidia-smi's lines (MIG instances print
lines of their own)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMI = """#!/bin/sh
case "$*" in
  *--query-gpu=index*) printf '0\\n1\\n' ;;
  *) printf 'GPU 0: H200\\n  MIG 3g.71gb Device 0\\nGPU 1: H200\\n  MIG 3g.71gb Device 0\\n' ;;
esac
"""


def scripts_env(tmp_path, rc: int) -> dict:
    """PATH with nvidia-smi, torchrun and mpirun stand-ins: the last two append their arguments
    and RANK to tmp_path/calls and exit rc."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(SMI)
    for name in ("torchrun", "mpirun", "python3"):
        record = f'echo "{name} $* RANK=${{RANK:-unset}}" >> {tmp_path}/calls'
        (bin_dir / name).write_text(f"#!/bin/sh\n{record}\nexit {rc}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}


def gpu_checks(tmp_path, steps: str, rc: int) -> subprocess.CompletedProcess:
    env = scripts_env(tmp_path, rc) | {"STEPS": steps, "NGPUS": "1"}
    return subprocess.run(["bash", "launch/gpu_checks.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("rc, want", [(0, 0), (1, 1), (124, 1)])
def test_gpu_checks_fail_when_a_check_fails(tmp_path, rc, want):
    """rc 124: timeout's code for a check cut at its limit."""
    proc = gpu_checks(tmp_path, "check faults", rc)
    assert proc.returncode == want, proc.stdout
    assert (tmp_path / "calls").read_text().count("torchrun") == 2


def test_an_unknown_step_fails_the_checks(tmp_path):
    proc = gpu_checks(tmp_path, "chek faults", 0)
    assert proc.returncode == 1 and "unknown step chek1" in proc.stdout, proc.stdout


@pytest.mark.parametrize("script, launcher", [("torchrun.sh", "torchrun"), ("mpirun.sh", "mpirun")])
def test_the_launchers_take_one_process_a_gpu_and_pass_the_exit_code(tmp_path, script, launcher):
    env = scripts_env(tmp_path, 3) | {"RANK": "0"}  # a shell torchrun started
    proc = subprocess.run(["bash", f"launch/{script}", "prog.py", "--flag"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    call = (tmp_path / "calls").read_text()
    assert proc.returncode == 3 and call.startswith(launcher), (proc.returncode, call)
    assert ("-np 2" if launcher == "mpirun" else "--nproc-per-node 2") in call and "prog.py --flag" in call
    assert launcher == "torchrun" or "RANK=unset" in call  # mpirun's processes must not read torchrun's


@pytest.mark.parametrize("gpus, peers_checked", [("1", False), ("2", True)])
def test_the_default_checks_need_a_peer_only_where_there_is_one(tmp_path, gpus, peers_checked):
    """A stalled or killed peer cannot be checked on one GPU (those checks exit 2 there): the
    one-GPU suite leaves them out instead of failing on them."""
    env = scripts_env(tmp_path, 0) | {"NGPUS": gpus}
    proc = subprocess.run(["bash", "launch/gpu_checks.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    calls = (tmp_path / "calls").read_text()
    assert proc.returncode == 0, proc.stdout
    assert ("check_faults.py" in calls) == peers_checked and ("check_killed_rank.py" in calls) == peers_checked
    assert "check_flash.py" in calls and "check_soak.py" in calls and "check_host_paths.py" in calls
    assert "check_ranks_on_one_gpu.py" in calls  # worlds 2-8 on one GPU, at any GPU count
    assert "check_compile_variants.py" in calls  # one GPU, at any GPU count
    assert f"--nproc-per-node {gpus} tests/gpu/check_training.py" in calls
    # the backward's world-1-only cases (captured steps, presets) in a one-GPU call of their own
    assert ("--nproc-per-node 1 tests/gpu/check_backward.py" in calls) and calls.count("check_backward.py") == (
        2 if peers_checked else 1)


@pytest.mark.parametrize("script", ["torchrun.sh", "mpirun.sh", "gpu_checks.sh"])
def test_without_nvidia_smi_the_launchers_ask_for_ngpus(tmp_path, script):
    """A CPU machine: the GPU count came from nvidia-smi, which failed with a bare shell error."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "date"):  # what the scripts run before they count; no nvidia-smi
        (bin_dir / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run([shutil.which("bash"), f"launch/{script}"], cwd=ROOT, env={"PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no nvidia-smi here to count GPUs: set NGPUS" in proc.stderr, proc


def test_the_gpu_checks_refuse_a_machine_without_a_driver_even_given_ngpus(tmp_path):
    """NGPUS set on a CPU machine ran every check in turn, each to its own failure."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "date", "realpath"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run([shutil.which("bash"), "launch/gpu_checks.sh"], cwd=ROOT,
                          env={"PATH": str(bin_dir), "NGPUS": "2"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no NVIDIA driver here" in proc.stderr, proc


@pytest.mark.parametrize("ngpus", ["0", "two"])
def test_a_count_that_is_no_positive_number_is_refused(tmp_path, ngpus):
    """nvidia-smi listing no GPU gave torchrun --nproc-per-node 0."""
    proc = subprocess.run(["bash", "launch/torchrun.sh"], cwd=ROOT, env=scripts_env(tmp_path, 0) | {"NGPUS": ngpus},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"NGPUS={ngpus}: the processes to start must be a positive number" in proc.stderr
    assert not (tmp_path / "calls").exists()


@pytest.mark.parametrize("visible, want", [("0,1,2", "3"), ("5", "1"), ("GPU-a1,GPU-b2", "2"), (" 0", "1"),
                                           ("0,-1", "1"), ("0,1,-1,2", "2"), ("0,,1", "1")])
def test_the_launchers_count_the_gpus_this_job_may_use(tmp_path, visible, want):
    """CUDA_VISIBLE_DEVICES=0,1 on an 8-GPU node started 8 processes (nvidia-smi lists them all);
    CUDA stops at the first entry that names no GPU, and every entry was counted."""
    env = scripts_env(tmp_path, 0) | {"CUDA_VISIBLE_DEVICES": visible}
    subprocess.run(["bash", "launch/torchrun.sh", "prog.py"], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert f"--nproc-per-node {want} prog.py" in (tmp_path / "calls").read_text()


def test_a_warning_nvidia_smi_prints_beside_its_list_is_no_gpu(tmp_path):
    """nvidia-smi's output was read with its errors (2>&1) and every line counted: a warning
    printed beside four GPUs started five processes."""
    env = scripts_env(tmp_path, 0)
    (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n'\necho 'Warning: persistence mode "
                                                  "is disabled' >&2\nprintf '2\\n3\\n'\n")
    subprocess.run(["bash", "launch/torchrun.sh", "prog.py"], cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert "--nproc-per-node 4 prog.py" in (tmp_path / "calls").read_text()


@pytest.mark.parametrize("visible", ["-1", "NoDevFiles", " -1", ""])
def test_a_cuda_visible_devices_that_hides_every_gpu_starts_nothing(tmp_path, visible):
    """CUDA_VISIBLE_DEVICES=-1 (or NoDevFiles) hides every GPU, and one process was started."""
    env = scripts_env(tmp_path, 0) | {"CUDA_VISIBLE_DEVICES": visible}
    proc = subprocess.run(["bash", "launch/torchrun.sh", "prog.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "NGPUS=0: the processes to start must be a positive number" in proc.stderr
    assert not (tmp_path / "calls").exists()


@pytest.mark.parametrize("smi, said", [
    ("exit 0", "NGPUS=0: the processes to start must be a positive number"),  # lists no GPU
    ("echo 'NVML: driver not loaded' >&2\nexit 9", "nvidia-smi failed to list the GPUs (NVML: driver not loaded)"),
])
def test_an_nvidia_smi_that_fails_or_lists_no_gpu_is_reported(tmp_path, smi, said):
    """A failing nvidia-smi ended the script (pipefail) with its own code and no message."""
    env = scripts_env(tmp_path, 0)
    (tmp_path / "bin" / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}\n")
    proc = subprocess.run(["bash", "launch/torchrun.sh", "prog.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and said in proc.stderr, proc.stderr


@pytest.mark.parametrize("script", ["torchrun.sh", "mpirun.sh"])
def test_a_program_path_is_read_from_the_callers_directory_else_from_the_repository(tmp_path, script):
    """The launchers changed to the repository's root first: a program or output path relative to
    the caller's directory was read from the root."""
    (tmp_path / "mine.py").write_text("")
    env = scripts_env(tmp_path, 0) | {"NGPUS": "1"}
    for program in ("mine.py", "bench/layer.py"):
        subprocess.run(["bash", os.path.join(ROOT, "launch", script), program, "--out", "x.json"], cwd=tmp_path,
                       env=env, capture_output=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert " mine.py --out x.json" in calls[0] and f" {ROOT}/bench/layer.py --out x.json" in calls[1], calls
