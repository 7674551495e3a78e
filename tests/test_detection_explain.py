"""Explanations of detectors (FALRCNN, FALRetinaNet, plain FPN): top-detection targets, the
evaluator and tools/explain.py, on tiny models and the synthetic shapes set, on the CPU."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data.dataset_mapper import DatasetMapper
from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.solver import build_optimizer
from detectron2.utils.env import seed_all_rng

from conftest import REPO_ROOT, TINY_OVERRIDES, load_script, make_tiny_cfg, tiny_detection_overrides
from fal_d2.data.shapes_coco import SHAPE_CLASSES, make_shapes_coco, register_shapes_coco
from fal_d2.evaluation import ExplanationEvaluator
from fal_d2.explain import (
    AttentionSaliency,
    BranchCAM,
    FastRCNNBoxTarget,
    GradCAM,
    RetinaNetAnchorTarget,
    build_target,
)
from fal_d2.explain.scoring import score_explanations
from fal_d2.explain.visualize import overlay_heatmap

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_SET, VAL_SET = "fal_test_explain_shapes_train", "fal_test_explain_shapes_val"
INPUT_SIZE = 96
RCNN_CONFIG = "COCO-Detection/fal_faster_rcnn_R_50_FPN_p2p3_1x.yaml"
BASELINE_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_baseline_1x.yaml"
RETINANET_CONFIG = "COCO-Detection/fal_retinanet_R_50_FPN_p3p4_1x.yaml"
ROW_KEYS = ["method", "level", "class", "average_drop", "increase_in_confidence", "coverage",
            "deletion_auc", "insertion_auc", "average_drop_top15", "increase_in_confidence_top15",
            "average_drop_top50", "increase_in_confidence_top50", "num_images"]
# On top of conftest's TINY_OVERRIDES: a ResNet-18 detector for 96 px images of 3 classes.
DETECTION_OPTS = tiny_detection_overrides(TRAIN_SET, VAL_SET, INPUT_SIZE) + [
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,  # every image has detections, even untrained
    "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
]


def _cfg(config, *opts):
    return make_tiny_cfg(config, *DETECTION_OPTS, *opts)


@pytest.fixture(scope="module")
def shapes_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_shapes")
    for name, num_images, seed in [(TRAIN_SET, 16, 0), (VAL_SET, 4, 1)]:
        make_shapes_coco(str(root / name), num_images, 128, seed)
        if name not in DatasetCatalog.list():
            register_shapes_coco(name, str(root / name))
    yield root
    for name in (TRAIN_SET, VAL_SET):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def trained_rcnn(shapes_sets, one_thread):
    """A tiny FAL Faster R-CNN (p2, p3) trained a few iterations, so that its boxes mean a bit."""
    seed_all_rng(0)
    torch.manual_seed(0)
    cfg = _cfg(RCNN_CONFIG)
    model = build_model(cfg)
    trainer = SimpleTrainer(model, build_detection_train_loader(cfg), build_optimizer(cfg, model))
    trainer.train(0, 20)
    model.eval()
    return cfg, model


def _inputs(cfg, n=None):
    mapper = DatasetMapper(cfg, is_train=False)
    return [mapper(d) for d in DatasetCatalog.get(VAL_SET)[:n]]


def _at_input_size(inputs):
    """The same images without their original "height"/"width": outputs in input pixels."""
    return [{"image": x["image"]} for x in inputs]


def _gradcam(activations, gradients):
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activations).sum(dim=1))


def _assert_top_detections(saliency, model, inputs):
    with torch.no_grad():
        outputs = model(_at_input_size(inputs))
    for i, output in enumerate(outputs):
        instances = output["instances"]
        assert int(saliency.target_classes[i]) == int(instances.pred_classes[0])
        assert float(saliency.confidence[i]) == pytest.approx(float(instances.scores[0]), abs=1e-6)
        assert torch.allclose(saliency.boxes[i], instances.pred_boxes.tensor[0], atol=1e-3)


def test_rcnn_gradcam_of_top_detection_matches_autograd(trained_rcnn):
    cfg, model = trained_rcnn
    inputs = _inputs(cfg, 2)
    levels = ["p2", "p3", "p4", "p5"]
    assert isinstance(build_target(model), FastRCNNBoxTarget)
    saliency = GradCAM(model, levels)(inputs)
    _assert_top_detections(saliency, model, inputs)

    # The same score by hand: the box predictor's class logit of the proposal behind each
    # image's top detection, found with the predictor's own inference (which keeps indices).
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    heads = model.roi_heads
    box_features = heads.box_pooler([features[f] for f in heads.box_in_features],
                                    [p.proposal_boxes for p in proposals])
    predictions = heads.box_predictor(heads.box_head(box_features))
    detections, kept = heads.box_predictor.inference(predictions, proposals)
    score, offset = 0.0, 0
    for proposal, detected, keep in zip(proposals, detections, kept):
        score = score + predictions[0][offset + keep[0], detected.pred_classes[0]]
        offset += len(proposal)
    gradients = torch.autograd.grad(score, [features[level] for level in levels])
    positive = []
    for level, gradient in zip(levels, gradients):
        expected = _gradcam(features[level].detach(), gradient)
        positive.append(float(expected.max()) > 0)
        assert torch.allclose(saliency.maps[level], expected, rtol=1e-4,
                              atol=1e-5 * max(float(expected.max()), 1e-12)), level
    # Each box is pooled from one level only: some level explains it, not all of them.
    assert any(positive)


def test_retinanet_gradcam_of_top_detection_matches_autograd(shapes_sets):
    torch.manual_seed(0)
    cfg = _cfg(RETINANET_CONFIG)
    model = build_model(cfg).eval()
    inputs = _inputs(cfg, 2)
    levels = ["p3", "p4", "p5"]
    assert isinstance(build_target(model), RetinaNetAnchorTarget)
    saliency = GradCAM(model, levels)(inputs)
    _assert_top_detections(saliency, model, inputs)

    # The top detection's score is the largest sigmoid, so its logit is the largest logit.
    features = model.backbone(model.preprocess_image(inputs).tensor)
    logits, _ = model.head([features[f] for f in model.head_in_features])
    logits = torch.cat([permute_to_N_HWA_K(level, 3) for level in logits], dim=1)
    top = logits.flatten(1).max(dim=1).values
    assert torch.allclose(top.detach().sigmoid(), saliency.confidence, atol=1e-6)
    gradients = torch.autograd.grad(top.sum(), [features[level] for level in levels])
    for level, gradient in zip(levels, gradients):
        expected = _gradcam(features[level].detach(), gradient)
        assert torch.allclose(saliency.maps[level], expected, rtol=1e-4,
                              atol=1e-5 * max(float(expected.max()), 1e-12)), level

    scores = score_explanations(model, inputs, AttentionSaliency(model, ["p3", "p4"]), auc_steps=1)
    assert scores.explained.all() and set(scores.levels) == {"p3", "p4"}
    assert np.all((0 <= scores.levels["p4"].drop) & (scores.levels["p4"].drop <= 100))


def test_attention_on_fal_detector_and_levels_on_plain_fpn(trained_rcnn, caplog):
    cfg, model = trained_rcnn
    inputs = _inputs(cfg, 2)
    attention = AttentionSaliency(model, ["p2", "p3"])(inputs)
    with torch.no_grad():
        model(inputs)
    for level in ("p2", "p3"):
        expected = model.backbone.last_attention[level].attention[:, 0]
        assert torch.allclose(attention.maps[level], expected)
    gradcam = GradCAM(model, ["p2"])(inputs)
    assert torch.equal(attention.target_classes, gradcam.target_classes)
    assert torch.allclose(attention.boxes, gradcam.boxes)
    # the branch's class map of the top detection's class (zeros without a detection)
    class_maps = BranchCAM(model, ["p2", "p3"])(inputs)
    assert torch.equal(class_maps.target_classes, gradcam.target_classes)
    for level in ("p2", "p3"):
        expected = model.backbone.last_attention[level].class_map(class_maps.target_classes)
        expected = expected - expected.flatten(1).min(dim=1).values[:, None, None]
        assert torch.allclose(class_maps.maps[level], expected, atol=1e-6)

    with pytest.raises(ValueError, match=r"\['p6'\] do not influence .*ROI_HEADS.IN_FEATURES"):
        GradCAM(model, ["p6"])  # only the RPN reads p6
    with pytest.raises(ValueError, match="outside"):
        GradCAM(model, ["p2"])(inputs, target_classes=[0, 3])
    explained = GradCAM(model, ["p2"])(inputs, target_classes=[1, 1])
    assert explained.target_classes.tolist() == [1, 1]

    torch.manual_seed(0)
    plain = build_model(_cfg(BASELINE_CONFIG)).eval()
    assert len(plain.backbone.attention_branches) == 0  # ATTENTION_LEVELS []: a plain FPN
    evaluator = ExplanationEvaluator(VAL_SET, plain, ["attention", "gradcam"], ["p3", "p6"])
    assert evaluator.method_levels == {"gradcam": ["p3"]}
    assert "skipping 'attention' on p3" in caplog.text and "skipping 'gradcam' on p6" in caplog.text
    with pytest.raises(ValueError, match="TARGET='gt'"):
        ExplanationEvaluator(VAL_SET, plain, ["gradcam"], ["p3"], target="gt")


def _white_pixels(path):
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    return int((pixels == 255).all(axis=2).sum())


def test_evaluator_rows_skips_and_overlays_with_boxes(trained_rcnn, tmp_path):
    cfg, model = trained_rcnn
    inputs = _inputs(cfg)
    predictor = model.roi_heads.box_predictor
    top_scores = sorted(GradCAM(model, ["p2"])(inputs).confidence.tolist())
    assert top_scores[0] < top_scores[-1]
    # A threshold between the images' top scores: the lowest-scoring image has no detection.
    threshold = (top_scores[0] + top_scores[1]) / 2
    predictor.test_score_thresh = threshold
    try:
        expected = GradCAM(model, ["p2"])(inputs)
        evaluator = ExplanationEvaluator(VAL_SET, model, ["attention", "gradcam", "fused"],
                                         ["p2", "p3"], vis_per_class=1,
                                         output_dir=str(tmp_path), auc_steps=2)
        evaluator.reset()
        for start in range(0, len(inputs), 2):
            evaluator.process(inputs[start : start + 2], None)
        results = evaluator.evaluate()["explanation"]
    finally:
        predictor.test_score_thresh = 0.0

    explained = expected.target_classes >= 0
    assert int((~explained).sum()) == 1
    assert evaluator.num_images_skipped == 1 and results["num_images_skipped"] == 1
    assert "gradcam/p3/average_drop" in results and "fused/p2+p3/insertion_auc" in results
    written = json.loads((tmp_path / "explanation_metrics.json").read_text())
    assert written["task"] == "detection" and written["num_images_skipped"] == 1
    rows = written["rows"]
    assert all(list(row) == ROW_KEYS for row in rows)
    detected = [SHAPE_CLASSES[c] for c in expected.target_classes[explained].tolist()]
    for method, level in [("attention", "p2"), ("gradcam", "p3"), ("fused", "p2+p3")]:
        key_rows = [row for row in rows if (row["method"], row["level"]) == (method, level)]
        assert key_rows[0]["class"] == "all" and key_rows[0]["num_images"] == len(inputs) - 1
        # per-class rows: the class of each image's top detection
        assert {row["class"]: row["num_images"] for row in key_rows[1:]} == {
            name: detected.count(name) for name in set(detected)
        }
        for row in key_rows:
            assert 0 <= row["average_drop"] <= 100 and 0 <= row["increase_in_confidence"] <= 100

    # The heatmaps (one per detected class) show the explained box, white on black.
    assert sorted(os.listdir(tmp_path / "heatmaps")) == ["attention", "fused", "gradcam"]
    names = sorted(os.listdir(tmp_path / "heatmaps" / "gradcam" / "p2"))
    assert names == sorted(f"{name}_0.png" for name in set(detected))
    for sample in evaluator.samples:
        assert sample.box is not None and sample.box_caption.startswith(sample.target_name)
        path = tmp_path / "heatmaps" / "gradcam" / "p2" / f"{sample.class_name}_0.png"
        with Image.open(path) as image:
            drawn = np.asarray(image.convert("RGB"))
        plain = overlay_heatmap(sample.image, sample.maps[("gradcam", "p2")] / 255.0)
        assert drawn.shape == plain.shape and not np.array_equal(drawn, plain)
        x0, y0, x1, y1 = (int(round(v)) for v in sample.box)
        edge = drawn[max(y0 - 1, 0) : y0 + 2, x0 : x1 + 1]  # the box's top edge
        assert (edge == 255).all(axis=2).any()
        assert _white_pixels(path) > 0
    for method in ["attention", "gradcam", "fused"]:
        with Image.open(tmp_path / f"grid_{method}.png") as image:
            image.verify()


def _state(model):
    return (
        [(name, module.training) for name, module in model.named_modules()],
        [(name, p.requires_grad) for name, p in model.named_parameters()],
        [
            (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for name, m in model.named_modules()
        ],
    )


def test_model_state_unchanged_after_explaining(trained_rcnn, shapes_sets):
    cfg, model = trained_rcnn
    torch.manual_seed(0)
    retinanet = build_model(_cfg(RETINANET_CONFIG))
    for detector, levels in [(model, ["p2", "p3"]), (retinanet, ["p3", "p4"])]:
        detector.train()
        detector.backbone.eval()  # a mixed state must come back as it was
        first = next(detector.parameters())
        first.requires_grad_(False)
        before = _state(detector)
        grads = [None if p.grad is None else p.grad.clone() for p in detector.parameters()]
        inputs = _inputs(cfg, 2)
        try:
            for method in (GradCAM(detector, levels), AttentionSaliency(detector, levels)):
                score_explanations(detector, inputs, method, auc_steps=1)
                assert _state(detector) == before
            with pytest.raises(ValueError, match="outside"):
                GradCAM(detector, levels)(inputs, target_classes=[0, 7])
            assert _state(detector) == before
            for param, grad in zip(detector.parameters(), grads):
                assert (param.grad is None) == (grad is None)
                assert grad is None or torch.equal(param.grad, grad)
        finally:
            first.requires_grad_(True)
            detector.eval()


def _load_tool():
    return load_script(os.path.join("tools", "explain.py"))


def test_explain_tool_end_to_end_on_detectors(trained_rcnn, tmp_path):
    cfg, model = trained_rcnn
    weights = tmp_path / "fal_rcnn.pth"
    torch.save({"model": model.state_dict()}, weights)
    opts = [str(value) for value in TINY_OVERRIDES + DETECTION_OPTS]
    output = tmp_path / "analysis"
    config_dir = os.path.join(REPO_ROOT, "configs")
    rows = _load_tool().main([
        "--config-file", os.path.join(config_dir, RCNN_CONFIG), "--weights", str(weights),
        "--compare-config", os.path.join(config_dir, BASELINE_CONFIG),
        "--dataset", VAL_SET, "--methods", "attention", "gradcam", "--levels", "p2", "p3",
        "--max-images", "3", "--auc-steps", "0", "--vis-per-class", "1",
        "--allow-random-weights",  # the --compare model has no weights
        "--output", str(output), *opts,
    ])

    fal_label = os.path.splitext(os.path.basename(RCNN_CONFIG))[0]
    plain_label = os.path.splitext(os.path.basename(BASELINE_CONFIG))[0]
    assert sorted(os.listdir(output)) == sorted([
        fal_label, plain_label, "grid_attention.png", "grid_gradcam.png",
        "layer_analysis.csv", "layer_analysis.json", "layer_analysis.md",
    ])
    table = json.loads((output / "layer_analysis.json").read_text())
    assert table["rows"] == rows
    assert table["num_images_skipped"] == {fal_label: 0, plain_label: 0}
    assert {(r["model"], r["method"], r["level"]) for r in rows if r["class"] == "all"} == {
        (fal_label, "attention", "p2"), (fal_label, "attention", "p3"),
        (fal_label, "gradcam", "p2"), (fal_label, "gradcam", "p3"),
        (plain_label, "gradcam", "p2"), (plain_label, "gradcam", "p3"),
    }
    assert all(r["num_images"] == 3 for r in rows if r["class"] == "all")
    assert "images without one" in (output / "layer_analysis.md").read_text()
    for name in ["grid_attention.png", "grid_gradcam.png", f"{fal_label}/grid_gradcam.png",
                 f"{fal_label}/explanation_metrics.json"]:
        assert (output / name).exists()

    with pytest.raises(ValueError, match="TARGET='gt'"):
        _load_tool().main(["--config-file", os.path.join(config_dir, RCNN_CONFIG),
                           "--dataset", VAL_SET, "--target", "gt", "--allow-random-weights",
                           "--output", str(output), *opts])
