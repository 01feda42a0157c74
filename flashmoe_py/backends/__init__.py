"""Implementations of the MoE forward selected by MoELayer(backend=...)."""
