"""ClassificationEvaluator: hand-computed metrics, output files, label checks, worker sums."""
import datetime
import json
import math
import os
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from detectron2.data import MetadataCatalog

from fal_d2.evaluation import ClassificationEvaluator
from fal_d2.evaluation import classification_evaluator as evaluator_module
from fal_d2.utils.atomic_io import atomic_write_bytes

THREE_CLASSES = "fal_test_cls_three"
SEVEN_CLASSES = "fal_test_cls_seven"

# (label, pred_class) for K=3; confusion rows=ground truth: a [2, 1, 0], b [0, 1, 1], c [0, 0, 1].
THREE_CLASS_PAIRS = [(0, 0), (0, 0), (0, 1), (1, 1), (1, 2), (2, 2)]


def _register(name, num_classes):
    MetadataCatalog.get(name).set(thing_classes=[chr(ord("a") + i) for i in range(num_classes)])
    return name


def _scores_ranking(order):
    """Softmax probabilities whose descending order is the class list ``order``."""
    logits = torch.empty(len(order))
    logits[list(order)] = torch.arange(len(order), 0, -1, dtype=torch.float32)
    return logits.softmax(0)


def _batch(pairs, num_classes):
    """Dataset dicts and model outputs where each ``pred_class`` is ranked first in ``scores``."""
    inputs, outputs = [], []
    for label, pred in pairs:
        others = [c for c in range(num_classes) if c != pred]
        inputs.append({"file_name": f"img_{len(inputs)}.tif", "label": label})
        outputs.append({"scores": _scores_ranking([pred] + others), "pred_class": pred})
    return inputs, outputs


def _evaluate(dataset_name, inputs, outputs, **kwargs):
    evaluator = ClassificationEvaluator(dataset_name, **kwargs)
    evaluator.reset()
    evaluator.process(inputs, outputs)
    return evaluator.evaluate()


@pytest.fixture(scope="module", autouse=True)
def registered_datasets():
    _register(THREE_CLASSES, 3)
    _register(SEVEN_CLASSES, 7)


def test_three_classes_hand_computed():
    results = _evaluate(THREE_CLASSES, *_batch(THREE_CLASS_PAIRS, 3))
    metrics = results["classification"]
    assert list(metrics) == ["top1", "top5", "mean_class_acc", "acc/a", "acc/b", "acc/c"]
    assert metrics["top1"] == pytest.approx(100 * 4 / 6)
    assert metrics["top5"] == pytest.approx(100.0)  # K=3 < 5: top-3 always contains the label
    assert metrics["acc/a"] == pytest.approx(100 * 2 / 3)
    assert metrics["acc/b"] == pytest.approx(50.0)
    assert metrics["acc/c"] == pytest.approx(100.0)
    assert metrics["mean_class_acc"] == pytest.approx((200 / 3 + 50 + 100) / 3)


def test_top5_counts_label_rank():
    # The label sits at rank 1, 5, 6 and 7 of the scores: 2 of 4 top-5 hits, 1 of 4 top-1.
    rankings = {1: [3, 0, 1, 2, 4, 5, 6], 5: [0, 1, 2, 4, 3, 5, 6], 6: [0, 1, 2, 4, 5, 3, 6]}
    rankings[7] = [0, 1, 2, 4, 5, 6, 3]
    inputs = [{"label": 3} for _ in rankings]
    outputs = [{"scores": _scores_ranking(r), "pred_class": r[0]} for r in rankings.values()]
    metrics = _evaluate(SEVEN_CLASSES, inputs, outputs)["classification"]
    assert metrics["top1"] == pytest.approx(25.0)
    assert metrics["top5"] == pytest.approx(50.0)
    assert metrics["acc/d"] == pytest.approx(25.0)


def test_class_without_images_is_nan_and_left_out_of_mean():
    metrics = _evaluate(THREE_CLASSES, *_batch([(0, 0), (1, 0)], 3))["classification"]
    assert math.isnan(metrics["acc/c"])
    assert metrics["mean_class_acc"] == pytest.approx(50.0)


def test_reset_clears_counts():
    evaluator = ClassificationEvaluator(THREE_CLASSES)
    evaluator.process(*_batch([(0, 1)], 3))
    evaluator.reset()
    evaluator.process(*_batch([(0, 0)], 3))
    assert evaluator.evaluate()["classification"]["top1"] == pytest.approx(100.0)


def test_writes_confusion_matrix_files(tmp_path):
    output_dir = tmp_path / "inference"
    metrics = _evaluate(THREE_CLASSES, *_batch(THREE_CLASS_PAIRS, 3), output_dir=str(output_dir))
    assert sorted(os.listdir(output_dir)) == ["confusion_matrix.json", "confusion_matrix.png"]

    written = json.loads((output_dir / "confusion_matrix.json").read_text())
    assert written["class_names"] == ["a", "b", "c"]
    assert written["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert written["metrics"] == pytest.approx(dict(metrics["classification"]))

    png_path = output_dir / "confusion_matrix.png"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png_path) as image:
        image.verify()


def test_failed_atomic_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_bytes(str(path), "text is not bytes")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]


@pytest.mark.parametrize("bad_label", [3, -1])
def test_label_outside_classes_is_rejected(bad_label):
    evaluator = ClassificationEvaluator(THREE_CLASSES)
    inputs, outputs = _batch([(0, 0)], 3)
    inputs[0]["label"] = bad_label
    with pytest.raises(ValueError, match=f"'{THREE_CLASSES}'.*'label' {bad_label}, outside"):
        evaluator.process(inputs, outputs)


def test_two_simulated_workers_match_one(monkeypatch):
    inputs, outputs = _batch(THREE_CLASS_PAIRS, 3)
    single = _evaluate(THREE_CLASSES, inputs, outputs)
    # Uneven split whose halves differ: a rank-0-only result would not match.
    main, other = ClassificationEvaluator(THREE_CLASSES), ClassificationEvaluator(THREE_CLASSES)
    main.process(inputs[:2], outputs[:2])
    other.process(inputs[2:], outputs[2:])

    sent_by_other = []
    monkeypatch.setattr(evaluator_module.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(evaluator_module.comm, "is_main_process", lambda: False)
    monkeypatch.setattr(
        evaluator_module.comm, "all_gather", lambda data, group=None: sent_by_other.append(data)
    )
    assert other.evaluate() == {}

    monkeypatch.setattr(evaluator_module.comm, "is_main_process", lambda: True)
    monkeypatch.setattr(
        evaluator_module.comm, "all_gather", lambda data, group=None: [data] + sent_by_other
    )
    assert main.evaluate() == single


def _distributed_worker(rank, init_file, result_dir):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        _register(THREE_CLASSES, 3)  # spawned processes start with an empty MetadataCatalog
        inputs, outputs = _batch(THREE_CLASS_PAIRS, 3)
        shard = slice(0, 2) if rank == 0 else slice(2, None)
        results = _evaluate(THREE_CLASSES, inputs[shard], outputs[shard], output_dir=result_dir)
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    single = _evaluate(THREE_CLASSES, *_batch(THREE_CLASS_PAIRS, 3))
    mp.spawn(_distributed_worker, args=(str(tmp_path / "dist_init"), str(tmp_path)), nprocs=2)

    main_results = json.loads((tmp_path / "rank0.json").read_text())
    assert main_results["classification"] == pytest.approx(dict(single["classification"]))
    assert json.loads((tmp_path / "rank1.json").read_text()) == {}
    written = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert written["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
