#!/usr/bin/env bash
# The runs behind docs/REPRODUCTION.md, "The two discrepancies": each variant changes one
# thing of a published protocol. Full MNIST in $DATA.
# Usage: docs/discrepancy_runs.sh OUT GROUP, GROUP one of a (fine-tuning forgets too little),
# b (L2 under Adam), c (the Hsu et al. protocols, the methods available), demo (L2 on the demo),
# switch (Adam's update size after a task switch, docs/adam_task_switch.py).
# On the project's shared machine each group ran under the shared lock:
#   flock /work/heavy.lock docs/discrepancy_runs.sh runs/discrepancies a
set -u
OUT=${1:-runs/discrepancies}
GROUP=${2:-a}
DATA=${DATA:-/work/shared/data/mnist}
EWC=${EWC:-.venv/bin/ewc}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
run() {  # run NAME ARGS...: one `ewc run`, its wall time appended to $OUT/times.txt
  local name=$1; shift
  [ -f "$OUT/$name/results.json" ] && return
  local t0=$(date +%s)
  "$EWC" run --data-dir "$DATA" --out "$OUT/$name" --no-progress "$@" > "$OUT/$name.log" 2>&1
  echo "$name $(( $(date +%s) - t0 )) s" >> "$OUT/times.txt"
}
VDV=(--config configs/vandeven2019-split-mnist-task.json --methods finetune)
HSU_T=(--config configs/hsu2018-split-mnist-task.json)
HSU_D=(--config configs/hsu2018-split-mnist-domain.json)
HSU_C=(--config configs/hsu2018-split-mnist-class.json)
DEMO=(--config configs/demo.json --methods finetune,l2 --seeds 0 --eval-every 0)
case $GROUP in
a)  # task-incremental fine-tuning: optimizer kept (published) vs reset (ours before); the
    # iteration count (van de Ven: 2,000 per task; Hsu: 4 epochs = 375) and the 32×32 padding
  run vdv-task-keep   "${VDV[@]}" --seeds 0,1
  run vdv-task-reset  "${VDV[@]}" --seeds 0,1 --reset-optimizer
  run vdv-task-reset-s23   "${VDV[@]}" --seeds 2,3 --reset-optimizer
  run vdv-task-ours-before "${VDV[@]}" --seeds 0 --reset-optimizer --val-fraction 0.1
  run hsu-task-keep   "${HSU_T[@]}" --methods finetune --seeds 0,1,2
  run hsu-task-reset  "${HSU_T[@]}" --methods finetune --seeds 0,1,2 --reset-optimizer
  run hsu-task-nopad  "${HSU_T[@]}" --methods finetune --seeds 0,1,2 --pad 0 --normalize none
  ;;
b)  # L2 under Adam, Hsu et al.'s domain-incremental protocol (λ = 2 · reg_coef 0.5 = 1)
  run hsu-domain-ft           "${HSU_D[@]}" --methods finetune --seeds 0,1,2
  run hsu-domain-l2latest     "${HSU_D[@]}" --methods l2 --seeds 0,1,2 --l2-anchor latest
  run hsu-domain-l2all        "${HSU_D[@]}" --methods l2 --seeds 0,1,2 --l2-anchor all
  run hsu-domain-ft-reset     "${HSU_D[@]}" --methods finetune --seeds 0,1,2 --reset-optimizer
  run hsu-domain-l2latest-reset "${HSU_D[@]}" --methods l2 --seeds 0,1,2 --reset-optimizer
  ;;
c)  # the Hsu et al. protocols with the methods this branch has (SI, MAS come with regularisers)
  run hsu-task-reg    "${HSU_T[@]}" --methods l2,ewc,online-ewc --seeds 0,1
  run hsu-class-all   "${HSU_C[@]}" --methods finetune,l2,ewc,online-ewc --seeds 0,1
  run hsu-domain-ewc  "${HSU_D[@]}" --methods ewc,online-ewc --seeds 0,1
  ;;
demo)  # the demo's λ grid under Adam and SGD, anchored at every past optimum or the latest
  run demo-adam-all     "${DEMO[@]}" --lam l2=0.0001:0.001:0.01 --l2-anchor all
  run demo-adam-latest  "${DEMO[@]}" --lam l2=0.0001:0.001:0.01 --l2-anchor latest
  run demo-sgd-all      "${DEMO[@]}" --lam l2=0.01:0.1:1 --l2-anchor all --optimizer sgd --lr 0.05
  ;;
switch)
  .venv/bin/python docs/adam_task_switch.py "$DATA" > "$OUT/adam_task_switch.txt" 2>&1
  ;;
esac
