"""tools/train_net.py --num-gpus 2 on the CPU: two gloo workers train, and evaluate over both."""
import datetime
import json
import os
import subprocess
import sys

import pytest
import torch

import detectron2.utils.comm as comm
from detectron2.engine import launch

from conftest import MINI_ROOT, REPO_ROOT, mini_train_opts
from fal_d2.data.ucmerced import load_ucmerced_split
from fal_d2.utils.distributed import broadcast_buffers_from_main_process, end_distributed_run

TEST_SPLIT = "val"  # 210 images, the smallest built-in split
TEST_SET = f"ucmerced_{TEST_SPLIT}"
# Cheap explanations: the branches' own maps, one budget, no deletion/insertion curves.
EXPLAIN_OPTS = [
    "TEST.IMS_PER_BATCH", "32",
    "TEST.EXPLAIN.METHODS", "['attention']",
    "TEST.EXPLAIN.LEVELS", "['p2', 'p3']",
    "TEST.EXPLAIN.AUC_STEPS", "0",
    "TEST.EXPLAIN.BUDGETS", "[50]",
]


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    """A $DETECTRON2_DATASETS whose UCMerced_LandUse holds every image of the fixed split, each a
    link to a committed mini-set image of its class: train_net.py's built-in ucmerced_* sets then
    load in every worker process, with no full dataset."""
    root = tmp_path_factory.mktemp("datasets")
    for split in ("train", "val", "test"):
        for class_name, stem in load_ucmerced_split(split):
            class_dir = root / "UCMerced_LandUse" / "Images" / class_name
            class_dir.mkdir(parents=True, exist_ok=True)
            sources = sorted(os.listdir(os.path.join(MINI_ROOT, "Images", class_name)))
            index = len(os.listdir(class_dir)) % len(sources)
            os.symlink(os.path.join(MINI_ROOT, "Images", class_name, sources[index]),
                       class_dir / f"{stem}.jpg")
    return root


def _train_net(datasets_root, output_dir, *args):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")  # gloo on the CPU even where a GPU exists
    opts = mini_train_opts(output_dir, "ucmerced_train", TEST_SET) + EXPLAIN_OPTS
    result = subprocess.run(
        [sys.executable, os.path.join("tools", "train_net.py"), "--config-file",
         os.path.join("configs", "fal_p2p3.yaml"), *args, *opts],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _metrics_lines(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def _evaluation(line):
    return {k: v for k, v in line.items() if k.startswith(("classification/", "explanation/"))}


@pytest.fixture(scope="module")
def runs(datasets_root, tmp_path_factory):
    """One 2-process training run, then a 1-process --eval-only of its model_final.pth."""
    trained = tmp_path_factory.mktemp("two_workers")
    _train_net(datasets_root, trained, "--num-gpus", "2")
    evaluated = tmp_path_factory.mktemp("eval_only")
    _train_net(datasets_root, evaluated, "--num-gpus", "1", "--eval-only",
               "MODEL.WEIGHTS", str(trained / "model_final.pth"))
    return trained, evaluated


def test_two_workers_train_and_evaluate_the_whole_test_set(runs):
    trained, _ = runs
    assert (trained / "model_final.pth").is_file()
    lines = _metrics_lines(trained)
    assert [line["iteration"] for line in lines if "total_loss" in line] == [2]
    assert any(_evaluation(line) for line in lines)

    num_test_images = len(load_ucmerced_split(TEST_SPLIT))
    with open(trained / "inference" / TEST_SET / "confusion_matrix.json") as f:
        confusion = json.load(f)["confusion_matrix"]
    assert sum(map(sum, confusion)) == num_test_images  # both workers' halves

    explain_dir = trained / "explain" / TEST_SET
    with open(explain_dir / "explanation_metrics.json") as f:
        rows = json.load(f)["rows"]
    overall = [row for row in rows if row["class"] == "all"]
    assert {(row["method"], row["level"]) for row in overall} == {("attention", "p2"), ("attention", "p3")}
    assert all(row["num_images"] == num_test_images for row in overall)
    # One heatmap per class (VIS_PER_CLASS 1): the samples of both workers were gathered.
    assert len(os.listdir(explain_dir / "heatmaps" / "attention" / "p2")) == 21


def test_training_metrics_equal_an_eval_only_of_the_saved_weights(runs):
    trained, evaluated = runs
    during_training = [_evaluation(line) for line in _metrics_lines(trained) if _evaluation(line)]
    eval_only = [_evaluation(line) for line in _metrics_lines(evaluated) if _evaluation(line)]
    assert len(during_training) == len(eval_only) == 1
    assert during_training[0] == pytest.approx(eval_only[0], rel=1e-4, abs=1e-6)


def buffers_worker(output_dir):
    """Runs in each launched process: BatchNorm statistics that differ by rank, then the broadcast."""
    norm = torch.nn.BatchNorm1d(3)
    norm.running_mean.fill_(comm.get_rank() + 1.0)
    norm.num_batches_tracked.fill_(comm.get_rank() + 5)
    broadcast_buffers_from_main_process(norm)
    with open(os.path.join(output_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump({"running_mean": norm.running_mean.tolist(),
                   "num_batches_tracked": int(norm.num_batches_tracked)}, f)
    end_distributed_run()


def test_broadcast_buffers_gives_every_worker_the_main_process_statistics(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(buffers_worker, 2, dist_url="auto", args=(str(tmp_path),),
           timeout=datetime.timedelta(minutes=2))
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record == {"running_mean": [1.0, 1.0, 1.0], "num_batches_tracked": 5}


def test_broadcast_buffers_is_a_no_op_in_one_process():
    norm = torch.nn.BatchNorm1d(2)
    norm.running_mean.fill_(3.0)
    broadcast_buffers_from_main_process(norm)
    assert norm.running_mean.tolist() == [3.0, 3.0]
