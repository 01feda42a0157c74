"""A caller's CUDA graph capture of the layer's work (a whole training step captured, forward and
backward), and the refusals where that work would synchronise with the host, which breaks a
capture: each raises a RuntimeError saying why, before the step that would synchronise.

Capturable, as run on an H200: backend flash's training step at world 1, dropless, with bf16 rows
in the backward's per-expert products (replayed on new inputs copied in:
tests/gpu/check_backward.py), and its inference forwards (no_grad or inference_mode:
tests/gpu/check_flash.py's "cuda graph" case).
Backend torch's steps at world 1 have not been run under a capture."""

from __future__ import annotations

import torch

NOT_CAPTURABLE = "cannot be captured in a CUDA graph here"


def capturing(where: torch.Tensor | torch.device | str) -> bool:
    """Whether work on `where` (a tensor or a device) is being captured into a CUDA graph on the
    current stream."""
    device = where.device if isinstance(where, torch.Tensor) else torch.device(where)
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def refuse_forward(layer) -> None:
    """A forward at world > 1 captured under grad mode (backend flash: the ranks compare their grad
    modes and token counts on the host first) or on backend torch (its all-to-all's split sizes
    come to the host): raise."""
    why = ("backend torch's all-to-all split sizes come to the host" if layer.backend.name == "torch" else
           "under grad mode the ranks compare their grad modes and token counts on the host first")
    raise RuntimeError(f"MoELayer's forward {NOT_CAPTURABLE}: at world {layer.world_size} {why}. Capture "
                       "backend flash's forwards under torch.no_grad() or torch.inference_mode(), or run "
                       "training steps without a graph")


def refuse_backward(layer) -> None:
    """The explicit backward captured at world > 1 (the all-to-all's split sizes) or with
    capacity_factor (the kept slots' count): raise; otherwise return."""
    why = []
    if layer.world_size > 1:
        why.append(f"at world {layer.world_size} its all-to-all split sizes come to the host")
    if layer.config.capacity_factor is not None:
        why.append(f"with capacity_factor={layer.config.capacity_factor} the kept slots' count comes to the host")
    if why:
        raise RuntimeError(f"MoELayer's backward {NOT_CAPTURABLE}: " + "; ".join(why)
                           + ". Capture the forward only, or run the training step without a graph")


def refuse_products(dtype: torch.dtype) -> None:
    """The backward's per-expert products captured other than through torch._grouped_mm's bf16 path
    (a loop over experts, or its float32 path, which copies from the host: seen on an H200): raise."""
    raise RuntimeError(f"MoELayer's backward {NOT_CAPTURABLE}: for {dtype} rows of these sizes its per-expert "
                       "products (a loop, or torch._grouped_mm's path other than bfloat16's) need the row "
                       "counts on the host")


def refuse_probe(what: str) -> None:
    """A one-time probe (what: its name) reached first inside a capture, where its small tensors
    made from host data cannot be copied in (a failure there would be cached as 'does not work'):
    raise."""
    raise RuntimeError(f"{what} is probed once, on first use, and {NOT_CAPTURABLE}: run one step without a "
                       "graph before capturing (as a capture's warm-up does)")
