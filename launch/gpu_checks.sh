#!/usr/bin/env bash
# Every GPU check of the fused backend on this node's GPUs (or NGPUS of them): correctness over both
# transports, bad input / NaN / capacity / heap limits, every kind of stalled peer (timed, one GPU),
# a peer that never launches, a rank killed mid-job, the 10,000-call soak, the patched HF models and
# the gradients of both backends (NCCL), a 200-step training loop of both beside its float64 reference,
# the fused backend's host-side guarantees (one GPU), and the fused kernel at worlds 2, 4 and 8 with
# every rank on one GPU (the multi-rank protocol where only one GPU is lent), and a layer built with its
# kernel variants compiled (no first forward compiles one; one GPU).
# Logs and JSON go to OUT.
#   bash launch/gpu_checks.sh                      # all of them
#   STEPS="soak faults" NGPUS=2 bash launch/gpu_checks.sh
set -euo pipefail
if [ -n "${OUT:-}" ]; then OUT=$(realpath -m -- "$OUT"); fi  # from the caller's directory, not the root's
cd "$(dirname "$0")/.."
source launch/count_gpus.sh
if ! command -v nvidia-smi >/dev/null 2>&1 && [ ! -e /proc/driver/nvidia/version ]; then
  echo "gpu_checks.sh: no NVIDIA driver here (no nvidia-smi, no /proc/driver/nvidia): the GPU checks" \
       "need GPUs; on a CPU the tests are: python -m pytest -q tests" >&2  # (every step failed in turn)
  exit 2
fi
export OUT=${OUT:-bench/results/gpu-checks-$(date -u +%F)-w$NGPUS}
steps=()
default="check nvcheck inputs timeouts faults killed soak hf backward training host ranks compile"
[ "$NGPUS" -gt 1 ] || default=${default/faults killed /}  # a stalled or killed peer needs a peer
for s in ${STEPS:-$default}; do steps+=("$s$NGPUS"); done
[ -n "${STEPS:-}" ] || [ "$NGPUS" -eq 1 ] || steps+=(backward1)  # the world-1-only backward cases
exec bash bench/device_run.sh "${steps[@]}"
