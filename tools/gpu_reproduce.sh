#!/usr/bin/env bash
# tools/gpu_reproduce.py on a lent GPU machine (no package registry): install what
# tools/pack_gpu_carry.sh put in .gpu/, unpack the UC Merced JPEG copy, then run it with "$@".
# The device tool returns at most 8 files from $OUT, so the work happens in /tmp/fal_d2_gpu and
# $OUT gets summary.json and results.tar.gz (every small output: JSON, tables, grids, logs; no
# weights). GPU_TIME_LIMIT_S (default 570) stops the run in time for that packing.
#
#   device run, carry [".gpu"]:  bash tools/gpu_reproduce.sh --stages cost
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-output}
work=/tmp/fal_d2_gpu
mkdir -p "$out" "$work"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fal_d2_site .gpu/whl/*.whl
export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/fal_d2_site PYTHONUNBUFFERED=1
export DETECTRON2_DATASETS=/tmp/fal_d2_datasets
if [ ! -d "$DETECTRON2_DATASETS/UCMerced_LandUse/Images" ]; then
  mkdir -p "$DETECTRON2_DATASETS"
  tar xf .gpu/UCMerced_LandUse_jpg90.tar -C "$DETECTRON2_DATASETS"
  mv "$DETECTRON2_DATASETS/UCMerced_LandUse_jpg90" "$DETECTRON2_DATASETS/UCMerced_LandUse"
fi
status=0
timeout "${GPU_TIME_LIMIT_S:-570}" python3 tools/gpu_reproduce.py --output "$work" "$@" || status=$?
cp "$work/summary.json" "$out/" 2>/dev/null || true
(cd "$work" && find . \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.yaml' \
   -o -path './analysis/figures/*.png' -o -name '*log.txt' \) -print0 \
 | tar czf "$out/results.tar.gz" --null -T -)
exit $status
