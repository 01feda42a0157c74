#!/usr/bin/env bash
# Run a flashmoe_py program on every GPU of this node (or NGPUS of them) under torchrun.
#   bash launch/torchrun.sh                          # the layer benchmark, every backend
#   bash launch/torchrun.sh tests/gpu/check_flash.py # the GPU correctness suite
#   NGPUS=2 bash launch/torchrun.sh bench/layer.py --preset mixtral_8x7b
# NVLink multicast stays off: it can take a shared host's GPUs down.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
source "$ROOT/launch/count_gpus.sh"
if [ $# -eq 0 ]; then set -- "$ROOT/bench/layer.py" --backends torch symm_mem flash flash_nvshmem; fi
# the program as given from here, else (as in the examples above) from the repository's root
if [ ! -e "$1" ] && [ -e "$ROOT/$1" ]; then set -- "$ROOT/$1" "${@:2}"; fi
exec torchrun --standalone --nproc-per-node "$NGPUS" "$@"
