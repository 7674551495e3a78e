"""
Tests of the UC Merced split, dataset registration and ClassificationDatasetMapper.

Split tests read only the committed split file. Registration tests use the committed mini subset
(tests/data/ucmerced_mini). Full-dataset tests look in $DETECTRON2_DATASETS/UCMerced_LandUse, then
in $FAL_D2_SHARED/datasets/UCMerced_LandUse, where FAL_D2_SHARED defaults to ../shared relative to
the repository root (the location CI provides), and are skipped when neither exists.
"""
import csv
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image

from fal_d2.config import add_fal_config
from fal_d2.data import (
    CLASS_NAMES,
    ClassificationDatasetMapper,
    RandomRotate90,
    Rot90Transform,
    load_ucmerced,
    register_ucmerced,
)
from fal_d2.data import mapper as mapper_module
from fal_d2.data.ucmerced import SPLIT_FILE, build_ucmerced_split, load_ucmerced_split

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "tests" / "data" / "ucmerced_mini"
CANONICAL_STEMS = {name: [f"{name}{i:02d}" for i in range(100)] for name in CLASS_NAMES}


def _full_dataset_root():
    candidates = [
        Path(os.getenv("DETECTRON2_DATASETS", REPO / "datasets")) / "UCMerced_LandUse",
        Path(os.getenv("FAL_D2_SHARED", REPO.parent / "shared")) / "datasets" / "UCMerced_LandUse",
    ]
    for root in candidates:
        if (root / "Images").is_dir():
            return root
    pytest.skip(f"full UC Merced dataset not found in {[str(c) for c in candidates]}")


def _committed_split():
    with open(SPLIT_FILE) as f:
        return json.load(f)


# ---------------------------------------------------------------- split


def test_class_names_sorted_and_shared_with_prepare_script():
    assert len(CLASS_NAMES) == 21 and CLASS_NAMES == sorted(CLASS_NAMES)
    prep = load_script(os.path.join("datasets", "prepare_ucmerced.py"))
    assert list(prep.CLASS_NAMES) == CLASS_NAMES


def test_committed_split_is_reproduced_by_the_documented_recipe():
    committed = _committed_split()
    assert committed["seed"] == 42
    assert build_ucmerced_split(CANONICAL_STEMS, seed=42) == committed


def test_split_is_deterministic_and_depends_only_on_seed():
    shuffled = {}
    for name in reversed(CLASS_NAMES):  # input order must not matter
        stems = list(CANONICAL_STEMS[name])
        random.Random(name).shuffle(stems)
        shuffled[name] = stems
    assert build_ucmerced_split(shuffled) == build_ucmerced_split(CANONICAL_STEMS)
    assert build_ucmerced_split(CANONICAL_STEMS, seed=7)["test"] != _committed_split()["test"]


def test_split_is_stratified_disjoint_and_complete():
    split = _committed_split()
    for name in CLASS_NAMES:
        train, val, test = (set(split[part][name]) for part in ("train", "val", "test"))
        assert (len(train), len(val), len(test)) == (70, 10, 20)
        assert not (train & val or train & test or val & test)
        assert train | val | test == set(CANONICAL_STEMS[name])


def test_named_splits_counts_and_trainval_union():
    counts = {s: len(load_ucmerced_split(s)) for s in ("train", "val", "trainval", "test")}
    assert counts == {"train": 1470, "val": 210, "trainval": 1680, "test": 420}
    assert set(load_ucmerced_split("trainval")) == set(load_ucmerced_split("train")) | set(
        load_ucmerced_split("val")
    )
    per_class = Counter(name for name, _ in load_ucmerced_split("test"))
    assert set(per_class.values()) == {20}
    with pytest.raises(KeyError, match="'valid'"):
        load_ucmerced_split("valid")


# ---------------------------------------------------------------- registration


@pytest.fixture(scope="module")
def mini_names():
    names = register_ucmerced(str(MINI), prefix="ucmerced_mini", allow_missing=True)
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _mini_manifest():
    with open(MINI / "MANIFEST.tsv", newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f, delimiter="\t")}


def test_builtin_datasets_registered_lazily():
    for split in ("train", "val", "trainval", "test"):
        name = f"ucmerced_{split}"
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == CLASS_NAMES and meta.split == split
        assert meta.evaluator_type == "classification"
        assert meta.dataset_root.endswith("UCMerced_LandUse")


def test_mini_records(mini_names):
    assert mini_names == [f"ucmerced_mini_{s}" for s in ("train", "val", "trainval", "test")]
    manifest = _mini_manifest()
    for split, expected_count in (("train", 63), ("val", 0), ("trainval", 63), ("test", 42)):
        records = DatasetCatalog.get(f"ucmerced_mini_{split}")
        assert len(records) == expected_count
        for record in records:
            path = Path(record["file_name"])
            row = manifest[f"{path.parent.name}/{path.name}"]
            assert path.is_file() and record["image_id"] == path.stem
            assert record["class_name"] == row["class"] == path.parent.name
            assert CLASS_NAMES[record["label"]] == record["class_name"]
            assert (record["width"], record["height"]) == (int(row["width"]), int(row["height"]))
            if split != "trainval":
                assert row["split"] == split
    sizes = {(r["width"], r["height"]) for r in DatasetCatalog.get("ucmerced_mini_train")}
    assert len(sizes) > 1  # the mini subset covers odd-sized images
    meta = MetadataCatalog.get("ucmerced_mini_test")
    assert meta.dataset_root == str(MINI) and meta.thing_classes == CLASS_NAMES


def test_subset_without_allow_missing_names_the_missing_image():
    with pytest.raises(FileNotFoundError) as info:
        load_ucmerced(str(MINI), "train")
    message = str(info.value)
    assert "\n" not in message and str(MINI / "Images") in message


def test_missing_root_registers_but_fails_to_load_with_path(tmp_path):
    missing = tmp_path / "nowhere"
    names = register_ucmerced(str(missing), prefix="ucmerced_nowhere")
    try:
        with pytest.raises(FileNotFoundError, match=str(missing / "Images")):
            DatasetCatalog.get("ucmerced_nowhere_test")
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_full_dataset_splits():
    root = _full_dataset_root()
    records = {split: load_ucmerced(str(root), split) for split in ("train", "val", "test")}
    for split, size in (("train", 1470), ("val", 210), ("test", 420)):
        assert len(records[split]) == size
        assert set(Counter(r["label"] for r in records[split]).values()) == {size // 21}
    ids = [{r["image_id"] for r in records[split]} for split in ("train", "val", "test")]
    assert len(set.union(*ids)) == 2100
    odd = [r for rs in records.values() for r in rs if (r["height"], r["width"]) != (256, 256)]
    assert len(odd) == 44  # the dataset's readme says 256x256, but 44 images are not


def test_split_script_reproduces_committed_file_from_full_dataset(tmp_path):
    root = _full_dataset_root()
    script = load_script(os.path.join("datasets", "make_ucmerced_split.py"))
    output = tmp_path / "split.json"
    assert script.main(["--dataset", str(root), "--output", str(output)]) == 0
    assert output.read_bytes() == Path(SPLIT_FILE).read_bytes()


# ---------------------------------------------------------------- mapper


def _cfg(**cls_options):
    cfg = get_cfg()
    add_fal_config(cfg)
    cfg.INPUT.CLS.SIZE = 16
    cfg.INPUT.CLS.RANDOM_FLIP = False
    cfg.INPUT.CLS.RANDOM_ROTATE90 = False
    cfg.DATALOADER.CACHE_IMAGES = False
    for key, value in cls_options.items():
        cfg.INPUT.CLS[key] = value
    return cfg


def _write_image(path, rgb):
    Image.fromarray(rgb).save(path)
    height, width = rgb.shape[:2]
    return {
        "file_name": str(path),
        "image_id": path.stem,
        "height": height,
        "width": width,
        "label": 3,
        "class_name": CLASS_NAMES[3],
    }


@pytest.fixture
def odd_sized(tmp_path):
    """A 20x30 image: red left half, blue right half."""
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :15, 0] = 255
    rgb[:, 15:, 2] = 255
    return _write_image(tmp_path / "odd.png", rgb)


@pytest.fixture
def square(tmp_path):
    """A random 16x16 image, already at SIZE so the resize is exact."""
    rgb = np.random.RandomState(0).randint(0, 256, (16, 16, 3), dtype=np.uint8)
    return _write_image(tmp_path / "square.png", rgb), rgb


def test_test_time_output_fields_and_channel_order(odd_sized):
    outputs = {}
    for image_format in ("RGB", "BGR"):
        cfg = _cfg()
        cfg.INPUT.FORMAT = image_format
        out = ClassificationDatasetMapper(cfg, is_train=False)(odd_sized)
        image = out["image"]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 16, 16)
        assert image.is_contiguous()
        assert (out["height"], out["width"], out["label"]) == (20, 30, 3)
        assert out["file_name"] == odd_sized["file_name"] and out["image_id"] == "odd"
        outputs[image_format] = image.numpy()
    red_channel = {"RGB": 0, "BGR": 2}
    for image_format, image in outputs.items():
        assert image[red_channel[image_format], :, 0].min() == 255  # left column is red
        assert image[2 - red_channel[image_format], :, 0].max() == 0
    np.testing.assert_array_equal(outputs["BGR"], outputs["RGB"][::-1])


def test_test_time_is_a_plain_resize(square):
    record, rgb = square
    cfg = _cfg(RANDOM_FLIP=True, RANDOM_ROTATE90=True, COLOR_JITTER=0.5)
    cfg.INPUT.FORMAT = "RGB"
    mapper = ClassificationDatasetMapper(cfg, is_train=False)
    for _ in range(5):
        np.testing.assert_array_equal(mapper(record)["image"].numpy().transpose(1, 2, 0), rgb)


def _train_outputs(record, cfg, draws=40):
    cfg.INPUT.FORMAT = "RGB"
    mapper = ClassificationDatasetMapper(cfg, is_train=True)
    np.random.seed(0)
    return [mapper(record)["image"].numpy().transpose(1, 2, 0) for _ in range(draws)]


def _which(image, candidates):
    return [name for name, c in candidates.items() if np.array_equal(image, c)]


def test_random_flips_are_the_four_flip_combinations(square):
    record, rgb = square
    candidates = {"none": rgb, "h": rgb[:, ::-1], "v": rgb[::-1], "hv": rgb[::-1, ::-1]}
    seen = [_which(out, candidates) for out in _train_outputs(record, _cfg(RANDOM_FLIP=True))]
    assert all(len(names) == 1 for names in seen)
    assert {names[0] for names in seen} == set(candidates)


def test_random_rotate90_is_lossless_and_covers_all_quarter_turns(square):
    record, rgb = square
    candidates = {k: np.rot90(rgb, k) for k in range(4)}
    seen = [_which(out, candidates) for out in _train_outputs(record, _cfg(RANDOM_ROTATE90=True))]
    assert all(len(names) == 1 for names in seen)
    assert {names[0] for names in seen} == {0, 1, 2, 3}


def test_rot90_transform_image_and_coords_agree():
    h, w = 5, 7
    image = np.zeros((h, w, 3), np.uint8)
    row, col = 1, 5
    image[row, col] = 255
    # One quarter turn counter-clockwise, written out by hand.
    np.testing.assert_array_equal(
        Rot90Transform(2, 2, 1).apply_image(np.array([[1, 2], [3, 4]])), [[2, 4], [1, 3]]
    )
    for k in range(4):
        transform = Rot90Transform(h, w, k)
        rotated = transform.apply_image(image)
        assert rotated.shape[:2] == ((w, h) if k % 2 else (h, w))
        new_row, new_col = np.argwhere(rotated[..., 0] == 255)[0]
        center = np.array([[col + 0.5, row + 0.5]])
        moved = transform.apply_coords(center.copy())
        np.testing.assert_allclose(moved, [[new_col + 0.5, new_row + 0.5]])
        inverse = transform.inverse()
        np.testing.assert_array_equal(inverse.apply_image(rotated), image)
        np.testing.assert_allclose(inverse.apply_coords(moved), center)


def test_random_rotate90_augmentation_draws_every_k():
    np.random.seed(0)
    image = np.zeros((4, 6, 3), np.uint8)
    ks = {RandomRotate90().get_transform(image).k for _ in range(50)}
    assert ks == {0, 1, 2, 3}


def test_color_jitter_is_the_same_for_rgb_and_bgr(square):
    record, _ = square
    outputs = {}
    for image_format in ("RGB", "BGR"):
        cfg = _cfg(COLOR_JITTER=0.4)
        cfg.INPUT.FORMAT = image_format
        mapper = ClassificationDatasetMapper(cfg, is_train=True)
        np.random.seed(3)
        outputs[image_format] = [mapper(record)["image"].numpy() for _ in range(5)]
    plain = ClassificationDatasetMapper(_cfg(), is_train=False)(record)["image"].numpy()
    for rgb, bgr in zip(outputs["RGB"], outputs["BGR"]):
        # Saturation must use RGB luma weights whatever the channel order.
        np.testing.assert_array_equal(bgr, rgb[::-1])
        assert not np.array_equal(bgr, plain)


def test_cache_reads_each_file_once_and_is_never_modified(square, monkeypatch):
    record, rgb = square
    reads = []

    def counting_read_image(file_name, format=None):
        reads.append(file_name)
        return read_image(file_name, format=format)

    monkeypatch.setattr(mapper_module, "read_image", counting_read_image)
    cfg = _cfg(RANDOM_FLIP=True, RANDOM_ROTATE90=True, COLOR_JITTER=0.3)
    cfg.DATALOADER.CACHE_IMAGES = True
    cfg.INPUT.FORMAT = "RGB"
    mapper = ClassificationDatasetMapper(cfg, is_train=True)
    for _ in range(6):
        out = mapper(record)
    assert reads == [record["file_name"]]
    assert (out["height"], out["width"]) == (16, 16)
    cached, original_size = mapper.cache[record["file_name"]]
    np.testing.assert_array_equal(cached, rgb)  # augmentations did not touch the cached copy
    assert original_size == (16, 16)

    cfg.DATALOADER.CACHE_IMAGES = False
    uncached = ClassificationDatasetMapper(cfg, is_train=True)
    uncached(record)
    uncached(record)
    assert len(reads) == 3


def test_size_mismatch_with_record_is_reported(odd_sized):
    with pytest.raises(Exception, match="odd.png"):
        ClassificationDatasetMapper(_cfg(), is_train=False)({**odd_sized, "height": 21})


def test_unsupported_format_is_rejected():
    cfg = _cfg()
    cfg.INPUT.FORMAT = "L"
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        ClassificationDatasetMapper(cfg)
