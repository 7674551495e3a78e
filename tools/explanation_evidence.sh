#!/usr/bin/env bash
# The explanation-head comparison on the `make demo` schedule, one seed per call: train
# fpn_baseline and fal_p2p3 (configs/fal_p2p3_R18_cpu.yaml), train an explanation head on each as
# a second stage (configs/explain_head/*_R18_cpu_head.yaml), then score every map of both models
# with tools/explain.py: binary budgets with deletion/insertion, and valued budgets for
# comparison with TAME's tables. Re-running resumes: finished steps are skipped.
#
#   bash tools/explanation_evidence.sh OUT_DIR SEED            # on this machine's CPU
#   DEVICE=cuda WORKERS=6 PY=python3 bash tools/explanation_evidence.sh OUT_DIR SEED
#   python tools/aggregate_explanations.py OUT_DIR/s*/explain_binary/layer_analysis.json \
#       --output OUT_DIR/explanations_binary.md
#
# IMAGES (default 210: 10 per class of ucmerced_test) and AUC_STEPS (default 8) set the scoring;
# MAX_ITER and HEAD_ITER, when set, shorten the two trainings (for a smoke test).
set -euo pipefail
out=${1:?usage: explanation_evidence.sh OUT_DIR SEED}
seed=${2:?usage: explanation_evidence.sh OUT_DIR SEED}
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
device=(MODEL.DEVICE "${DEVICE:-cpu}" DATALOADER.NUM_WORKERS "${WORKERS:-2}")
base_iter=(${MAX_ITER:+SOLVER.MAX_ITER $MAX_ITER})
head_iter=(${HEAD_ITER:+SOLVER.MAX_ITER $HEAD_ITER})
run="$out/s$seed"
mkdir -p "$run"

train() {  # train NAME CONFIG OVERRIDES...: tools/train_net.py into $run/NAME unless finished
  local name=$1 config=$2
  shift 2
  [ -f "$run/$name/model_final.pth" ] && return
  echo "[evidence] seed $seed: training $name ($(date -u +%T))"
  "$PY" tools/train_net.py --config-file "$config" --resume OUTPUT_DIR "$run/$name" SEED "$seed" \
    TEST.EXPLAIN.ENABLED False "${device[@]}" "$@" > "$run/$name.log" 2>&1
}

train fal_p2p3 configs/fal_p2p3_R18_cpu.yaml "${base_iter[@]}"
train fpn_baseline configs/fal_p2p3_R18_cpu.yaml MODEL.FAL.ATTENTION_LEVELS "[]" "${base_iter[@]}"
train fal_p2p3_head configs/explain_head/fal_p2p3_R18_cpu_head.yaml \
  MODEL.WEIGHTS "$run/fal_p2p3/model_final.pth" "${head_iter[@]}"
train fpn_baseline_head configs/explain_head/fpn_baseline_R18_cpu_head.yaml \
  MODEL.WEIGHTS "$run/fpn_baseline/model_final.pth" "${head_iter[@]}"

score() {  # score MODE AUC_STEPS: both head models, every map, p2 and p3
  local mode=$1 steps=$2
  [ -f "$run/explain_$mode/layer_analysis.json" ] && return
  echo "[evidence] seed $seed: scoring, $mode budgets ($(date -u +%T))"
  "$PY" tools/explain.py --config-file configs/explain_head/fal_p2p3_R18_cpu_head.yaml \
    --compare-config configs/explain_head/fpn_baseline_R18_cpu_head.yaml \
    --compare-weights "$run/fpn_baseline_head/model_final.pth" \
    --methods gradcam branch_cam attention head random --levels p2 p3 \
    --max-images "${IMAGES:-210}" --auc-steps "$steps" --mask normalized --budgets 15 50 \
    --budget-mode "$mode" --vis-per-class 1 --output "$run/explain_$mode" \
    --opts MODEL.WEIGHTS "$run/fal_p2p3_head/model_final.pth" TEST.IMS_PER_BATCH 32 \
    "${device[@]}" > "$run/explain_$mode.log" 2>&1
}

score binary "${AUC_STEPS:-8}"
score valued 0
echo "[evidence] seed $seed: done ($(date -u +%T))"
