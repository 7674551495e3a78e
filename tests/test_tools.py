"""End-to-end runs of tools/train_net.py, tools/demo.py and tools/benchmark.py on the committed UC
Merced subset."""
import json
import os

import pytest

from fal_d2.checkpoint import file_sha256

from conftest import MINI_ROOT, REPO_ROOT, TINY_OVERRIDES, load_script, mini_train_opts


def _load_tool(name):
    return load_script(os.path.join("tools", f"{name}.py"))


def test_train_then_eval_only(tmp_path, mini_datasets):
    train_net = _load_tool("train_net")
    train, test = mini_datasets
    config = os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml")
    args = train_net.get_parser().parse_args(
        ["--config-file", config, *mini_train_opts(tmp_path, train, test)])
    train_net.main(args)

    assert (tmp_path / "model_final.pth").exists()
    with open(tmp_path / "metrics.json") as f:
        records = [json.loads(line) for line in f]
    final = [r for r in records if "classification/top1" in r]
    assert final, "the evaluation results must reach metrics.json through the EvalHook"
    assert 0.0 <= final[-1]["classification/top1"] <= 100.0
    assert any(key.startswith("explanation/gradcam/p2/") for key in final[-1])
    assert any(key.startswith("explanation/attention/p3/") for key in final[-1])
    assert "loss_att_p2" in records[0] and "loss_cls" in records[0]
    assert (tmp_path / "inference" / test / "confusion_matrix.png").exists()
    assert (tmp_path / "explain" / test / "explanation_metrics.json").exists()
    report = (tmp_path / "inference" / test / "report.html").read_text()
    assert "Top-1 accuracy" in report and "Average Drop" in report
    assert report.count("data:image/png;base64,") >= 2  # the grids of both methods
    assert "trained in this run" in report and "from scratch" in report

    weights = str(tmp_path / "model_final.pth")
    eval_dir = tmp_path / "eval"
    eval_args = train_net.get_parser().parse_args(
        ["--config-file", config, "--eval-only", *mini_train_opts(eval_dir, train, test),
         "MODEL.WEIGHTS", weights]
    )
    results = train_net.main(eval_args)
    assert results["classification"]["top1"] == pytest.approx(final[-1]["classification/top1"])
    # --eval-only appends its results to metrics.json, with the weights file and its sha256
    with open(eval_dir / "metrics.json") as f:
        (record,) = [json.loads(line) for line in f]
    assert record["eval_only"] and record["weights"] == weights and record["iteration"] == 2
    assert record["weights_sha256"] == file_sha256(weights)
    assert record["classification/top1"] == pytest.approx(results["classification"]["top1"])
    report = (eval_dir / "inference" / test / "report.html").read_text()
    assert f"sha256 {file_sha256(weights)}" in report and "trained in this run" not in report


def test_num_classes_mismatch_fails_before_training(tmp_path, mini_datasets):
    train_net = _load_tool("train_net")
    config = os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml")
    opts = mini_train_opts(tmp_path, *mini_datasets) + ["MODEL.CLS_HEAD.NUM_CLASSES", "7"]
    args = train_net.get_parser().parse_args(["--config-file", config, *opts])
    with pytest.raises(ValueError, match="MODEL.CLS_HEAD.NUM_CLASSES=7 but dataset 'ucmerced_mini_train' has 21"):
        train_net.main(args)


def test_demo_writes_heatmaps_and_skips_bad_files(tmp_path):
    demo = _load_tool("demo")
    images = os.path.join(MINI_ROOT, "Images", "airplane")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    opts = [str(o) for o in TINY_OVERRIDES]
    opts[opts.index("MODEL.CLS_HEAD.NUM_CLASSES") + 1] = "21"
    out = tmp_path / "out"
    status = demo.main(
        ["--config-file", os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml"),
         "--input", images, str(bad), "--output", str(out), "--allow-random-weights", *opts]
    )
    assert status == 0
    with open(out / "predictions.json") as f:
        predictions = json.load(f)
    assert len(predictions) == len(os.listdir(images))
    assert str(bad) not in predictions
    for path, entry in predictions.items():
        stem = os.path.splitext(os.path.basename(path))[0]
        # by default, the maps the model computes itself, on the levels with a branch
        assert set(entry["heatmaps"]) == {"branch_cam", "attention"}
        assert entry["explained_class"] == entry["pred_class"]
        for method, heatmaps in entry["heatmaps"].items():
            assert set(heatmaps) == {"p2", "p3"}
            for level, heatmap in heatmaps.items():
                assert heatmap == str(out / f"{stem}_{level}_{method}.png")
                assert os.path.exists(heatmap)


def _demo(config, inputs, output, *extra):
    opts = [str(o) for o in TINY_OVERRIDES]
    opts[opts.index("MODEL.CLS_HEAD.NUM_CLASSES") + 1] = "21"
    return _load_tool("demo").main(
        ["--config-file", os.path.join(REPO_ROOT, "configs", config), "--input", *inputs,
         "--output", str(output), "--allow-random-weights", *extra, "--opts", *opts])


def test_demo_draws_the_methods_levels_and_class_asked_for(tmp_path, capsys):
    image = os.path.join(MINI_ROOT, "Images", "airplane", "airplane04.jpg")
    out = tmp_path / "fal"
    assert _demo("fal_p2p3.yaml", [image], out, "--methods", "gradcam", "branch_cam",
                 "--levels", "p2", "p4", "--target-class", "beach") == 0
    # branch_cam has no map on p4 (no branch there): one line, and the other maps are written
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "no map" in line]
    assert line.startswith("branch_cam: no map on p4 (") and "levels with a branch" in line
    (entry,) = json.loads((out / "predictions.json").read_text()).values()
    assert (entry["explained_class"], entry["explained_name"]) == (3, "beach")
    assert {method: sorted(maps) for method, maps in entry["heatmaps"].items()} == {
        "gradcam": ["p2", "p4"], "branch_cam": ["p2"]}
    assert sorted(os.listdir(out)) == ["airplane04_p2_branch_cam.png", "airplane04_p2_gradcam.png",
                                       "airplane04_p4_gradcam.png", "predictions.json"]

    # a plain FPN has no built-in maps: Grad-CAM by default, and branch_cam is reported
    out = tmp_path / "fpn"
    assert _demo("fpn_baseline.yaml", [image], out, "--methods", "branch_cam", "gradcam") == 0
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "no map" in line]
    assert line.startswith("branch_cam: no map on p2, p3, p4, p5 (")
    assert "the model has none" in line
    (entry,) = json.loads((out / "predictions.json").read_text()).values()
    assert {method: sorted(maps) for method, maps in entry["heatmaps"].items()} == {
        "gradcam": ["p2", "p3", "p4", "p5"]}
    assert _demo("fpn_baseline.yaml", [image], tmp_path / "fpn_default") == 0
    (entry,) = json.loads((tmp_path / "fpn_default" / "predictions.json").read_text()).values()
    assert list(entry["heatmaps"]) == ["gradcam"]


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_benchmark_reports_ratios_to_the_baseline(tmp_path, amp):
    benchmark = _load_tool("benchmark")
    output = tmp_path / "bench.json"
    configs = [os.path.join(REPO_ROOT, "configs", name) for name in ("fpn_baseline.yaml", "fal_p2p3.yaml")]
    rows = benchmark.main(
        ["--config-file", *configs, "--batch-size", "2", "--iters", "1", "--warmup", "0",
         "--output", str(output), *(["--amp"] if amp else []), *[str(o) for o in TINY_OVERRIDES]]
    )
    baseline, fal = rows
    assert baseline["gflops_ratio"] == 1.0 and baseline["attention_ms_img"] is None
    assert fal["gflops"] > baseline["gflops"] and fal["params_M"] > baseline["params_M"]
    assert fal["attention_ms_img"] > 0 and fal["gradcam_ms_img"] > 0
    assert fal["branch_cam_ms_img"] > 0 and baseline["branch_cam_ms_img"] is None
    with open(output) as f:
        written = json.load(f)
    assert written["environment"]["device"] == "cpu" and len(written["results"]) == 2
    assert written["environment"]["amp"] is amp
