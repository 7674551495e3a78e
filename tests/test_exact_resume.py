"""Exact resume: tools/train_net.py killed (SIGKILL) after a mid-run checkpoint and resumed with
--resume ends with the weights of an uninterrupted run of the same seed.

The runs are real subprocesses of the tool, with loader workers, augmentation (flips, rotations,
colour jitter, random resized crops), head dropout, mixup/CutMix and an EMA of the weights (the
from-scratch recipe), so the data order, the augmentation draws, the model's RNG and the average
all have to come back. On the CPU a training step is deterministic for a fixed thread count, so
the weights must agree to float32 rounding.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import MINI_ROOT, REPO_ROOT, TINY_OVERRIDES

MAX_ITER = 12
CHECKPOINT_PERIOD = 4

# Registers the committed mini set, then runs the tool as its own __main__.
_LAUNCHER = (
    "import runpy, sys\n"
    "from fal_d2.data import register_ucmerced\n"
    f"register_ucmerced({MINI_ROOT!r}, prefix='ucmerced_mini', allow_missing=True)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def _command(output_dir, *extra, max_iter=MAX_ITER, checkpoint_period=CHECKPOINT_PERIOD):
    opts = [str(o) for o in TINY_OVERRIDES]
    opts[opts.index("MODEL.CLS_HEAD.NUM_CLASSES") + 1] = "21"
    return [
        sys.executable, "-c", _LAUNCHER, os.path.join(REPO_ROOT, "tools", "train_net.py"),
        "--config-file", os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml"), *extra,
        *opts,
        "OUTPUT_DIR", str(output_dir),
        "SEED", "7",
        "DATASETS.TRAIN", "('ucmerced_mini_train',)",
        "DATASETS.TEST", "()",
        "DATALOADER.NUM_WORKERS", "2",
        "INPUT.CLS.COLOR_JITTER", "0.2",
        "MODEL.CLS_HEAD.DROPOUT", "0.3",
        "INPUT.CLS.CROP_SCALE", "[0.5, 1.0]",
        "INPUT.CLS.MIXUP_ALPHA", "0.2",
        "INPUT.CLS.CUTMIX_ALPHA", "1.0",
        "MODEL.CLS_HEAD.LABEL_SMOOTHING", "0.1",
        "MODEL.EMA.ENABLED", "True",
        "MODEL.EMA.DECAY", "0.9",
        "SOLVER.IMS_PER_BATCH", "8",
        "SOLVER.BASE_LR", "0.01",
        "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD", str(checkpoint_period),
        "TEST.EVAL_PERIOD", "0",
    ]


def _env():
    # One intra-op thread: the same reduction order in every run, and no fight over 2 cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _train(output_dir, *extra, **schedule):
    result = subprocess.run(_command(output_dir, *extra, **schedule), env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _train_and_kill_after_checkpoint(output_dir, checkpoint_period=CHECKPOINT_PERIOD, **schedule):
    """Start a run, SIGKILL it as soon as its first periodic checkpoint is on disk and tagged."""
    name = f"model_{checkpoint_period - 1:07d}.pth"
    tag = output_dir / "last_checkpoint"
    command = _command(output_dir, checkpoint_period=checkpoint_period, **schedule)
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (tag.exists() and tag.read_text().strip() == name) and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        try:  # its loader workers, in the session the run started
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == -signal.SIGKILL, "the run ended before it was killed"
    assert not (output_dir / "model_final.pth").exists(), "the kill did not land mid-run"


def _checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _weights(path):
    return _checkpoint(path)["model"]


def _max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a
               if a[k].is_floating_point())


def _assert_same_weights(a, b):
    for key in a:
        if a[key].is_floating_point():
            assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), (
                f"{key}: max difference {(a[key] - b[key]).abs().max().item():.3g}")
        else:
            assert torch.equal(a[key], b[key]), key


def test_batches_do_not_depend_on_workers_or_start(mini_datasets, tiny_cfg):
    """Batch k (images after augmentation included) is the same with 0 or 2 loader workers, and
    for a loader that starts at batch 2 from another's state."""
    from fal_d2.data import build_classification_train_loader

    def batches(num_workers, count, state=None):
        cfg = tiny_cfg("fal_p2p3.yaml", "DATASETS.TRAIN", (mini_datasets[0],), "SEED", "5",
                       "DATALOADER.NUM_WORKERS", num_workers, "SOLVER.IMS_PER_BATCH", 4,
                       "INPUT.CLS.COLOR_JITTER", 0.2, "MODEL.CLS_HEAD.NUM_CLASSES", 21)
        loader = build_classification_train_loader(cfg)
        if state is not None:
            loader.load_state_dict(state)
        stream = iter(loader)
        return [next(stream) for _ in range(count)], loader.state_dict()

    def same(a, b):
        return all(x["file_name"] == y["file_name"] and torch.equal(x["image"], y["image"])
                   for batch_a, batch_b in zip(a, b) for x, y in zip(batch_a, batch_b))

    in_main, _ = batches(0, 4)
    in_workers, _ = batches(2, 4)
    _, after_two = batches(0, 2)
    resumed, _ = batches(2, 2, state=after_two)
    assert after_two["position"] == 8
    assert same(in_main, in_workers) and same(in_main[2:], resumed)
    assert not same(in_main[:2], in_main[2:])  # a test that can fail


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    _train(output_dir)
    return output_dir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return _weights(uninterrupted_run / "model_final.pth")


def test_model_final_holds_the_weight_average(uninterrupted_run):
    """With MODEL.EMA, model_final.pth holds the average (the hook's state); a periodic checkpoint
    holds the trained weights of its step beside the average up to that step."""
    final = _checkpoint(uninterrupted_run / "model_final.pth")
    _assert_same_weights(final["model"], final["trainer"]["hooks"]["WeightEMA"]["ema_model"])
    middle = _checkpoint(uninterrupted_run / f"model_{2 * CHECKPOINT_PERIOD - 1:07d}.pth")
    assert _max_difference(middle["model"], middle["trainer"]["hooks"]["WeightEMA"]["ema_model"]) > 1e-4


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """The output folder of a run killed after its first checkpoint (copy it before resuming)."""
    output_dir = tmp_path_factory.mktemp("killed")
    _train_and_kill_after_checkpoint(output_dir)
    return output_dir


def test_killed_run_resumes_exactly(tmp_path, killed_run, uninterrupted):
    shutil.copytree(killed_run, tmp_path, dirs_exist_ok=True)
    log = _train(tmp_path, "--resume")
    assert "Starting training from iteration 0" not in log, "the run did not resume"
    assert "not exact" not in log
    resumed = _weights(tmp_path / "model_final.pth")
    _assert_same_weights(resumed, uninterrupted)


def test_checkpoint_without_resume_state_resumes_with_a_warning(tmp_path, killed_run,
                                                               uninterrupted):
    """A checkpoint from before exact resume (no ExactResume hook state, no optimizer state)
    still resumes."""
    shutil.copytree(killed_run, tmp_path, dirs_exist_ok=True)
    last = tmp_path / (tmp_path / "last_checkpoint").read_text().strip()
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    del checkpoint["trainer"]["hooks"]["ExactResume"]
    del checkpoint["trainer"]["_trainer"]
    torch.save(checkpoint, last)

    log = _train(tmp_path, "--resume")
    warnings = [line for line in log.splitlines() if "is not exact" in line]
    assert len(warnings) == 1 and str(last) in warnings[0], log[-3000:]
    resumed = _weights(tmp_path / "model_final.pth")
    assert all(torch.isfinite(value).all() for value in resumed.values()
               if value.is_floating_point())
    # It trained on from the checkpoint, but with another sample order and other draws.
    assert _max_difference(resumed, uninterrupted) > 1e-4


@pytest.mark.parametrize("grouping", [False, True], ids=["exact", "aspect-ratio-grouping"])
def test_detector_resumes(tmp_path, grouping, one_thread):
    """A Faster R-CNN trained with tools/train_net.py resumes from a mid-run checkpoint; exactly
    without aspect-ratio grouping (its buckets are not checkpointed)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from fal_d2.data.shapes_coco import make_shapes_coco, register_shapes_coco

    from conftest import load_script, tiny_detection_overrides

    train_net = load_script(os.path.join("tools", "train_net.py"))
    name = f"exact_resume_shapes_{grouping}"
    make_shapes_coco(str(tmp_path / "shapes"), 8, 96, 0)
    register_shapes_coco(name, str(tmp_path / "shapes"))
    opts = [str(o) for o in TINY_OVERRIDES + tiny_detection_overrides(name, name, 96)] + [
        "DATASETS.TEST", "()", "DATALOADER.ASPECT_RATIO_GROUPING", str(grouping), "SEED", "3",
        "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0",
    ]
    config = os.path.join(REPO_ROOT, "configs", "COCO-Detection",
                          "fal_faster_rcnn_R_50_FPN_p2p3_1x.yaml")

    def train(output_dir, *flags):
        args = train_net.get_parser().parse_args(
            ["--config-file", config, *flags, *opts, "OUTPUT_DIR", str(output_dir)])
        train_net.main(args)
        return _weights(output_dir / "model_final.pth")

    try:
        uninterrupted = train(tmp_path / "run")
        # Resume a copy from its iteration-2 checkpoint, as if killed there.
        shutil.copytree(tmp_path / "run", tmp_path / "resumed")
        (tmp_path / "resumed" / "model_final.pth").unlink()
        (tmp_path / "resumed" / "last_checkpoint").write_text("model_0000001.pth")
        resumed = train(tmp_path / "resumed", "--resume")
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    if grouping:
        assert all(torch.isfinite(v).all() for v in resumed.values() if v.is_floating_point())
    else:
        _assert_same_weights(resumed, uninterrupted)
