"""FAL detectors (FALRCNN, FALRetinaNet) on the synthetic shapes set, tiny and on the CPU."""
import glob
import json
import os

import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data.dataset_mapper import DatasetMapper
from detectron2.engine import SimpleTrainer
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Instances
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

import fal_d2  # noqa: F401  (registers the meta-archs and backbones)
from conftest import REPO_ROOT, TINY_OVERRIDES, load_script, tiny_detection_overrides
from fal_d2.config import add_fal_config
from fal_d2.data.shapes_coco import SHAPE_CLASSES, make_shapes_coco, register_shapes_coco
from fal_d2.modeling import (
    FALRCNN,
    AttentionOutput,
    FALRetinaNet,
    attention_losses,
    multi_hot_targets,
)

CONFIG_DIR = os.path.join(REPO_ROOT, "configs", "COCO-Detection")
IMAGE_SIZE = 128  # generated images; the model sees them resized to INPUT_SIZE
INPUT_SIZE = 96
TRAIN_SET, VAL_SET = "fal_test_shapes_train", "fal_test_shapes_val"

TINY_DETECTION_OVERRIDES = TINY_OVERRIDES + tiny_detection_overrides(TRAIN_SET, VAL_SET, INPUT_SIZE)


# Tiny models gain nothing from intra-op threads; on a busy CPU extra threads spin-wait
# (measured here: 30 training iterations took 8 s with one thread, 240 s with two).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_detection_cfg(config_name, *opts):
    """A COCO-Detection config shrunk to a ResNet-18 on 96 px shapes images."""
    cfg = get_cfg()
    add_fal_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, config_name))
    cfg.merge_from_list(TINY_DETECTION_OVERRIDES + list(opts))
    return cfg


@pytest.fixture(scope="module")
def shapes_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_coco")
    for name, num_images, seed in [(TRAIN_SET, 32, 0), (VAL_SET, 6, 1)]:
        make_shapes_coco(str(root / name), num_images, IMAGE_SIZE, seed)
        if name not in DatasetCatalog.list():
            register_shapes_coco(name, str(root / name))
    yield root
    for name in (TRAIN_SET, VAL_SET):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _mapped_batch(cfg, dataset_name, n, is_train):
    mapper = DatasetMapper(cfg, is_train=is_train)
    return [mapper(d) for d in DatasetCatalog.get(dataset_name)[:n]]


@pytest.fixture(scope="module")
def trained_fal_rcnn(shapes_sets):
    """A FAL Faster R-CNN (p2, p3) trained a few iterations with Detectron2's SimpleTrainer."""
    seed_all_rng(0)
    # Every box is kept at test time, so that AP is defined even for a barely trained model.
    cfg = tiny_detection_cfg("fal_faster_rcnn_R_50_FPN_p2p3_1x.yaml",
                             "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)
    model = build_model(cfg)
    trainer = SimpleTrainer(model, build_detection_train_loader(cfg), build_optimizer(cfg, model))
    trainer.train(0, 30)
    return cfg, model, trainer.storage


def test_training_losses_finite_and_fall(trained_fal_rcnn):
    _, _, storage = trained_fal_rcnn
    for key in ["loss_att_p2", "loss_att_p3", "loss_cls", "loss_box_reg", "loss_rpn_cls"]:
        assert np.all(np.isfinite([v for v, _ in storage.history(key).values()])), key
    total = [v for v, _ in storage.history("total_loss").values()]
    assert len(total) == 30
    assert np.mean(total[-5:]) < 0.8 * np.mean(total[:5]), total


def test_coco_evaluator_returns_ap(trained_fal_rcnn, tmp_path):
    cfg, model, _ = trained_fal_rcnn
    evaluator = COCOEvaluator(VAL_SET, output_dir=str(tmp_path), use_fast_impl=False)
    results = inference_on_dataset(model, build_detection_test_loader(cfg, VAL_SET), evaluator)
    bbox = results["bbox"]
    for key in ["AP", "AP50", "AP75"] + [f"AP-{name}" for name in SHAPE_CLASSES]:
        assert key in bbox and 0.0 <= bbox[key] <= 100.0, (key, bbox)


def test_inference_outputs_instances_and_attention(trained_fal_rcnn):
    cfg, model, _ = trained_fal_rcnn
    model.eval()
    inputs = _mapped_batch(cfg, VAL_SET, 2, is_train=False)
    assert tuple(inputs[0]["image"].shape[-2:]) == (INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        outputs = model(inputs)
    for output in outputs:
        assert isinstance(output["instances"], Instances)
        assert output["instances"].image_size == (IMAGE_SIZE, IMAGE_SIZE)
        assert set(output["attention"]) == {"p2", "p3"}
        for attention_map in output["attention"].values():
            assert attention_map.shape == (IMAGE_SIZE, IMAGE_SIZE)
            assert 0.0 <= attention_map.min() and attention_map.max() <= 1.0
        # the branches' class map of the top detection's class; none without a detection
        assert set(output["class_map"]) == ({"p2", "p3"} if len(output["instances"]) else set())
        for class_map in output["class_map"].values():
            assert class_map.shape == (IMAGE_SIZE, IMAGE_SIZE)
            assert class_map.min() == 0.0 and class_map.max() == 1.0
    assert model.backbone.last_attention["p2"].attention.shape == (2, 1, INPUT_SIZE // 4,
                                                                    INPUT_SIZE // 4)


@pytest.mark.parametrize(
    "config_name, plain_meta_arch, plain_backbone",
    [
        ("faster_rcnn_R_50_FPN_baseline_1x.yaml", "GeneralizedRCNN", "build_resnet_fpn_backbone"),
        ("Base-FAL-RetinaNet.yaml", "RetinaNet", "build_retinanet_resnet_fpn_backbone"),
    ],
)
def test_no_levels_equals_plain_detector(shapes_sets, config_name, plain_meta_arch, plain_backbone):
    cfg = tiny_detection_cfg(config_name)
    plain_cfg = tiny_detection_cfg(config_name, "MODEL.META_ARCHITECTURE", plain_meta_arch,
                                   "MODEL.BACKBONE.NAME", plain_backbone)
    fal, plain = build_model(cfg), build_model(plain_cfg)
    assert isinstance(fal, (FALRCNN, FALRetinaNet)) and type(plain).__name__ == plain_meta_arch
    plain.load_state_dict(fal.state_dict(), strict=True)
    seed_all_rng(0)
    batch = _mapped_batch(cfg, TRAIN_SET, 2, is_train=True)

    losses = []
    for model in (fal, plain):
        model.train()
        torch.manual_seed(0)  # the RPN and ROI heads sample anchors and proposals at random
        with EventStorage():
            losses.append(model(batch))
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        assert torch.equal(losses[0][key], losses[1][key]), key

    outputs = []
    for model in (fal, plain):
        model.eval()
        with torch.no_grad():
            outputs.append(model(_mapped_batch(cfg, VAL_SET, 2, is_train=False)))
    for ours, theirs in zip(*outputs):
        assert ours.keys() == theirs.keys() == {"instances"}
        ours, theirs = ours["instances"], theirs["instances"]
        assert torch.equal(ours.pred_boxes.tensor, theirs.pred_boxes.tensor)
        assert torch.equal(ours.scores, theirs.scores)
        assert torch.equal(ours.pred_classes, theirs.pred_classes)


def test_retinanet_forward_backward_and_attention(shapes_sets):
    cfg = tiny_detection_cfg("fal_retinanet_R_50_FPN_p3p4_1x.yaml")
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(_mapped_batch(cfg, TRAIN_SET, 2, is_train=True))
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_att_p3", "loss_att_p4"}
    sum(losses.values()).backward()
    for name, param in model.backbone.attention_branches.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        outputs = model(_mapped_batch(cfg, VAL_SET, 1, is_train=False))
    assert set(outputs[0]["attention"]) == {"p3", "p4"}
    assert outputs[0]["attention"]["p4"].shape == (IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize(
    "config_path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))), ids=os.path.basename
)
def test_every_config_builds(config_path):
    cfg = get_cfg()
    add_fal_config(cfg)
    cfg.merge_from_file(config_path)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    assert sorted(model.backbone.attention_branches) == sorted(cfg.MODEL.FAL.ATTENTION_LEVELS)


def test_level_not_produced_by_backbone_is_a_config_error():
    cfg = tiny_detection_cfg("fal_retinanet_R_50_FPN_p3p4_1x.yaml",
                             "MODEL.FAL.ATTENTION_LEVELS", ["p2", "p3"])
    expected = r"ATTENTION_LEVELS.*\['p2'\].*'p3', 'p4', 'p5', 'p6', 'p7'"
    with pytest.raises(ValueError, match=expected):
        build_model(cfg)


@pytest.mark.parametrize(
    "config_name, key",
    [
        ("fal_faster_rcnn_R_50_FPN_p2p3_1x.yaml", "MODEL.ROI_HEADS.NUM_CLASSES"),
        ("fal_retinanet_R_50_FPN_p3p4_1x.yaml", "MODEL.RETINANET.NUM_CLASSES"),
    ],
)
def test_class_count_mismatch_is_a_config_error(config_name, key):
    cfg = tiny_detection_cfg(config_name, "MODEL.CLS_HEAD.NUM_CLASSES", 5)
    with pytest.raises(ValueError, match=f"MODEL.CLS_HEAD.NUM_CLASSES=5 must equal {key}=3") as e:
        build_model(cfg)
    assert "\n" not in str(e.value)
    # Without attention branches the K of CLS_HEAD is unused, so a mismatch is no error.
    build_model(tiny_detection_cfg(config_name, "MODEL.CLS_HEAD.NUM_CLASSES", 5,
                                   "MODEL.FAL.ATTENTION_LEVELS", []))


def test_attention_levels_need_a_fal_backbone():
    cfg = tiny_detection_cfg("fal_faster_rcnn_R_50_FPN_p2p3_1x.yaml",
                             "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone")
    with pytest.raises(ValueError, match="ATTENTION_LEVELS.*build_resnet_fpn_backbone"):
        build_model(cfg)


def test_multi_hot_targets_and_attention_loss():
    def instances(classes):
        result = Instances((8, 8))
        result.gt_classes = torch.tensor(classes, dtype=torch.int64)
        return result

    gt = [instances([2, 0, 2]), instances([])]
    targets = multi_hot_targets(gt, 3)
    assert torch.equal(targets, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))

    logits = torch.tensor([[5.0, -5.0, 5.0], [-5.0, -5.0, -5.0]])
    attention = {
        level: AttentionOutput(features=None, logits=level_logits, attention=None,
                               class_response=None, class_maps=None)
        for level, level_logits in [("p2", logits), ("p3", -logits)]
    }
    losses = attention_losses(attention, gt, weight=0.5)
    assert set(losses) == {"loss_att_p2", "loss_att_p3"}
    assert losses["loss_att_p2"] < 0.01 < losses["loss_att_p3"]
    expected = 0.5 * torch.nn.functional.softplus(torch.tensor(5.0))  # BCE of a wrong logit 5
    assert torch.isclose(losses["loss_att_p3"], expected)


def test_shapes_set_is_deterministic_valid_coco(tmp_path):
    first = make_shapes_coco(str(tmp_path / "a"), num_images=3, size=64, seed=7)
    second = make_shapes_coco(str(tmp_path / "b"), num_images=3, size=64, seed=7)
    with open(first[0]) as f:
        coco = json.load(f)
    with open(second[0]) as f:
        assert json.load(f) == coco
    for name in sorted(os.listdir(first[1])):
        with open(os.path.join(first[1], name), "rb") as a, open(os.path.join(second[1], name),
                                                                  "rb") as b:
            assert a.read() == b.read()
    assert [c["name"] for c in coco["categories"]] == SHAPE_CLASSES
    assert len(coco["images"]) == 3 and coco["annotations"]
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
        assert annotation["iscrowd"] == 0 and 0 < annotation["area"] <= w * h

    # Rewriting replaces the set atomically and leaves no temporary folder behind.
    make_shapes_coco(str(tmp_path / "a"), num_images=2, size=64, seed=8)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
    assert len(os.listdir(tmp_path / "a" / "images")) == 2

    register_shapes_coco("fal_test_shapes_tiny", str(tmp_path / "b"))
    try:
        dicts = DatasetCatalog.get("fal_test_shapes_tiny")
    finally:
        DatasetCatalog.remove("fal_test_shapes_tiny")
        MetadataCatalog.remove("fal_test_shapes_tiny")
    assert len(dicts) == 3
    assert all(0 <= a["category_id"] < 3 for d in dicts for a in d["annotations"])


def test_make_shapes_coco_command_line(tmp_path):
    script = load_script(os.path.join("datasets", "make_shapes_coco.py"))
    output = tmp_path / "set"
    args = ["--output", str(output), "--num-images", "2", "--size", "64", "--seed", "3"]
    assert script.main(args) == 0
    assert sorted(os.listdir(output)) == ["images", "instances.json"]
    assert script.main(args[:3] + ["0"]) == 1  # no images: a one-line error, not a traceback


def test_builtin_shapes_names_are_registered():
    assert {"shapes_coco_train", "shapes_coco_val"} <= set(DatasetCatalog.list())
