"""Shared test fixtures: tiny CPU-sized fal_d2 configs."""
import importlib.util
import os
import sys

import pytest
import torch

from detectron2.config import get_cfg

import fal_d2  # noqa: F401  (registers models and datasets)
from fal_d2.config import add_fal_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_OVERRIDES = [
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.FAL.BRANCH_CHANNELS", 8,
    "MODEL.CLS_HEAD.NUM_CLASSES", 5,
    "INPUT.CLS.SIZE", 64,
    "INPUT.MIN_SIZE_TEST", 64,
    "INPUT.MAX_SIZE_TEST", 64,
]


def make_tiny_cfg(config_name="fal_p2p3.yaml", *opts):
    """A repo config shrunk to run in milliseconds on the CPU."""
    cfg = get_cfg()
    add_fal_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs", config_name))
    cfg.merge_from_list(TINY_OVERRIDES + list(opts))
    return cfg


def load_script(relative_path):
    """Import a repo script (tools/*.py, datasets/*.py) as a module, registered in sys.modules
    under its file stem so that worker processes can unpickle its functions. A script already
    loaded from the same file is reused, as by import: a second copy under the same name would
    make the first copy's functions unpicklable."""
    path = os.path.join(REPO_ROOT, relative_path)
    name = os.path.splitext(os.path.basename(path))[0]
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__file__", None) == path:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # no half-executed module for the next caller to reuse
        raise
    return module


def tiny_detection_overrides(train_set, val_set, input_size=96):
    """On top of TINY_OVERRIDES: a ResNet-18 detector for small images of 3 classes."""
    return [
        "MODEL.FAL.BRANCH_CHANNELS", 32,  # GroupNorm(32, C) needs C divisible by 32
        "MODEL.CLS_HEAD.NUM_CLASSES", 3,
        "MODEL.ROI_HEADS.NUM_CLASSES", 3,
        "MODEL.RETINANET.NUM_CLASSES", 3,
        "MODEL.ANCHOR_GENERATOR.SIZES", [[16], [32], [64], [128], [256]],
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 64,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 100,
        "MODEL.RPN.POST_NMS_TOPK_TEST", 100,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
        "MODEL.ROI_BOX_HEAD.CONV_DIM", 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
        "INPUT.MIN_SIZE_TRAIN", (input_size,),
        "INPUT.MAX_SIZE_TRAIN", input_size,
        "INPUT.MIN_SIZE_TEST", input_size,
        "INPUT.MAX_SIZE_TEST", input_size,
        "DATASETS.TRAIN", (train_set,),
        "DATASETS.TEST", (val_set,),
        "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.IMS_PER_BATCH", 4,
        "SOLVER.BASE_LR", 0.02,
    ]


@pytest.fixture
def tiny_cfg():
    return make_tiny_cfg


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's many small model calls on one intra-op thread: on 2 cores shared with
    DataLoader workers or gloo processes, threads mostly wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


MINI_ROOT = os.path.join(REPO_ROOT, "tests", "data", "ucmerced_mini")


@pytest.fixture(scope="module")
def mini_datasets():
    """The committed 105-image UC Merced subset as ucmerced_mini_*; yields (train, test) names."""
    from detectron2.data import DatasetCatalog

    from fal_d2.data import register_ucmerced

    names = register_ucmerced(MINI_ROOT, prefix="ucmerced_mini", allow_missing=True)
    yield "ucmerced_mini_train", "ucmerced_mini_test"
    for name in names:
        DatasetCatalog.remove(name)


def mini_train_opts(output_dir, train, test):
    """Overrides for a 3-iteration tools/train_net.py run of a tiny model on the mini set."""
    opts = list(TINY_OVERRIDES)
    opts[opts.index("MODEL.CLS_HEAD.NUM_CLASSES") + 1] = 21
    return [str(o) for o in opts] + [
        "OUTPUT_DIR", str(output_dir),
        "DATASETS.TRAIN", f"('{train}',)",
        "DATASETS.TEST", f"('{test}',)",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "8",
        "SOLVER.BASE_LR", "0.01",
        "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.MAX_ITER", "3",
        "SOLVER.CHECKPOINT_PERIOD", "3",
        "TEST.EVAL_PERIOD", "3",
        "TEST.EXPLAIN.ENABLED", "True",
        "TEST.EXPLAIN.METHODS", "['attention', 'gradcam']",
        "TEST.EXPLAIN.VIS_PER_CLASS", "1",
        "TEST.EXPLAIN.AUC_STEPS", "2",
    ]


def has_compiled_ops():
    """Whether an official Detectron2 (with compiled ops) is installed instead of our build."""
    try:
        import detectron2._C  # noqa: F401
    except ImportError:
        return False
    return True
