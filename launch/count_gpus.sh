# Sourced by the launch scripts: NGPUS, the processes to start, one a GPU (default: the GPUs this job
# may use, CUDA_VISIBLE_DEVICES's where it is set, else this node's, counted by nvidia-smi; where
# there is neither, NGPUS must be given).
if [ -z "${NGPUS:-}" ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    NGPUS=0  # CUDA's rule: the entries before the first one that names no GPU (-1, NoDevFiles, empty)
    for dev in "${visible[@]}"; do
      dev=$(echo "$dev" | tr -d '[:space:]')
      [[ "$dev" =~ ^([0-9]+|GPU-.+|MIG-.+)$ ]] || break
      NGPUS=$((NGPUS + 1))
    done
  elif ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no nvidia-smi here to count GPUs: set NGPUS, the processes to start" \
         "(on a CPU: NGPUS=2 bash launch/torchrun.sh bench/layer.py --backends torch)" >&2
    exit 2
  elif ! listed=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>&1); then
    echo "nvidia-smi failed to list the GPUs ($listed): set NGPUS, the processes to start" >&2
    exit 2
  else  # its index lines, not a warning it printed beside them (grep -c exits 1 when it counts none)
    NGPUS=$(printf '%s\n' "$listed" | grep -cE '^ *[0-9]+ *$' || true)
  fi
fi
if ! [[ "$NGPUS" =~ ^[1-9][0-9]*$ ]]; then
  echo "NGPUS=$NGPUS: the processes to start must be a positive number (no GPU visible?)" >&2
  exit 2
fi
