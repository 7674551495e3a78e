#!/usr/bin/env python3
"""Build a pure-Python Detectron2 v0.6 from PyPI's ``pb1-detectron2==0.6`` sdist.

The sdist holds the official v0.6 Python sources without the C++/CUDA sources, so its own
``setup.py`` cannot build. We copy the ``detectron2`` package into ``--target`` and apply the
smallest patches that make v0.6 import and run on today's libraries:

* ``from detectron2 import _C`` at module level (layers, fast COCOeval) becomes a lazy stand-in
  that raises :class:`CompiledOpsUnavailableError` naming the op when a compiled-only op is used;
* Pillow >= 10 removed ``Image.LINEAR`` (an alias of ``Image.BILINEAR``);
* ``detectron2.model_zoo`` used ``pkg_resources``, which new setuptools no longer ships;
* NumPy >= 1.24 removed the ``np.bool``/``np.int``/``np.float`` aliases;
* ``detectron2.export`` imported caffe2 (no longer in PyTorch) at module level, which broke
  ``TracingAdapter``, torchscript export and ``detectron2.utils.analysis``: caffe2 is optional;
* ``MapDataset``'s retry, when a mapper returns None, called ``random.sample`` on a set, which
  Python 3.11 rejects;
* the ``LRScheduler`` hook saved and restored only ``_LRScheduler`` subclasses, so on torch 2.x
  ``--resume`` restarted a ``torch.optim`` schedule such as ``StepLR``;
* ``launch()`` required CUDA and NCCL, and ``create_ddp_model`` passed ``device_ids`` for a model
  on the CPU: several processes now train on the CPU with gloo;
* ``torch.jit.script`` warns (FutureWarning) on current PyTorch, and ``detectron2.modeling``
  scripted two classes at import, so every program began with deprecation warnings: they are
  scripted as before, without the warning. fvcore, which ``requirements.txt`` installed into the
  same ``--target``, gets the same patch for its two scripted focal losses.

Where upstream Detectron2 later fixed a defect, the patch does what upstream did (commit cited
beside it).

Each patch asserts that its original text is present, so a different sdist fails loudly instead
of producing a half-patched tree. Nothing is patched at import time: the result behaves the same
in any fresh interpreter, whatever is imported first.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request

SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
INDEX_URL = "https://pypi.org/simple/pb1-detectron2/"

COMPILED_OPS_MODULE = '''"""Stand-in for ``detectron2._C`` in a Detectron2 built without compiled ops (added by fal_d2).

Pure-Python code paths work as usual; using a compiled-only op raises an error that names it.
"""
import importlib

import torch

try:
    _C = importlib.import_module("detectron2._C")
    HAS_COMPILED_OPS = True
except ImportError:
    HAS_COMPILED_OPS = False

_DESCRIPTIONS = {
    "deform_conv": "deformable convolution",
    "modulated_deform_conv": "modulated deformable convolution",
    "box_iou_rotated": "rotated box IoU",
    "nms_rotated": "rotated NMS",
    "roi_align_rotated": "ROIAlignRotated",
    "COCOeval": "fast COCOeval (use COCOEvaluator(..., use_fast_impl=False))",
    "InstanceAnnotation": "fast COCOeval (use COCOEvaluator(..., use_fast_impl=False))",
}


class CompiledOpsUnavailableError(RuntimeError):
    """A compiled-only Detectron2 op was used in a build without compiled ops."""


def _describe(name):
    for prefix, description in _DESCRIPTIONS.items():
        if name.startswith(prefix):
            return description
    return "a compiled op"


def _unavailable(name):
    return CompiledOpsUnavailableError(
        f"detectron2 op '{name}' ({_describe(name)}) needs compiled ops, but this Detectron2 was "
        "built without compiled ops (pure-Python build from pb1-detectron2==0.6). Install the "
        "official Detectron2 to use it."
    )


class _MissingCompiledOps:
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise _unavailable(name)


def compiled_op(name):
    """Return ``torch.ops.detectron2.<name>``, or raise a clear error when it is not compiled."""
    if not HAS_COMPILED_OPS:
        raise _unavailable(name)
    return getattr(torch.ops.detectron2, name)


if not HAS_COMPILED_OPS:
    _C = _MissingCompiledOps()
'''

# torch.jit.script warns (FutureWarning) on current PyTorch. Detectron2 and fvcore script a few
# functions and classes at import; the warning is about PyTorch's API, which no user of them can
# act on, so those call sites script without it. What is scripted, and when, is unchanged.
SCRIPT_QUIETLY = '''

def _script_quietly(obj):
    """``torch.jit.script(obj)`` without its deprecation warning (added by fal_d2's build)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        return torch.jit.script(obj)
'''

IMPORT_C = "from detectron2 import _C\n"
LAZY_C = "from detectron2._compiled_ops import _C\n"

PATCHES = [
    ("layers/deform_conv.py", IMPORT_C, LAZY_C),
    ("layers/rotated_boxes.py", IMPORT_C, LAZY_C),
    ("layers/roi_align_rotated.py", IMPORT_C, LAZY_C),
    ("evaluation/fast_eval_api.py", IMPORT_C, LAZY_C),
    (
        "layers/nms.py",
        "    return torch.ops.detectron2.nms_rotated(boxes, scores, iou_threshold)",
        "    from detectron2._compiled_ops import compiled_op\n\n"
        '    return compiled_op("nms_rotated")(boxes, scores, iou_threshold)',
    ),
    ("data/transforms/transform.py", "interp=Image.LINEAR", "interp=Image.BILINEAR"),
    ("model_zoo/model_zoo.py", "import pkg_resources\n", ""),
    (
        "model_zoo/model_zoo.py",
        'cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", '
        'os.path.join("configs", config_path)\n    )',
        'cfg_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", '
        "config_path)",
    ),
    ("structures/masks.py", "astype(np.bool)", "astype(bool)"),
    ("evaluation/pascal_voc_evaluation.py", ".astype(np.bool)\n", ".astype(bool)\n"),
    ("evaluation/sem_seg_evaluation.py", "dtype=np.int)", "dtype=int)"),
    ("evaluation/sem_seg_evaluation.py", "np.float)", "float)"),
    # caffe2 is optional, as upstream made it (48b598b4, "Add support for ONNX-only"): the
    # caffe2 API loads only when caffe2 imports; TracingAdapter and torchscript always do.
    (
        "export/__init__.py",
        "from .api import *\nfrom .flatten import TracingAdapter\n"
        "from .torchscript import scripting_with_instances, dump_torchscript_IR\n",
        "from .flatten import TracingAdapter\n"
        "from .torchscript import scripting_with_instances, dump_torchscript_IR\n\n"
        "try:\n"
        "    from caffe2.proto import caffe2_pb2 as _caffe2_pb2  # noqa: F401\n"
        "except ImportError:\n"
        "    pass  # caffe2 is optional: current PyTorch no longer ships it\n"
        "else:\n"
        "    from .api import *\n",
    ),
    # Python 3.11's random.sample takes a sequence, not a set (upstream 400a49c1).
    (
        "data/common.py",
        "self._rng.sample(self._fallback_candidates, k=1)",
        "self._rng.sample(list(self._fallback_candidates), k=1)",
    ),
    # torch 2.x schedulers (StepLR...) derive from LRScheduler, not _LRScheduler (upstream
    # 21080971 checks LRScheduler; detectron2's own LRMultiplier derives from both).
    (
        "engine/hooks.py",
        "isinstance(self.scheduler, torch.optim.lr_scheduler._LRScheduler)",
        "isinstance(self.scheduler, torch.optim.lr_scheduler.LRScheduler)",
    ),
    # launch() on a machine without CUDA: gloo, no CUDA device (upstream b4b6cc9c).
    (
        "engine/launch.py",
        '    assert torch.cuda.is_available(), "cuda is not available. Please check your installation."\n',
        "    has_gpu = torch.cuda.is_available()\n",
    ),
    ("engine/launch.py", 'backend="NCCL",', 'backend="NCCL" if has_gpu else "GLOO",'),
    (
        "engine/launch.py",
        "    assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        "    torch.cuda.set_device(local_rank)\n",
        "    if has_gpu:\n"
        "        assert num_gpus_per_machine <= torch.cuda.device_count()\n"
        "        torch.cuda.set_device(local_rank)\n",
    ),
    # DistributedDataParallel rejects device_ids for a module on the CPU (not fixed upstream).
    (
        "engine/defaults.py",
        '    if "device_ids" not in kwargs:\n',
        '    if "device_ids" not in kwargs and any(p.is_cuda for p in model.parameters()):\n',
    ),
    # Box2BoxTransform(Rotated) are TorchScript classes, compiled at import: see SCRIPT_QUIETLY.
    ("modeling/box_regression.py", "import math\n", "import math\nimport warnings\n"),
    (
        "modeling/box_regression.py",
        "from detectron2.structures import Boxes\n",
        "from detectron2.structures import Boxes\n" + SCRIPT_QUIETLY,
    ),
    (
        "modeling/box_regression.py",
        "@torch.jit.script\nclass Box2BoxTransform(object):",
        "@_script_quietly\nclass Box2BoxTransform(object):",
    ),
    (
        "modeling/box_regression.py",
        "@torch.jit.script\nclass Box2BoxTransformRotated(object):",
        "@_script_quietly\nclass Box2BoxTransformRotated(object):",
    ),
]


# (path relative to the --target directory, original text, replacement), like PATCHES.
FVCORE_PATCHES = [
    ("fvcore/nn/focal_loss.py", "\nimport torch\n", "\nimport warnings\n\nimport torch\n"),
    (
        "fvcore/nn/focal_loss.py",
        "from torch.nn import functional as F\n",
        "from torch.nn import functional as F\n" + SCRIPT_QUIETLY,
    ),
    (
        "fvcore/nn/focal_loss.py",
        'sigmoid_focal_loss_jit: "torch.jit.ScriptModule" = torch.jit.script(sigmoid_focal_loss)',
        'sigmoid_focal_loss_jit: "torch.jit.ScriptModule" = _script_quietly(sigmoid_focal_loss)',
    ),
    (
        "fvcore/nn/focal_loss.py",
        'sigmoid_focal_loss_star_jit: "torch.jit.ScriptModule" = torch.jit.script(\n',
        'sigmoid_focal_loss_star_jit: "torch.jit.ScriptModule" = _script_quietly(\n',
    ),
]


def fetch_sdist(cache_dir):
    """Download the sdist once into ``cache_dir`` and check its sha256."""
    path = os.path.join(cache_dir, SDIST_NAME)
    if not os.path.exists(path):
        request = urllib.request.Request(
            INDEX_URL, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            files = json.load(response)["files"]
        url = next(f["url"] for f in files if f["filename"] == SDIST_NAME)
        with urllib.request.urlopen(url, timeout=300) as response:
            payload = response.read()
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"error: {path}: sha256 {digest} != expected {SDIST_SHA256}")
    return path


def apply_patches(root, patches):
    """Apply (path relative to ``root``, original text, replacement) patches in order."""
    for relpath, old, new in patches:
        path = os.path.join(root, relpath)
        with open(path) as f:
            text = f.read()
        if old not in text:
            raise SystemExit(f"error: {path}: expected text to patch not found: {old!r}")
        with open(path, "w") as f:
            f.write(text.replace(old, new))


def build(target, cache_dir):
    sdist = fetch_sdist(cache_dir)
    final = os.path.join(target, "detectron2")
    staging = tempfile.mkdtemp(dir=target, prefix=".detectron2-build-")
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/detectron2/" in m.name]
            tar.extractall(staging, members=members, filter="data")
        package_dir = os.path.join(staging, "pb1-detectron2-0.6", "detectron2")
        apply_patches(package_dir, PATCHES)
        with open(os.path.join(package_dir, "_compiled_ops.py"), "w") as f:
            f.write(COMPILED_OPS_MODULE)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(package_dir, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    apply_patches(target, FVCORE_PATCHES)
    dist_info = os.path.join(target, "detectron2-0.6.dist-info")
    os.makedirs(dist_info, exist_ok=True)
    with open(os.path.join(dist_info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: detectron2\nVersion: 0.6\n"
                "Summary: Detectron2 v0.6, pure-Python build (no compiled ops) by fal_d2\n")
    with open(os.path.join(dist_info, "INSTALLER"), "w") as f:
        f.write("fal_d2\n")
    with open(os.path.join(dist_info, "RECORD"), "w") as f:
        f.write("")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True,
                        help="site directory holding requirements.txt's packages, to install into")
    parser.add_argument("--cache-dir", default=os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fal_d2"),
        help="where the downloaded sdist is kept")
    args = parser.parse_args(argv)
    os.makedirs(args.target, exist_ok=True)
    build(args.target, args.cache_dir)
    print(f"built pure-Python detectron2 0.6 into {args.target}")


if __name__ == "__main__":
    sys.exit(main())
