"""The runtime without GPUs: launcher detection, heap sizing, cross-rank consistency, clear errors."""

import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import flashmoe_py as fm
from flashmoe_py import runtime
from flashmoe_py.heap import SymmetricHeap
from flashmoe_py.kernels.layout import Geometry, format_bytes, heap_bytes_for
from flashmoe_py.runtime import (ConsistencyError, LaunchInfo, Runtime, _parse_size, _set_heap_size,
                                 detect_launcher, find_mismatch, fused_unavailable_reason)


@pytest.mark.parametrize("env,expect", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"},
     LaunchInfo("torchrun", 3, 8, 3, 8)),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, LaunchInfo("mpirun", 1, 4, 1, 4)),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "4"},
     LaunchInfo("mpirun", 2, 4, 2, 4)),
    ({}, LaunchInfo("single", 0, 1, 0, 1)),
    ({"SLURM_NTASKS": "8"}, LaunchInfo("single", 0, 1, 0, 1)),  # a batch script's or salloc's shell
    ({"WORLD_SIZE": "2"}, LaunchInfo("single", 0, 1, 0, 1)),  # init() refuses it alone (below)
    ({"WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"},
     LaunchInfo("mpirun", 1, 4, 1, 4)),  # WORLD_SIZE inherited under mpirun: its own variables count
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_NTASKS": "8"}, LaunchInfo("torchrun", 1, 2, 1, 2)),  # inside salloc
    ({"RANK": "9", "WORLD_SIZE": "16", "TORCHELASTIC_RUN_ID": "j", "PMI_RANK": "1", "PMI_SIZE": "2"},
     LaunchInfo("torchrun", 9, 16, 9, 16)),  # srun --mpi=pmi2 -N2 torchrun: the outer launcher's too
    ({"RANK": "1", "WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},
     LaunchInfo("torchrun", 1, 2, 1, 2)),  # both, agreeing
    ({"RANK": "9", "WORLD_SIZE": "16", "OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "16",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"},
     LaunchInfo("mpirun", 9, 16, 1, 8)),  # RANK exported for env:// under mpirun, no LOCAL_RANK: mpirun's
])
def test_detects_the_launcher(env, expect):
    assert detect_launcher(env) == expect


@pytest.mark.parametrize("env,name", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE"),
])
def test_garbled_launcher_environment_names_the_variable(env, name):
    with pytest.raises(ValueError, match=name):
        detect_launcher(env)


def test_launchers_that_disagree_are_refused():
    """A torchrun shell's RANK=0 WORLD_SIZE=1 left under mpirun: each process would run alone as
    world 1, holding every expert."""
    with pytest.raises(ValueError, match="disagree"):
        detect_launcher({"RANK": "0", "WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})


def test_launchers_whose_local_ranks_disagree_are_refused():
    """A LOCAL_RANK=0 left in the shell beside mpirun's own local rank 1: the torchrun variables
    won, and rank 1 took cuda:0 beside rank 0 (a review's run)."""
    with pytest.raises(ValueError, match=r"disagree \(local rank\)"):
        detect_launcher({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "OMPI_COMM_WORLD_RANK": "1",
                         "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                         "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})


def test_an_srun_step_without_a_launcher_is_refused(monkeypatch):
    """srun -n 4 python script.py: each task alone as world 1 (with the caller's own process group,
    as Lightning or submitit make, init joins that instead; a batch script's shell is no step)."""
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert runtime.srun_tasks() == 4 and runtime.srun_tasks({"SLURM_NTASKS": "4"}) == 1
    with pytest.raises(RuntimeError, match="srun job step of 4 tasks"):
        fm.init(nvshmem=False)


def test_find_mismatch_names_field_and_ranks():
    same = {"config": {"top_k": 2, "hidden_size": 64}, "max_tokens_per_rank": 128}
    assert find_mismatch([same, same, same]) is None
    other = {"config": {"top_k": 4, "hidden_size": 64}, "max_tokens_per_rank": 128}
    msg = find_mismatch([same, same, other])
    assert msg == "config.top_k differs across ranks: rank 0 has 2, rank 2 has 4"
    # a key rank 0 lacks (one more symmetric buffer on rank 1: NVSHMEM needs the same everywhere)
    more = {**same, "extra": [1 << 20]}
    assert find_mismatch([same, more]) == "extra differs across ranks: rank 0 has None, rank 1 has [1048576]"


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("name", ["mixtral_8x7b", "qwen3_30b_a3b", "deepseek_v3"])
def test_heap_sizing_grows_with_tokens_and_covers_buffers(world, name):
    cfg = fm.preset(name)
    small, large = heap_bytes_for(cfg, world, 128), heap_bytes_for(cfg, world, 16384)
    assert small < large
    geo = Geometry.for_config(cfg, world, 16384)
    payload = 2 * world * geo.source_rows * cfg.hidden_size * 2  # recv_x + combine_y, bf16
    assert payload < large < payload * 1.1 + (128 << 20)


def test_geometry_bounds_hold_for_8_ranks():
    """Every slot one source can send one destination fits its region, on 8 ranks too."""
    cfg = fm.preset("deepseek_v3")
    geo = Geometry.for_config(cfg, 8, 4096)
    L = geo.local_experts
    assert L == 32 and geo.source_rows >= 4096 * min(cfg.top_k, L) + L * geo.chunk
    assert geo.max_tiles * geo.min_block_m >= 8 * 4096 * min(cfg.top_k, L)


def test_too_small_user_heap_is_refused_with_sizes(monkeypatch):
    monkeypatch.setenv("NVSHMEM_SYMMETRIC_SIZE", "1G")
    need = 3 << 30
    with pytest.raises(RuntimeError, match=f"needs {format_bytes(need)} .*allows 1.00 GiB"):
        _set_heap_size(need)
    monkeypatch.delenv("NVSHMEM_SYMMETRIC_SIZE")
    _set_heap_size(need)
    import os
    assert int(os.environ["NVSHMEM_SYMMETRIC_SIZE"]) == need


def test_parse_size():
    assert _parse_size("2G") == 2 << 30 and _parse_size("512M") == 512 << 20 and _parse_size("100") == 100


@pytest.mark.parametrize("text", ["garbage", "", "1GiB", "-2G", "0", "nanG"])
def test_a_heap_size_that_is_no_size_names_its_variable(text):
    """'could not convert string to float' named nothing, and -2G was taken as a negative capacity."""
    with pytest.raises(ValueError, match=r"NVSHMEM_SYMMETRIC_SIZE=.*expected a positive size"):
        _parse_size(text)


def test_fused_backend_unavailable_on_cpu_says_why():
    reason = fused_unavailable_reason()
    assert reason and ("CUDA" in reason or "nvshmem4py" in reason)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU|nvshmem4py"):
        fm.init(nvshmem=True)
    with pytest.raises(ValueError, match="backend='flash' is unavailable"):
        fm.MoELayer(fm.MoEConfig(hidden_size=16, ffn_size=16, num_experts=2, top_k=1),
                    backend="flash", max_tokens_per_rank=8)


def test_a_local_rank_past_the_visible_gpus_is_named(monkeypatch):
    """One GPU visible to each process (CUDA_VISIBLE_DEVICES per task) and local rank 3: CUDA's
    'invalid device ordinal' said nothing of why."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match=r"local rank 3 \(torchrun\) but 1 GPU\(s\) visible"):
        fm.init(nvshmem=False)


def test_a_refused_local_rank_leaves_no_heap_size_of_its_own(monkeypatch):
    """init(heap_bytes=...) wrote NVSHMEM_SYMMETRIC_SIZE before the local-rank check refused the
    call, and a retry then blamed that variable ("allows 1.00 GiB; raise it"), not the local rank."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "nvshmem", types.ModuleType("nvshmem"))
    monkeypatch.setitem(sys.modules, "nvshmem.core", types.ModuleType("nvshmem.core"))
    monkeypatch.delenv("NVSHMEM_SYMMETRIC_SIZE", raising=False)
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    for heap in (1 << 30, 2 << 30):
        with pytest.raises(RuntimeError, match=r"local rank 1 \(torchrun\) but 1 GPU"):
            fm.init(heap_bytes=heap)
        assert "NVSHMEM_SYMMETRIC_SIZE" not in os.environ


@pytest.mark.parametrize("sizes", [dict(heap_bytes=1 << 30), dict(layers=[(fm.MoEConfig(16, 16, 2, 1), 8)])])
def test_a_heap_size_without_nvshmem_is_refused(sizes):
    """It sizes NVSHMEM's symmetric heap: without NVSHMEM it did nothing, silently."""
    with pytest.raises(ValueError, match="init.nvshmem=False. with heap_bytes or layers"):
        fm.init(nvshmem=False, **sizes)


def test_a_fused_layer_on_another_device_than_the_runtime_is_refused(monkeypatch):
    """Its symmetric heap is on the runtime's GPU. Refused among the constructor's checks, which
    every rank compares (raised in the backend, one rank's refusal left the others blocked in the
    heap's collective allocation)."""
    rt = Runtime(LaunchInfo("single", 0, 1, 0, 1), torch.device("cuda", 0), owns_group=False, nvshmem=True)
    monkeypatch.setattr(runtime, "_current", rt)
    monkeypatch.setattr(fm.layer, "fused_unavailable_reason", lambda: None)
    assert runtime.runtime_device() == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="device=cpu but flashmoe_py.init.. bound this process to cuda:0"):
        fm.MoELayer(fm.MoEConfig(hidden_size=16, ffn_size=16, num_experts=2, top_k=1), backend="flash",
                    max_tokens_per_rank=8, device="cpu")


def check_consistent_on_ranks(rank, world, top_k):
    rt = fm.init(nvshmem=False)
    cfg = fm.MoEConfig(hidden_size=16, ffn_size=16, num_experts=4, top_k=top_k[rank])
    try:
        rt.check_consistent(config=cfg.to_dict())
        return "agreed"
    except ConsistencyError as e:
        return str(e)


@pytest.mark.parametrize("world", [2, 8])
def test_runtime_consistency_check_raises_on_every_rank(dist_pools, world):
    """Eight gloo ranks: the runtime joins the existing group, one rank's top_k differs."""
    top_k = [2] * world
    assert dist_pools(world).run(check_consistent_on_ranks, top_k) == ["agreed"] * world
    top_k[world - 1] = 3
    res = dist_pools(world).run(check_consistent_on_ranks, top_k)
    assert all(f"config.top_k differs across ranks: rank 0 has 2, rank {world - 1} has 3" == r
               for r in res)


class FakeNvshmem:
    """Stands in for nvshmem.core: counts allocations and frees (CPU tensors)."""

    def __init__(self):
        self.live = 0

    def tensor(self, shape, dtype):
        self.live += 1
        return torch.empty(shape, dtype=dtype)

    def free_tensor(self, t):
        self.live -= 1


@pytest.fixture
def fake_heap(monkeypatch):
    fake = FakeNvshmem()
    monkeypatch.setitem(sys.modules, "nvshmem", types.ModuleType("nvshmem"))
    monkeypatch.setitem(sys.modules, "nvshmem.core", fake)
    monkeypatch.setenv("NVSHMEM_SYMMETRIC_SIZE", "200M")
    rt = Runtime(LaunchInfo("single", 0, 1, 0, 1), torch.device("cpu"), owns_group=False, nvshmem=False)
    monkeypatch.setattr(runtime, "_current", rt)  # as init() leaves it
    return rt, fake


def test_heap_refuses_buffers_beyond_its_size_before_allocating(fake_heap):
    rt, fake = fake_heap
    first = SymmetricHeap(rt)
    first.allocate({"a": ((50 << 20,), torch.uint8)})  # 50 MiB of 200 - 64 reserved
    assert rt.heap_used() == 50 << 20 and fake.live == 1
    second = SymmetricHeap(rt)
    with pytest.raises(RuntimeError, match=r"need 100.00 MiB \(104857600 bytes\), 86.00 MiB is free of "
                                           r"NVSHMEM_SYMMETRIC_SIZE=200.00 MiB"):
        second.allocate({"b": ((100 << 20,), torch.uint8)})
    assert fake.live == 1 and rt.heap_used() == 50 << 20
    first.free()
    assert fake.live == 0 and rt.heap_used() == 0
    second.allocate({"b": ((100 << 20,), torch.uint8)})  # fits once the first is freed
    assert fake.live == 1


class Owner:
    """Stands in for a fused layer's backend, the one holder of its heap's buffers."""


def test_a_heap_goes_back_once_its_owner_is_gone(fake_heap):
    """A fused layer deleted (or dropped by unpatch_model) kept its symmetric buffers until
    finalize(), so building layers again was refused for want of heap. Its buffers now go back at
    the next allocation; a live owner's stay, and so do a heap's without an owner."""
    rt, fake = fake_heap
    owners = [Owner(), Owner()]
    heaps = [SymmetricHeap(rt, owner=o) for o in owners] + [SymmetricHeap(rt)]
    for heap, name in zip(heaps, "abc"):
        heap.allocate({name: ((40 << 20,), torch.uint8)})  # 120 MiB of 200 - 64 reserved
    later, keep = SymmetricHeap(rt, owner=(owner := Owner())), owner
    with pytest.raises(RuntimeError, match="16.00 MiB is free"):
        later.allocate({"d": ((40 << 20,), torch.uint8)})
    del owners[0]
    later.allocate({"d": ((40 << 20,), torch.uint8)})
    assert [h.freed for h in heaps] == [True, False, False] and fake.live == 3 and rt.heap_used() == 120 << 20
    assert keep is owner and not later.freed


def heaps_on_ranks(rank, world, gone_on, failed_on=()):
    """A rank of dist_pools: its owner of a first heap gone on the ranks gone_on, then everywhere
    (its runtime failed on the ranks failed_on) -> (first freed after the second allocation, after
    the third, buffers live at the end, barriers run)."""
    held = {name: sys.modules.get(name) for name in ("nvshmem", "nvshmem.core")}
    fake = FakeNvshmem()
    sys.modules["nvshmem"], sys.modules["nvshmem.core"] = types.ModuleType("nvshmem"), fake
    try:
        rt = Runtime(LaunchInfo("single", rank, world, rank, world), torch.device("cpu"), owns_group=False,
                     nvshmem=False)
        barriers = []
        rt.barrier = lambda: (barriers.append(1), torch.distributed.barrier())
        owners = [Owner(), Owner()]
        first = SymmetricHeap(rt, owner=owners[0])
        first.allocate({"a": ((1 << 20,), torch.uint8)})
        if rank in gone_on:
            owners[0] = None
        if rank in failed_on:
            rt.failed = "fused MoE kernel timed out"
        SymmetricHeap(rt, owner=owners[1]).allocate({"b": ((1 << 20,), torch.uint8)})
        freed_then = first.freed
        owners[0] = None
        SymmetricHeap(rt, owner=owners[1]).allocate({"c": ((1 << 20,), torch.uint8)})
        return freed_then, first.freed, fake.live, len(barriers)
    finally:
        for name, module in held.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def test_a_heap_goes_back_only_once_its_owner_is_gone_on_every_rank(dist_pools):
    """Freeing is collective: an owner gone on one rank only (a reference cycle the other rank's
    garbage collector has not reached) keeps the heap on both until it is gone on both."""
    assert dist_pools(2).run(heaps_on_ranks, [0]) == [(False, True, 2, 1)] * 2


def test_no_heap_goes_back_after_a_kernel_failed_on_any_rank(dist_pools):
    """After a fused kernel failed on one rank, free() keeps that rank's buffers (nothing
    collective is safe) while its peer would enter the barrier and NVSHMEM's free: no rank frees
    anything then, and the heaps stay counted."""
    assert dist_pools(2).run(heaps_on_ranks, [0, 1], [0]) == [(False, False, 3, 0)] * 2


def test_after_a_kernel_timeout_teardown_is_local(fake_heap):
    """A timed-out fused kernel may mean a dead peer: freeing (a collective) would hang, so the
    buffers are kept until the process exits, and finalize does not wait on anyone."""
    rt, fake = fake_heap
    heap = SymmetricHeap(rt)
    heap.allocate({"a": ((1 << 20,), torch.uint8)})
    rt.failed = "fused MoE kernel on rank 0 timed out"
    rt.finalize()
    assert fake.live == 1 and rt.heap_used() == 0 and fm.runtime.current() is None


def finalize_on_ranks(rank, world, failed_rank, late_rank):
    rt = fm.init(nvshmem=False)  # joins the pool's group: finalize leaves the group alone
    rt.finalize_wait_s = 3.0
    if rank == failed_rank:
        rt.failed = "fused MoE kernel timed out"
    if rank == late_rank:
        time.sleep(rt.finalize_wait_s + 0.5)
    t0 = time.monotonic()
    rt.finalize()
    return rt.failed is None, time.monotonic() - t0


@pytest.mark.parametrize("world", [2, 4])
def test_finalize_is_collective_only_when_every_rank_is_healthy_and_present(dist_pools, world):
    """After a kernel timeout on one rank, or with a rank that never arrives, no rank may enter a
    collective teardown that could hang: every rank decides the same, within the wait."""
    healthy = dist_pools(world).run(finalize_on_ranks, -1, -1)
    assert all(together and seconds < 1.0 for together, seconds in healthy)
    one_failed = dist_pools(world).run(finalize_on_ranks, 0, -1)
    assert all(not together and seconds < 1.0 for together, seconds in one_failed)
    one_late = dist_pools(world).run(finalize_on_ranks, -1, world - 1)
    assert all(not together for together, _ in one_late)
    assert all(2.5 < seconds < 5.0 for _, seconds in one_late[:-1])  # waited, then went alone


LIFECYCLE = """
import os, sys, time, torch.distributed as dist
import flashmoe_py as fm
from flashmoe_py import runtime
first = fm.init(nvshmem=False)
fm.finalize()
second = fm.init(nvshmem=False)
first.finalize()  # an old handle: must leave the new runtime alone
assert dist.is_initialized() and runtime.current() is second, "the old handle tore the new runtime down"
second.finalize()
second.finalize()  # twice: nothing
assert not dist.is_initialized() and runtime.current() is None
print("port", os.environ["MASTER_PORT"], flush=True)
"""


def _alone(script: str) -> subprocess.Popen:
    """script in a fresh python whose environment names no launcher (as one process started by hand)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "MPI_", "TORCHELASTIC"))}
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_a_process_alone_rendezvouses_on_this_host_whatever_a_shell_left_exported():
    """A MASTER_ADDR left exported (a cluster script's, a .bashrc's) that names no reachable host
    hung a one-process init() for torch's 30-minute rendezvous timeout; a MASTER_PORT left there
    made two one-process jobs collide."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "MPI_", "TORCHELASTIC"))}
    env |= {"MASTER_ADDR": "no.such.host.invalid", "MASTER_PORT": "1"}
    job = subprocess.Popen([sys.executable, "-c", LIFECYCLE], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0 and out.split()[-1] != "1", err[-2000:]
    # RANK=0 and WORLD_SIZE=1 set by hand, nothing else: the variables a torchrun worker would have are filled in
    env = {k: v for k, v in env.items() if not k.startswith("MASTER_")} | {"RANK": "0", "WORLD_SIZE": "1"}
    job = subprocess.Popen([sys.executable, "-c", LIFECYCLE], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-2000:]


def test_an_old_runtime_handle_leaves_the_new_one_alone_and_one_process_jobs_take_free_ports():
    """An old runtime's finalize() after finalize() and a new init() destroyed the new one's
    process group (the next layer: "Default process group has not been initialized"), and a
    process alone took port 29531 always: a second one-process job on the host failed with
    EADDRINUSE. Two such jobs run at once here."""
    jobs = [_alone(LIFECYCLE) for _ in range(2)]
    said = [job.communicate(timeout=120) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), said
    ports = {out.split()[-1] for out, _ in said}
    assert len(ports) == 2, said


def test_mpirun_without_mpi4py_or_a_port_says_how_to_rendezvous(monkeypatch):
    """Under mpirun with MASTER_ADDR set and no MASTER_PORT the rendezvous was skipped and torch
    failed on the port; without mpi4py the error was a bare ModuleNotFoundError."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py raises ImportError
    info = LaunchInfo("mpirun", 0, 2, 0, 2)
    with pytest.raises(RuntimeError, match=r"mpi4py, which is missing .*pip install 'flashmoe_py\[mpi\]'"):
        runtime._init_process_group(info, torch.device("cpu"))


@pytest.mark.parametrize("layers", [
    fm.MoEConfig(hidden_size=64, ffn_size=64, num_experts=4, top_k=1), "layers", 5, [("tiny", 64)],
    [(fm.MoEConfig(hidden_size=64, ffn_size=64, num_experts=4, top_k=1),)],
    [(fm.MoEConfig(hidden_size=64, ffn_size=64, num_experts=4, top_k=1), -5)],
    [(fm.MoEConfig(hidden_size=64, ffn_size=64, num_experts=4, top_k=1), 64, "bogus")]])
def test_init_refuses_layers_it_cannot_size_the_heap_for_naming_the_argument(layers):
    """init(layers=...) took a negative token count and an unknown transport, and failed on other
    entries inside its sizing, naming neither `layers` nor the entry."""
    with pytest.raises(ValueError, match=r"init\(layers=\.\.\.\): (expected a list|entry 0)"):
        runtime._heap_needed(None, layers, 1)


@pytest.mark.parametrize("kwargs, match", [
    ({"heap_bytes": -1}, r"init\(heap_bytes=-1\): expected None or a number of bytes"),
    ({"heap_bytes": "lots"}, r"init\(heap_bytes='lots'\)"), ({"heap_bytes": 1.5}, r"init\(heap_bytes=1.5\)"),
    ({"nvshmem": "no"}, r"init\(nvshmem='no'\): expected True or False")])
def test_init_refuses_a_heap_size_or_an_nvshmem_flag_it_cannot_take(kwargs, match):
    """heap_bytes=-1 went to NVSHMEM as NVSHMEM_SYMMETRIC_SIZE='-1', a string failed a comparison
    inside the sizing, and nvshmem='no' was taken as True; refused before anything starts."""
    with pytest.raises(ValueError, match=match):
        fm.init(**{"nvshmem": False, **kwargs})
    assert runtime._current is None


def test_init_sizes_the_heap_for_each_layer_given():
    cfg = fm.MoEConfig(hidden_size=64, ffn_size=64, num_experts=4, top_k=1)
    one = runtime._heap_needed(None, [(cfg, 64)], 2)
    both = runtime._heap_needed(None, [(cfg, 64), [cfg, np.int64(64), "nvshmem"]], 2)
    assert one == heap_bytes_for(cfg, 2, 64) > 0 and both == one + heap_bytes_for(cfg, 2, 64, "nvshmem")
    assert runtime._heap_needed(1 << 40, [(cfg, 64)], 2) == 1 << 40 and runtime._heap_needed(7, (), 2) == 7
    # any iterable, None for none
    assert runtime._heap_needed(None, ((c, t) for c, t in [(cfg, 64)]), 2) == one
    assert runtime._heap_needed(None, zip([cfg], [64]), 2) == one and runtime._heap_needed(7, None, 2) == 7


def test_a_second_init_that_needs_a_larger_heap_is_refused(monkeypatch):
    """A second init() returned the running runtime whatever heap it asked for, so the layers it
    sized the heap for then failed to fit, told to pass them to init(layers=...), as was done."""
    monkeypatch.setenv("NVSHMEM_SYMMETRIC_SIZE", "100M")
    running = Runtime(LaunchInfo("single", 0, 1, 0, 1), torch.device("cpu"), owns_group=False, nvshmem=True)
    monkeypatch.setattr(runtime, "_current", running)
    assert fm.init(heap_bytes=64 << 20) is running
    with pytest.raises(RuntimeError, match=r"a symmetric heap of 1.00 GiB, but NVSHMEM started with 100.00 MiB"):
        fm.init(heap_bytes=1 << 30)
    with pytest.raises(RuntimeError, match="pass every layer to the first init"):
        fm.init(layers=[(fm.MoEConfig(hidden_size=2048, ffn_size=1024, num_experts=64, top_k=8), 4096)])


BAD_SIZE = """
import torch.distributed as dist
import flashmoe_py as fm
try:
    fm.init(nvshmem=False)
except ValueError as e:
    print("refused", "NVSHMEM_SYMMETRIC_SIZE='garbage'" in str(e), dist.is_initialized(), flush=True)
"""


def test_a_malformed_heap_size_is_refused_before_the_process_group_is_made():
    """NVSHMEM_SYMMETRIC_SIZE was read after init() had made the process group: the refused call left a
    group nobody owned, which a retry then took for the caller's and never tore down."""
    job = _alone(f"import os\nos.environ['NVSHMEM_SYMMETRIC_SIZE'] = 'garbage'\n{BAD_SIZE}")
    out, err = job.communicate(timeout=120)
    assert out.split() == ["refused", "True", "False"], err


def test_the_heap_size_init_set_is_taken_back_at_finalize(monkeypatch):
    """init(layers=...) wrote NVSHMEM_SYMMETRIC_SIZE, and a later init() after finalize() took it for the
    user's and refused a larger heap. _set_heap_size says what it wrote (init() keeps it on the
    runtime, a GPU path), and finalize() takes back that value; one the user set, or changed
    since, is kept."""
    monkeypatch.delenv("NVSHMEM_SYMMETRIC_SIZE", raising=False)
    assert runtime._set_heap_size(1 << 30) == str(1 << 30)
    assert runtime._set_heap_size(1 << 20) is None  # (now set: kept, large enough)
    for now, kept in ((str(1 << 30), False), ("2G", True)):
        monkeypatch.setenv("NVSHMEM_SYMMETRIC_SIZE", now)
        rt = Runtime(LaunchInfo("single", 0, 1, 0, 1), torch.device("cpu"), owns_group=False, nvshmem=False)
        rt.heap_size_set = str(1 << 30)
        monkeypatch.setattr(runtime, "_current", rt)
        rt.finalize()
        assert ("NVSHMEM_SYMMETRIC_SIZE" in os.environ) == kept


REINIT = """
import os, sys
os.environ.update(RANK=sys.argv[1], WORLD_SIZE="2", LOCAL_RANK=sys.argv[1], LOCAL_WORLD_SIZE="2",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
import torch.distributed as dist
import flashmoe_py as fm
fm.init(nvshmem=False)
dist.barrier()
fm.finalize()
try:
    fm.init(nvshmem=False)
    print("started", flush=True)
except RuntimeError as e:
    print("refused", "after finalize() at world > 1" in str(e), dist.is_initialized(), flush=True)
"""


def test_init_after_finalize_at_two_ranks_is_refused_not_hung():
    """torch's env:// rendezvous reads the last group's keys from its store (pytorch#55967): a second
    init() after finalize() at world 2 hung or failed in gloo's connect. Refused now, on every rank."""
    port = str(runtime._free_port())
    jobs = [subprocess.Popen([sys.executable, "-c", REINIT, str(r), port], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "OMPI_"))})
            for r in range(2)]
    said = [job.communicate(timeout=120) for job in jobs]
    assert [out.split() for out, _ in said] == [["refused", "True", "False"]] * 2, said


RANKLESS = """
import os, sys
os.environ.update(WORLD_SIZE="2", LOCAL_RANK=sys.argv[1], MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
for k in ("RANK", "LOCAL_WORLD_SIZE"):
    os.environ.pop(k, None)
import torch.distributed as dist
import flashmoe_py as fm
if sys.argv[3] == "own-group":  # as Lightning's launcher does: WORLD_SIZE exported, the group made by hand
    dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2)
try:
    rt = fm.init(nvshmem=False)
    print("joined", rt.rank, rt.world_size, flush=True)
    rt.finalize()
except RuntimeError as e:
    print("refused", "WORLD_SIZE=2 is set but no rank variable" in str(e), flush=True)
"""


@pytest.mark.parametrize("group", ["own-group", "none"])
def test_a_world_size_without_a_rank_joins_the_callers_group_or_is_refused(group):
    """WORLD_SIZE=2 exported without RANK (PyTorch Lightning's launcher exports it and makes the
    group itself): init() joins a group the caller made; without one each process would run
    alone as world 1, holding every expert: refused, naming the variable."""
    port = str(runtime._free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "OMPI_", "PMI_"))}
    jobs = [subprocess.Popen([sys.executable, "-c", RANKLESS, str(r), port, group], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    said = sorted(out.strip() for out, _ in (job.communicate(timeout=120) for job in jobs))
    assert said == (["joined 0 2", "joined 1 2"] if group == "own-group" else ["refused True"] * 2)


@pytest.mark.parametrize("env,bare", [
    ({"WORLD_SIZE": "4"}, ("WORLD_SIZE", 4)), ({"PMI_SIZE": "2"}, ("PMI_SIZE", 2)),
    ({"WORLD_SIZE": "1"}, None), ({"WORLD_SIZE": ""}, None), ({}, None),
    ({"WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"}, None),  # under mpirun
])
def test_a_world_size_set_without_any_launchers_rank_is_found(env, bare):
    assert runtime.rankless_world(env) == bare


def test_mpirun_of_one_process_needs_no_rendezvous():
    """mpirun -np 1 without mpi4py was refused for want of it: one process has no one to meet."""
    job = _alone("import os, sys\nsys.modules['mpi4py'] = None\n"
                 "os.environ.update(OMPI_COMM_WORLD_RANK='0', OMPI_COMM_WORLD_SIZE='1')\n"
                 "import flashmoe_py as fm\nrt = fm.init(nvshmem=False)\n"
                 "print(rt.launcher, rt.world_size)\nrt.finalize()")
    out, err = job.communicate(timeout=120)
    assert out.split() == ["mpirun", "1"], err


FAILED_INIT = """
import os
os.environ.pop("NVSHMEM_SYMMETRIC_SIZE", None)  # (none set by the user)
import torch.distributed as dist
import flashmoe_py as fm
from flashmoe_py import runtime
runtime.torch.cuda.is_available = lambda: True  # as on a GPU node, up to NVSHMEM's start
runtime.torch.cuda.device_count = lambda: 1
runtime.torch.cuda.set_device = lambda device: None
def refused(*args, **kwargs):
    raise RuntimeError("no process group here")
runtime._init_process_group = refused
import sys, types
sys.modules["nvshmem"], sys.modules["nvshmem.core"] = types.ModuleType("nvshmem"), types.ModuleType("nvshmem.core")
try:
    fm.init(heap_bytes=1 << 20)
except RuntimeError as e:
    print(str(e) == "no process group here", "NVSHMEM_SYMMETRIC_SIZE" in os.environ, flush=True)
"""


NVSHMEM_FAILS = """
import os, sys, types
os.environ.pop("NVSHMEM_SYMMETRIC_SIZE", None)
import torch, torch.distributed as dist
import flashmoe_py as fm
from flashmoe_py import runtime
runtime.torch.cuda.is_available = lambda: True  # as on a GPU node, the group on gloo
runtime.torch.cuda.device_count = lambda: 1
runtime.torch.cuda.set_device = lambda device: None
make_group = runtime._init_process_group
runtime._init_process_group = lambda info, device: make_group(info, torch.device("cpu"))
sys.modules["nvshmem"], sys.modules["nvshmem.core"] = types.ModuleType("nvshmem"), types.ModuleType("nvshmem.core")
def fails(info):
    raise RuntimeError("NVSHMEM did not start")
runtime._init_nvshmem = fails
try:
    fm.init()
except RuntimeError:
    pass
rt = fm.init(nvshmem=False)  # the fallback, backend torch
owned = rt.owns_group
fm.finalize()
print(owned, dist.is_initialized(), flush=True)
"""


def test_a_process_group_an_init_that_failed_made_is_torn_down_by_the_retry_s_finalize():
    """NVSHMEM failing after init() made the process group left the group up; the retry took it
    for the caller's (owns_group False) and its finalize() never tore it down (a review's run)."""
    job = _alone(NVSHMEM_FAILS)
    out, err = job.communicate(timeout=120)
    assert out.split() == ["True", "False"], err


def test_mpirun_keeps_a_master_port_set_without_an_address(monkeypatch):
    """Rank 0 picked a free port and sent it, replacing the one the user fixed (the only one a
    firewall opens, say); an address set alone was kept already."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29517")
    sent = []
    comm = types.SimpleNamespace(bcast=lambda obj, root: sent.append(obj) or obj)
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=types.SimpleNamespace(COMM_WORLD=comm)))
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda *args, **kwargs: None)
    runtime._init_process_group(LaunchInfo("mpirun", 0, 2, 0, 2), torch.device("cpu"))
    assert sent[0][1] == 29517 and os.environ["MASTER_PORT"] == "29517"


def test_an_init_that_fails_takes_back_the_heap_size_it_wrote():
    """init() wrote NVSHMEM_SYMMETRIC_SIZE before its process group and NVSHMEM started; where
    either failed, a retry took the value for the user's and refused a larger heap."""
    job = _alone(FAILED_INIT)
    out, err = job.communicate(timeout=120)
    assert out.split() == ["True", "False"], err
