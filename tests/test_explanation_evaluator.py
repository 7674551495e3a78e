"""ExplanationEvaluator and tools/explain.py on tiny random models and a synthetic dataset."""
import datetime
import itertools
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from conftest import REPO_ROOT, TINY_OVERRIDES, load_script, make_tiny_cfg
from fal_d2.data import ClassificationDatasetMapper
from fal_d2.evaluation import ExplanationEvaluator
from fal_d2.evaluation.random_control import CONTROL_MARK, CONTROL_NOTE
from fal_d2.explain import GradCAM
from fal_d2.explain.scoring import score_explanations

DATASET = "fal_test_explain_synthetic"
CLASSES = ["airplane", "beach", "forest"]
SIZE = 32
SMALL_OPTS = ["MODEL.CLS_HEAD.NUM_CLASSES", 3, "INPUT.CLS.SIZE", SIZE, "DATALOADER.NUM_WORKERS", 0]
METRICS = ["average_drop", "increase_in_confidence", "coverage", "deletion_auc", "insertion_auc",
           "average_drop_top15", "increase_in_confidence_top15", "average_drop_top50",
           "increase_in_confidence_top50"]
ROW_KEYS = ["method", "level", "class", *METRICS, "num_images"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _register_dataset(root):
    """Two generated images per class, each class with its own colour, written to ``root``."""
    records = []
    rng = np.random.default_rng(0)
    for label, class_name in enumerate(CLASSES):
        for index in range(2):
            pixels = rng.integers(0, 80, (40, 48, 3), dtype=np.uint8)
            pixels[..., label] += 150
            file_name = os.path.join(root, f"{class_name}{index}.png")
            Image.fromarray(pixels).save(file_name)
            records.append({"file_name": file_name, "image_id": f"{class_name}{index}",
                            "height": 40, "width": 48, "label": label, "class_name": class_name})
    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
    DatasetCatalog.register(DATASET, lambda: records)
    MetadataCatalog.get(DATASET).set(thing_classes=CLASSES)
    return records


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return _register_dataset(str(tmp_path_factory.mktemp("synthetic")))


def _cfg(config="fal_p2p3.yaml", *opts):
    return make_tiny_cfg(config, *SMALL_OPTS, *opts)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def _inputs(cfg, records):
    mapper = ClassificationDatasetMapper(cfg, is_train=False)
    return [mapper(record) for record in records]


def _evaluate(evaluator, inputs, batch_size=2):
    evaluator.reset()
    for start in range(0, len(inputs), batch_size):
        evaluator.process(inputs[start : start + batch_size], None)
    return evaluator.evaluate()


def test_metrics_rows_and_files(records, tmp_path):
    cfg = _cfg()
    model = _model(cfg)
    inputs = _inputs(cfg, records)
    evaluator = ExplanationEvaluator(DATASET, model, ["gradcam", "fused"], ["p2", "p4"],
                                     vis_per_class=1, output_dir=str(tmp_path), auc_steps=1)
    results = _evaluate(evaluator, inputs)["explanation"]

    keys = [f"{m}/{level}/{metric}" for m, level in [("gradcam", "p2"), ("gradcam", "p4"),
                                                       ("fused", "p2+p4")] for metric in METRICS]
    assert list(results) == keys
    direct = score_explanations(model, inputs, GradCAM(model, ["p4"]), auc_steps=1,
                                budgets=[15, 50]).levels["p4"]
    assert results["gradcam/p4/coverage"] == pytest.approx(direct.coverage.mean(), rel=1e-4)
    for percent in (15, 50):
        budget = direct.budgets[percent]
        assert results[f"gradcam/p4/average_drop_top{percent}"] == pytest.approx(
            budget.drop.mean(), rel=1e-4)
        assert results[f"gradcam/p4/increase_in_confidence_top{percent}"] == pytest.approx(
            budget.increase.mean())
    assert results["gradcam/p4/average_drop"] == pytest.approx(direct.drop.mean(), rel=1e-4)
    assert results["gradcam/p4/increase_in_confidence"] == pytest.approx(direct.increase.mean())
    assert results["gradcam/p4/deletion_auc"] == pytest.approx(direct.deletion_auc.mean(), rel=1e-4)
    assert results["gradcam/p4/insertion_auc"] == pytest.approx(direct.insertion_auc.mean(),
                                                                 rel=1e-4)

    written = json.loads((tmp_path / "explanation_metrics.json").read_text())
    assert written["dataset"] == DATASET and written["target"] == "pred"
    assert written["mask"] == "normalized" and written["budgets"] == [15, 50]
    assert written["budget_mode"] == "binary"
    drops = written["per_image_drop"]["gradcam/p4/average_drop_top15"]
    assert sorted(drops) == sorted(record["image_id"] for record in records)
    assert np.mean(list(drops.values())) == pytest.approx(budget.drop.mean() if percent == 15
                                                          else direct.budgets[15].drop.mean())
    rows = written["rows"]
    assert all(list(row) == ROW_KEYS for row in rows)
    assert [(row["method"], row["level"], row["class"], row["num_images"]) for row in rows[:4]] == [
        ("gradcam", "p2", "all", 6), ("gradcam", "p2", "airplane", 2),
        ("gradcam", "p2", "beach", 2), ("gradcam", "p2", "forest", 2),
    ]
    per_class = [row["average_drop"] for row in rows[1:4]]
    assert rows[0]["average_drop"] == pytest.approx(np.mean(per_class))

    for path in ["grid_gradcam.png", "grid_fused.png", "heatmaps/gradcam/p4/beach_0.png",
                 "heatmaps/fused/p2+p4/forest_0.png"]:
        with Image.open(tmp_path / path) as image:
            image.verify()
    assert len(os.listdir(tmp_path / "heatmaps/gradcam/p2")) == 3  # vis_per_class=1, 3 classes


def test_method_and_level_checks(records, caplog):
    fal = _model(_cfg())
    evaluator = ExplanationEvaluator(DATASET, fal, ["attention", "gradcampp"], ["p2", "p5"])
    assert evaluator.method_levels == {"attention": ["p2"], "gradcampp": ["p2", "p5"]}
    assert "skipping 'attention' on p5" in caplog.text

    fpn = _model(_cfg("fpn_baseline.yaml"))
    assert ExplanationEvaluator(DATASET, fpn, ["attention", "gradcam"], ["p3"]).method_levels == {
        "gradcam": ["p3"]
    }
    with pytest.raises(ValueError, match=r"TEST.EXPLAIN.LEVELS: unknown level\(s\) \['res4'\]"):
        ExplanationEvaluator(DATASET, fpn, ["gradcam"], ["res4"])
    with pytest.raises(ValueError, match=r"TEST.EXPLAIN.METHODS: unknown method\(s\) \['cam'\]"):
        ExplanationEvaluator(DATASET, fpn, ["cam"], ["p3"])
    with pytest.raises(ValueError, match="TEST.EXPLAIN.TARGET='label'"):
        ExplanationEvaluator(DATASET, fpn, ["gradcam"], ["p3"], target="label")


def test_from_config_and_ground_truth_target(records, tmp_path):
    cfg = _cfg("fal_p2p3.yaml", "TEST.EXPLAIN.METHODS", ["gradcam"], "TEST.EXPLAIN.LEVELS", ["p3"],
               "TEST.EXPLAIN.TARGET", "gt", "TEST.EXPLAIN.VIS_PER_CLASS", 2,
               "TEST.EXPLAIN.AUC_STEPS", 0, "OUTPUT_DIR", str(tmp_path))
    evaluator = ExplanationEvaluator.from_config(cfg, DATASET, _model(cfg))
    results = _evaluate(evaluator, _inputs(cfg, records))["explanation"]
    assert list(results) == [f"gradcam/p3/{metric}" for metric in METRICS if "auc" not in metric]
    explained = [(s.class_name, s.target_name) for s in evaluator.samples]
    assert explained == [(c, c) for c in CLASSES for _ in range(2)]
    written = json.loads((tmp_path / "explain" / DATASET / "explanation_metrics.json").read_text())
    assert written["rows"][0]["deletion_auc"] is None and written["auc_steps"] == 0


def test_state_does_not_grow_with_the_number_of_images(records):
    cfg = _cfg()
    inputs = _inputs(cfg, records)
    evaluator = ExplanationEvaluator(DATASET, _model(cfg), ["gradcam"], ["p5"], vis_per_class=1,
                                     output_dir=None, auc_steps=0)

    def state_size():
        return len(pickle.dumps((evaluator._sums, evaluator._samples)))

    evaluator.process(inputs[::2], None)  # one image of each class: the samples are full
    size = state_size()
    for _ in range(3):
        evaluator.process(inputs, None)
    assert state_size() == size
    assert evaluator.evaluate()["explanation"]["gradcam/p5/average_drop"] >= 0
    assert evaluator.rows[0]["num_images"] == 3 + 3 * 6


def _distributed_worker(rank, init_file, weights, root, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        records = _register_dataset(root)  # spawned processes start with empty catalogs
        cfg = _cfg()
        model = _model(cfg)
        DetectionCheckpointer(model).load(weights)
        shard = _inputs(cfg, records)[slice(0, 2) if rank == 0 else slice(2, None)]
        evaluator = ExplanationEvaluator(DATASET, model, ["gradcam"], ["p3"], vis_per_class=1,
                                         output_dir=result_dir, auc_steps=1)
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(_evaluate(evaluator, shard), f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(records, tmp_path):
    cfg = _cfg()
    model = _model(cfg, seed=3)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("weights")
    single_dir = tmp_path / "single"
    single = _evaluate(
        ExplanationEvaluator(DATASET, model, ["gradcam"], ["p3"], vis_per_class=1,
                             output_dir=str(single_dir), auc_steps=1),
        _inputs(cfg, records),
    )
    root = os.path.dirname(records[0]["file_name"])
    mp.spawn(_distributed_worker, nprocs=2,
             args=(str(tmp_path / "init"), str(tmp_path / "weights.pth"), root, str(tmp_path)))

    assert json.loads((tmp_path / "rank1.json").read_text()) == {}
    assert json.loads((tmp_path / "rank0.json").read_text())["explanation"] == pytest.approx(
        dict(single["explanation"]), rel=1e-4, abs=1e-6
    )
    gathered_rows = json.loads((tmp_path / "explanation_metrics.json").read_text())["rows"]
    single_rows = json.loads((single_dir / "explanation_metrics.json").read_text())["rows"]
    assert [r["num_images"] for r in gathered_rows] == [r["num_images"] for r in single_rows]
    assert sorted(os.listdir(tmp_path / "heatmaps/gradcam/p3")) == [f"{c}_0.png" for c in CLASSES]


def _load_tool():
    return load_script(os.path.join("tools", "explain.py"))


def test_explain_tool_end_to_end(records, tmp_path):
    weights = tmp_path / "fal.pth"
    torch.save({"model": _model(_cfg(), seed=1).state_dict()}, weights)
    output = tmp_path / "analysis"
    opts = [str(value) for value in TINY_OVERRIDES + SMALL_OPTS]
    rows = _load_tool().main([
        "--config-file", os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml"),
        "--weights", str(weights),
        "--compare-config", os.path.join(REPO_ROOT, "configs", "fpn_baseline.yaml"),
        "--dataset", DATASET, "--class-name", "beach", "--methods", "attention", "gradcam",
        "random", "--levels", "p2", "p3", "--max-images", "3", "--auc-steps", "0",
        "--vis-per-class", "1", "--budget-mode", "valued",
        "--allow-random-weights",  # the --compare model has no weights
        "--output", str(output), *opts,
    ])

    assert sorted(os.listdir(output)) == [
        "fal_p2p3", "fpn_baseline", "grid_attention.png", "grid_gradcam.png", "grid_random.png",
        "layer_analysis.csv", "layer_analysis.json", "layer_analysis.md",
    ]
    table = json.loads((output / "layer_analysis.json").read_text())
    assert table["rows"] == rows
    assert {(r["model"], r["method"], r["level"], r["class"]) for r in rows} == {
        (model, method, level, class_name)
        for model, methods in [("fal_p2p3", ["attention", "gradcam", "random"]),
                               ("fpn_baseline", ["gradcam", "random"])]
        for method in methods for level in ["p2", "p3"] for class_name in ["all", "beach"]
    }
    # The random control is the same map for both models: only the models' confidences differ.
    for model in ("fal_p2p3", "fpn_baseline"):
        metrics = json.loads((output / model / "explanation_metrics.json").read_text())
        assert metrics["budget_mode"] == "valued"
    # --max-images 3 takes one image of each class in turn
    assert all(r["num_images"] == (3 if r["class"] == "all" else 1) for r in rows)
    assert all(r["deletion_auc"] is None for r in rows)  # --auc-steps 0
    markdown = (output / "layer_analysis.md").read_text()
    assert "| fal_p2p3 " in markdown and "AD % top 15 %" in markdown
    assert ("Mask convention: normalized; budgets: top 15, 50 % of each map's pixels (valued: "
            "kept pixels at their map values)") in markdown
    assert (table["mask"], table["budgets"], table["budget_mode"]) == ("normalized", [15, 50],
                                                                       "valued")
    assert CONTROL_NOTE in markdown
    lines = {tuple(cell.strip() for cell in line.split("|")[1:5]): line
             for line in markdown.splitlines() if line.startswith("| fal_p2p3 ")
             or line.startswith("| fpn_baseline ")}
    by_key = {(r["model"], r["method"], r["level"], r["class"]): r for r in rows}
    for (key, row), metric in itertools.product(by_key.items(), ["average_drop_top15",
                                                                "average_drop_top50"]):
        control = by_key[(key[0], "random", key[2], key[3])]
        marked = key[1] != "random" and row[metric] >= control[metric]
        assert (f"{row[metric]:.2f} {CONTROL_MARK}" in lines[key]) == marked
    assert table["win_reference"] == "gradcam of fpn_baseline"
    for row in rows:
        reference = (row["model"], row["method"]) == ("fpn_baseline", "gradcam")
        for key in ("win", "win_top15", "win_top50"):
            if reference or row["class"] != "all":
                assert row[key] is None
            else:  # a percentage of the 3 images
                assert row[key] in (0.0, pytest.approx(100 / 3), pytest.approx(200 / 3), 100.0)
    csv_lines = (output / "layer_analysis.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,method,level,class")
    assert csv_lines[0].endswith(",budget_mode") and csv_lines[1].endswith(",valued")
    for name in ["grid_attention.png", "grid_gradcam.png", "fpn_baseline/grid_gradcam.png"]:
        with Image.open(output / name) as image:
            image.verify()

    with pytest.raises(ValueError, match="--class-name 'desert' is not a class"):
        _load_tool().main(["--config-file", os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml"),
                           "--dataset", DATASET, "--class-name", "desert",
                           "--allow-random-weights", "--output", str(output), *opts])


def test_table_marks_maps_that_do_not_beat_the_random_control(tmp_path):
    """Also for a table from before the budget mode was recorded: its budgets kept the pixels at
    their values."""
    rows = [{"model": "m", "method": method, "level": level, "class": "all",
             "average_drop_top15": drop, "increase_in_confidence_top15": 0.0,
             "average_drop": drop, "increase_in_confidence": 0.0, "num_images": 2}
            for method, level, drop in [("gradcam", "p2", 30.0), ("gradcam", "p3", 50.0),
                                        ("random", "p2", 40.0), ("random", "p3", 50.0)]]
    markdown = _load_tool().write_table(
        rows, str(tmp_path), DATASET, None,
        protocol={"mask": "pixel", "budgets": [15.0], "win_reference": "gradcam of m"})
    lines = [line for line in markdown.splitlines() if line.startswith("| m ")]
    assert f"30.00 {CONTROL_MARK}" not in lines[0]  # below the random map's 40
    assert f"50.00 {CONTROL_MARK}" in lines[1]  # a tie does not beat the control
    assert CONTROL_MARK not in lines[2] + lines[3]  # the control itself
    assert CONTROL_NOTE in markdown
    assert "(valued: kept pixels at their map values)" in markdown
    assert json.loads((tmp_path / "layer_analysis.json").read_text())["budget_mode"] == "valued"
    without_control = _load_tool().write_table(rows[:2], str(tmp_path), DATASET, None)
    assert CONTROL_MARK not in without_control


def test_batched_test_loader_gives_the_same_metrics_as_batch_one(records):
    """TEST.IMS_PER_BATCH changes speed only: accuracy and explanation metrics are per image."""
    from detectron2.evaluation import DatasetEvaluators, inference_on_dataset

    from fal_d2.data import build_batched_test_loader
    from fal_d2.evaluation import ClassificationEvaluator

    cfg = _cfg()
    model = _model(cfg)
    mapper = ClassificationDatasetMapper(cfg, is_train=False)
    results = {}
    for batch_size in (1, 4):
        loader = build_batched_test_loader(records, mapper=mapper, batch_size=batch_size)
        assert [len(batch) for batch in loader] == ([1] * 6 if batch_size == 1 else [4, 2])
        evaluators = DatasetEvaluators([
            ClassificationEvaluator(DATASET, distributed=False),
            ExplanationEvaluator(DATASET, model, ["attention", "gradcam"], ["p2", "p3"],
                                 vis_per_class=0, auc_steps=0, distributed=False),
        ])
        results[batch_size] = inference_on_dataset(model, loader, evaluators)
    assert results[1]["classification"] == results[4]["classification"]
    assert results[1]["explanation"].keys() == results[4]["explanation"].keys()
    for key, value in results[1]["explanation"].items():
        # A budget keeps the top k % of pixels: float noise between batch sizes (~1e-6 in a map)
        # can swap two nearly equal pixels at the cut, which moves O slightly.
        tolerance = 1e-2 if "_top" in key else 1e-4
        assert results[4]["explanation"][key] == pytest.approx(value, rel=tolerance, abs=1e-4), key


def test_batched_test_loader_rejects_a_zero_batch(records):
    from fal_d2.data import build_batched_test_loader

    with pytest.raises(ValueError, match="TEST.IMS_PER_BATCH"):
        build_batched_test_loader(records, mapper=lambda record: record, batch_size=0)


@pytest.mark.parametrize("key, value, message", [
    ("MASK", "black", r"TEST.EXPLAIN.MASK='black'; expected one of \('normalized', 'pixel'\)"),
    ("BUDGET_MODE", "soft",
     r"TEST.EXPLAIN.BUDGET_MODE='soft'; expected one of \('binary', 'valued'\)"),
    ("BUDGETS", [15, 0], r"TEST.EXPLAIN.BUDGETS: \[0\] outside \(0, 100\]"),
    ("BUDGETS", [150], r"TEST.EXPLAIN.BUDGETS: \[150\] outside \(0, 100\]"),
    ("METHODS", ["gradcm"], r"TEST.EXPLAIN.METHODS: unknown method\(s\) \['gradcm'\]"),
    ("TARGET", "label", "TEST.EXPLAIN.TARGET='label'"),
])
def test_explain_config_is_checked_before_training(key, value, message, tmp_path):
    """train_net.setup checks TEST.EXPLAIN, so a typo fails before the first iteration."""
    from detectron2.engine import default_argument_parser

    train_net = load_script(os.path.join("tools", "train_net.py"))
    args = default_argument_parser().parse_args([
        "--config-file", os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml"),
        *[str(o) for o in TINY_OVERRIDES], "OUTPUT_DIR", str(tmp_path),
        "MODEL.CLS_HEAD.NUM_CLASSES", "21", f"TEST.EXPLAIN.{key}", str(value),
    ])
    with pytest.raises(ValueError, match=message):
        train_net.setup(args)
    assert not os.listdir(tmp_path)  # nothing trained, nothing written


def test_budget_100_is_the_whole_map(records):
    model = _model(_cfg())
    evaluator = ExplanationEvaluator(DATASET, model, ["gradcam"], ["p3"], auc_steps=0,
                                     budgets=[100, 50], distributed=False, vis_per_class=0)
    results = _evaluate(evaluator, _inputs(_cfg(), records))["explanation"]
    assert "gradcam/p3/average_drop_top50" in results
    assert not any("top100" in key for key in results)  # 100 % is the plain columns


def test_mask_conventions_give_different_numbers(records):
    cfg = _cfg()
    model = _model(cfg)
    inputs = _inputs(cfg, records)
    scores = {mask: score_explanations(model, inputs, GradCAM(model, ["p3"]), auc_steps=1,
                                       mask=mask).levels["p3"] for mask in ("normalized", "pixel")}
    assert not np.allclose(scores["normalized"].explanation_confidence,
                           scores["pixel"].explanation_confidence)
