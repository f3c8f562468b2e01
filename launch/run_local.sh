#!/usr/bin/env bash
# Train on this machine with torchrun: one rank per GPU, or NPROC CPU ranks (gloo) without one.
#   launch/run_local.sh [paradyse-train flags...]        e.g. --config launch/configs/llama_7b.toml
#   NPROC=2 launch/run_local.sh --steps 5                CPU: 2 ranks
# Uses .venv/bin/python when it exists (make setup creates it), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ -z "${NPROC:-}" ]; then
  GPUS=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | wc -l || echo 0)
  NPROC=$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 4)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  -m paradyse.train "$@"
