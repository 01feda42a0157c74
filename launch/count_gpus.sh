# Sourced by the launch scripts: NGPUS, the processes to start, one a GPU (default: this node's GPUs,
# counted by nvidia-smi; where there is none, NGPUS must be given).
if [ -z "${NGPUS:-}" ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no nvidia-smi here to count GPUs: set NGPUS, the processes to start" \
         "(on a CPU: NGPUS=2 bash launch/torchrun.sh bench/layer.py --backends torch)" >&2
    exit 2
  fi
  NGPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
fi
if ! [[ "$NGPUS" =~ ^[1-9][0-9]*$ ]]; then
  echo "NGPUS=$NGPUS: the processes to start must be a positive number (nvidia-smi found no GPU?)" >&2
  exit 2
fi
