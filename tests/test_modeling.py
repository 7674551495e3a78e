"""The FAL model: backbones, branches, head and the FALClassifier meta-arch."""
import os

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from fal_d2.config import check_config_against_datasets
from fal_d2.data import ClassificationDatasetMapper, load_ucmerced
from fal_d2.modeling import FALFPN
from fal_d2.modeling.attention_branch import ABNAttentionBranch
from fal_d2.predictor import FALPredictor

from conftest import REPO_ROOT

LEVEL_SUBSETS = [[], ["p2"], ["p3"], ["p4"], ["p5"], ["p6"], ["p2", "p3"], ["p2", "p3", "p4", "p5"]]
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def _inputs(n, size=64, height=None, width=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator),
            "label": i % 5,
            "height": height or size,
            "width": width or size,
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("levels", LEVEL_SUBSETS, ids=lambda levels: "+".join(levels) or "none")
def test_output_shapes_for_level_subsets(tiny_cfg, levels):
    cfg = tiny_cfg("fal_p2p3.yaml", "MODEL.FAL.ATTENTION_LEVELS", levels)
    model = build_model(cfg)
    model.train()
    losses = model(_inputs(2))
    assert set(losses) == {"loss_cls"} | {f"loss_att_{level}" for level in levels}
    model.eval()
    with torch.no_grad():
        outputs = model(_inputs(3, height=50, width=70))
    assert len(outputs) == 3
    for output in outputs:
        assert output["scores"].shape == (5,)
        assert torch.allclose(output["scores"].sum(), torch.tensor(1.0), atol=1e-5)
        assert output["pred_class"] == int(output["scores"].argmax())
        assert set(output["attention"]) == set(levels)
        for level in levels:
            assert output["attention"][level].shape == (50, 70)
            side = -(-64 // STRIDES[level])
            assert output["attention_raw"][level].shape == (side, side)
            for attention_map in (output["attention"][level], output["attention_raw"][level]):
                assert attention_map.min() >= 0.0 and attention_map.max() <= 1.0
        assert set(output["class_map"]) == set(levels)
        for class_map in output["class_map"].values():
            assert class_map.shape == (50, 70)
            assert class_map.min() >= 0.0 and class_map.max() <= 1.0


def test_class_map_is_the_branch_map_of_the_predicted_class(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("fal_p2p3.yaml")).eval()
    inputs = _inputs(3)
    with torch.no_grad():
        outputs = model(inputs)
    for i, output in enumerate(outputs):
        for level in ("p2", "p3"):
            raw = model.backbone.last_attention[level].class_maps[i, output["pred_class"]]
            full = torch.nn.functional.interpolate(raw[None, None], size=(64, 64),
                                                   mode="bilinear", align_corners=False)[0, 0]
            expected = (full - full.min()) / (full.max() - full.min())
            assert torch.allclose(output["class_map"][level], expected, atol=1e-5)


def test_no_levels_is_exactly_the_plain_fpn(tiny_cfg):
    cfg = tiny_cfg("fpn_baseline.yaml")
    torch.manual_seed(0)
    fal = build_backbone(cfg)
    plain = build_resnet_fpn_backbone(cfg, fal.bottom_up.output_shape()["res2"].__class__(channels=3))
    assert isinstance(fal, FALFPN) and len(fal.attention_branches) == 0
    assert fal.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(fal.state_dict(), strict=True)
    fal.eval(), plain.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = fal(x), plain(x)
    assert ours.keys() == theirs.keys()
    for level in ours:
        assert torch.equal(ours[level], theirs[level])


def test_attention_reweights_only_chosen_levels(tiny_cfg):
    cfg = tiny_cfg("fal_p2p3.yaml")
    backbone = build_backbone(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        attended = backbone(x)
        raw = FALFPN.__mro__[1].forward(backbone, x)  # the FPN's own forward, no branches
    for level in ["p2", "p3"]:
        expected = raw[level] * (1 + backbone.last_attention[level].attention)
        assert torch.allclose(attended[level], expected)
    for level in ["p4", "p5", "p6"]:
        assert torch.equal(attended[level], raw[level])


def test_losses_finite_and_fall_on_committed_subset(tiny_cfg):
    torch.manual_seed(0)
    cfg = tiny_cfg("fal_p2p3.yaml", "MODEL.CLS_HEAD.NUM_CLASSES", 21)
    records = load_ucmerced(os.path.join(REPO_ROOT, "tests", "data", "ucmerced_mini"), "train",
                            allow_missing=True)
    mapper = ClassificationDatasetMapper(cfg, is_train=False)
    batch = [mapper(record) for record in records[::4]]  # 16 real images, many classes
    model = build_model(cfg)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(12):
        losses = model(batch)
        assert set(losses) == {"loss_cls", "loss_att_p2", "loss_att_p3"}
        assert all(torch.isfinite(v) for v in losses.values())
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert np.mean(history[-3:]) < 0.8 * np.mean(history[:3])


def test_checkpoint_round_trip(tiny_cfg, tmp_path):
    cfg = tiny_cfg("fal_p2p3.yaml", "OUTPUT_DIR", str(tmp_path))
    model = build_model(cfg)
    model.train()
    model(_inputs(4))  # update BN running statistics so they differ from init
    model.eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("round_trip")
    restored = build_model(cfg)
    DetectionCheckpointer(restored).load(str(tmp_path / "round_trip.pth"))
    restored.eval()
    inputs = _inputs(2, seed=1)
    with torch.no_grad():
        before, after = model(inputs), restored(inputs)
    for a, b in zip(before, after):
        assert torch.equal(a["scores"], b["scores"])
        for level in a["attention"]:
            assert torch.equal(a["attention"][level], b["attention"][level])


def test_abn_resnet_backbone(tiny_cfg):
    cfg = tiny_cfg("abn_r50.yaml")
    model = build_model(cfg)
    model.train()
    assert set(model(_inputs(2))) == {"loss_cls", "loss_att_res4"}
    model.eval()
    with torch.no_grad():
        output = model(_inputs(1))[0]
    assert output["attention"]["res4"].shape == (64, 64)


def test_fal_backbone_inside_generalized_rcnn(tiny_cfg):
    cfg = tiny_cfg(
        "fal_p2p3.yaml",
        "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
        "MODEL.ROI_HEADS.NUM_CLASSES", 5,
        "MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"],
        "MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5"],
        "MODEL.ANCHOR_GENERATOR.SIZES", [[8], [16], [32], [64], [128]],
        "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
        "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_FC", 2,
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 7,
    )
    model = build_model(cfg)
    inputs = _inputs(2)
    for item in inputs:
        instances = Instances((64, 64))
        instances.gt_boxes = Boxes(torch.tensor([[4.0, 4.0, 40.0, 40.0]]))
        instances.gt_classes = torch.tensor([item["label"]])
        item["instances"] = instances
    model.train()
    with EventStorage():
        losses = model(inputs)
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    sum(losses.values()).backward()
    assert set(model.backbone.last_attention) == {"p2", "p3"}
    model.eval()
    with torch.no_grad():
        outputs = model(inputs)
    assert "instances" in outputs[0]


def test_unknown_level_is_a_build_error(tiny_cfg):
    cfg = tiny_cfg("fal_p2p3.yaml", "MODEL.FAL.ATTENTION_LEVELS", ["p2", "p9"])
    with pytest.raises(ValueError, match=r"ATTENTION_LEVELS.*p9.*p2', 'p3', 'p4', 'p5', 'p6'"):
        build_model(cfg)


def test_unknown_head_feature_is_a_build_error(tiny_cfg):
    cfg = tiny_cfg("fal_p2p3.yaml", "MODEL.CLS_HEAD.IN_FEATURES", ["p2", "res9"])
    with pytest.raises(ValueError, match="CLS_HEAD.IN_FEATURES.*res9"):
        build_model(cfg)


def test_num_classes_must_match_dataset(tiny_cfg):
    name = "fal_test_three_classes"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
    cfg = tiny_cfg("fal_p2p3.yaml", "DATASETS.TRAIN", (name,), "DATASETS.TEST", ())
    with pytest.raises(ValueError, match=f"MODEL.CLS_HEAD.NUM_CLASSES=5 but dataset '{name}' has 3"):
        check_config_against_datasets(cfg)
    cfg.MODEL.CLS_HEAD.NUM_CLASSES = 3
    check_config_against_datasets(cfg)


@pytest.mark.parametrize(
    "image",
    [
        np.random.RandomState(0).randint(0, 256, (90, 70), dtype=np.uint8),  # grayscale, odd size
        np.random.RandomState(1).randint(0, 256, (64, 64, 4), dtype=np.uint8),  # BGRA
        np.random.RandomState(2).randint(0, 65536, (33, 47, 3), dtype=np.uint16),  # 16-bit
        np.random.RandomState(3).rand(40, 41, 1).astype(np.float32),  # float, one channel
    ],
    ids=["gray-odd", "bgra", "uint16", "float-1ch"],
)
def test_predictor_handles_image_layouts(tiny_cfg, image):
    predictor = FALPredictor(tiny_cfg("fal_p2p3.yaml"), allow_random_weights=True)
    output = predictor(image)
    assert output["scores"].shape == (5,)
    for level in ("p2", "p3"):
        assert output["attention"][level].shape == image.shape[:2]
        assert output["class_map"][level].shape == image.shape[:2]


def test_predictor_rejects_bad_shapes(tiny_cfg):
    predictor = FALPredictor(tiny_cfg("fal_p2p3.yaml"), allow_random_weights=True)
    with pytest.raises(ValueError, match="unsupported image shape"):
        predictor(np.zeros((8, 8, 2), dtype=np.uint8))


def test_detector_num_classes_must_match_dataset(tiny_cfg):
    name = "fal_test_three_classes"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
    cfg = tiny_cfg("fal_p2p3.yaml", "MODEL.META_ARCHITECTURE", "GeneralizedRCNN",
                   "MODEL.ROI_HEADS.NUM_CLASSES", 80, "DATASETS.TRAIN", (name,), "DATASETS.TEST", ())
    with pytest.raises(ValueError, match=f"MODEL.ROI_HEADS.NUM_CLASSES=80 but dataset '{name}' has 3"):
        check_config_against_datasets(cfg)
    cfg.MODEL.META_ARCHITECTURE = "FALRetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    check_config_against_datasets(cfg)


def test_channels_last_gives_the_same_outputs(tiny_cfg):
    """MODEL.CHANNELS_LAST changes memory layout only: same weights, same scores and maps."""
    torch.manual_seed(0)
    reference = build_model(tiny_cfg()).eval()
    nhwc = build_model(tiny_cfg("fal_p2p3.yaml", "MODEL.CHANNELS_LAST", True)).eval()
    nhwc.load_state_dict(reference.state_dict())
    conv_weight = nhwc.backbone.bottom_up.stem.conv1.weight
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv_weight.is_contiguous()
    inputs = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)} for _ in range(2)]
    with torch.no_grad():
        expected, actual = reference(inputs), nhwc(inputs)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a["scores"], e["scores"], rtol=1e-4, atol=1e-5)
        for level in e["attention"]:
            torch.testing.assert_close(a["attention"][level], e["attention"][level], rtol=1e-4, atol=1e-5)


def test_batched_map_resize_equals_resizing_each_map():
    """Grouping images by size must not change any map: mixed image and output sizes in one batch."""
    from fal_d2.modeling import level_maps_to_images

    torch.manual_seed(0)
    maps = torch.rand(4, 8, 10)
    padded_size = (32, 40)
    image_sizes = [(32, 40), (30, 36), (32, 40), (30, 36)]
    output_sizes = [(64, 80), (45, 54), (64, 80), (30, 36)]
    batched = level_maps_to_images(maps, padded_size, image_sizes, output_sizes)
    for i, (image_size, output_size) in enumerate(zip(image_sizes, output_sizes)):
        full = torch.nn.functional.interpolate(maps[i][None, None], size=padded_size, mode="bilinear",
                                               align_corners=False)
        cropped = full[:, :, : image_size[0], : image_size[1]]
        expected = torch.nn.functional.interpolate(cropped, size=output_size, mode="bilinear",
                                                   align_corners=False)[0, 0]
        assert batched[i].shape == output_size
        torch.testing.assert_close(batched[i], expected)


@pytest.mark.parametrize("norm, expected", [
    ("SyncBN", torch.nn.SyncBatchNorm),
    ("naiveSyncBN", NaiveSyncBatchNorm),
    ("GN", torch.nn.BatchNorm2d),  # 32 groups divide neither K nor 1
    ("", torch.nn.BatchNorm2d),  # M keeps a normaliser before its sigmoid
])
def test_branch_class_response_and_map_norms_follow_branch_norm(norm, expected):
    branch = ABNAttentionBranch(in_channels=32, num_classes=21, reduced_channels=32, norm=norm)
    bn_keys = ABNAttentionBranch(in_channels=32, num_classes=21, reduced_channels=32).state_dict()
    for module, channels in ((branch.class_response[1], 21), (branch.attention_map[1], 1)):
        assert type(module) is expected
        assert module.num_features == channels
    # the norms' parameters and buffers keep BN's names, so a checkpoint loads under either norm
    assert {k for k in branch.state_dict() if "convs" not in k} == \
        {k for k in bn_keys if "convs" not in k}
