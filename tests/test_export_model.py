"""tools/export_model.py: the TorchScript file reproduces the eager FALClassifier, scores and maps,
on real images and at a batch size other than the trace's; bad input fails with one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from fal_d2.checkpoint import WeightsError, file_sha256, load_weights
from fal_d2.data import ClassificationDatasetMapper

from conftest import REPO_ROOT, TINY_OVERRIDES, load_script, make_tiny_cfg

TOOL = "tools/export_model.py"
MAP_KINDS = ("class_map", "attention", "attention_raw", "attention_scores", "explanation")
HEAD = ["MODEL.EXPLAIN_HEAD.ENABLED", "True"]  # an explanation head on p2 and p3


def export_opts(test_set, weights, *opts):
    return [str(o) for o in TINY_OVERRIDES] + ["DATASETS.TEST", f"('{test_set}',)",
                                               "MODEL.WEIGHTS", str(weights), *opts]


def tiny_model_with_weights(config_name, test_set, path, *opts):
    """A tiny model with random weights (BN statistics too, so that no map is trivially flat),
    its head biased so that the test images split between classes 0 and 1, saved to ``path`` and
    loaded back; and its config."""
    cfg = make_tiny_cfg(config_name, "DATASETS.TEST", (test_set,), *opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    for name, tensor in model.state_dict().items():
        if name.endswith("running_mean"):
            tensor.normal_(0, 0.1)
        elif name.endswith("running_var"):
            tensor.uniform_(0.5, 2.0)
    split_predictions(model.eval(), mini_batch(cfg, test_set, range(20)))
    torch.save({"model": model.state_dict()}, path)
    cfg.MODEL.WEIGHTS = str(path)
    load_weights(model, cfg)
    return cfg, model.eval()


def split_predictions(model, images):
    """A random model predicts one class for every image (its pooled features barely differ), so
    a bug that gave every image the first image's class map would pass unseen. Shift the head's
    bias so that the images divide between classes 0 and 1, the boundary in the widest gap of
    their logit differences, where float noise cannot flip a prediction."""
    with torch.no_grad():
        margins = eager_outputs(model, images)["scores"].log()
        margins = (margins[:, 0] - margins[:, 1]).sort().values[2:-2]  # both classes keep >= 3
        gap = (margins[1:] - margins[:-1]).argmax()
        model.head.linear.bias[1] += (margins[gap] + margins[gap + 1]) / 2


def mixed_batch(cfg, model, test_set):
    """Five test images, predicted as class 0 and as class 1 in turn (see split_predictions)."""
    candidates = mini_batch(cfg, test_set, range(20))
    predicted = eager_outputs(model, candidates)["scores"].argmax(1)
    zeros, ones = (predicted == 0).nonzero()[:, 0], (predicted == 1).nonzero()[:, 0]
    return candidates[torch.stack([ones[0], zeros[0], ones[1], zeros[1], ones[2]])]


def mini_batch(cfg, test_set, indices, size=None):
    """Test-set images read and resized as the eager path does (uint8, N x 3 x S x S)."""
    if size is not None:
        cfg = cfg.clone()
        cfg.INPUT.CLS.SIZE = size
    mapper = ClassificationDatasetMapper(cfg, is_train=False)
    records = DatasetCatalog.get(test_set)
    return torch.stack([mapper(records[i])["image"] for i in indices])


def eager_outputs(model, images):
    """The eager model's inference, maps at the input's size, stacked over the batch by name."""
    with torch.no_grad():
        outputs = model([{"image": image, "height": image.shape[-2], "width": image.shape[-1]}
                         for image in images])
    stacked = {"scores": torch.stack([out["scores"] for out in outputs])}
    for kind in MAP_KINDS:
        for level in outputs[0].get(kind, {}):
            stacked[f"{kind}/{level}"] = torch.stack([out[kind][level] for out in outputs])
    return stacked


def load_exported(path):
    extra = {"fal_d2.json": ""}
    module = torch.jit.load(path, _extra_files=extra)
    return module, json.loads(extra["fal_d2.json"])


def assert_outputs_equal(exported, eager):
    assert set(exported) == set(eager)
    for name, reference in eager.items():
        assert exported[name].shape == reference.shape, name
        torch.testing.assert_close(exported[name], reference, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def fal_export(mini_datasets, tmp_path_factory, one_thread):
    """fal_p2p3 with an explanation head, traced on one sample image given with --sample-image."""
    _, test_set = mini_datasets
    tmp = tmp_path_factory.mktemp("export_fal")
    cfg, model = tiny_model_with_weights("fal_p2p3.yaml", test_set, tmp / "weights.pth", *HEAD)
    sample = DatasetCatalog.get(test_set)[0]["file_name"]
    output = tmp / "out"
    load_script(TOOL).main(["--config-file", os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml"),
                            "--format", "torchscript", "--export-method", "tracing",
                            "--sample-image", sample, "--output", str(output)]
                           + export_opts(test_set, tmp / "weights.pth", *HEAD))
    return cfg, model, output / "model.ts", test_set


def test_exported_model_matches_eager_at_another_batch_size(fal_export):
    cfg, model, path, test_set = fal_export
    exported, _ = load_exported(str(path))
    images = mixed_batch(cfg, model, test_set)  # traced on one image; five here
    with torch.no_grad():
        outputs = exported(images)
    assert set(outputs) == {"scores"} | {f"{kind}/{level}" for kind in MAP_KINDS
                                         for level in ("p2", "p3")}
    assert outputs["class_map/p2"].shape == (5, 64, 64)
    assert outputs["attention_raw/p3"].shape == (5, 8, 8)
    assert outputs["explanation/p2"].shape == (5, 64, 64)
    # Each image's class map must be the map of its own predicted class.
    assert outputs["scores"].argmax(1).tolist() == [1, 0, 1, 0, 1]
    assert_outputs_equal(outputs, eager_outputs(model, images))


def test_exported_model_takes_float_input_and_other_sizes(fal_export):
    """Float and uint8 batches give the same outputs; an 80 px batch (padded to 96 inside, as the
    eager model pads) still matches the eager model: no size is fixed by the trace."""
    cfg, model, path, test_set = fal_export
    exported, _ = load_exported(str(path))
    images = mini_batch(cfg, test_set, [2, 3])
    with torch.no_grad():
        assert_outputs_equal(exported(images.float()), exported(images))
        odd = mini_batch(cfg, test_set, [4, 5], size=80)
        outputs = exported(odd)
    assert outputs["class_map/p3"].shape == (2, 80, 80)
    assert_outputs_equal(outputs, eager_outputs(model, odd))


def test_exported_model_runs_without_fal_d2_or_detectron2(fal_export, tmp_path):
    """A plain torch process (no fal_d2, no Detectron2 imported) loads and runs the file."""
    cfg, model, path, test_set = fal_export
    images = mini_batch(cfg, test_set, [6, 8])
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import sys, torch\n"
        f"module = torch.jit.load({str(path)!r})\n"
        f"outputs = module(torch.load({str(tmp_path / 'images.pt')!r}))\n"
        "assert not {'fal_d2', 'detectron2'} & set(sys.modules)\n"
        f"torch.save(dict(outputs), {str(tmp_path / 'outputs.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-W", "ignore", "-c", script], check=True, cwd=tmp_path,
                   timeout=300)
    assert_outputs_equal(torch.load(tmp_path / "outputs.pt"), eager_outputs(model, images))


def test_export_metadata_names_inputs_outputs_and_weights(fal_export):
    cfg, _, path, _ = fal_export
    _, metadata = load_exported(str(path))
    assert metadata["input"]["shape"] == ["N", 3, 64, 64]
    assert metadata["input"]["channel_order"] == cfg.INPUT.FORMAT
    assert metadata["outputs"]["scores"]["shape"] == ["N", 5]
    assert metadata["outputs"]["attention/p2"]["shape"] == ["N", 64, 64]
    assert metadata["outputs"]["explanation/p3"]["what"].startswith("the explanation head's map")
    assert metadata["weights_sha256"] == file_sha256(cfg.MODEL.WEIGHTS)
    assert not [name for name in os.listdir(path.parent) if name != "model.ts"]  # no temp file


def test_model_without_branches_exports_scores_only(mini_datasets, tmp_path, capsys, one_thread):
    """fpn_baseline, traced on the test set's first image (no --sample-image)."""
    _, test_set = mini_datasets
    cfg, model = tiny_model_with_weights("fpn_baseline.yaml", test_set, tmp_path / "w.pth")
    load_script(TOOL).main(["--config-file", os.path.join(REPO_ROOT, "configs", "fpn_baseline.yaml"),
                            "--output", str(tmp_path / "out")]
                           + export_opts(test_set, tmp_path / "w.pth"))
    printed = capsys.readouterr().out
    assert "class scores only" in printed
    assert DatasetCatalog.get(test_set)[0]["file_name"] in printed
    exported, metadata = load_exported(str(tmp_path / "out" / "model.ts"))
    assert list(metadata["outputs"]) == ["scores"]
    images = mini_batch(cfg, test_set, [0, 9])
    with torch.no_grad():
        assert_outputs_equal(exported(images), eager_outputs(model, images))


def test_model_without_branches_exports_its_explanation_head(mini_datasets, tmp_path, one_thread):
    """fpn_baseline with an explanation head: scores and the head's maps, as the eager model."""
    _, test_set = mini_datasets
    cfg, model = tiny_model_with_weights("fpn_baseline.yaml", test_set, tmp_path / "w.pth", *HEAD)
    config = os.path.join(REPO_ROOT, "configs", "fpn_baseline.yaml")
    load_script(TOOL).main(["--config-file", config, "--output", str(tmp_path / "out")]
                           + export_opts(test_set, tmp_path / "w.pth", *HEAD))
    exported, metadata = load_exported(str(tmp_path / "out" / "model.ts"))
    assert list(metadata["outputs"]) == ["scores", "explanation/p2", "explanation/p3"]
    images = mixed_batch(cfg, model, test_set)
    with torch.no_grad():
        outputs = exported(images)
    assert_outputs_equal(outputs, eager_outputs(model, images))
    assert 0 <= float(outputs["explanation/p3"].min()) < float(outputs["explanation/p3"].max()) <= 1


def test_missing_weights_file_fails_with_one_line(mini_datasets, tmp_path):
    _, test_set = mini_datasets
    missing = tmp_path / "nope.pth"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    # The mini set is registered in this process only: give the sample image directly.
    sample = DatasetCatalog.get(test_set)[0]["file_name"]
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, TOOL), "--config-file",
         os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml"), "--sample-image", sample,
         "--output", str(tmp_path / "out")] + export_opts(test_set, missing),
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"tools/export_model.py: error: {missing}: no such weights file"]
    assert not os.path.exists(tmp_path / "out" / "model.ts")


@pytest.mark.parametrize("arguments, message", [
    (["--format", "onnx"], "--format onnx: not supported; use torchscript"),
    (["--export-method", "scripting"], "--export-method scripting: not supported"),
    ([], "MODEL.WEIGHTS is empty"),
    (["--sample-image", "no/such.jpg"], "no/such.jpg: cannot read the sample image"),
])
def test_bad_input_fails_before_writing(mini_datasets, tmp_path, arguments, message):
    _, test_set = mini_datasets
    opts = [str(o) for o in TINY_OVERRIDES] + ["DATASETS.TEST", f"('{test_set}',)"]
    if "--sample-image" in arguments:
        opts += ["MODEL.WEIGHTS", str(tmp_path / "w.pth")]
    with pytest.raises((ValueError, WeightsError), match=message):
        load_script(TOOL).main(["--config-file", os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml"),
                                "--output", str(tmp_path / "out")] + arguments + opts)
    assert not os.path.exists(tmp_path / "out")
