#!/usr/bin/env bash
# Usage: ./distributed_train.sh NUM_PROC [train.py flags...]
# Launches NUM_PROC training processes on this machine with torchrun (DDP: nccl on GPU, gloo on CPU).
# For several machines call torchrun yourself (see the README, "Distributed training").
set -euo pipefail
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROC [train flags...]" >&2
  exit 2
fi
NUM_PROC=$1
shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PY="$HERE/.venv/bin/python"; else PY=python3; fi
fi
# the flags are checked once, here, so that a mistake gives one line (exit 2) rather than one per process
# and torchrun's traceback. Exit status 3: --help was shown, or --check-args asked for the check alone.
rc=0
"$PY" "$HERE/train.py" --before-launch "$@" || rc=$?
if [ "$rc" -eq 3 ]; then exit 0; fi
if [ "$rc" -ne 0 ]; then exit "$rc"; fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NUM_PROC" "$HERE/train.py" "$@"
