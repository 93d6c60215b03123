#!/usr/bin/env bash
# Single-machine quick start: score and reorder a teacher, then list the MiniDisc candidates.
#
#   TEACHER=/models/llama-2-7b-hf DATA=/data/calib.jsonl OUT=/runs/llama7b-pruned \
#       bash launch_scripts/prune_single_node.sh [extra `minidisc prune` options]
#
# Environment:
#   TEACHER        Hugging Face checkpoint directory (LLaMA, Mistral, Qwen2, Qwen3, OPT) with its tokenizer (required)
#   DATA           calibration data: .txt, .jsonl, .parquet, .csv or a save_to_disk folder (required)
#   OUT            output directory for the reordered teacher and pruning.json         (required)
#   DEVICE         torch device for calibration                                        (default: cuda if present, else cpu)
#   CALIB_SAMPLES  calibration blocks                                                  (default: 64)
#   SEQ_LEN        tokens per block                                                    (default: 512)
set -euo pipefail

for name in TEACHER DATA OUT; do
  if [ -z "${!name:-}" ]; then
    echo "prune_single_node.sh: set $name (see the header of $0 for what it means)" >&2
    exit 2
  fi
done
if [ -z "${DEVICE:-}" ]; then
  DEVICE=$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
fi

exec minidisc prune --teacher "$TEACHER" --data "$DATA" --out "$OUT" --device "$DEVICE" \
  --calib-samples "${CALIB_SAMPLES:-64}" --calib-seq-len "${SEQ_LEN:-512}" "$@"
