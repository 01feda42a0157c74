"""flashmoe_py: a distributed, expert-parallel Mixture-of-Experts layer for one multi-GPU node.

Logging: the package logs graph captures, heap sizing and teardown decisions to the
"flashmoe_py" logger (logging.getLogger("flashmoe_py")), silent unless configured."""

import logging

from .backends.flash import FusedKernelError
from .backends.torch_ep import PeerInputError
from .checkpoint import load_sharded_state_dict, sharded_state_dict
from .config import PRESETS, ConfigError, MoEConfig, preset
from .data_parallel import clip_grad_norm_, prepare_ddp, prepare_fsdp
from .hf import UnsupportedBlock, hf_state_dict, patch_model, unpatch_model
from .layer import MoELayer, MoEStats
from .placement import ExpertPlacement, PlacementError
from .reference import reference_forward
from .runtime import ConsistencyError, finalize, init
from .wrappers import DataParallelError

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["MoEConfig", "MoELayer", "MoEStats", "ExpertPlacement", "PRESETS", "preset",
           "reference_forward", "init", "finalize", "patch_model", "unpatch_model", "hf_state_dict",
           "ConfigError", "PlacementError",
           "ConsistencyError", "PeerInputError", "FusedKernelError", "UnsupportedBlock", "prepare_ddp",
           "prepare_fsdp", "clip_grad_norm_", "DataParallelError",
           "sharded_state_dict", "load_sharded_state_dict"]
