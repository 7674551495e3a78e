"""No silent wrong answers (issue 14): weights, configs, checkpoints, demo outputs and images fail
loudly and early, with one line naming the file or key. One test per item; the eval-only
metrics.json and the weights' sha256 are checked in test_tools.py."""
import contextlib
import errno
import json
import logging
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.modeling import META_ARCH_REGISTRY, build_model

import fal_d2.checkpoint
from fal_d2.checkpoint import FALCheckpointer, WeightsError
from fal_d2.modeling import FALClassifier
from fal_d2.predictor import FALPredictor, to_bgr_uint8

from conftest import REPO_ROOT, TINY_OVERRIDES, load_script, make_tiny_cfg, mini_train_opts

FAL_CONFIG = os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml")


def _tool(name):
    return load_script(os.path.join("tools", f"{name}.py"))


def _demo_opts():
    opts = [str(o) for o in TINY_OVERRIDES]
    opts[opts.index("MODEL.CLS_HEAD.NUM_CLASSES") + 1] = "21"
    return opts


def _save(model, path):
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def _one_line(error):
    message = str(error.value)
    assert "\n" not in message, message
    return message


@contextlib.contextmanager
def _logged(name):
    """The messages logged at INFO and above to logger ``name``. Detectron2's setup_logger stops
    "fvcore" (the checkpointer's) and "detectron2" from propagating to pytest's caplog."""
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# ---------------------------------------------------------------- weights


def test_eval_only_refuses_to_run_without_weights(tmp_path, mini_datasets):
    train_net = _tool("train_net")
    opts = ["--config-file", FAL_CONFIG, "--eval-only", *mini_train_opts(tmp_path, *mini_datasets)]
    with pytest.raises(WeightsError, match="--eval-only: MODEL.WEIGHTS is empty") as error:
        train_net.setup(train_net.get_parser().parse_args(opts))
    assert "--allow-random-weights" in _one_line(error)
    assert not os.listdir(tmp_path)  # failed before writing anything
    train_net.setup(train_net.get_parser().parse_args(["--allow-random-weights", *opts]))


def test_demo_explain_and_predictor_refuse_to_run_without_weights(tmp_path, mini_datasets):
    image = os.path.join(REPO_ROOT, "tests", "data", "ucmerced_mini", "Images", "beach")
    with pytest.raises(WeightsError, match=r"fal_p2p3.yaml: MODEL.WEIGHTS is empty.* pass "
                                           r"--allow-random-weights"):
        _tool("demo").main(["--config-file", FAL_CONFIG, "--input", image,
                            "--output", str(tmp_path / "demo"), *_demo_opts()])
    with pytest.raises(WeightsError, match=r"fal_p2p3.yaml \(MODEL.WEIGHTS; --compare-weights for "
                                           r"--compare-config\): MODEL.WEIGHTS is empty"):
        _tool("explain").main(["--config-file", FAL_CONFIG, "--dataset", mini_datasets[1],
                               "--output", str(tmp_path / "explain"), *_demo_opts()])
    with pytest.raises(WeightsError, match="allow_random_weights=True"):
        FALPredictor(make_tiny_cfg())
    assert not os.path.exists(tmp_path / "demo") and not os.path.exists(tmp_path / "explain")


def test_weights_that_do_not_fit_fail_in_one_line(tmp_path):
    """The issue's case: an R-50 FPN baseline checkpoint loaded into an R-18 FAL config."""
    r50 = build_model(make_tiny_cfg("fpn_baseline.yaml", "MODEL.RESNETS.DEPTH", 50,
                                    "MODEL.RESNETS.RES2_OUT_CHANNELS", 256))
    weights = _save(r50, tmp_path / "r50_baseline.pth")
    with pytest.raises(WeightsError) as error:
        FALPredictor(make_tiny_cfg("fal_p2p3.yaml", "MODEL.WEIGHTS", weights))
    message = _one_line(error)
    assert message.startswith(f"{weights} does not fit the FALClassifier: ")
    for part in [r"\d+ tensor\(s\) of the model missing from the file \(e.g. backbone\.\S+\)",
                 r"\d+ tensor\(s\) of the file not in the model \(e.g. backbone\.bottom_up\.\S+\)",
                 r"\d+ of another shape \(e.g. \S+: \([\d, ]+\) in the file, \([\d, ]+\) in the "
                 r"model\)", "set MODEL.WEIGHTS_PARTIAL True"]:
        assert re.search(part, message), part

    with _logged("fvcore") as messages:
        FALPredictor(make_tiny_cfg("fal_p2p3.yaml", "MODEL.WEIGHTS", weights,
                                   "MODEL.WEIGHTS_PARTIAL", True))
    (summary,) = [m for m in messages if m.startswith(weights)]
    assert re.match(r".*: \d+ of the model's \d+ tensors loaded \(MODEL.WEIGHTS_PARTIAL\); "
                    r"not loaded: ", summary)


def test_training_may_start_from_weights_without_the_new_parts(tmp_path):
    """A baseline (no branches) or a trunk-only ImageNet-style file initialises training, in one
    line; the same files for inference, or a file without the trunk for training, fail."""
    fal = build_model(make_tiny_cfg("fal_p2p3.yaml"))
    baseline = build_model(make_tiny_cfg("fpn_baseline.yaml"))
    baseline_file = _save(baseline, tmp_path / "baseline.pth")
    trunk = {key[len("backbone.bottom_up."):]: value.numpy()
             for key, value in baseline.state_dict().items() if key.startswith("backbone.bottom_up.")}
    trunk_file = str(tmp_path / "imagenet_style.pkl")
    with open(trunk_file, "wb") as f:  # Detectron2's model-zoo format, matched by name heuristics
        pickle.dump({"model": trunk, "__author__": "test", "matching_heuristics": True}, f)

    for weights, example in [(baseline_file, "backbone.attention_branches."),
                             (trunk_file, "backbone.fpn_")]:
        with _logged("fvcore") as messages:
            FALCheckpointer(fal, training=True).resume_or_load(weights, resume=False)
        (summary,) = [m for m in messages if m.startswith(weights)]
        assert re.fullmatch(rf"{re.escape(weights)}: \d+ of the model's \d+ tensors loaded; \d+ "
                            rf"new one\(s\) keep their initialisation \(e.g. {example}\S+\)",
                            summary), summary
        with pytest.raises(WeightsError, match="does not fit the FALClassifier"):
            FALCheckpointer(fal).resume_or_load(weights, resume=False)  # inference: must fit
    head_only = _save(baseline.head, tmp_path / "head_only.pth")
    with pytest.raises(WeightsError, match="no tensor fits the FALClassifier"):
        FALCheckpointer(fal, training=True).resume_or_load(head_only, resume=False)


@pytest.mark.parametrize("content, reason", [
    (b"", r"the file is empty \(0 bytes\)"),
    (b"model weights\n", r"neither a PyTorch zip archive nor a pickle \(it starts with b'model we'\)"),
    ("truncated", r"the zip archive is truncated or damaged \(4000 bytes, no end record\)"),
], ids=["empty", "text", "truncated"])
def test_unreadable_weights_fail_in_one_line_naming_the_file(tmp_path, content, reason):
    model = build_model(make_tiny_cfg())
    weights = tmp_path / "weights.pth"
    if content == "truncated":
        content = open(_save(model, tmp_path / "whole.pth"), "rb").read()[:4000]
    weights.write_bytes(content)
    with pytest.raises(WeightsError, match=f"^{weights}: cannot be read as a checkpoint: {reason}$"):
        FALCheckpointer(model).load(str(weights))
    with pytest.raises(WeightsError, match=f"^{tmp_path / 'none.pth'}: no such weights file$"):
        FALCheckpointer(model).load(str(tmp_path / "none.pth"))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("key, value, message", [
    ("TEST.EXPLAIN.LEVELS", "['p2', 'p9']", r"TEST.EXPLAIN.LEVELS: unknown level\(s\) \['p9'\]; "
                                            r"the backbone \(build_fal_resnet_fpn_backbone\) "
                                            r"produces \['p2', 'p3', 'p4', 'p5', 'p6'\]"),
    ("TEST.EXPLAIN.LEVELS", "[]", "TEST.EXPLAIN.LEVELS: no level given"),
    ("MODEL.FAL.ATTENTION_LEVELS", "['p7']", r"MODEL.FAL.ATTENTION_LEVELS: unknown level\(s\)"),
    ("MODEL.CLS_HEAD.IN_FEATURES", "['p2', 'res9']", r"MODEL.CLS_HEAD.IN_FEATURES: unknown"),
])
def test_levels_are_checked_at_setup(tmp_path, mini_datasets, key, value, message):
    train_net = _tool("train_net")
    args = train_net.get_parser().parse_args(
        ["--config-file", FAL_CONFIG, *mini_train_opts(tmp_path, *mini_datasets), key, value])
    with pytest.raises(ValueError, match=message):
        train_net.setup(args)
    assert not os.listdir(tmp_path)  # before training: nothing written


def test_a_config_typo_names_the_yaml_file(tmp_path):
    config = tmp_path / "my_config.yaml"
    config.write_text(f"_BASE_: {FAL_CONFIG}\nTEST:\n  EXPLAIN:\n    METHODZ: [gradcam]\n")
    train_net = _tool("train_net")
    args = train_net.get_parser().parse_args(["--config-file", str(config)])
    with pytest.raises(ValueError, match=f"^{config}: Non-existent config key: "
                                         f"TEST.EXPLAIN.METHODZ$"):
        train_net.setup(args)


# ---------------------------------------------------------------- checkpoints


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    model = build_model(make_tiny_cfg())
    checkpointer = FALCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")

    def disk_full(data, f):
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fal_d2.checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save("model_0000002")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


@pytest.mark.parametrize("damage", ["truncated", "empty_tag"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, mini_datasets, damage):
    """--resume after a run whose last checkpoint is damaged: it resumes from the newest intact
    one, says which file it skipped and why, and trains on."""
    train_net = _tool("train_net")
    opts = mini_train_opts(tmp_path, mini_datasets[0], mini_datasets[1]) + [
        "DATASETS.TEST", "()", "TEST.EXPLAIN.ENABLED", "False", "SOLVER.CHECKPOINT_PERIOD", "1",
        "SOLVER.MAX_ITER", "2"]
    train_net.main(train_net.get_parser().parse_args(["--config-file", FAL_CONFIG, *opts]))
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    if damage == "truncated":
        final = tmp_path / "model_final.pth"
        final.write_bytes(final.read_bytes()[:5000])
        skipped = f"{final} (the zip archive is truncated or damaged (5000 bytes, no end record))"
    else:
        (tmp_path / "last_checkpoint").write_text("")
        skipped = f"{tmp_path / 'last_checkpoint'} (it is empty)"

    args = train_net.get_parser().parse_args(
        ["--config-file", FAL_CONFIG, "--resume", *opts, "SOLVER.MAX_ITER", "3"])
    with _logged("fvcore") as messages, _logged("detectron2") as trainer_messages:
        train_net.main(args)
    resumed = tmp_path / ("model_final.pth" if damage == "empty_tag" else "model_0000001.pth")
    assert f"resume: skipped {skipped}; resuming from {resumed}" in messages
    assert "Starting training from iteration 2" in trainer_messages

    for name in os.listdir(tmp_path):
        if name.endswith(".pth"):
            (tmp_path / name).write_bytes(b"")
    with pytest.raises(WeightsError, match="no other intact model_\\*.pth .*delete last_checkpoint"):
        train_net.main(args)


# ---------------------------------------------------------------- demo


def _write_image(path, width, height, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _run_demo(inputs, output, *extra):
    return _tool("demo").main(["--input", *map(str, inputs), "--output", str(output),
                               "--config-file", FAL_CONFIG, "--allow-random-weights", *extra,
                               *_demo_opts()])


def _overlay_sizes(predictions):
    """{input path: the set of (width, height) of its overlays}."""
    sizes = {}
    for path, entry in predictions.items():
        for maps in entry["heatmaps"].values():
            for heatmap in maps.values():
                with Image.open(heatmap) as image:
                    sizes.setdefault(path, set()).add(image.size)
    return sizes


def test_demo_searches_folders_recursively(tmp_path, capsys):
    """A folder of class folders (UC Merced's Images/ layout) is searched, its tree mirrored."""
    root = tmp_path / "Images"
    for name in ["airplane/a0.jpg", "beach/b0.png", "beach/deeper/b1.tif"]:
        _write_image(str(root / name), 40, 30)
    (root / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert _run_demo([root], out) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(predictions) == [str(root / n) for n in
                                   ["airplane/a0.jpg", "beach/b0.png", "beach/deeper/b1.tif"]]
    assert predictions[str(root / "beach/deeper/b1.tif")]["heatmaps"]["branch_cam"]["p2"] == \
        str(out / "beach/deeper/b1_p2_branch_cam.png")

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert _run_demo([empty], tmp_path / "out_empty") == 1
    assert "no images" in capsys.readouterr().err


def test_demo_output_names_are_unique_and_map_back(tmp_path):
    """The issue's case: ok.jpg, dup/ok.png and dup/x/ok.jpg once wrote one ok_p2.png."""
    inputs = [tmp_path / "in" / name for name in ["ok.jpg", "dup/ok.png", "dup/x/ok.jpg"]]
    for i, (path, size) in enumerate(zip(inputs, [(40, 30), (50, 20), (33, 33)])):
        _write_image(str(path), *size, seed=i)
    for given, out in [([tmp_path / "in"], tmp_path / "mirrored"), (inputs, tmp_path / "flat")]:
        assert _run_demo(given, out) == 0
        predictions = json.loads((out / "predictions.json").read_text())
        assert sorted(predictions) == sorted(map(str, inputs))
        paths = [p for e in predictions.values() for m in e["heatmaps"].values() for p in m.values()]
        assert len(set(paths)) == len(paths) == 3 * 2 * 2  # 3 images, 2 methods, 2 levels
        assert _overlay_sizes(predictions) == {str(inputs[0]): {(40, 30)},
                                               str(inputs[1]): {(50, 20)},
                                               str(inputs[2]): {(33, 33)}}
    flat = sorted(os.listdir(tmp_path / "flat"))
    assert "ok_p2_branch_cam.png" in flat
    assert sum(n.endswith("_p2_branch_cam.png") for n in flat) == 3


def test_demo_overlays_have_a_bounded_size(tmp_path):
    image = tmp_path / "wide.png"
    _write_image(str(image), 300, 200)
    for max_side, size in [("64", (64, 43)), ("0", (300, 200))]:
        out = tmp_path / f"out_{max_side}"
        assert _run_demo([image], out, "--max-side", max_side) == 0
        predictions = json.loads((out / "predictions.json").read_text())
        assert _overlay_sizes(predictions) == {str(image): {size}}


def test_demo_messages_do_not_break_the_progress_bar(tmp_path, monkeypatch):
    demo = _tool("demo")
    written = []
    monkeypatch.setattr(demo.tqdm, "write", lambda message, **kwargs: written.append(message))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    good = tmp_path / "good.png"
    _write_image(str(good), 20, 20)
    assert _run_demo([bad, good], tmp_path / "out") == 0
    assert len(written) == 1 and written[0].startswith(f"skipped {bad}: ")


# ---------------------------------------------------------------- images


def test_float_images_in_0_to_255_are_detected():
    image = np.random.RandomState(0).randint(0, 256, (24, 20, 3), dtype=np.uint8)
    predictor = FALPredictor(make_tiny_cfg(), allow_random_weights=True)
    expected = predictor(image)["scores"]
    for as_float in (image.astype(np.float32), image.astype(np.float64) / 255.0):
        np.testing.assert_array_equal(to_bgr_uint8(as_float), image)
        torch.testing.assert_close(predictor(as_float)["scores"], expected)


@pytest.mark.parametrize("image, message", [
    (None, r"no image was given \(got None; cv2.imread returns None"),
    (np.zeros((0, 0, 3), np.uint8), r"no image was given \(got an empty array of shape \(0, 0, 3\)\)"),
    (np.full((4, 4, 3), 256.0, np.float32), r"float image values span \[256, 256\]; accepted "
                                            r"ranges are \[0, 1\] and \[0, 255\]"),
    (np.full((4, 4), -0.5, np.float32), r"float image values span \[-0.5, -0.5\]"),
    (np.full((4, 4), np.nan, np.float32), "NaN or infinite"),
], ids=["none", "empty", "above-255", "negative", "nan"])
def test_missing_or_out_of_range_images_fail_in_one_line(image, message):
    with pytest.raises(ValueError, match=message):
        to_bgr_uint8(image)


# ---------------------------------------------------------------- task dispatch


def test_a_subclass_of_fal_classifier_trains_as_a_classifier(tmp_path, mini_datasets):
    """The mapper, evaluators and class-count check come from the registered class, not its
    name: a user's subclass gets the classification mapper (INPUT.CLS.SIZE squares)."""
    seen_sizes = set()

    class MyClassifier(FALClassifier):
        def forward(self, batched_inputs):
            seen_sizes.update(tuple(x["image"].shape) for x in batched_inputs)
            return super().forward(batched_inputs)

    META_ARCH_REGISTRY.register(MyClassifier)
    try:
        train_net = _tool("train_net")
        opts = mini_train_opts(tmp_path, *mini_datasets) + [
            "MODEL.META_ARCHITECTURE", "MyClassifier", "TEST.EXPLAIN.ENABLED", "False",
            "SOLVER.MAX_ITER", "2", "DATASETS.TEST", f"('{mini_datasets[1]}',)"]
        train_net.main(train_net.get_parser().parse_args(["--config-file", FAL_CONFIG, *opts]))
    finally:
        META_ARCH_REGISTRY._obj_map.pop("MyClassifier")
    assert seen_sizes == {(3, 64, 64)}
    with open(tmp_path / "metrics.json") as f:
        assert any("classification/top1" in json.loads(line) for line in f)  # its evaluator
