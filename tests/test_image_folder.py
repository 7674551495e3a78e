"""Your own images, <root>/<class>/<image>, as datasets: the split, the errors on a bad tree, and a
tiny training through tools/train_net.py from the config keys, explanations and TensorBoard
images included. The trees are built from the committed UC Merced subset."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.events import EventStorage

import fal_d2
from fal_d2.data import ClassificationDatasetMapper, register_from_config, register_image_folder
from fal_d2.evaluation.tensorboard_grids import put_explanation_grids

from conftest import MINI_ROOT, REPO_ROOT, load_script, make_tiny_cfg, mini_train_opts

CLASSES = ("airplane", "beach", "forest")
IMAGES_PER_CLASS = 5


def make_tree(root, classes=CLASSES, per_class=IMAGES_PER_CLASS):
    """``root/<class>/<image>`` with the first ``per_class`` mini-set images of each class."""
    for class_name in classes:
        source = os.path.join(MINI_ROOT, "Images", class_name)
        os.makedirs(root / class_name)
        for name in sorted(os.listdir(source))[:per_class]:
            shutil.copy(os.path.join(source, name), root / class_name / name)
    return root


def relative_paths(root):
    return sorted(f"{c}/{name}" for c in os.listdir(root) if not c.startswith(".")
                  for name in os.listdir(root / c) if name.endswith(".jpg"))


def _split_file(tmp, content):
    path = tmp / "split.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return {"split_file": str(path)}


def _of_each_class(root, indices, classes=CLASSES):
    """The images at ``indices`` (in sorted order) of each class."""
    paths = relative_paths(root)
    return [[p for p in paths if p.startswith(f"{c}/")][i] for c in classes for i in indices]


@pytest.fixture(autouse=True)
def restore_catalogs():
    """Each test registers its own names; none outlives it."""
    before = set(DatasetCatalog.list())
    yield
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_seeded_split_is_stratified_complete_and_reproducible(tmp_path):
    root = make_tree(tmp_path / "tree")
    (root / "airplane" / "notes.txt").write_text("not an image")  # ignored: not an image type
    os.makedirs(root / ".thumbnails")  # ignored: hidden
    shutil.copy(root / "beach" / os.listdir(root / "beach")[0], root / ".thumbnails" / "x.jpg")

    names = register_image_folder("trees", str(root), test_fraction=0.4, seed=0)
    assert names == ["trees_train", "trees_test", "trees_all"]
    metadata = MetadataCatalog.get("trees_test")
    assert metadata.thing_classes == sorted(CLASSES)
    assert metadata.evaluator_type == "classification" and metadata.dataset_root == str(root)

    train, test, every = (DatasetCatalog.get(name) for name in names)
    for record in every:
        class_name, file_name = record["class_name"], os.path.basename(record["file_name"])
        assert record["image_id"] == f"{class_name}/{file_name}"
        assert record["file_name"] == os.path.join(str(root), class_name, file_name)
        assert record["label"] == sorted(CLASSES).index(class_name)
        with Image.open(record["file_name"]) as image:
            assert (record["width"], record["height"]) == image.size
    for class_name in CLASSES:  # round(5 * 0.4) = 2 test images per class
        assert sum(r["class_name"] == class_name for r in test) == 2
        assert sum(r["class_name"] == class_name for r in train) == 3
    train_ids, test_ids = {r["image_id"] for r in train}, {r["image_id"] for r in test}
    assert not train_ids & test_ids
    assert sorted(train_ids | test_ids) == [r["image_id"] for r in every] == relative_paths(root)

    register_image_folder("again", str(root), test_fraction=0.4, seed=0)
    assert [r["image_id"] for r in DatasetCatalog.get("again_test")] == sorted(test_ids)
    register_image_folder("other_seed", str(root), test_fraction=0.4, seed=1)
    assert {r["image_id"] for r in DatasetCatalog.get("other_seed_test")} != test_ids


def test_split_file_gives_exactly_the_listed_images(tmp_path):
    root = make_tree(tmp_path / "tree")
    # The 4th and 5th image of each class are left out.
    split = {"train": _of_each_class(root, [0, 1]), "test": _of_each_class(root, [2])}
    split_file = _split_file(tmp_path, split)["split_file"]

    register_image_folder("listed", str(root), split_file=split_file)
    assert [r["image_id"] for r in DatasetCatalog.get("listed_train")] == sorted(split["train"])
    assert [r["image_id"] for r in DatasetCatalog.get("listed_test")] == sorted(split["test"])
    assert len(DatasetCatalog.get("listed_all")) == 9
    metadata = MetadataCatalog.get("listed_train")
    assert metadata.split_file == split_file and metadata.test_fraction is None


def _remove_root(tmp, root):
    shutil.rmtree(root)
    return {}


def _remove_class_folders(tmp, root):
    for class_name in CLASSES:
        shutil.rmtree(root / class_name)
    return {}


def _add_empty_class_folder(tmp, root):
    os.makedirs(root / "empty")
    return {}


def _keep_one_beach_image(tmp, root):
    for name in sorted(os.listdir(root / "beach"))[1:]:
        os.remove(root / "beach" / name)
    return {}


BAD_TREES = {  # id: (damage(tmp, root) -> register_image_folder kwargs, error, message regex)
    "missing_root": (_remove_root, FileNotFoundError, "{root}: dataset folder not found"),
    "no_class_folder": (_remove_class_folders, ValueError, "{root}: no class folders"),
    "empty_class_folder": (_add_empty_class_folder, ValueError,
                           "{root}/empty: class folder has no images"),
    "one_image_class": (_keep_one_beach_image, ValueError, "{root}/beach: 1 image, too few"),
    "test_fraction_one": (lambda tmp, root: {"test_fraction": 1.0}, ValueError,
                          r"test_fraction=1.0 must be in \(0, 1\)"),
    "split_file_missing": (lambda tmp, root: {"split_file": str(tmp / "nowhere.json")},
                           FileNotFoundError, "{tmp}/nowhere.json: split file not found"),
    "split_file_not_json": (lambda tmp, root: _split_file(tmp, "{train: ["), ValueError,
                            "{tmp}/split.json: not valid JSON"),
    "split_file_without_test": (lambda tmp, root: _split_file(tmp, {"train": []}), ValueError,
                                r'{tmp}/split.json: expected {{"train"'),
    "split_names_a_missing_file": (
        lambda tmp, root: _split_file(tmp, {"train": ["airplane/nope.jpg"], "test": []}),
        FileNotFoundError, "{tmp}/split.json: 'train' names 'airplane/nope.jpg', which is not an "
                           "image in {root}/<class name>/"),
    "image_in_both_lists": (
        lambda tmp, root: _split_file(tmp, {"train": relative_paths(root),
                                            "test": relative_paths(root)[:1]}),
        ValueError, "{tmp}/split.json: '[a-z/0-9.]+' is in both 'train' and 'test'"),
    "class_missing_from_test": (
        lambda tmp, root: _split_file(tmp, {"train": _of_each_class(root, [0, 1]),
                                            "test": _of_each_class(root, [2], CLASSES[:2])}),
        ValueError, "{root}/forest: class has no image in {tmp}/split.json's 'test' list"),
}


@pytest.mark.parametrize("damage,error,message", BAD_TREES.values(), ids=BAD_TREES.keys())
def test_a_bad_tree_fails_in_one_line_naming_the_folder_or_file(tmp_path, damage, error, message):
    root = make_tree(tmp_path / "tree")
    kwargs = damage(tmp_path, root)
    with pytest.raises(error, match=message.format(root=root, tmp=tmp_path)) as raised:
        register_image_folder("bad", str(root), **kwargs)
    assert "\n" not in str(raised.value)
    assert "bad_train" not in DatasetCatalog.list()


def test_an_unreadable_image_fails_when_loaded_naming_the_file(tmp_path):
    root = make_tree(tmp_path / "tree")
    broken = root / "beach" / "zz_broken.jpg"
    broken.write_bytes(b"not an image")
    register_image_folder("broken", str(root), test_fraction=0.4)  # lists files, reads none
    with pytest.raises(ValueError, match=f"{broken}: not a readable image"):
        DatasetCatalog.get("broken_all")


def test_a_truncated_image_fails_when_decoded_naming_the_file(tmp_path, tiny_cfg):
    root = make_tree(tmp_path / "tree")
    image = root / "beach" / sorted(os.listdir(root / "beach"))[0]
    image.write_bytes(image.read_bytes()[:2000])  # the header survives: it loads, but cannot decode
    register_image_folder("cut", str(root), test_fraction=0.4)
    (record,) = [r for r in DatasetCatalog.get("cut_all") if r["file_name"] == str(image)]
    mapper = ClassificationDatasetMapper(tiny_cfg(), is_train=False)
    with pytest.raises(OSError, match=f"{image}: cannot read the image"):
        mapper(record)


def _folder_cfg(root, name="mine", **keys):
    cfg = make_tiny_cfg()
    cfg.DATASETS.IMAGE_FOLDER.NAME = name
    cfg.DATASETS.IMAGE_FOLDER.ROOT = str(root)
    for key, value in keys.items():
        cfg.DATASETS.IMAGE_FOLDER[key] = value
    return cfg


def test_register_from_config_registers_once_and_refuses_another_folder(tmp_path):
    root = make_tree(tmp_path / "tree")
    assert register_from_config(make_tiny_cfg()) == []  # NAME "" registers nothing
    cfg = _folder_cfg(root, TEST_FRACTION=0.4)
    assert register_from_config(cfg) == ["mine_train", "mine_test", "mine_all"]
    assert register_from_config(cfg) == ["mine_train", "mine_test", "mine_all"]  # no-op
    with pytest.raises(ValueError, match="'mine_train' is already registered"):
        register_from_config(_folder_cfg(root, TEST_FRACTION=0.2))
    with pytest.raises(ValueError, match="NAME='other' needs DATASETS.IMAGE_FOLDER.ROOT"):
        register_from_config(_folder_cfg("", name="other"))


def _train_net_args(train_net, output_dir, root, *extra):
    opts = mini_train_opts(output_dir, "mine_train", "mine_test")
    opts[opts.index("MODEL.CLS_HEAD.NUM_CLASSES") + 1] = "3"
    opts += ["DATASETS.IMAGE_FOLDER.NAME", "mine", "DATASETS.IMAGE_FOLDER.ROOT", str(root),
             "DATASETS.IMAGE_FOLDER.TEST_FRACTION", "0.4",
             "TEST.EXPLAIN.LEVELS", "['p2', 'p3']", "TEST.EXPLAIN.AUC_STEPS", "0", *extra]
    config = os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml")
    return train_net.get_parser().parse_args(["--config-file", config, *opts])


def test_the_class_count_is_checked_against_the_folder(tmp_path):
    train_net = load_script(os.path.join("tools", "train_net.py"))
    args = _train_net_args(train_net, tmp_path / "out", make_tree(tmp_path / "tree"),
                           "MODEL.CLS_HEAD.NUM_CLASSES", "21")
    message = "MODEL.CLS_HEAD.NUM_CLASSES=21 but dataset 'mine_train' has 3 classes"
    with pytest.raises(ValueError, match=message):
        train_net.setup(args)


def _tensorboard_images(output_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_file,) = [name for name in os.listdir(output_dir) if name.startswith("events.out")]
    accumulator = EventAccumulator(os.path.join(output_dir, events_file),
                                   size_guidance={"images": 0})  # 0: keep every image
    accumulator.Reload()
    return {tag: accumulator.Images(tag) for tag in accumulator.Tags()["images"]}


def test_train_net_trains_and_explains_on_an_image_folder(tmp_path):
    train_net = load_script(os.path.join("tools", "train_net.py"))
    output_dir = tmp_path / "out"
    train_net.main(_train_net_args(train_net, output_dir, make_tree(tmp_path / "tree")))

    with open(output_dir / "metrics.json") as f:
        final = [r for r in map(json.loads, f) if "classification/top1" in r][-1]
    assert 0.0 <= final["classification/top1"] <= 100.0
    assert any(key.startswith("explanation/attention/p2/") for key in final)
    explain_dir = output_dir / "explain" / "mine_test"
    with open(explain_dir / "explanation_metrics.json") as f:
        explanation = json.load(f)
    assert explanation["fal_d2_version"] == fal_d2.__version__
    assert explanation["dataset"] == "mine_test"
    assert {row["class"] for row in explanation["rows"]} == {"all", *CLASSES}
    assert (output_dir / "inference" / "mine_test" / "report.html").exists()

    # The evaluation during training put both grids into TensorBoard, at its iteration.
    images = _tensorboard_images(output_dir)
    assert set(images) == {"explain/mine_test/attention", "explain/mine_test/gradcam"}
    for method, (event,) in ((tag.split("/")[-1], events) for tag, events in images.items()):
        assert event.step == final["iteration"]
        with Image.open(explain_dir / f"grid_{method}.png") as grid:
            assert (event.width, event.height) == grid.size


def test_grids_go_to_the_event_storage_only_during_training(tmp_path):
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba).save(tmp_path / "grid_gradcam.png")
    assert put_explanation_grids(str(tmp_path), "set", ["gradcam", "attention"]) == []
    with EventStorage(start_iter=7) as storage:
        names = put_explanation_grids(str(tmp_path), "set", ["gradcam", "attention"])
        assert names == ["explain/set/gradcam"]  # attention drew no grid
        ((name, image, step),) = storage._vis_data
    assert (name, step) == ("explain/set/gradcam", 7)
    assert image.shape == (3, 20, 30) and image.dtype == np.uint8
    assert image[:, 0, 0].tolist() == [200, 0, 0]  # RGB, alpha dropped
