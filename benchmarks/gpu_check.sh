#!/usr/bin/env bash
# The GPU check of issue 4, for a lent GPU machine: the per-sequence Fisher and the EWC penalty of
# GPT-2 small (124M parameters, built from a config, nothing downloaded) on CUDA, float32 and
# bfloat16 models, bfloat16 Fisher storage; times as ratios to one forward+backward pass and peak
# memory. Results go to $OUT (or ./gpu-results). About 3 minutes on an H100-class GPU.
#
#   bash benchmarks/gpu_check.sh            # needs the venv of `make test` (transformers in it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
"$PY" - <<'PY' | tee "$OUT/env.txt"
import torch
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
PY
for dtype in float32 bfloat16; do
  "$PY" benchmarks/bench_lm.py --preset gpt2 --device cuda --dtype "$dtype" --seq 512 --n 64 \
    --batch 8 --rounds 3 --json "$OUT/lm_gpt2_$dtype.json" | tee "$OUT/lm_gpt2_$dtype.txt"
done
"$PY" -m pytest -q -p no:warnings tests/test_lm_fisher.py tests/test_penalty.py 2>&1 | tail -3 | tee "$OUT/tests.txt"
