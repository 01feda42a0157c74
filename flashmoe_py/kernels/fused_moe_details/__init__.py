"""The fused kernel's device functions (kernels/fused_moe.py composes them into one persistent
kernel), one family per module: tasks (numbering, expert tiles, trace stamps, timeouts),
dispatch, expert_ffn (the routed experts' GEMM tiles), shared_experts, combine."""
