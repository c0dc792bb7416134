#!/usr/bin/env bash
# The runs behind docs/REPRODUCTION.md, "The two discrepancies": each variant changes one
# thing of a published protocol. Full MNIST in $DATA; every training goes through the shared
# lock of the project's machine (drop `flock` elsewhere). Usage: docs/discrepancy_runs.sh OUT
set -u
OUT=${1:-runs/discrepancies}
DATA=${DATA:-/work/shared/data/mnist}
EWC=${EWC:-.venv/bin/ewc}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
run() {  # run NAME ARGS...: one `ewc run`, its wall time appended to $OUT/times.txt
  local name=$1; shift
  [ -f "$OUT/$name/results.json" ] && return
  local t0=$(date +%s)
  flock /work/heavy.lock "$EWC" run --data-dir "$DATA" --out "$OUT/$name" --no-progress "$@" \
    > "$OUT/$name.log" 2>&1
  echo "$name $(( $(date +%s) - t0 )) s" >> "$OUT/times.txt"
}
VDV=(--config configs/vandeven2019-split-mnist-task.json --methods finetune)
HSU_T=(--config configs/hsu2018-split-mnist-task.json)
HSU_D=(--config configs/hsu2018-split-mnist-domain.json)
# (a) task-incremental fine-tuning: optimizer kept (published) vs reset (ours before), then
#     the iteration count (Hsu's 4 epochs = 375 steps vs 2,000) and the 32×32 padding.
run vdv-task-keep     "${VDV[@]}" --seeds 0,1,2
run vdv-task-reset    "${VDV[@]}" --seeds 0,1,2 --reset-optimizer
run hsu-task-keep     "${HSU_T[@]}" --methods finetune --seeds 0,1,2
run hsu-task-reset    "${HSU_T[@]}" --methods finetune --seeds 0,1,2 --reset-optimizer
run hsu-task-nopad    "${HSU_T[@]}" --methods finetune --seeds 0,1,2 --pad 0 --normalize none
run hsu-task-2000it   "${HSU_T[@]}" --methods finetune --seeds 0,1,2 --iterations 2000
# (b) L2 under Adam, Hsu et al.'s domain-incremental protocol (λ = 2 · reg_coef 0.5 = 1)
run hsu-domain-ft     "${HSU_D[@]}" --methods finetune --seeds 0,1,2
run hsu-domain-l2latest "${HSU_D[@]}" --methods l2 --seeds 0,1,2 --l2-anchor latest
run hsu-domain-l2all  "${HSU_D[@]}" --methods l2 --seeds 0,1,2 --l2-anchor all
run hsu-domain-l2latest-reset "${HSU_D[@]}" --methods l2 --seeds 0,1,2 --l2-anchor latest --reset-optimizer
run hsu-domain-ft-reset "${HSU_D[@]}" --methods finetune --seeds 0,1,2 --reset-optimizer
# (b) continued, on the demo (10 permuted tasks of the 5,000 embedded digits, 5 epochs):
#     the same λ grid under Adam and under SGD, anchored at every past optimum or the latest.
DEMO=(--config configs/demo.json --methods finetune,l2 --seeds 0,1 --eval-every 0)
run demo-adam-all     "${DEMO[@]}" --lam l2=0.0001:0.001:0.01 --l2-anchor all
run demo-adam-latest  "${DEMO[@]}" --lam l2=0.0001:0.001:0.01 --l2-anchor latest
run demo-sgd-all      "${DEMO[@]}" --lam l2=0.01:0.1:1 --l2-anchor all --optimizer sgd --lr 0.05
run demo-sgd-latest   "${DEMO[@]}" --lam l2=0.01:0.1:1 --l2-anchor latest --optimizer sgd --lr 0.05
