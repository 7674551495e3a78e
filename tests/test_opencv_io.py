"""OpenCV at the user-facing edges: predictors take ``cv2.imread`` output, overlays are drawn as
pytorch-grad-cam draws them; without OpenCV, explanations are still scored."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from pytorch_grad_cam.utils.image import show_cam_on_image

from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultPredictor

from fal_d2.data.mapper import ClassificationDatasetMapper
from fal_d2.explain.visualize import overlay_heatmap
from fal_d2.predictor import FALPredictor

from conftest import MINI_ROOT, REPO_ROOT, make_tiny_cfg

SQUARE_IMAGE = os.path.join(MINI_ROOT, "Images", "airplane", "airplane02.jpg")  # 256 x 256


def _assert_same_output(actual, expected):
    assert actual["pred_class"] == expected["pred_class"]
    torch.testing.assert_close(actual["scores"], expected["scores"])
    assert set(actual["class_map"]) == set(expected["class_map"]) == {"p2", "p3"}
    for level in expected["class_map"]:
        torch.testing.assert_close(actual["class_map"][level], expected["class_map"][level])


@pytest.fixture(scope="module")
def weighted_cfg(tmp_path_factory, mini_datasets, one_thread):
    """A tiny classifier of the mini set with its (random) weights saved, so that FALPredictor
    and DefaultPredictor load the same model."""
    _, test = mini_datasets
    cfg = make_tiny_cfg("fal_p2p3.yaml", "MODEL.CLS_HEAD.NUM_CLASSES", 21, "DATASETS.TEST", (test,))
    assert cfg.INPUT.FORMAT == "RGB"  # the case where BGR input must be converted
    model = FALPredictor(cfg, allow_random_weights=True).model
    weights = str(tmp_path_factory.mktemp("weights") / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    cfg.MODEL.WEIGHTS = weights
    return cfg


def _evaluation_path_output(cfg, file_name):
    """What the evaluator computes for a mini-set image: the test mapper reads it as RGB
    (Detectron2's read_image, INPUT.FORMAT) and the model runs on the mapped dict."""
    (record,) = [r for r in DatasetCatalog.get(cfg.DATASETS.TEST[0]) if r["file_name"] == file_name]
    mapper = ClassificationDatasetMapper(cfg, is_train=False)
    model = FALPredictor(cfg).model
    with torch.no_grad():
        return model([mapper(record)])[0]


@pytest.mark.parametrize("name", ["airplane/airplane02.jpg", "golfcourse/golfcourse06.jpg"],
                         ids=["square", "251x256"])
def test_fal_predictor_on_cv2_imread_matches_the_evaluation_path(weighted_cfg, name):
    path = os.path.join(MINI_ROOT, "Images", name)
    expected = _evaluation_path_output(weighted_cfg, path)
    predictor = FALPredictor(weighted_cfg)
    bgr = cv2.imread(path)
    assert bgr.dtype == np.uint8 and bgr.ndim == 3
    _assert_same_output(predictor(bgr), expected)
    # the documented way to pass an RGB array (PIL's decoding of the same file)
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"))
    _assert_same_output(predictor(rgb[:, :, ::-1]), expected)
    # and the check can fail: the same array unflipped is another image to the model
    assert not torch.allclose(predictor(rgb)["scores"], expected["scores"])


def test_default_predictor_on_cv2_imread_matches_fal_predictor(weighted_cfg):
    """Detectron2's own predictor converts BGR to our configs' RGB too; on a square image its
    shortest-edge resize is FALPredictor's square resize."""
    bgr = cv2.imread(SQUARE_IMAGE)
    expected = _evaluation_path_output(weighted_cfg, SQUARE_IMAGE)
    _assert_same_output(DefaultPredictor(weighted_cfg)(bgr), expected)
    _assert_same_output(FALPredictor(weighted_cfg)(bgr), expected)


def test_fal_predictor_takes_other_cv2_imread_flags(weighted_cfg, tmp_path):
    """Grayscale (IMREAD_GRAYSCALE) is the same image as its three-channel copy; a 16-bit BGRA PNG
    read with IMREAD_UNCHANGED is its 8-bit BGR content."""
    predictor = FALPredictor(weighted_cfg)
    gray = cv2.imread(SQUARE_IMAGE, cv2.IMREAD_GRAYSCALE)
    assert gray.ndim == 2
    torch.testing.assert_close(predictor(gray)["scores"],
                               predictor(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))["scores"])

    bgr = cv2.imread(SQUARE_IMAGE)
    bgra16 = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA).astype(np.uint16) * 257
    png = str(tmp_path / "deep.png")
    assert cv2.imwrite(png, bgra16)
    unchanged = cv2.imread(png, cv2.IMREAD_UNCHANGED)
    assert unchanged.dtype == np.uint16 and unchanged.shape[2] == 4
    torch.testing.assert_close(predictor(unchanged)["scores"], predictor(bgr)["scores"])


def _saliency(height, width):
    """A smooth blob, as explanation maps look, with values across [0, 1]."""
    y, x = np.mgrid[0:height, 0:width]
    blob = np.exp(-((y - 0.4 * height) ** 2 + (x - 0.6 * width) ** 2) / (2 * (0.2 * width) ** 2))
    return (blob / blob.max()).astype(np.float32)


@pytest.mark.parametrize("colormap,alpha", [(cv2.COLORMAP_JET, 0.5), (cv2.COLORMAP_HOT, 0.3)],
                         ids=["jet", "hot-0.3"])
def test_overlay_matches_pytorch_grad_cam(colormap, alpha):
    image = cv2.cvtColor(cv2.imread(SQUARE_IMAGE), cv2.COLOR_BGR2RGB)
    saliency = _saliency(*image.shape[:2])
    # One white pixel under a colour with a 255 channel: the blend's maximum is then 1, so
    # show_cam_on_image's final division by it changes nothing (we do not divide).
    colours = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], colormap)[0]
    level = int(colours.max(axis=1).argmax())
    assert colours[level].max() == 255
    image[0, 0] = 255
    saliency[0, 0] = (level + 0.5) / 255  # uint8(255 * s) == level

    ours = overlay_heatmap(image, saliency, alpha=alpha, colormap=colormap)
    reference = show_cam_on_image(image.astype(np.float32) / 255, saliency, use_rgb=True,
                                  colormap=colormap, image_weight=1 - alpha)
    assert ours.shape == reference.shape and ours.dtype == np.uint8
    # grad-cam truncates the blend to uint8, we round it
    difference = ours.astype(np.int16) - reference
    assert difference.min() >= 0 and difference.max() <= 1


WITHOUT_OPENCV = """
import json, os, sys
sys.modules["cv2"] = None  # what `import cv2` meets on a machine without OpenCV: ImportError
repo, output = sys.argv[1:]
sys.path[:0] = [repo, os.path.join(repo, "tests")]
import numpy as np
from conftest import MINI_ROOT, TINY_OVERRIDES, load_script
from fal_d2.data import register_ucmerced
from fal_d2.explain.visualize import overlay_heatmap

register_ucmerced(MINI_ROOT, prefix="ucmerced_mini", allow_missing=True)
load_script("tools/explain.py").main([
    "--config-file", os.path.join(repo, "configs", "fal_p2p3.yaml"),
    "--dataset", "ucmerced_mini_test", "--allow-random-weights", "--max-images", "3",
    "--methods", "branch_cam", "gradcam", "--vis-per-class", "0", "--output", output,
    *[str(value) for value in TINY_OVERRIDES], "MODEL.CLS_HEAD.NUM_CLASSES", "21"])
try:
    overlay_heatmap(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4)))
    overlay_error = None
except ImportError as error:
    overlay_error = str(error)
print(json.dumps({"vis_per_class": load_script("tools/gpu_reproduce.py").default_vis_per_class(),
                  "overlay_error": overlay_error}))
"""


def test_explanations_are_scored_without_opencv(tmp_path):
    """The lent GPU machines have no OpenCV (no room in their carry): the explanation metrics must
    still be computed there, with heatmap images off, and an overlay must say what is missing."""
    output = tmp_path / "explain"
    result = subprocess.run([sys.executable, "-c", WITHOUT_OPENCV, REPO_ROOT, str(output)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["vis_per_class"] == 0
    assert report["overlay_error"].startswith("heatmap overlays need OpenCV")
    assert "TEST.EXPLAIN.VIS_PER_CLASS 0" in report["overlay_error"]
    with open(output / "layer_analysis.json") as f:
        rows = json.load(f)["rows"]
    assert {(row["method"], row["level"]) for row in rows} >= {("gradcam", "p2"), ("branch_cam", "p3")}
    assert not list(output.rglob("*.png"))
