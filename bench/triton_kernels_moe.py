"""The `triton_kernels` baseline (world 1): OpenAI's triton_kernels `matmul_ogs`, the fastest
single-GPU MoE expert path measured here, run on a layer's experts with the layer's own router.

Users install `triton_kernels` from the Triton repository's `python/triton_kernels` at the tag of
their triton (on the device machines, `../shared/gpu/prepare.sh` carries v3.6.0). One forward:

  1. the project's router (flashmoe_py.routing.route: the router kernel), weights [T, k] fp32 and
     experts [T, k];
  2. the routing metadata matmul_ogs takes (rows sorted by expert: a stable argsort, then its
     ragged-tensor metadata kernel);
  3. matmul_ogs gathering x's rows per expert with SwiGLU fused on the accumulator;
  4. matmul_ogs scattering each row's weighted output back to its token (gammas = the weights),
     the k rows of a token summed by its reduction.

Its SwiGLU is gpt-oss's, s * (up + 1) with s = gate * sigmoid(alpha * gate) (clamped to a limit):
that is the layer's clamped_swiglu as it is, and with alpha = 1, no limit and a bias of -1 on the
up columns it is silu(gate) * up, the layer's swiglu. Expert biases go to its bias inputs; shared
experts are added by the layer's torch path. Its weights are copies in its own layout (gate and up
interleaved column by column). The whole forward is replayed from a CUDA graph, as the fused
layer's is, on the caller's x in place."""

from __future__ import annotations

import torch

from flashmoe_py.backends.torch_ep import shared_experts
from flashmoe_py.gate_up import to_interleaved


def available() -> str | None:
    """None if triton_kernels is importable here, else why not."""
    try:
        import triton_kernels.matmul_ogs  # noqa: F401
    except ImportError as e:
        return f"triton_kernels is not importable ({e})"
    return None


def swiglu_gemm1(w_in: torch.Tensor, bias_in: torch.Tensor | None, activation: str = "swiglu",
                 swiglu_alpha: float = 1.0, swiglu_limit: float | None = None) -> tuple:
    """A GEMM1 with a gated activation ("swiglu" or "clamped_swiglu", MoEConfig's) as matmul_ogs
    takes it: w_in [E, H, 2F] (and bias_in [E, 2F] or None) in the layer's gate/up pairs -> (w1
    [E, H, 2F] and b1 [E, 2F] fp32 with gate and up interleaved column by column, its fused
    activation). Its gpt-oss form s * (up + 1) is swiglu with alpha 1, no limit and -1 on the up
    columns' bias."""
    from triton_kernels.matmul_ogs import FnSpecs, FusedActivation
    from triton_kernels.swiglu import swiglu_fn
    E, _, F2 = w_in.shape
    w1 = to_interleaved(w_in).contiguous()
    b1 = (to_interleaved(bias_in.float()) if bias_in is not None
          else torch.zeros(E, F2, dtype=torch.float32, device=w_in.device))
    if activation == "swiglu":
        b1[:, 1::2] -= 1.0  # (up - 1) + 1 = up
        alpha_limit = (1.0, None)
    else:
        alpha_limit = (swiglu_alpha, swiglu_limit)
    return w1, b1, FusedActivation(FnSpecs("swiglu", swiglu_fn, ("alpha", "limit"), reduction_n=2), alpha_limit)


class TritonKernelsMoE:
    """The layer's forward through triton_kernels (one rank, swiglu). x: [T, H] -> [T, H]."""

    mode = "graph"

    def __init__(self, layer):
        cfg = layer.config
        if (layer.world_size != 1 or cfg.activation not in ("swiglu", "clamped_swiglu") or cfg.weight_on_input
                or cfg.capacity_factor is not None):
            raise ValueError("the triton_kernels baseline runs one rank, dropless, with (clamped) swiglu experts "
                             "weighted at their output")
        self.layer, self.cfg = layer, cfg
        bias_in = layer.bias_in.detach() if cfg.expert_bias else None
        self.w1, self.b1, self.act = swiglu_gemm1(layer.w_in.detach(), bias_in, cfg.activation, cfg.swiglu_alpha,
                                                  cfg.swiglu_limit)
        self.w2 = layer.w_out.detach().contiguous()
        self.b2 = layer.bias_out.detach().float().contiguous() if cfg.expert_bias else None
        self.seen: set[int] = set()  # token counts run once eagerly
        self.graphs: dict[tuple, tuple] = {}  # (x's shape, strides, address) -> (graph, its output)

    def _routing(self, r):
        """triton_kernels' routing metadata for the layer's routing r (weights/experts [T, k]).

        Sorted position p (rows grouped by expert, stably) and flat index i = t * k + j:
        col_sorted[p] = i, row_sorted[i] = p. The gather and the gate scales read by p; the
        scatter writes by i. Built with a stable argsort and a histogram: its own topk kernel,
        given the layer's expert indices (y_indx), built a wrong bitmatrix on an H200 at 128
        experts (histogram summing past T * k, then an illegal address in the second GEMM;
        bench/NOTES.md), and its metadata kernels need a power-of-two k."""
        from triton_kernels.matmul_ogs import GatherIndx, RoutingData, ScatterIndx
        from triton_kernels.tensor import make_ragged_tensor_metadata
        cfg = self.cfg
        flat = r.experts.flatten()
        col_sorted = torch.argsort(flat, stable=True).to(torch.int32)
        row_sorted = torch.empty_like(col_sorted)
        row_sorted[col_sorted.long()] = torch.arange(flat.numel(), dtype=torch.int32, device=flat.device)
        col_sum = torch.zeros(cfg.num_experts, dtype=torch.int32, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))  # bincount would sync: no graph capture
        ragged = make_ragged_tensor_metadata(col_sum, col_sorted.shape[0])
        gate_scal = r.weights.flatten().float()[col_sorted.long()]
        rdata = RoutingData(gate_scal, ragged.slice_sizes, cfg.num_experts, r.experts.shape[1], ragged)
        return rdata, GatherIndx(col_sorted, row_sorted), ScatterIndx(row_sorted, col_sorted)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        from triton_kernels.matmul_ogs import matmul_ogs
        cfg = self.cfg
        rdata, gather, scatter = self._routing(self.layer.route(x))
        h = matmul_ogs(x, self.w1, self.b1, rdata, gather_indx=gather,
                       fused_activation=self.act)
        y = matmul_ogs(h, self.w2, self.b2, rdata, scatter_indx=scatter,
                       gammas=rdata.gate_scal).reshape(x.shape[0], cfg.hidden_size)
        if cfg.shared_experts:
            y = (y.float() + shared_experts(x, self.layer)).to(x.dtype)
        return y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The first call at a token count runs eagerly (compiles); later ones replay a CUDA graph
        captured on x itself (one a tensor: the benchmark's input sets), which reads it in place
        as the fused layer's graphs do: a copy into a static input would add 2 T H bytes to this
        peer's time alone (~44 µs of 3,330 at qwen3's 16,384 tokens on an H100, by the copy rate)."""
        if x.shape[0] not in self.seen:
            self.seen.add(x.shape[0])
            return self._forward(x)
        key = (x.shape, x.stride(), x.data_ptr())
        if key not in self.graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._forward(x)
            self.graphs[key] = (graph, out)
        graph, out = self.graphs[key]
        graph.replay()
        return out
