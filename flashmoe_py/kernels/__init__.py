"""Triton kernels: the fused persistent MoE kernel and its device-side transport."""
