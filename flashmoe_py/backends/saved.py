"""What a training forward keeps for backward="saved": its routing (with the router's logits),
where each kept slot went, and GEMM1's outputs before the activation where the experts ran them,
so the backward runs neither the router nor GEMM1 again (backends/explicit_backward.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..routing import Routing


@dataclass
class SavedForward:
    """routing: the forward's (its experts, capacity drops and logits); slot: [>= S] int, the S
    kept slots (token * top_k + choice) first, sorted by the (rank, local expert) of their expert
    and, within one, in the order that expert numbered them; send_counts: [W, L] int, the kept
    slots per (rank, local expert), S in all; pre: [>= R, ffn_in] in the layer's dtype, GEMM1's
    output with bias_in (and the input weight) before the activation, of the R rows this rank's
    experts received, in the experts' order (local expert, then source rank, then the source's
    order; gated: the layer's gate/up pairs); shared_pre: [T, shared ffn_in], the shared experts'
    own, or None."""

    routing: Routing
    slot: torch.Tensor
    send_counts: torch.Tensor
    pre: torch.Tensor
    shared_pre: torch.Tensor | None

    def keep_copies(self) -> None:
        """Hold copies of every tensor from now on (it held a CUDA graph's buffers, which the
        graph's next replay overwrites); every copy is made before any field changes."""
        r = self.routing
        routing = Routing(*(None if t is None else t.clone() for t in (r.weights, r.experts, r.kept, r.logits)))
        copies = (self.slot.clone(), self.send_counts.clone(), self.pre.clone(),
                  None if self.shared_pre is None else self.shared_pre.clone())
        self.routing = routing
        self.slot, self.send_counts, self.pre, self.shared_pre = copies

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Mark every tensor as used on `stream` too (its backward's, when they were made on
        another), so the caching allocator keeps their memory until that stream's work is done."""
        r = self.routing
        for t in (r.weights, r.experts, r.kept, r.logits, self.slot, self.send_counts, self.pre, self.shared_pre):
            if t is not None:
                t.record_stream(stream)
