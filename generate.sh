#!/usr/bin/env bash
# Caption a dataset (a JSON/JSONL list, webdataset tar shards or Parquet) with one model, one process per GPU:
#
#   bash generate.sh INPUT MODEL [ARGS...]      MODEL: internvl, qwen, llava or minigpt4
#
# ARGS go to MODEL.py (see `python MODEL.py --help`). Processes never talk to each other: each takes
# its rank and world size from the environment and captions its own shard of INPUT.
#   NUM_GPUS      processes on this node (default: the GPUs that CUDA_VISIBLE_DEVICES leaves; with no
#                 GPU, one process on the CPU), started by utils/launch.py
#   NNODES, NODE_RANK   several nodes: run this on each, NODE_RANK 0 to NNODES-1 (no MASTER_ADDR needed)
#   Under SLURM (srun sets SLURM_PROCID/SLURM_NTASKS), each task runs its one process directly.
set -euo pipefail

if [ $# -lt 2 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  [ $# -ge 2 ] && exit 0 || exit 2
fi
INPUT=$1
MODEL=$2
shift 2
case "$MODEL" in
  internvl|qwen|llava|minigpt4) ;;
  *) echo "generate.sh: unknown model '$MODEL' (choose internvl, qwen, llava or minigpt4)" >&2; exit 2 ;;
esac
if [ ! -e "$INPUT" ] && [[ "$INPUT" != *"{"* ]]; then  # a file, a folder of shards, or a pattern {00000..00099}
  echo "generate.sh: $INPUT: no such file or folder" >&2
  exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}
SCRIPT=("$HERE/$MODEL.py" --input-json "$INPUT" "$@")

if [ -n "${SLURM_PROCID:-}" ] && [ -n "${SLURM_NTASKS:-}" ]; then
  exec "$PYTHON" "${SCRIPT[@]}"
fi
if [ -z "${NUM_GPUS:-}" ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    NUM_GPUS=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
  else
    NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
fi
NNODES=${NNODES:-1}
[ "$NUM_GPUS" -ge 1 ] || NUM_GPUS=1
if [ "$NUM_GPUS" -eq 1 ] && [ "$NNODES" -eq 1 ]; then
  exec "$PYTHON" "${SCRIPT[@]}"
fi
if [ "$NNODES" -gt 1 ] && [ -z "${NODE_RANK:-}" ]; then
  echo "generate.sh: set NODE_RANK (0 to $((NNODES - 1))) for several nodes" >&2
  exit 2
fi
# One check before the launch: a mistake then reads as one line, not once per process.
RANK=0 WORLD_SIZE=$((NUM_GPUS * NNODES)) "$PYTHON" "${SCRIPT[@]}" --check-input
exec "$PYTHON" "$HERE/utils/launch.py" --nproc "$NUM_GPUS" --nnodes "$NNODES" --node-rank "${NODE_RANK:-0}" \
  -- "$PYTHON" "${SCRIPT[@]}"
