"""Bootstrap: torch.distributed and NVSHMEM together, under torchrun or mpirun; one runtime handle.

    rt = flashmoe_py.init()          # idempotent; detects the launcher
    ...
    flashmoe_py.finalize()           # frees every symmetric buffer, then NVSHMEM, then the group

    with flashmoe_py.runtime.init(nvshmem=False) as rt:   # or as a context manager
        rt.check_consistent(config, placement, max_tokens_per_rank)

nvshmem4py, cuda.core and mpi4py are imported only when asked for, so the package (and
backend="torch") works on a machine with none of them."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .heap import DEFAULT_SYMMETRIC_SIZE, HeapSizeError, SymmetricHeap, heap_bytes, heap_plan, parse_size

# NVLink multicast (NVLS) stays off everywhere: it can take a shared host's GPUs down.
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
     "OMPI_COMM_WORLD_LOCAL_SIZE"),                                      # Open MPI
    ("mpirun", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH / Hydra
]


def detect_launcher(env=os.environ) -> LaunchInfo:
    """How this process was started: torchrun, Open MPI or MPICH (Hydra) mpirun, or alone (rank 0
    of 1). The local rank and size default to the global ones when a launcher leaves them out.
    Raises ValueError naming the variable when the values are missing, garbled or inconsistent."""
    for name, r, w, lr, lw in _LAUNCHERS:
        if r not in env and w not in env:
            continue
        for var in (r, w):
            if var not in env:
                other = w if var == r else r
                raise ValueError(f"{other}={env[other]!r} is set but {var} is not ({name} environment)")
        rank, world = _env_int(env, r, name), _env_int(env, w, name)
        local = _env_int(env, lr, name) if lr in env else rank
        local_world = _env_int(env, lw, name) if lw in env else world
        if world < 1:
            raise ValueError(f"{w}={world} must be >= 1 ({name} environment)")
        if not 0 <= rank < world:
            raise ValueError(f"{r}={rank} is out of range for {w}={world} ({name} environment)")
        if not 1 <= local_world <= world:
            raise ValueError(f"{lw}={local_world} must be in 1..{w}={world} ({name} environment)")
        if not 0 <= local < local_world:
            raise ValueError(f"{lr}={local} is out of range for {lw}={local_world} "
                             f"({name} environment)")
        return LaunchInfo(name, rank, world, local, local_world)
    return LaunchInfo("single", 0, 1, 0, 1)


def _env_int(env, var: str, launcher: str) -> int:
    raw = env[var]
    try:
        return int(str(raw).strip())
    except ValueError:
        raise ValueError(f"environment variable {var}={raw!r} is not an integer "
                         f"({launcher} environment)") from None


_MISSING = type("Missing", (), {"__repr__": lambda self: "<not given>"})()


def find_mismatch(per_rank_dicts: list[dict], prefix: str = "") -> str | None:
    """The first field whose value differs across ranks, as a sentence naming the values and the
    ranks holding each, or None if every rank agrees. per_rank_dicts[r] is rank r's dict; nested
    dicts and equal-length lists are compared element by element, so the path names the leaf:
    "MoEConfig.top_k differs across ranks: rank 0 has 2, rank 1 has 4"."""
    keys = list(dict.fromkeys(k for d in per_rank_dicts for k in d))
    for key in keys:
        path = f"{prefix}.{key}" if prefix else str(key)
        found = _compare([d.get(key, _MISSING) for d in per_rank_dicts], path)
        if found:
            return found
    return None


def _compare(values: list, path: str) -> str | None:
    if all(isinstance(v, dict) for v in values):
        return find_mismatch(values, path)
    if all(isinstance(v, (list, tuple)) for v in values) and len({len(v) for v in values}) == 1:
        for i in range(len(values[0])):
            found = _compare([v[i] for v in values], f"{path}[{i}]")
            if found:
                return found
        return None
    if all(v == values[0] for v in values):
        return None
    groups: list[tuple[object, list[int]]] = []  # values are not always hashable
    for rank, v in enumerate(values):
        for seen, ranks in groups:
            if seen == v:
                ranks.append(rank)
                break
        else:
            groups.append((v, [rank]))
    return f"{path} differs across ranks: " + ", ".join(
        f"{_ranks(ranks)} {'has' if len(ranks) == 1 else 'have'} {_short(v)}" for v, ranks in groups)


def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2, 5'."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"rank {text}" if len(ranks) == 1 else f"ranks {text}"


def _short(v, limit: int = 120) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Runtime:
    """The process's one handle on torch.distributed and NVSHMEM (see init()).

    rank, world_size, local_rank, local_world_size, launcher: from the launcher (or the process
    group it joined); device: this rank's torch device (cuda:local_rank, or cpu); backend: the
    torch.distributed backend; nvshmem_enabled; heap: a SymmetricHeap (None without NVSHMEM);
    heap_limit: NVSHMEM_SYMMETRIC_SIZE in bytes (None without NVSHMEM)."""

    def __init__(self, info: LaunchInfo, device: torch.device, backend: str, owns_group: bool,
                 nvshmem_enabled: bool, heap_limit: int | None, unreachable_peers: tuple[int, ...],
                 restore_env: dict):
        self.info, self.device, self.backend = info, device, backend
        self.rank, self.world_size = info.rank, info.world_size
        self.local_rank, self.local_world_size = info.local_rank, info.local_world_size
        self.launcher = info.launcher
        self.owns_group, self.nvshmem_enabled, self.heap_limit = owns_group, nvshmem_enabled, heap_limit
        self.unreachable_peers = unreachable_peers  # PEs this GPU cannot map (nvshmem_ptr NULL)
        self.heaps: list[SymmetricHeap] = []  # every heap with live buffers, freed at finalize
        self.heap = SymmetricHeap(self) if nvshmem_enabled else None
        self.finalized = False
        self._restore_env = restore_env

    def __repr__(self) -> str:
        return (f"Runtime(rank={self.rank}/{self.world_size}, launcher={self.launcher!r}, "
                f"device={self.device}, backend={self.backend!r}, nvshmem={self.nvshmem_enabled})")

    def barrier(self) -> None:
        """Every rank's queued device work is done before any rank goes on."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.world_size > 1:
            dist.barrier()

    def check_consistent(self, config=None, placement=None, max_tokens_per_rank: int | None = None,
                         **extra) -> None:
        """Collective: raise ConsistencyError on every rank unless all ranks passed the same
        config (MoEConfig), placement (ExpertPlacement), max_tokens_per_rank and `extra` values
        (dicts, lists, numbers, strings). The message names the first field that differs."""
        mine = {}
        if config is not None:
            mine["MoEConfig"] = config.to_dict()
        if placement is not None:
            mine["ExpertPlacement"] = placement.to_dict()
        if max_tokens_per_rank is not None:
            mine["max_tokens_per_rank"] = max_tokens_per_rank
        mine.update(extra)
        if self.world_size == 1:
            return
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        mismatch = find_mismatch(everyone)
        if mismatch:
            raise ConsistencyError(mismatch)

    def fused_unavailable_reason(self) -> str | None:
        """What stops backend='flash' in this runtime ('; '-separated), or None."""
        missing = _nvshmem_missing()
        if not missing and not self.nvshmem_enabled:
            missing.append("NVSHMEM is not initialised: this runtime was started with "
                           "init(nvshmem=False); finalize() and call init() again")
        if self.unreachable_peers:
            missing.append(f"rank {self.rank} cannot reach PEs {list(self.unreachable_peers)} by "
                           f"GPU peer access (NVLink/PCIe P2P), which the fused kernel's stores need")
        return "; ".join(missing) or None

    def fused_available(self) -> bool:
        return self.fused_unavailable_reason() is None

    def finalize(self) -> None:
        """Free every symmetric buffer, finalize NVSHMEM, then destroy the process group if this
        runtime created it. Collective; idempotent."""
        global _current
        if self.finalized:
            return
        self.finalized = True
        try:
            for heap in list(self.heaps):
                heap.free()
            if self.nvshmem_enabled:
                import nvshmem.core as nv
                self.barrier()  # no peer is still touching the heap
                nv.finalize()
        finally:
            if self.owns_group and dist.is_initialized():
                dist.destroy_process_group()
            for var, value in self._restore_env.items():  # a later init() sizes the heap afresh
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value
            if _current is self:
                _current = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.finalize()


_current: Runtime | None = None


def current() -> Runtime | None:
    """The runtime from init(), or None."""
    return _current


def _nvshmem_missing() -> list[str]:
    """What this process lacks to run NVSHMEM at all."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA device (torch.cuda.is_available() is False)")
    try:
        import nvshmem.core  # noqa: F401
    except Exception as e:  # ImportError, or OSError when libnvshmem_host cannot be loaded
        missing.append(f"nvshmem4py-cu13 not installed (import nvshmem.core: {e}); "
                       f"pip install nvshmem4py-cu13")
    return missing


def fused_unavailable_reason() -> str | None:
    """Why backend='flash' cannot run in this process now ('; '-separated), or None."""
    if _current is not None:
        return _current.fused_unavailable_reason()
    missing = _nvshmem_missing()
    missing.append("NVSHMEM is not initialised: call flashmoe_py.init() first")
    return "; ".join(missing)


def require_fused() -> Runtime:
    """The runtime, if the fused kernel can run; else RuntimeError listing everything missing."""
    reason = fused_unavailable_reason()
    if reason:
        raise RuntimeError(f"backend='flash' is unavailable: {reason}")
    return _current


def init(backend: str | None = None, nvshmem: bool = True, heap_bytes: int | None = None,
         device=None, layers=()) -> Runtime:
    """Bring up torch.distributed and, if `nvshmem`, NVSHMEM on this rank's GPU; returns the runtime.

    backend:    torch.distributed backend; default NCCL with CUDA, else gloo. An existing process
                group (made by the caller) is joined, not replaced, and is left to the caller.
    nvshmem:    start NVSHMEM (nvshmem4py) too. Needs CUDA and nvshmem4py-cu13: without them this
                raises RuntimeError naming what is missing; init(nvshmem=False) runs on the CPU.
    heap_bytes: symmetric heap size (NVSHMEM_SYMMETRIC_SIZE) to set before NVSHMEM starts, e.g.
                flashmoe_py.heap.heap_bytes(plan). A user-set NVSHMEM_SYMMETRIC_SIZE is kept if big
                enough, else HeapSizeError says how many bytes are needed and allowed.
    device:     this rank's device; default cuda:local_rank (cpu without CUDA).
    layers:     [(MoEConfig, max_tokens_per_rank)] for the fused layers this process will hold at
                once; the heap is sized for all of them (and at least heap_bytes).

    Idempotent: a second call returns the same runtime; one asking for something the running
    runtime does not have (another backend or device, NVSHMEM, a larger heap) raises ValueError.
    NVLink multicast is always off (NVSHMEM_DISABLE_NVLS=1, NCCL_NVLS_ENABLE=0,
    TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are exported first)."""
    global _current
    if heap_bytes is not None and (not isinstance(heap_bytes, int) or heap_bytes < 1):
        raise ValueError(f"heap_bytes={heap_bytes!r} must be a positive int")
    if _current is not None:
        _current_matches(_current, backend, nvshmem, heap_bytes, device, layers)
        return _current
    if nvshmem:
        missing = _nvshmem_missing()
        if missing:
            raise RuntimeError(f"flashmoe_py.init(nvshmem=True) cannot start NVSHMEM: "
                               f"{'; '.join(missing)}. backend='torch' needs neither: "
                               f"use init(nvshmem=False)")
    os.environ.update(NO_MULTICAST)
    info = detect_launcher()
    joined = dist.is_initialized()
    if joined and (dist.get_rank(), dist.get_world_size()) != (info.rank, info.world_size):
        # A group the caller made without a launcher's environment (e.g. mp.spawn): trust it.
        rank, world = dist.get_rank(), dist.get_world_size()
        ngpu = max(1, torch.cuda.device_count())
        info = LaunchInfo("single" if info.launcher != "mpirun" else "joined", rank, world,
                          rank % ngpu, min(world, ngpu))
    needed = heap_bytes
    if layers:
        needed = max(needed or 0, _layers_bytes(layers, info.world_size))
    restore = {}
    heap_limit = None
    if nvshmem:
        restore = {"NVSHMEM_SYMMETRIC_SIZE": os.environ.get("NVSHMEM_SYMMETRIC_SIZE")}
        heap_limit = _size_heap(needed)
    dev = _pick_device(device, info)
    if joined:
        backend_now = dist.get_backend()
        if backend is not None and backend != backend_now:
            raise ValueError(f"flashmoe_py.init(backend={backend!r}): the existing process group "
                             f"uses {backend_now!r}")
        backend = backend_now
    else:
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        _init_process_group(info, dev, backend)
    unreachable: tuple[int, ...] = ()
    try:
        if nvshmem:
            _init_nvshmem(info, dev)
            unreachable = _unreachable_peers(info)
    except BaseException:
        if not joined and dist.is_initialized():
            dist.destroy_process_group()
        raise
    _current = Runtime(info, dev, backend, not joined, nvshmem, heap_limit, unreachable, restore)
    return _current


def finalize() -> None:
    """Tear down the runtime from init(), if any (frees symmetric buffers first)."""
    if _current is not None:
        _current.finalize()


def _current_matches(rt: Runtime, backend, nvshmem, heap_bytes, device, layers) -> None:
    """Raise ValueError if a repeated init() asks for something the running runtime lacks."""
    def conflict(what: str) -> ValueError:
        return ValueError(f"flashmoe_py.init({what}) conflicts with the running runtime ({rt!r}); "
                          f"call flashmoe_py.finalize() first")
    if backend is not None and backend != rt.backend:
        raise conflict(f"backend={backend!r}")
    if nvshmem and not rt.nvshmem_enabled:
        raise conflict("nvshmem=True")
    if device is not None and torch.device(device) != rt.device:
        raise conflict(f"device={device!r}")
    needed = max(heap_bytes or 0, _layers_bytes(layers, rt.world_size) if layers else 0)
    if needed and rt.nvshmem_enabled and needed > rt.heap_limit:
        raise conflict(f"heap_bytes={needed}") from HeapSizeError(
            needed, rt.heap_limit, "the running NVSHMEM heap")


def _layers_bytes(layers, world_size: int) -> int:
    """Heap bytes for several fused layers allocated at once (one NVSHMEM reserve for all)."""
    return heap_bytes(*(heap_plan(cfg, world_size, tokens) for cfg, tokens in layers))


def _size_heap(needed: int | None) -> int:
    """Set NVSHMEM_SYMMETRIC_SIZE to `needed` before NVSHMEM starts, unless the user set it: a
    user value at least as large is kept, a smaller one refused. -> the size in effect (bytes)."""
    user = os.environ.get("NVSHMEM_SYMMETRIC_SIZE")
    if user is not None:
        allowed = parse_size(user)
        if needed is not None and allowed < needed:
            raise HeapSizeError(needed, allowed, f"NVSHMEM_SYMMETRIC_SIZE={user}")
        return allowed
    if needed is None:
        return DEFAULT_SYMMETRIC_SIZE
    os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(needed)
    return needed


def _pick_device(device, info: LaunchInfo) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", info.local_rank)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", info.local_rank)
    else:
        return torch.device("cpu")
    if dev.type == "cuda":
        if dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"rank {info.rank} (local rank {info.local_rank}) wants {dev}, but only "
                               f"{torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(dev)
    return dev


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _import_mpi(why: str):
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(f"launched by mpirun, but mpi4py is not installed (pip install mpi4py); "
                           f"flashmoe_py needs it to {why}") from e
    return MPI


def _init_process_group(info: LaunchInfo, device: torch.device, backend: str) -> None:
    """torchrun: env:// from its MASTER_ADDR/PORT. mpirun: rank 0 picks a free port and mpi4py
    broadcasts the address, then env://. Alone: a free local port."""
    if info.launcher == "mpirun" and not {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
        MPI = _import_mpi("share the torch.distributed rendezvous address")
        comm = MPI.COMM_WORLD
        if (comm.Get_rank(), comm.Get_size()) != (info.rank, info.world_size):
            raise RuntimeError(f"MPI.COMM_WORLD is rank {comm.Get_rank()} of {comm.Get_size()}, the "
                               f"launcher environment says {info.rank} of {info.world_size}")
        addr = None
        if info.rank == 0:
            one_node = info.local_world_size == info.world_size
            addr = ("127.0.0.1" if one_node else socket.gethostname(), _free_port())
        addr = comm.bcast(addr, root=0)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr[0], str(addr[1])
    elif info.launcher == "single" and info.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method="env://", rank=info.rank,
                            world_size=info.world_size, **kwargs)


def _init_nvshmem(info: LaunchInfo, device: torch.device) -> None:
    """NVSHMEM by unique id: under mpirun nvshmem4py broadcasts it over MPI.COMM_WORLD itself
    ("emulated_mpi": no NVSHMEM MPI plugin matching the MPI build is needed); otherwise rank 0
    makes it and torch.distributed carries its bytes to every rank."""
    import nvshmem.core as nv
    from cuda.core import Device
    dev = Device(device.index)
    dev.set_current()
    if info.launcher == "mpirun":
        MPI = _import_mpi("broadcast the NVSHMEM unique id")
        nv.init(device=dev, mpi_comm=MPI.COMM_WORLD, initializer_method="emulated_mpi")
    else:
        import numpy as np
        uid = nv.get_unique_id(empty=info.rank != 0)
        raw = uid._data.view(np.int8)
        payload = [raw.tobytes() if info.rank == 0 else None]
        dist.broadcast_object_list(payload, src=0)
        raw[:] = np.frombuffer(payload[0], dtype=np.int8)
        nv.init(device=dev, uid=uid, rank=info.rank, nranks=info.world_size,
                initializer_method="uid")
    if (nv.my_pe(), nv.n_pes()) != (info.rank, info.world_size):
        raise RuntimeError(f"NVSHMEM made this process PE {nv.my_pe()} of {nv.n_pes()}, but it is "
                           f"rank {info.rank} of {info.world_size}: peer addresses would be wrong")


def _unreachable_peers(info: LaunchInfo) -> tuple[int, ...]:
    """PEs whose heap this GPU cannot map (collective: a small probe buffer on every rank)."""
    import nvshmem.core as nv
    probe = nv.tensor((ALIGN_PROBE,), dtype=torch.int8)
    bad = []
    try:
        for pe in range(info.world_size):
            if pe != info.rank:
                try:
                    nv.get_peer_tensor(probe, pe)
                except Exception:
                    bad.append(pe)
    finally:
        nv.free_tensor(probe)
    return tuple(bad)


ALIGN_PROBE = 512
