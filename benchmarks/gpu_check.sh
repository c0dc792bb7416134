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
# FSDP2 (issue 12): GPT-2 small sharded by fully_shard over every GPU of the machine (NCCL); one
# GPU gives a world of one. Then the tiny preset, checked against an unsharded copy.
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
for dtype in float32 bfloat16; do
  "${TORCHRUN:-.venv/bin/torchrun}" --standalone --nproc_per_node="$NGPU" benchmarks/fsdp_check.py --device cuda \
    --preset gpt2 --dtype "$dtype" --seq 512 --n 16 --batch 4 --json "$OUT/fsdp_gpt2_$dtype.json" \
    | tee "$OUT/fsdp_gpt2_$dtype.txt"
done
"${TORCHRUN:-.venv/bin/torchrun}" --standalone --nproc_per_node="$NGPU" benchmarks/fsdp_check.py --device cuda \
  --preset tiny --json "$OUT/fsdp_tiny.json" | tee "$OUT/fsdp_tiny.txt"
# Lightning ModelParallelStrategy and HF Trainer with FSDP2 need one process per GPU; the CPU
# tests (tests/test_fsdp*.py) cover the same code paths on gloo.
"$PY" -m pytest -q -p no:warnings tests/test_fsdp.py tests/test_fsdp_lightning.py 2>&1 | tail -3 \
  | tee "$OUT/tests_fsdp.txt"
