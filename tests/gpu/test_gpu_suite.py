"""The GPU suite: multi-rank scripts under torchrun, one process per visible GPU (marker `gpu`)."""

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def torchrun(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    n = torch.cuda.device_count()
    env = {**os.environ, "NVSHMEM_DISABLE_NVLS": "1", "NCCL_NVLS_ENABLE": "0",
           "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
                           os.path.join(HERE, script), *args], env=env, timeout=timeout, cwd=ROOT)


def one_process(script: str, timeout: int) -> subprocess.CompletedProcess:
    """A check that runs in one process on one GPU (no launcher)."""
    return subprocess.run([sys.executable, os.path.join(HERE, script)], timeout=timeout, cwd=ROOT)


@pytest.mark.gpu
def test_flash_backend_matches_reference_on_all_gpus():
    assert torchrun("check_flash.py", "--calls", "1000").returncode == 0


@pytest.mark.gpu
def test_flash_backend_over_the_nvshmem_transport_matches_reference_on_all_gpus():
    assert torchrun("check_flash.py", "--transport", "nvshmem", "--calls", "200").returncode == 0


@pytest.mark.gpu
def test_patched_hf_models_match_on_all_gpus():
    assert torchrun("check_hf.py").returncode == 0


@pytest.mark.gpu
def test_missing_peer_is_a_bounded_error_not_a_hang():
    assert torchrun("check_faults.py", timeout=300).returncode == 0


@pytest.mark.gpu
def test_bad_input_nan_capacity_and_heap_limits_on_all_gpus():
    assert torchrun("check_inputs.py", timeout=300).returncode == 0


@pytest.mark.gpu
def test_every_kind_of_stalled_peer_ends_the_kernel_within_the_timeout():
    assert one_process("check_timeouts.py", timeout=300).returncode == 0


@pytest.mark.gpu
def test_replaced_weights_two_streams_and_a_timed_out_step_are_handled_on_the_host():
    assert one_process("check_host_paths.py", timeout=300).returncode == 0


@pytest.mark.gpu
def test_killed_rank_is_a_bounded_error_and_survivors_exit():
    assert one_process("check_killed_rank.py", timeout=300).returncode == 0


@pytest.mark.gpu
def test_torch_backend_gradients_match_reference_on_all_gpus():
    assert torchrun("check_backward.py", timeout=300).returncode == 0


@pytest.mark.gpu
def test_a_tiny_model_trains_beside_its_float64_reference_on_all_gpus():
    assert torchrun("check_training.py", timeout=600).returncode == 0


@pytest.mark.gpu
def test_the_fused_kernel_at_worlds_2_4_and_8_with_every_rank_on_one_gpu():
    assert one_process("check_ranks_on_one_gpu.py", timeout=420).returncode == 0


@pytest.mark.gpu
def test_a_layer_built_with_its_variants_compiled_leaves_none_for_a_first_forward():
    assert one_process("check_compile_variants.py", timeout=240).returncode == 0
