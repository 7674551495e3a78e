#!/usr/bin/env bash
# Fill .gpu/ (git-excluded) with what tools/gpu_reproduce.sh needs on a GPU machine that has
# PyTorch but no package registry: the pure-Python dependencies as installed here (Detectron2 as
# tools/build_detectron2.py patched it), a Python 3.12 pycocotools wheel, and the UC Merced JPEG
# copy as a tar. Everything must stay under the device tool's 64 MiB carry limit, which leaves no
# room for OpenCV's wheel (about 50 MB): without it, gpu_reproduce.py scores the explanations and
# draws no heatmap images (--vis-per-class defaults to 0).
#
#   bash tools/pack_gpu_carry.sh ../shared/datasets/UCMerced_LandUse_jpg90.tar
set -euo pipefail
tar_path=${1:?usage: pack_gpu_carry.sh UCMerced_LandUse_jpg90.tar}
[ -f "$tar_path" ] || { echo "pack_gpu_carry.sh: $tar_path: no such file" >&2; exit 1; }
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
site=$(.venv/bin/python -c 'import detectron2, os; print(os.path.dirname(os.path.dirname(detectron2.__file__)))')
rm -rf .gpu.new && mkdir -p .gpu.new/site .gpu.new/whl
for package in detectron2 fvcore iopath yacs omegaconf hydra antlr4 termcolor; do
  cp -r "$site/$package" .gpu.new/site/
done
find .gpu.new/site -name __pycache__ -prune -exec rm -rf {} +
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu.new/whl pycocotools==2.0.11
cp "$tar_path" .gpu.new/UCMerced_LandUse_jpg90.tar
rm -rf .gpu && mv .gpu.new .gpu
du -sh .gpu
