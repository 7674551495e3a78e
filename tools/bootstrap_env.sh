#!/usr/bin/env bash
# Create (or reuse) the project's Python environment at ./.venv.
#
# Why this shape: torch's CUDA wheels are ~5.5 GB and CI clones afresh on every run. The heavy,
# pinned dependencies (requirements.txt plus a pure-Python Detectron2) are installed once into a
# content-addressed cache directory shared by every checkout; ./.venv is a small per-checkout
# virtual environment that sees that directory through a .pth file and holds fal_d2 in editable
# mode. A cache entry is built in a temporary directory and renamed into place, so an interrupted
# build never leaves a half-written environment behind.
#
# Environment variables:
#   PYTHON        interpreter to build on (default: python3.11, else python3)
#   FAL_D2_CACHE  cache root (default: $XDG_CACHE_HOME/fal_d2 or ~/.cache/fal_d2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
CACHE="${FAL_D2_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fal_d2}"
UV_VERSION="0.13.9"
mkdir -p "$CACHE"

# uv: taken from PATH, else installed once into the cache.
UV="$(command -v uv || true)"
if [ -z "$UV" ]; then
    UV="$CACHE/uv-$UV_VERSION/bin/uv"
    if [ ! -x "$UV" ]; then
        echo "[bootstrap] installing uv $UV_VERSION into $CACHE"
        rm -rf "$CACHE/uv-$UV_VERSION.tmp"
        "$PYTHON" -m venv "$CACHE/uv-$UV_VERSION.tmp"
        "$CACHE/uv-$UV_VERSION.tmp/bin/python" -m pip install -q "uv==$UV_VERSION"
        rm -rf "$CACHE/uv-$UV_VERSION"
        mv "$CACHE/uv-$UV_VERSION.tmp" "$CACHE/uv-$UV_VERSION"
    fi
fi

PYVER="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
KEY="$(cat requirements.txt tools/build_detectron2.py | sha256sum | cut -c1-16)"
DEPS="$CACHE/deps-py$PYVER-$KEY"

if [ ! -f "$DEPS/.complete" ]; then
    echo "[bootstrap] building dependency cache $DEPS (first time only; ~5.5 GB, a few minutes)"
    TMP="$(mktemp -d "$CACHE/deps-tmp.XXXXXX")"
    trap 'rm -rf "$TMP"' EXIT
    "$UV" pip install --quiet --python "$PYTHON" --target "$TMP" -r requirements.txt
    "$PYTHON" tools/build_detectron2.py --target "$TMP" --cache-dir "$CACHE"
    touch "$TMP/.complete"
    # Another checkout may have finished the same entry first: keep theirs.
    mv -T "$TMP" "$DEPS" 2>/dev/null || rm -rf "$TMP"
    trap - EXIT
fi

if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating .venv"
    "$UV" venv --quiet --python "$PYTHON" .venv
fi
SITE="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "import site; site.addsitedir('$DEPS')" > "$SITE/_fal_d2_deps.pth"

if ! .venv/bin/python -I -c 'import fal_d2' 2>/dev/null; then
    "$UV" pip install --quiet --python .venv/bin/python --no-deps --no-build-isolation -e .
fi

.venv/bin/python - <<'EOF'
import detectron2, torch
try:
    import detectron2._C  # noqa: F401
    kind = "official, with compiled ops"
except ImportError:
    kind = "pure-Python build, no compiled ops"
print(f"[bootstrap] .venv ready: torch {torch.__version__}, detectron2 {detectron2.__version__} ({kind})")
EOF
