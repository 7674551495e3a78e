"""fal_d2.Explainer: one call explains one image, with any registered method, on any classifier;
its maps are the evaluator's maps of the same image, at the image's own size."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from fal_d2 import Explainer
from fal_d2.checkpoint import WeightsError
from fal_d2.config import load_config
from fal_d2.data.mapper import ClassificationDatasetMapper
from fal_d2.explain import SALIENCY_METHODS, GradCAM, draw_overlay
from fal_d2.explain.metrics import normalize_saliency
from fal_d2.explain.visualize import overlay_heatmap
from fal_d2.predictor import FALPredictor

from conftest import MINI_ROOT, REPO_ROOT, TINY_OVERRIDES, make_tiny_cfg

AIRPLANE = os.path.join(MINI_ROOT, "Images", "airplane", "airplane04.jpg")
NUM_CLASSES = 21  # the UC Merced test set's, so that the Explainer knows the class names


def _tiny_cfg(config_name, weights=""):
    cfg = make_tiny_cfg(config_name, "MODEL.CLS_HEAD.NUM_CLASSES", NUM_CLASSES,
                        "MODEL.WEIGHTS", weights)
    cfg.freeze()
    return cfg


def _save_random_weights(cfg, path):
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, one_thread):
    """A tiny FAL classifier's (random) weights, saved: the Explainer loads them checked."""
    return _save_random_weights(_tiny_cfg("fal_p2p3.yaml"),
                                tmp_path_factory.mktemp("weights") / "model.pth")


@pytest.fixture(scope="module")
def explainer(weights):
    return Explainer(_tiny_cfg("fal_p2p3.yaml", weights))


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    """A non-square crop of a mini-set image, as a PNG: lossless, so that OpenCV and the dataset
    mapper (PIL) read the same pixels."""
    path = str(tmp_path_factory.mktemp("images") / "airplane_crop.png")
    assert cv2.imwrite(path, cv2.imread(AIRPLANE)[20:200, :237])
    return path


def _assert_maps_fit(maps, height, width):
    for level_maps in maps.values():
        for saliency in level_maps.values():
            assert saliency.shape == (height, width) and saliency.dtype == np.float32
            assert saliency.min() >= 0.0 and saliency.max() <= 1.0


def test_every_registered_method_gives_maps_at_the_image_size(explainer, image_path):
    image = cv2.imread(image_path)
    methods = sorted(set(SALIENCY_METHODS) - {"head"})  # this model has no explanation head
    result = explainer(image, methods=methods)
    assert set(result.maps) == set(methods)
    _assert_maps_fit(result.maps, *image.shape[:2])
    # min-max scaled: a map that is not constant spans [0, 1]
    assert any(saliency.max() == 1.0 for maps in result.maps.values() for saliency in maps.values())
    # default levels: TEST.EXPLAIN.LEVELS, where the method applies (branches on p2 and p3 only)
    assert list(result.maps["gradcam"]) == explainer.levels == ["p2", "p3", "p4", "p5"]
    assert list(result.maps["branch_cam"]) == ["p2", "p3"]
    assert result.scores.shape == (NUM_CLASSES,)
    assert result.scores.sum() == pytest.approx(1.0, abs=1e-5)
    assert result.pred_class == int(result.scores.argmax()) == result.target_class
    assert result.class_name == result.target_name == explainer.class_names[result.pred_class]
    assert explainer.default_methods == ["branch_cam", "attention"]
    assert set(explainer(image).maps) == {"branch_cam", "attention"}
    small = explainer(image, methods=["gradcam"], output_size=(30, 40))
    _assert_maps_fit(small.maps, 30, 40)


@pytest.mark.parametrize("target_class", [None, 3], ids=["predicted", "chosen"])
def test_gradcam_equals_the_evaluation_path(weights, explainer, image_path, target_class):
    """The evaluator's path, computed apart: a separately loaded model, the test mapper's batch,
    GradCAM and normalize_saliency as the evaluator calls them."""
    cfg = _tiny_cfg("fal_p2p3.yaml", weights)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()
    height, width = cv2.imread(image_path).shape[:2]
    inputs = ClassificationDatasetMapper(cfg, is_train=False)(
        {"file_name": image_path, "height": height, "width": width})
    targets = None if target_class is None else [target_class]
    saliency = GradCAM(model, ["p2", "p3"])([inputs], targets)
    size = cfg.INPUT.CLS.SIZE

    for output_size in [(height, width), (size, size)]:
        result = explainer(cv2.imread(image_path), methods=["gradcam"], levels=["p2", "p3"],
                           target_class=target_class, output_size=output_size)
        np.testing.assert_allclose(result.scores, saliency.scores[0].numpy(), rtol=1e-5)
        assert result.target_class == int(saliency.target_classes[0])
        for level in ["p2", "p3"]:
            at_size = normalize_saliency(saliency.maps[level], saliency.image_sizes[0],
                                         saliency.padded_size, output_size)[0]
            np.testing.assert_allclose(result.maps["gradcam"][level], at_size.numpy(), atol=1e-5)
    # at the model's input size, the evaluator's own call (no output size) gives the same maps
    evaluator_maps = normalize_saliency(saliency.maps["p2"], saliency.image_sizes[0],
                                        saliency.padded_size)[0]
    np.testing.assert_allclose(result.maps["gradcam"]["p2"], evaluator_maps.numpy(), atol=1e-5)


def test_branch_cam_is_the_models_own_class_map(weights, explainer, image_path):
    """The model returns the branch class map of the predicted class at the image size; the
    Explainer's branch_cam, computed by the saliency method, is the same map."""
    image = cv2.imread(image_path)
    own = FALPredictor(_tiny_cfg("fal_p2p3.yaml", weights))(image)
    result = explainer(image, methods=["branch_cam"])
    assert result.pred_class == own["pred_class"]
    for level in ["p2", "p3"]:
        np.testing.assert_allclose(result.maps["branch_cam"][level], own["class_map"][level],
                                   atol=1e-5)


def test_a_chosen_class_changes_gradcam(explainer, image_path):
    image = cv2.imread(image_path)
    predicted = explainer(image, methods=["gradcam"])
    other = (predicted.pred_class + 1) % NUM_CLASSES
    name = explainer.class_names[other]
    by_name = explainer(image, methods=["gradcam"], target_class=name)
    by_index = explainer(image, methods=["gradcam"], target_class=other)
    assert (by_name.target_class, by_name.target_name) == (other, name)
    assert by_name.pred_class == predicted.pred_class  # the prediction is the model's
    np.testing.assert_array_equal(by_name.scores, predicted.scores)
    for level in predicted.maps["gradcam"]:
        np.testing.assert_array_equal(by_name.maps["gradcam"][level],
                                      by_index.maps["gradcam"][level])
    assert any(not np.allclose(by_name.maps["gradcam"][level], predicted.maps["gradcam"][level],
                               atol=1e-3) for level in predicted.maps["gradcam"])


def test_the_image_is_read_as_bgr(explainer, image_path):
    bgr = cv2.imread(image_path)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])  # what PIL or matplotlib would give
    expected = explainer(bgr, methods=["gradcam"])
    same = explainer(np.ascontiguousarray(rgb[:, :, ::-1]), methods=["gradcam"])
    np.testing.assert_array_equal(same.scores, expected.scores)
    # an RGB array given unflipped is another image to the model
    assert not np.allclose(explainer(rgb, methods=["gradcam"]).scores, expected.scores)
    # the other layouts FALPredictor takes: grayscale is its three-channel copy
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(explainer(gray, methods=["gradcam"]).scores,
                                  explainer(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR),
                                            methods=["gradcam"]).scores)


def test_a_plain_fpn_is_explained_by_gradcam(tmp_path, image_path):
    cfg = _tiny_cfg("fpn_baseline.yaml")
    explainer = Explainer(_tiny_cfg("fpn_baseline.yaml",
                                    _save_random_weights(cfg, tmp_path / "fpn.pth")))
    image = cv2.imread(image_path)
    assert explainer.default_methods == ["gradcam"]
    result = explainer(image)
    assert list(result.maps) == ["gradcam"]
    assert list(result.maps["gradcam"]) == ["p2", "p3", "p4", "p5"]
    _assert_maps_fit(result.maps, *image.shape[:2])
    with pytest.raises(ValueError) as error:
        explainer(image, methods=["branch_cam"], levels=["p2"])
    assert str(error.value) == ("method 'branch_cam': BranchCAM: level(s) ['p2'] have no attention "
                                "branch; the model has none (MODEL.FAL.ATTENTION_LEVELS is empty)")


def test_a_model_with_a_trained_head_is_explained_by_it(tmp_path, image_path):
    cfg = _tiny_cfg("fal_p2p3.yaml")
    cfg = _tiny_cfg_with_head(_save_random_weights(_with_head(cfg), tmp_path / "untrained.pth"))
    image = cv2.imread(image_path)
    untrained = Explainer(cfg)
    assert untrained.default_methods == ["head"]
    with pytest.raises(ValueError, match="levels with a trained head: none"):
        untrained(image)
    model = build_model(_with_head(_tiny_cfg("fal_p2p3.yaml")))
    for head in model.explanation_head.values():
        head.num_updates.fill_(1)  # as if a second stage had trained it
    trained = tmp_path / "trained.pth"
    torch.save({"model": model.state_dict()}, trained)
    result = Explainer(_tiny_cfg_with_head(str(trained)))(image)
    assert list(result.maps) == ["head"]
    assert list(result.maps["head"]) == ["p2", "p3"]
    _assert_maps_fit(result.maps, *image.shape[:2])


def _with_head(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.EXPLAIN_HEAD.ENABLED = True
    cfg.freeze()
    return cfg


def _tiny_cfg_with_head(weights):
    return _with_head(_tiny_cfg("fal_p2p3.yaml", weights))


@pytest.mark.parametrize("call,asked,available", [
    (dict(methods=["gradcam", "scorecam"]), "['scorecam']", str(sorted(SALIENCY_METHODS))),
    (dict(methods=["branch_cam"], levels=["p2", "p4"]), "['p4']", "['p2', 'p3']"),
    (dict(methods=["gradcam"], levels=["p9"]), "['p9']", "['p2', 'p3', 'p4', 'p5', 'p6']"),
    (dict(target_class="airport"), "'airport'", "'airplane'"),
    (dict(target_class=NUM_CLASSES), f"{NUM_CLASSES}", f"[0, {NUM_CLASSES})"),
], ids=["method", "level without a branch", "level", "class name", "class index"])
def test_bad_requests_fail_in_one_line_naming_what_is_available(explainer, call, asked,
                                                                available):
    with pytest.raises(ValueError) as error:
        explainer(cv2.imread(AIRPLANE), **call)
    message = str(error.value)
    assert "\n" not in message and asked in message and available in message, message


def test_weights_are_checked_as_by_the_predictor(tmp_path):
    config = os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml")
    opts = [str(o) for o in TINY_OVERRIDES]
    with pytest.raises(WeightsError, match="MODEL.WEIGHTS is empty.*allow_random_weights=True"):
        Explainer.from_config_file(config, opts=opts)
    fpn = _save_random_weights(_tiny_cfg("fpn_baseline.yaml"), tmp_path / "fpn.pth")
    with pytest.raises(WeightsError, match=f"{fpn} does not fit the FALClassifier"):
        Explainer.from_config_file(config, fpn, opts=opts + ["MODEL.CLS_HEAD.NUM_CLASSES", "21"])
    explainer = Explainer.from_config_file(config, opts=opts, allow_random_weights=True)
    assert explainer.predictor.weights_file is None


def test_overlays_are_drawn_in_bgr(explainer, image_path):
    image = cv2.imread(image_path)
    saliency = explainer(image, methods=["gradcam"]).maps["gradcam"]["p2"]
    overlay = explainer.draw(image, saliency)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    rgb = overlay_heatmap(np.ascontiguousarray(image[:, :, ::-1]), saliency)
    np.testing.assert_array_equal(overlay, rgb[:, :, ::-1])
    # a map of another size is resized to the image, as overlay_heatmap does
    np.testing.assert_array_equal(draw_overlay(image, cv2.resize(saliency, (20, 10))),
                                  overlay_heatmap(np.ascontiguousarray(image[:, :, ::-1]),
                                                  cv2.resize(saliency, (20, 10)))[:, :, ::-1])


# ---------------------------------------------------------------- README snippets

PYTHON_SNIPPET = """
import cv2
from fal_d2 import Explainer
explainer = Explainer.from_config_file("configs/fal_p2p3_R18_cpu.yaml",
                                      "output/demo/model_final.pth")
image = cv2.imread("tests/data/ucmerced_mini/Images/airplane/airplane04.jpg")
result = explainer(image, methods=["gradcam", "branch_cam"])
cv2.imwrite("airplane_gradcam_p2.png", explainer.draw(image, result.maps["gradcam"]["p2"]))
"""

CLI_SNIPPET = [
    "tools/demo.py", "--config-file", "configs/fal_p2p3_R18_cpu.yaml",
    "--input", "tests/data/ucmerced_mini/Images/airplane/airplane04.jpg",
    "--methods", "gradcam", "branch_cam", "--target-class", "airplane",
    "--output", "output/demo/explained", "--opts", "MODEL.WEIGHTS", "output/demo/model_final.pth",
]


@pytest.fixture
def demo_checkout(tmp_path, monkeypatch):
    """A working directory laid out like the repository after `make demo`, with a random-weights
    checkpoint of configs/fal_p2p3_R18_cpu.yaml as output/demo/model_final.pth."""
    for name in ("configs", "tests", "tools"):
        os.symlink(os.path.join(REPO_ROOT, name), tmp_path / name)
    os.makedirs(tmp_path / "output" / "demo")
    cfg = load_config(os.path.join(REPO_ROOT, "configs", "fal_p2p3_R18_cpu.yaml"))
    _save_random_weights(cfg, tmp_path / "output" / "demo" / "model_final.pth")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_python_snippet(demo_checkout):
    exec(compile(PYTHON_SNIPPET, "README", "exec"), {})
    overlay = cv2.imread(str(demo_checkout / "airplane_gradcam_p2.png"))
    assert overlay.shape == cv2.imread(AIRPLANE).shape


def test_readme_cli_snippet(demo_checkout):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, *CLI_SNIPPET], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(os.listdir(demo_checkout / "output" / "demo" / "explained"))
    assert written == ["airplane04_p2_branch_cam.png", "airplane04_p2_gradcam.png",
                       "airplane04_p3_branch_cam.png", "airplane04_p3_gradcam.png",
                       "airplane04_p4_gradcam.png", "airplane04_p5_gradcam.png",
                       "predictions.json"]
