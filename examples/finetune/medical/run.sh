#!/usr/bin/env bash
# Fine-tunes a LoRA adapter "health-info" on train.jsonl through the cluster, then chats with it
# through the router (base model first, for comparison).
#
#   .venv/bin/llmcluster up &                   # router on 127.0.0.1:50051 + workers
#   examples/finetune/medical/run.sh      # or TARGET=host:port examples/finetune/medical/run.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The repository's own CLI unless LLMCLUSTER names another (e.g. llmcluster on PATH).
LLMCLUSTER="${LLMCLUSTER:-$HERE/../../../.venv/bin/llmcluster}"
TARGET="${TARGET:-${LLMCLUSTER_TARGET:-127.0.0.1:50051}}"
NAME="${NAME:-health-info}"

# Streams a progress bar (step/total, loss), the eval loss before/after and the new
# name@version; exits non-zero if the job fails. EXTRA_FLAGS e.g. "--max-steps 20" for a
# quick run on a small CPU.
$LLMCLUSTER finetune create --data "$HERE/train.jsonl" --name "$NAME" --method lora \
  --epochs 3 --learning-rate 3e-4 --lora-r 16 --batch-size 8 --max-seq-length 256 \
  --target "$TARGET" ${EXTRA_FLAGS:-}

for question in "What helps with a stuffy nose?" "I think I have a mild fever. What should I know?"; do
  echo; echo "### base model: $question"
  $LLMCLUSTER generate --chat "$question" --max-new-tokens 96 --target "$TARGET"
  echo; echo "### $NAME (latest version): $question"
  $LLMCLUSTER generate --chat "$question" --adapter "$NAME" --max-new-tokens 96 --target "$TARGET"
done
