"""The fused backend's layer options: one frozen, validated value, built by MoELayer for every
backend (so a bad value is refused wherever it is given) and compared across ranks with the config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import as_int, as_number, is_int, is_positive_number

TRANSPORTS = ("p2p", "nvshmem")
BACKWARDS = ("autograd", "saved", "recompute")


MAX_TIMEOUT_S = 86_400  # the longest device-side wait FusedOptions takes


@dataclass(frozen=True)
class FusedOptions:
    """max_tokens_per_rank: tokens one rank may pass to a forward; sizes the fused backend's
    symmetric buffers (needed by backend "flash", optional elsewhere, where it is enforced too).
    timeout_s: seconds of the GPU's clock any device-side wait of the fused kernel may last (up
    to MAX_TIMEOUT_S).
    cuda_graphs: replay the fused forward from a CUDA graph per token count.
    transport: "p2p" (stores through NVLink peer mappings) or "nvshmem" (device-API puts).
    launch_override: for tuning, launch settings fixed instead of chosen per call ({field:
    value} of kernels/launch_config.FIELDS; checked when the layer is built at world > 1, where
    backend flash compiles its launches then, else at the first forward).
    backward: how gradients are taken (backends/explicit_backward.py): "autograd" records the
    torch backend's ops and saves their activations; "saved" keeps x, the routing and GEMM1's
    outputs before the activation (backends/saved.py) and runs explicit steps from them (backend
    "flash"'s default); "recompute" keeps only x and routes and runs GEMM1 again in those steps
    (the least memory); None: the backend's own."""

    max_tokens_per_rank: int | None = None
    timeout_s: float = 10.0
    cuda_graphs: bool = True
    transport: str = "p2p"
    launch_override: dict | None = None
    backward: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_tokens_per_rank", mt := as_int(self.max_tokens_per_rank))
        if mt is not None and (not is_int(mt) or mt < 1):
            raise ValueError(f"max_tokens_per_rank must be a positive int (it sizes the symmetric heap) "
                             f"or None; got {mt!r}")
        object.__setattr__(self, "timeout_s", t := as_number(self.timeout_s))
        if not is_positive_number(t) or t > MAX_TIMEOUT_S:
            raise ValueError(f"timeout_s must be a positive number of seconds up to {MAX_TIMEOUT_S} (a day: the "
                             f"kernel counts it in int64 nanoseconds); got {t!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be a bool; got {self.cuda_graphs!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport={self.transport!r} is not available; choose one of {TRANSPORTS}")
        if self.launch_override is not None and not isinstance(self.launch_override, dict):
            raise ValueError(f"launch_override must be a dict of launch settings or None; got "
                             f"{self.launch_override!r}")
        if self.launch_override is not None:  # the ranks compared this one: a caller's later edit must not reach it
            object.__setattr__(self, "launch_override", dict(self.launch_override))
        if self.backward is not None and self.backward not in BACKWARDS:
            raise ValueError(f"backward={self.backward!r}; choose one of {BACKWARDS} or None")

    def backward_for(self, backend: str) -> str:
        """The backward a layer of `backend` takes: the one asked for, or the backend's own."""
        return self.backward or ("saved" if backend == "flash" else "autograd")

    def require_max_tokens(self) -> int:
        """max_tokens_per_rank, which backend "flash" cannot do without."""
        if self.max_tokens_per_rank is None:
            raise ValueError("backend='flash' needs max_tokens_per_rank, a positive int (it sizes the "
                             "symmetric heap); got None")
        return self.max_tokens_per_rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
