#!/usr/bin/env bash
# The prepared GPU run (see benchmarks/gpu.py): every method on resnet18/resnet50/vgg16/ViT-B/16 at
# batch 1 and 64, fp32/bf16/channels-last, CUDA-event timing and peak memory, appended to
# benchmarks/RESULTS.md as a dated section with the card's name. Under 8 minutes of wall time: the
# script stops starting cells after --budget seconds (default 400) and `timeout` is the backstop.
#   bash benchmarks/gpu.sh                                    # on a CUDA machine
#   bash benchmarks/gpu.sh --dry-run --results /tmp/R.md      # CPU rehearsal, tiny models, seconds
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 "${PYTHON:-python}" -m benchmarks.gpu "$@"
