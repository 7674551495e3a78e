#!/usr/bin/env bash
# tools/gpu_reproduce.py on a lent GPU machine (no package registry): install what
# tools/pack_gpu_carry.sh put in .gpu/, unpack the UC Merced JPEG copy, then run it with "$@".
# Results go to $OUT/gpu; $OUT/results.tar.gz holds every small output (no weights).
#
#   device run, carry [".gpu"]:  bash tools/gpu_reproduce.sh --stages cost
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-output}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fal_d2_site .gpu/whl/*.whl
export PYTHONPATH=$PWD:$PWD/.gpu/site:/tmp/fal_d2_site PYTHONUNBUFFERED=1
export DETECTRON2_DATASETS=/tmp/fal_d2_datasets
if [ ! -d "$DETECTRON2_DATASETS/UCMerced_LandUse/Images" ]; then
  mkdir -p "$DETECTRON2_DATASETS"
  tar xf .gpu/UCMerced_LandUse_jpg90.tar -C "$DETECTRON2_DATASETS"
  mv "$DETECTRON2_DATASETS/UCMerced_LandUse_jpg90" "$DETECTRON2_DATASETS/UCMerced_LandUse"
fi
status=0
python3 tools/gpu_reproduce.py --output "$out/gpu" "$@" || status=$?
(cd "$out" && find gpu \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.yaml' \
   -o -name 'grid_*.png' -o -name 'confusion_matrix.png' -o -name '*log.txt' \) -print0 \
 | tar czf results.tar.gz --null -T -)
exit $status
