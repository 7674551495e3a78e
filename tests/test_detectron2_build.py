"""The Detectron2 v0.6 build's patches (tools/build_detectron2.py) fix what they say they fix."""
import datetime
import json
import os
import subprocess
import sys

import pytest
import torch

import detectron2
import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.engine import hooks, launch
from detectron2.engine.defaults import create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.modeling import build_model

from conftest import has_compiled_ops, load_script, make_tiny_cfg
from fal_d2.utils.distributed import end_distributed_run

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.skipif(has_compiled_ops(), reason="an official Detectron2 is installed, not our build")
def test_every_patch_is_in_the_installed_detectron2_and_fvcore():
    build = load_script(os.path.join("tools", "build_detectron2.py"))
    package_dir = os.path.dirname(detectron2.__file__)
    target = os.path.dirname(package_dir)
    patches = [(package_dir, patch) for patch in build.PATCHES]
    patches += [(target, patch) for patch in build.FVCORE_PATCHES]
    for root, (relpath, old, new) in patches:
        with open(os.path.join(root, relpath)) as f:
            text = f.read()
        assert new in text, f"{relpath}: patch not applied: {new!r}"
        if old not in new:
            assert old not in text, f"{relpath}: original text left: {old!r}"


@pytest.mark.skipif(has_compiled_ops(), reason="an official Detectron2 is installed, not our build")
def test_importing_detectron2_and_fal_d2_raises_no_future_warning():
    # A fresh interpreter: this one has imported both already, and warnings fire only once.
    command = "import detectron2.modeling, detectron2.engine, fal_d2"
    result = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", command],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_scripting_at_import_still_happens():
    from fvcore.nn import sigmoid_focal_loss, sigmoid_focal_loss_jit, sigmoid_focal_loss_star_jit
    from detectron2.modeling.box_regression import Box2BoxTransform

    assert isinstance(sigmoid_focal_loss_jit, torch.jit.ScriptFunction)
    assert isinstance(sigmoid_focal_loss_star_jit, torch.jit.ScriptFunction)
    torch.manual_seed(0)
    logits, targets = torch.randn(8, 3), (torch.rand(8, 3) > 0.5).float()
    torch.testing.assert_close(sigmoid_focal_loss_jit(logits, targets, 0.25, 2.0, "sum"),
                               sigmoid_focal_loss(logits, targets, 0.25, 2.0, "sum"))

    # A TorchScript class since import (as in upstream), which scripted code can construct.
    assert torch.jit._state._get_script_class(Box2BoxTransform) is not None
    @torch.jit.script
    def apply_identity_deltas(boxes: torch.Tensor) -> torch.Tensor:
        return Box2BoxTransform((1.0, 1.0, 1.0, 1.0)).apply_deltas(torch.zeros(1, 4), boxes)

    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    torch.testing.assert_close(apply_identity_deltas(boxes), boxes)


def _count_conv_flops(model, inputs):
    """Multiply-adds of every Conv2d, counted by hand from each output's shape."""
    total = 0

    def count(module, _, output):
        nonlocal total
        kernel = module.weight.shape[2] * module.weight.shape[3]
        total += output.numel() * (module.in_channels // module.groups) * kernel

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def test_flop_count_analysis_counts_a_fal_classifier():
    from detectron2.utils.analysis import FlopCountAnalysis

    torch.manual_seed(0)
    model = build_model(make_tiny_cfg()).eval()
    conv_flops, totals = {}, {}
    for size in (64, 128):
        inputs = [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8)}]
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, inputs)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            conv_flops[size] = analysis.by_operator()["conv"]
            totals[size] = analysis.total()
        assert conv_flops[size] == _count_conv_flops(model, inputs)
        assert totals[size] > conv_flops[size]  # plus the head, BatchNorm and map upsampling
    # Every level halves exactly, so the convolutions cost 4x at twice the side.
    assert conv_flops[128] == 4 * conv_flops[64]
    assert 3 * totals[64] < totals[128] <= 4 * totals[64]


def test_torchscript_export_imports_without_caffe2():
    from detectron2.export import TracingAdapter, dump_torchscript_IR, scripting_with_instances

    assert callable(dump_torchscript_IR) and callable(scripting_with_instances)
    model = build_model(make_tiny_cfg()).eval()
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    adapter = TracingAdapter(model, [{"image": image}], allow_non_tensor=True)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        expected = adapter(image)
        outputs = traced(image)
    assert len(outputs) == len(expected) > 0
    for output, expected_output in zip(outputs, expected):
        torch.testing.assert_close(output, expected_output)


def test_map_dataset_retries_a_sample_the_mapper_drops():
    dataset = MapDataset(DatasetFromList(list(range(6)), copy=False),
                         lambda x: None if x == 2 else 10 * x)
    assert [dataset[i] for i in (0, 1, 3)] == [0, 10, 30]
    for _ in range(5):
        assert dataset[2] in {0, 10, 30, 40, 50}  # another sample, never None


def _schedule(lr=1.0):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.1)
    trainer = TrainerBase()
    trainer.register_hooks([hooks.LRScheduler(optimizer, scheduler)])
    return model, optimizer, scheduler, trainer


def test_step_lr_survives_resume(tmp_path):
    model, optimizer, scheduler, trainer = _schedule()
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    trainer.iter = 4
    DetectionCheckpointer(model, str(tmp_path), trainer=trainer, optimizer=optimizer).save(
        "model_0000004")

    model, optimizer, resumed, trainer = _schedule()
    checkpointer = DetectionCheckpointer(model, str(tmp_path), trainer=trainer, optimizer=optimizer)
    checkpointer.resume_or_load("", resume=True)
    assert trainer.iter == 4 and resumed.last_epoch == scheduler.last_epoch == 5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    for _ in range(2):
        optimizer.step()
        resumed.step()
        scheduler.step()
        assert resumed.get_last_lr() == pytest.approx(scheduler.get_last_lr())


def record_worker(output_dir):
    """Runs in each launched process: its rank, and one DistributedDataParallel step on the CPU."""
    model = create_ddp_model(torch.nn.Linear(2, 1, bias=False))
    model(torch.full((1, 2), float(comm.get_rank() + 1))).sum().backward()
    gradients = comm.all_gather(model.module.weight.grad.tolist())
    record = {"rank": comm.get_rank(), "world_size": comm.get_world_size(),
              "local_rank": comm.get_local_rank(), "backend": torch.distributed.get_backend(),
              "gradients": gradients}
    with open(os.path.join(output_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump(record, f)
    end_distributed_run()


def test_launch_runs_two_processes_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the spawned workers see no GPU
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(record_worker, 2, dist_url="auto", args=(str(tmp_path),),
           timeout=datetime.timedelta(minutes=2))
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(r["rank"], r["local_rank"], r["world_size"]) for r in records] == [(0, 0, 2), (1, 1, 2)]
    assert {r["backend"] for r in records} == {"gloo"}
    # DDP averaged the gradients of inputs 1 and 2: every worker holds 1.5 for both weights.
    for record in records:
        assert record["gradients"] == [[[1.5, 1.5]], [[1.5, 1.5]]]
