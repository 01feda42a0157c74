#!/usr/bin/env bash
set -u
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
BASEPP=${PYTHONPATH:-}; export PYTHONPATH=$PWD:$BASEPP FLASHMOE_COMMIT=865aabc+side_stream_wgrad
pack() { tar -czf /tmp/all.tgz -C "$OUT" --exclude all.tgz . && mv /tmp/all.tgz "$OUT/all.tgz"; }
FB_PRESETS="deepseek_v3 qwen3_30b_a3b" TOKENS=4096 VARIANT_ROUNDS=2 timeout -k 10 400 bash bench/device_run.sh fbvariants 2>&1 | grep -E "===|flash"
pack
