"""flashmoe_py: a distributed, expert-parallel Mixture-of-Experts layer for one multi-GPU node."""

from .config import PRESETS, ConfigError, MoEConfig, preset
from .hf import patch_model
from .layer import MoELayer, MoEStats
from .placement import ExpertPlacement, PlacementError
from .reference import reference_forward
from .runtime import ConsistencyError, finalize, init

__all__ = ["MoEConfig", "MoELayer", "MoEStats", "ExpertPlacement", "PRESETS", "preset",
           "reference_forward", "init", "finalize", "patch_model", "ConfigError", "PlacementError",
           "ConsistencyError"]
