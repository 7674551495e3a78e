"""tools/gpu_reproduce.py's bookkeeping: run summaries, speed from the log, the deadline."""
import argparse
import json
import os

from detectron2.config import get_cfg

from fal_d2.config import add_fal_config

from conftest import REPO_ROOT
from test_tools import _load_tool


def _fake_run(run_dir, seconds_per_iter=0.25, resumed_at=None):
    """The files a finished train_net.py run leaves, as gpu_reproduce reads them."""
    os.makedirs(os.path.join(run_dir, "explain", "ucmerced_test"))
    cfg = get_cfg()
    add_fal_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, "configs", "fal_p2p3.yaml"))
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    with open(os.path.join(run_dir, "log.txt"), "w") as f:
        f.write("[11/24 12:46:19] d2.engine.train_loop INFO: Starting training from iteration 0\n")
        if resumed_at is not None:  # cut off, then resumed: Detectron2 appends to log.txt
            f.write("[11/24 12:47:01] d2.engine.train_loop INFO: Starting training from "
                    f"iteration {resumed_at}\n")
        f.write("[11/24 12:49:13] d2.engine.hooks INFO: Overall training speed: 1298 iterations "
                f"in 0:02:53 ({seconds_per_iter:.4f} s / it)\n")
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        f.write(json.dumps({"iteration": 19, "time": 0.2, "data_time": 0.01}) + "\n")
        f.write(json.dumps({"classification/top1": 90.0, "classification/top5": 99.0,
                            "classification/mean_class_acc": 89.5, "iteration": 1299}) + "\n")
    rows = [{"method": "gradcam", "level": "p2", "class": name, "average_drop": 80.0,
             "increase_in_confidence": 5.0}
            for name in ("all", "airplane", "beach")]
    with open(os.path.join(run_dir, "explain", "ucmerced_test", "explanation_metrics.json"), "w") as f:
        json.dump({"rows": rows}, f)


def test_run_summary_reads_accuracy_speed_and_explanations(tmp_path):
    gpu_reproduce = _load_tool("gpu_reproduce")
    run_dir = str(tmp_path / "runs" / "fal_p2p3_s0")
    _fake_run(run_dir, seconds_per_iter=0.25)
    summary = gpu_reproduce.summarize_run(run_dir, "configs/fal_p2p3.yaml", 0, wall_s=300.0)
    assert summary["attention_levels"] == ["p2", "p3"]
    assert summary["train_img_s"] == 128 / 0.25  # batch 128 over the log's wall time per iteration
    assert (summary["top1"], summary["top5"], summary["mean_class_acc"]) == (90.0, 99.0, 89.5)
    assert [row["class"] for row in summary["explanation_rows"]] == ["all", "airplane"]
    assert summary["started_at_iterations"] == [0]


def test_a_resumed_run_says_so_beside_its_speed_and_wall_time(tmp_path):
    gpu_reproduce = _load_tool("gpu_reproduce")
    run_dir = str(tmp_path / "runs" / "fal_p2p3_s0")
    _fake_run(run_dir, seconds_per_iter=0.25, resumed_at=750)
    summary = gpu_reproduce.summarize_run(run_dir, "configs/fal_p2p3.yaml", 0, wall_s=300.0)
    assert summary["started_at_iterations"] == [0, 750]
    row = gpu_reproduce.runs_markdown({"fal_p2p3_s0": summary}).splitlines()[2]
    assert "| 512 (resumed at it. 750) | 300 (resumed at it. 750) |" in row


def test_summary_collects_finished_runs(tmp_path):
    gpu_reproduce = _load_tool("gpu_reproduce")
    run_dir = str(tmp_path / "runs" / "fal_p2p3_s0")
    _fake_run(run_dir)
    with open(os.path.join(run_dir, "run_summary.json"), "w") as f:
        json.dump(gpu_reproduce.summarize_run(run_dir, "configs/fal_p2p3.yaml", 0, 1.0), f)
    os.makedirs(tmp_path / "runs" / "fpn_baseline_s0")  # started, never finished: not reported
    summary = gpu_reproduce.summarize(str(tmp_path))
    assert list(summary["runs"]) == ["fal_p2p3_s0"]
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["runs"]["fal_p2p3_s0"]["top1"] == 90.0
    with open(tmp_path / "runs.md") as f:
        table = f.read().splitlines()
    assert len(table) == 3  # header, rule, the one finished run
    assert table[2] == ("| `fal_p2p3_s0` | 0 | p2, p3 | 90.0 | 99.0 | 89.5 | 512 | 1 | "
                        "gradcam p2 80.0 / 5.0 |")


def test_runs_table_lists_each_method_and_level_of_the_whole_test_split():
    gpu_reproduce = _load_tool("gpu_reproduce")
    rows = [{"method": "attention", "level": "p3", "class": "all", "average_drop": 86.04,
             "increase_in_confidence": 4.05},
            {"method": "attention", "level": "p3", "class": "airplane", "average_drop": 99.9,
             "increase_in_confidence": 0.0},
            {"method": "gradcam", "level": "p2", "class": "all", "average_drop": 80.44,
             "increase_in_confidence": None, "coverage": 0.384}]
    run = {"seed": 1, "attention_levels": [], "top1": 67.14, "top5": None, "mean_class_acc": 67.1,
           "train_img_s": None, "wall_s": 557.4, "explanation_rows": rows}
    row = gpu_reproduce.runs_markdown({"fpn_baseline_s1": run}).splitlines()[2]
    assert row == ("| `fpn_baseline_s1` | 1 | – | 67.1 | – | 67.1 | – | 557 | "
                   "attention p3 86.0 / 4.0; gradcam p2 80.4 / – (0.38) |")


def test_deadline_refuses_runs_that_would_not_finish():
    gpu_reproduce = _load_tool("gpu_reproduce")
    assert gpu_reproduce.Deadline(None).allows("any")
    deadline = gpu_reproduce.Deadline(100.0)
    assert deadline.allows("first")  # nothing measured yet
    deadline.record(30.0)
    assert deadline.allows("second")
    deadline.record(90.0)
    assert not deadline.allows("third")


def _comparison_table(path, model, reference, drops):
    """A layer_analysis.json of ``model`` against ``reference``: one gradcam row each at p2."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = [{"model": label, "method": "gradcam", "level": "p2", "class": name,
             "average_drop_top15": drop, "increase_in_confidence_top15": 1.0, "win_top15": None,
             "average_drop": drop, "increase_in_confidence": 2.0, "win": None, "coverage": 0.4,
             "deletion_auc": None, "insertion_auc": None, "num_images": 3}
            for label, drop in zip((model, reference), drops) for name in ("all", "airplane")]
    with open(path, "w") as f:
        json.dump({"mask": "normalized", "budgets": [15.0], "rows": rows}, f)


def test_comparison_summary_means_over_seeds_and_takes_the_reference_once(tmp_path):
    gpu_reproduce = _load_tool("gpu_reproduce")
    root = tmp_path / "comparison"
    for seed, drops in [(0, (10.0, 50.0)), (1, (20.0, 70.0))]:
        _comparison_table(str(root / f"fal_p2p3_s{seed}_vs_fpn_baseline_s{seed}" / "normalized"
                              / "layer_analysis.json"), "fal_p2p3", "fpn_baseline", drops)
        _comparison_table(str(root / f"fal_p2p3_mix_s{seed}_vs_fpn_baseline_s{seed}"
                              / "normalized" / "layer_analysis.json"),
                          "fal_p2p3_mix", "fpn_baseline", (5.0, drops[1]))
    records = gpu_reproduce.summarize_comparison(str(tmp_path))
    assert sorted((r["model"], r["seed"]) for r in records) == sorted(
        (model, seed) for model in ("fal_p2p3", "fal_p2p3_mix", "fpn_baseline")
        for seed in (0, 1))
    table = (tmp_path / "explanations.md").read_text().splitlines()
    assert table[0] == "### Mask convention: normalized"
    # Tables from before the budget mode was recorded kept the budget's pixels at their values.
    assert table[2] == "Budgets: top 15 % of each map's pixels (valued: kept pixels at their map " \
                       "values)."
    assert all(r["budget_mode"] == "valued" for r in records)
    assert table[4].startswith("| model | method | level | seeds | AD 15 % | IC 15 % | Win 15 % |")
    by_model = {line.split(" | ")[0][2:]: line for line in table[6:] if line}
    assert by_model["fal_p2p3"].startswith("| fal_p2p3 | gradcam | p2 | 2 | 15.0 ± 5.0 | 1.0 ± 0.0 | – |")
    assert " | 2 | 60.0 ± 10.0 | " in by_model["fpn_baseline"]
    assert json.loads((tmp_path / "explanations.json").read_text()) == records


def test_a_head_run_waits_for_its_base_run_and_starts_from_its_weights(tmp_path, monkeypatch,
                                                                        capsys):
    gpu_reproduce = _load_tool("gpu_reproduce")
    commands = []
    monkeypatch.setattr(gpu_reproduce, "run_logged", lambda command, log: commands.append(command))
    monkeypatch.setattr(gpu_reproduce, "summarize_run",
                        lambda *args: {"top1": 90.0, "train_img_s": 100.0})
    args = argparse.Namespace(vis_per_class=0, max_iter=None, opts=[], device="cuda", workers=2,
                              test_batch=8)
    gpu_reproduce.stage_train(args, str(tmp_path), gpu_reproduce.Deadline(None),
                              ["fal_p2p3_head_s0"])
    assert commands == []
    assert "fal_p2p3_head_s0: not started, its base run fal_p2p3_s0 is not trained" in \
        capsys.readouterr().out
    base = tmp_path / "runs" / "fal_p2p3_s0" / "model_final.pth"
    base.parent.mkdir(parents=True)
    base.write_bytes(b"weights")
    gpu_reproduce.stage_train(args, str(tmp_path), gpu_reproduce.Deadline(None),
                              ["fal_p2p3_head_s0"])
    (command,) = commands
    assert command[command.index("--config-file") + 1] == "configs/explain_head/fal_p2p3_head.yaml"
    assert command[command.index("MODEL.WEIGHTS") + 1] == str(base)
    assert "head" in command[command.index("TEST.EXPLAIN.METHODS") + 1]
