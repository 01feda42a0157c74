#!/usr/bin/env bash
# Run a flashmoe_py program on every GPU of this node (or NGPUS of them) under Open MPI's mpirun:
# one process per GPU; flashmoe_py.init() reads OMPI_COMM_WORLD_* (or PMI_* under MPICH) and
# brings up torch.distributed (rendezvous address broadcast with mpi4py) and NVSHMEM itself.
#   bash launch/mpirun.sh                          # the layer benchmark, all backends
#   bash launch/mpirun.sh tests/gpu/check_flash.py # the GPU correctness suite
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE  # a torchrun shell's: each process would run alone as world 1
source "$ROOT/launch/count_gpus.sh"
if [ $# -eq 0 ]; then set -- "$ROOT/bench/layer.py" --backends torch symm_mem flash flash_nvshmem; fi
# the program as given from here, else (as in the examples above) from the repository's root
if [ ! -e "$1" ] && [ -e "$ROOT/$1" ]; then set -- "$ROOT/$1" "${@:2}"; fi
exec mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$NGPUS" \
  -x NVSHMEM_DISABLE_NVLS -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x PYTHONPATH \
  -x PYTHONUNBUFFERED -x LD_LIBRARY_PATH -x PATH python3 "$@"
