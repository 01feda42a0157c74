"""Bootstrap: torch.distributed and NVSHMEM together, under torchrun or mpirun; one runtime handle.

    rt = flashmoe_py.init()          # idempotent; detects the launcher
    ...
    flashmoe_py.finalize()           # frees every symmetric buffer, then NVSHMEM, then the group

nvshmem4py and CUDA are imported only when asked for, so the package (and backend="torch") works on
a machine with neither."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import MoEConfig, as_int, is_int
from .kernels.layout import format_bytes, heap_bytes_for
from .options import TRANSPORTS

log = logging.getLogger("flashmoe_py")

NO_MULTICAST = {"NVSHMEM_DISABLE_NVLS": "1", "NCCL_NVLS_ENABLE": "0",
                "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


class ConsistencyError(RuntimeError):
    """Ranks disagree on something that must be identical everywhere (config, placement, sizes)."""


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str  # "torchrun", "mpirun" or "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


_LAUNCHERS = [  # (name, rank, world size, local rank, local world size) environment variables
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpirun", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
]


def detect_launcher(env=None) -> LaunchInfo:
    """How this process was started: torchrun, Open MPI or MPICH (Hydra) mpirun, or alone.
    A torchrun worker (TORCHELASTIC_RUN_ID set) reads torchrun's variables, whatever launcher
    started torchrun itself (srun, mpirun -npernode 1). Otherwise ValueError where two launchers'
    variables disagree: a torchrun shell's RANK left beside mpirun's would make every process a
    world of its own."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env:
        return _launch_info(env, *_LAUNCHERS[0])
    named = [names for names in _LAUNCHERS if names[1] in env]
    found = [_launch_info(env, *names) for names in named]
    # those whose own local-rank variable is set (the others' is their rank, as on one node)
    local = [info for info, names in zip(found, named) if names[3] in env]
    _refuse_disagreeing(found, lambda info: (info.rank, info.world_size), "rank")
    _refuse_disagreeing(local, lambda info: info.local_rank, "local rank")
    return (local or found or [LaunchInfo("single", 0, 1, 0, 1)])[0]


def _refuse_disagreeing(infos: list[LaunchInfo], key: Callable, what: str) -> None:
    """ValueError where two launchers' LaunchInfo differ in key(info) (their `what`)."""
    for other in infos[1:]:
        if key(other) != key(infos[0]):
            raise ValueError(f"the environment holds two launchers' variables that disagree ({what}): {infos[0]} and "
                             f"{other}; unset the stale ones (e.g. RANK, WORLD_SIZE and LOCAL_RANK under mpirun)")


def rankless_world(env=None) -> tuple[str, int] | None:
    """(a world-size variable, its value) where one says more than one process and no launcher's
    rank is set (WORLD_SIZE=4 alone, as a launcher that makes the process group itself exports,
    or a stale export), else None."""
    env = os.environ if env is None else env
    if any(names[1] in env for names in _LAUNCHERS):
        return None
    for _, _, w, *_ in _LAUNCHERS:
        try:
            size = int(env.get(w, "1"))
        except ValueError:
            continue
        if size > 1:
            return w, size
    return None


def _refuse_a_job_of_processes_alone() -> None:
    """RuntimeError where this process, with no launcher's rank and no process group, is one of
    several (an srun job step, or a world size exported without a rank): alone, each would run as
    world 1, holding every expert."""
    remedy = ("start the processes with torchrun or mpirun (launch/torchrun.sh, launch/mpirun.sh), or make the "
              "process group first (init() joins it)")
    if (tasks := srun_tasks()) > 1:
        raise RuntimeError(f"an srun job step of {tasks} tasks, and no launcher's variables this package reads: "
                           f"{remedy}; alone, each would run as world 1")
    if bare := rankless_world():
        raise RuntimeError(f"{bare[0]}={bare[1]} is set but no rank variable (RANK, or an MPI launcher's): {remedy}, "
                           f"or unset {bare[0]} to run one process; alone, each would run as world 1")


def srun_tasks(env=None) -> int:
    """The tasks of the srun job step this process is one of (SLURM_STEP_NUM_TASKS; a batch
    script's or salloc's shell has none), or 1."""
    tasks = (os.environ if env is None else env).get("SLURM_STEP_NUM_TASKS", "")
    return int(tasks) if tasks.isdigit() else 1


def _launch_info(env, name: str, r: str, w: str, lr: str, lw: str) -> LaunchInfo:
    """One launcher's variables -> LaunchInfo (ValueError naming the variable if one is wrong)."""
    vals = {}
    for var, default in ((r, None), (w, None), (lr, env.get(r)), (lw, env.get(w))):
        raw = env.get(var, default)
        try:
            vals[var] = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"environment variable {var} is not set (launcher {name}, {r} is)" if raw is None else
                             f"environment variable {var}={raw!r} is not an integer (launcher {name})") from None
    rank, world, local, local_world = vals[r], vals[w], vals[lr], vals[lw]
    if not (0 <= rank < world and 0 <= local < local_world <= world):
        raise ValueError(f"inconsistent launcher environment: {r}={rank}, {w}={world}, "
                         f"{lr}={local}, {lw}={local_world}")
    return LaunchInfo(name, rank, world, local, local_world)


def from_every_rank(obj, group=None) -> list:
    """obj of every rank of `group` (None: the default group), by the group's rank ([obj] outside
    torch.distributed or in a group of one). Collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return [obj]
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, obj, group=group)
    return everyone


def on_every_rank(step: Callable, refusal: Callable[[int, str], Exception], group=None):
    """step()'s result, where it raised on no rank of `group` (None: the default group); else
    raise on every rank, since the others would wait in their next collective: a rank that raised
    re-raises its own error, the others refusal(the first such rank's global rank, its error as
    "Type: message"). Collective."""
    error = None
    try:
        result = step()
    except Exception as e:  # noqa: BLE001 (told to every rank, then raised)
        error, result = e, None
    said = from_every_rank(None if error is None else f"{type(error).__name__}: {error}", group)
    if error is not None:
        raise error
    failed = next((rank for rank, text in enumerate(said) if text is not None), None)
    if failed is not None:
        raise refusal(failed if group is None else dist.get_global_rank(group, failed), said[failed])
    return result


def find_mismatch(per_rank: list[dict], prefix: str = "") -> str | None:
    """The first field whose value differs across ranks, as a sentence naming the ranks, or None.

    per_rank: one dict per rank (nested dicts are compared field by field; a key some rank lacks
    differs, as None there: a key of another rank than 0 alone was let through)."""
    for key in dict.fromkeys(k for d in per_rank for k in d):
        values = [d.get(key) for d in per_rank]
        if all(isinstance(v, dict) for v in values):
            found = find_mismatch(values, f"{prefix}{key}.")
            if found:
                return found
        elif any(v != values[0] for v in values):
            odd = next(r for r, v in enumerate(values) if v != values[0])
            return (f"{prefix}{key} differs across ranks: rank 0 has {values[0]!r}, "
                    f"rank {odd} has {values[odd]!r}")
    return None


class Runtime:
    """The process's one handle on torch.distributed and NVSHMEM (see init())."""

    def __init__(self, info: LaunchInfo, device: torch.device, owns_group: bool, nvshmem: bool,
                 job_id: str = ""):
        self.info, self.device, self.owns_group, self.nvshmem = info, device, owns_group, nvshmem
        self.job_id = job_id  # the same on every rank: names this runtime's keys in the group's store
        self.rank, self.world_size, self.local_rank = info.rank, info.world_size, info.local_rank
        self.launcher = info.launcher
        self.heaps: list = []  # SymmetricHeaps allocated under this runtime, freed at finalize
        self.heaps_made = 0  # how many were allocated (each numbered in turn: heap.free_ownerless)
        # NVSHMEM_SYMMETRIC_SIZE as NVSHMEM read it at init (its default is 1 GiB).
        self.heap_capacity = _parse_size(os.environ.get("NVSHMEM_SYMMETRIC_SIZE", "1G"))
        # Set when a fused kernel timed out: a peer may be gone, so teardown stays local.
        self.failed: str | None = None
        # How long finalize() waits for every rank to arrive before tearing down alone.
        self.finalize_wait_s = 60.0
        self.heap_size_set: str | None = None  # NVSHMEM_SYMMETRIC_SIZE as init() set it (finalize takes it back)

    def barrier(self) -> None:
        """Every rank's queued device work is done before any rank goes on."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.world_size > 1:
            dist.barrier()

    def check_consistent(self, **values) -> None:
        """Raise ConsistencyError on every rank unless each value (dict, number, string) is the
        same on all ranks; the message names the first field that differs."""
        if self.world_size == 1:
            return
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, values)
        mismatch = find_mismatch(everyone)
        if mismatch:
            raise ConsistencyError(mismatch)

    def heap_used(self) -> int:
        """Bytes of the symmetric heap held by this runtime's buffers (granule-rounded)."""
        return sum(heap.bytes for heap in self.heaps)

    def finalize(self) -> None:
        """Free the symmetric buffers, then NVSHMEM, then the process group: collectively when
        every rank is healthy and arrives (see teardown_together), else alone: the buffers and
        NVSHMEM are left to process exit and the process group is aborted, not destroyed, so no
        rank waits on a peer that is dead, stuck, or tearing down alone. Either way the process
        can exit. Once only, and only while this is init()'s current runtime: a second call, or an
        old runtime's after finalize() and a new init(), does nothing (it tore down the new one's
        process group)."""
        global _current
        if self is not _current:
            return
        together = self.teardown_together()
        if not together and self.failed is None:
            self.failed = "a peer failed or did not reach finalize()"
        log.info("rank %d: tearing down %s%s", self.rank, "with every rank" if together else "alone",
                 "" if together else f" ({self.failed})")
        for heap in list(self.heaps):
            heap.free()
        _take_back_heap_size(self.heap_size_set)
        if self.nvshmem and self.failed is None:
            import nvshmem.core as nv
            self.barrier()
            nv.finalize()
        if self.owns_group and dist.is_initialized():
            if self.failed is not None and dist.get_backend() == "nccl":
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
            _STATE["group_destroyed"] |= self.world_size > 1
        _current = None

    def teardown_together(self) -> bool:
        """Whether all ranks tear down collectively: one decision for every rank, through the
        process group's store (which needs no collective). Each rank posts "ok" or "failed"; a
        healthy rank waits up to finalize_wait_s for all of them. All ok -> together; a failed
        rank, or one missing at the deadline -> alone, and ranks arriving later read the same."""
        if self.world_size == 1 or not dist.is_initialized():
            return self.failed is None
        store = dist.distributed_c10d._get_default_store()
        prefix = f"flashmoe/finalize/{self.job_id}/"
        keys = [prefix + str(r) for r in range(self.world_size)]
        decision = prefix + "decision"
        store.set(keys[self.rank], "failed" if self.failed else "ok")
        verdict = "alone"
        deadline = time.monotonic() + self.finalize_wait_s
        while self.failed is None and time.monotonic() < deadline and not store.check([decision]):
            posted = [store.get(k) for k in keys if store.check([k])]
            if b"failed" in posted:
                break
            if len(posted) == len(keys):
                verdict = "together"
                break
            time.sleep(0.01)
        return store.compare_set(decision, "", verdict) == b"together"

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        """The block's end finalizes the runtime, also where its init() returned one made before
        (a helper's `with fm.init()`): helpers call init() plainly."""
        self.finalize()


_current: Runtime | None = None
# group_destroyed: finalize() destroyed a group of 2+ ranks init() made, in this process; left_group:
# the process group an init() made before it failed (init() owns it if it is still the default group)
_STATE = {"group_destroyed": False, "left_group": None}


def current() -> Runtime | None:
    return _current


def fused_unavailable_reason() -> str | None:
    """Why backend='flash' cannot run in this process now, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    try:
        import nvshmem.core  # noqa: F401
    except ImportError as e:
        return f"nvshmem4py is not importable ({e}); pip install nvshmem4py-cu13"
    if _current is None or not _current.nvshmem:
        return "NVSHMEM is not initialised: call flashmoe_py.init() first"
    return None


def require_fused() -> Runtime:
    reason = fused_unavailable_reason()
    if reason:
        raise RuntimeError(f"backend='flash' is unavailable: {reason}")
    return _current


def runtime_device() -> torch.device | None:
    """The device init() bound this process to, or None before init()."""
    return None if _current is None else _current.device


def init(nvshmem: bool = True, heap_bytes: int | None = None, layers=()) -> Runtime:
    """Bring up torch.distributed (NCCL with CUDA, else gloo) and, if `nvshmem`, NVSHMEM on this
    process's GPU (cuda:local_rank), with NVLink multicast off. Idempotent: a second call returns
    the same runtime (RuntimeError where it asks for a larger symmetric heap than NVSHMEM started
    with). Raises RuntimeError naming what is missing when NVSHMEM cannot be used.

    The symmetric heap is sized before NVSHMEM starts: `heap_bytes`, or enough for `layers`, a
    list of (MoEConfig, max_tokens_per_rank[, transport]) for the fused layers this process will build (each
    holds its own buffers); a user-set NVSHMEM_SYMMETRIC_SIZE that is too small is refused."""
    global _current
    if isinstance(nvshmem, (str, bytes)) or nvshmem not in (True, False):  # (0, 1, numpy's bools too)
        raise ValueError(f"init(nvshmem={nvshmem!r}): expected True or False")
    nvshmem = bool(nvshmem)
    heap_bytes, layers = _heap_args(heap_bytes, layers)  # checked before anything starts; an iterator read once
    if not nvshmem and (heap_bytes is not None or layers):
        raise ValueError("init(nvshmem=False) with heap_bytes or layers: they size NVSHMEM's symmetric heap, which "
                         "a runtime without NVSHMEM has none of (backend 'torch' needs none)")
    if _current is not None:
        if nvshmem and not _current.nvshmem:
            raise RuntimeError("flashmoe_py.init(nvshmem=True) after init(nvshmem=False): "
                               "call finalize() first")
        needed = _heap_needed(heap_bytes, layers, _current.world_size)
        if _current.nvshmem and needed is not None and needed > _current.heap_capacity:
            raise RuntimeError(f"flashmoe_py.init() asks for a symmetric heap of {format_bytes(needed)}, but NVSHMEM "
                               f"started with {format_bytes(_current.heap_capacity)}, which cannot grow: pass every "
                               "layer to the first init(layers=...), or finalize() first")
        return _current
    if "NVSHMEM_SYMMETRIC_SIZE" in os.environ:  # read by the Runtime: refused before the group is made
        _parse_size(os.environ["NVSHMEM_SYMMETRIC_SIZE"])
    os.environ.update(NO_MULTICAST)
    info = detect_launcher()
    if info.launcher == "single" and not dist.is_initialized():
        _refuse_a_job_of_processes_alone()
    if dist.is_initialized() and (dist.get_rank(), dist.get_world_size()) != (info.rank, info.world_size):
        # Joining a group the caller made without a launcher's environment (e.g. mp.spawn).
        rank, world = dist.get_rank(), dist.get_world_size()
        info = LaunchInfo(info.launcher, rank, world, rank % max(1, torch.cuda.device_count()), world)
    if nvshmem and not torch.cuda.is_available():
        raise RuntimeError("flashmoe_py.init(nvshmem=True) needs a CUDA GPU; none is visible "
                           "(use init(nvshmem=False) and backend='torch' on the CPU)")
    if nvshmem:
        try:
            import nvshmem.core  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"NVSHMEM needs nvshmem4py: pip install nvshmem4py-cu13 ({e})") from e
    if info.world_size > 1 and not dist.is_initialized() and _STATE["group_destroyed"]:
        raise RuntimeError("flashmoe_py.init() after finalize() at world > 1: torch's env:// rendezvous would find "
                           "the last group's keys in its store and hang or fail (pytorch#55967). Call init() once "
                           "a process, or make the process group yourself (init() joins it)")
    heap_bytes = _heap_needed(heap_bytes, layers, info.world_size)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        if info.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {info.local_rank} ({info.launcher}) but {torch.cuda.device_count()} "
                               f"GPU(s) visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                               "each process takes cuda:<local rank> of the node's GPUs, so every process "
                               "must see them all (a launcher that exports no local rank, such as srun's PMI "
                               "without MPI_LOCALRANKID, has its global rank taken for it: one node only)")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    heap_size_set = None  # (after every refusal above: a refused init() leaves no variable of its own behind)
    if nvshmem and heap_bytes is not None:
        heap_size_set = _set_heap_size(heap_bytes)
        log.info("symmetric heap: %s per rank (NVSHMEM_SYMMETRIC_SIZE=%s)", format_bytes(heap_bytes),
                 os.environ["NVSHMEM_SYMMETRIC_SIZE"])
    make_group = not dist.is_initialized()
    # a group an init() that failed made and left is still this package's (a retry took it for the
    # caller's, and its finalize() never tore it down)
    left, _STATE["left_group"] = _STATE["left_group"], None
    owns_group = make_group or left is dist.distributed_c10d._get_default_group()
    try:
        if make_group:
            _init_process_group(info, device)
        job_id = [uuid.uuid4().hex]
        if info.world_size > 1:
            dist.broadcast_object_list(job_id, src=0)
        if nvshmem:
            _init_nvshmem(info)
    except BaseException:
        _take_back_heap_size(heap_size_set)
        if owns_group and dist.is_initialized():  # kept for a retry (init(nvshmem=False), say), which owns it
            _STATE["left_group"] = dist.distributed_c10d._get_default_group()
        raise
    _current = Runtime(info, device, owns_group, nvshmem, job_id[0])
    _current.heap_size_set = heap_size_set
    return _current


def _heap_needed(heap_bytes: int | None, layers, world_size: int) -> int | None:
    """The symmetric heap init() is asked for: heap_bytes, or more where `layers` need it (None:
    neither given); the arguments as _heap_args takes them."""
    heap_bytes, layers = _heap_args(heap_bytes, layers)
    if layers:
        return max(heap_bytes or 0, sum(heap_bytes_for(c, world_size, as_int(t), *rest) for c, t, *rest in layers))
    return heap_bytes


def _heap_args(heap_bytes, layers) -> tuple[int | None, list]:
    """init's heap_bytes (None or an int >= 1) and layers (any iterable, None: none, of
    (MoEConfig, max_tokens_per_rank >= 1[, transport])) -> (heap_bytes as an int, layers as a
    list); ValueError naming the argument or entry that is not so."""
    if heap_bytes is not None and not (is_int(as_int(heap_bytes)) and as_int(heap_bytes) >= 1):
        raise ValueError(f"init(heap_bytes={heap_bytes!r}): expected None or a number of bytes (an int >= 1)")
    heap_bytes = as_int(heap_bytes)
    if isinstance(layers, (MoEConfig, str, bytes)) or not isinstance(layers, Iterable | None):
        raise ValueError(f"init(layers=...): expected a list of (MoEConfig, max_tokens_per_rank[, transport]) "
                         f"tuples, got {type(layers).__name__}")
    layers = list(layers or ())
    for i, entry in enumerate(layers):
        fits = isinstance(entry, (list, tuple)) and len(entry) in (2, 3) and isinstance(entry[0], MoEConfig)
        if fits:
            tokens = as_int(entry[1])
            fits = is_int(tokens) and tokens >= 1 and (len(entry) == 2 or entry[2] in TRANSPORTS)
        if not fits:
            raise ValueError(f"init(layers=...): entry {i} is {entry!r}; expected (MoEConfig, max_tokens_per_rank "
                             f"(an int >= 1)[, transport, one of {TRANSPORTS}])")
    return heap_bytes, layers


def finalize() -> None:
    """Tear down the runtime from init(), if any (frees symmetric buffers first)."""
    if _current is not None:
        _current.finalize()


def _set_heap_size(needed: int) -> str | None:
    """Size NVSHMEM's symmetric heap before init; a user-set NVSHMEM_SYMMETRIC_SIZE that is too
    small is refused, a larger one kept. -> the value set, or None (the user's kept)."""
    user = os.environ.get("NVSHMEM_SYMMETRIC_SIZE")
    if user is None:
        os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(needed)
        return str(needed)
    if _parse_size(user) < needed:
        raise RuntimeError(f"the symmetric heap needs {format_bytes(needed)} ({needed} bytes) but "
                           f"NVSHMEM_SYMMETRIC_SIZE={user} allows {format_bytes(_parse_size(user))}; "
                           f"raise it or lower max_tokens_per_rank")
    return None


def _take_back_heap_size(value: str | None) -> None:
    """Unset NVSHMEM_SYMMETRIC_SIZE where it still holds `value`, what init() set (_set_heap_size;
    None: init() set nothing): a later init() sizes the heap again rather than take it for the
    user's. A value the user set, or changed since, is kept."""
    if value is not None and os.environ.get("NVSHMEM_SYMMETRIC_SIZE") == value:
        del os.environ["NVSHMEM_SYMMETRIC_SIZE"]


def _parse_size(text: str) -> int:
    """NVSHMEM_SYMMETRIC_SIZE's syntax: a number with an optional K/M/G/T suffix (powers of 1024)
    -> bytes (ValueError naming the variable where text is none)."""
    digits = text.strip().upper().rstrip("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(digits[-1:], 1)
    try:
        size = float(digits[:-1] if scale > 1 else digits) * scale
    except ValueError:
        size = math.nan
    if not (math.isfinite(size) and size > 0):
        raise ValueError(f"NVSHMEM_SYMMETRIC_SIZE={text!r}: expected a positive size in bytes, a number with an "
                         "optional K, M, G or T suffix (powers of 1024), e.g. 2G")
    return int(size)


def _init_process_group(info: LaunchInfo, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if info.launcher == "mpirun" and info.world_size > 1 and not ("MASTER_ADDR" in os.environ
                                                                  and "MASTER_PORT" in os.environ):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise RuntimeError(f"started by mpirun without MASTER_ADDR and MASTER_PORT: rank 0 sends its address "
                               f"to the others through mpi4py, which is missing ({e}): pip install "
                               "'flashmoe_py[mpi]', or set both variables on every rank") from None
        addr_port = None
        if info.rank == 0:  # (a MASTER_ADDR or a MASTER_PORT set without the other is kept)
            addr_port = (os.environ.get("MASTER_ADDR") or socket.gethostname(),
                         int(os.environ.get("MASTER_PORT") or _free_port()))
        addr_port = MPI.COMM_WORLD.bcast(addr_port, root=0)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr_port[0], str(addr_port[1])
    elif info.world_size == 1 and info.launcher != "torchrun":
        # alone (or mpirun -np 1): a rendezvous with itself, on this host at a free port, whatever
        # MASTER_ADDR / MASTER_PORT a shell left exported (an unreachable address hung the rendezvous
        # for torch's 30 minutes; a fixed port made a second one-process job fail with EADDRINUSE)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    elif info.world_size == 1:  # RANK and WORLD_SIZE: a torchrun worker keeps its agent's store; set by hand, here
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, **kwargs)


def _free_port() -> int:
    """A TCP port no socket on this host holds now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _init_nvshmem(info: LaunchInfo) -> None:
    """UID bootstrap: rank 0 makes the id, torch.distributed carries its bytes to every rank."""
    import numpy as np
    import nvshmem.core as nv
    from cuda.core import Device
    dev = Device(info.local_rank)
    dev.set_current()
    uid = nv.get_unique_id(empty=info.rank != 0)
    raw = [bytes(uid._data.view(np.int8).tobytes())]
    dist.broadcast_object_list(raw, src=0)
    uid._data.view(np.int8)[:] = np.frombuffer(raw[0], dtype=np.int8)
    nv.init(device=dev, uid=uid, rank=info.rank, nranks=info.world_size, initializer_method="uid")
