"""Every tool takes its arguments the Detectron2 way (fal_d2/utils/tool_args.py): config overrides
after --opts or at the end of the line, never swallowed by a list option; old flags still work,
with one deprecation line; --help reads as plain text."""
import os
import re
import subprocess
import sys

import pytest
import torch

from fal_d2.utils.tool_args import override_value, split_overrides, without_override

from conftest import REPO_ROOT, load_script

TOOLS = ["demo", "explain", "select_levels", "benchmark", "export_model", "train_net",
         "gpu_reproduce"]
OVERRIDES = ["MODEL.WEIGHTS", "w.pth", "MODEL.DEVICE", "cpu"]


def _tool(name):
    return load_script(os.path.join("tools", f"{name}.py"))


def _parse(name, argv):
    return _tool(name).get_parser().parse_args(argv)


# (tool, the arguments it requires, a list option and its values, the attribute they fill)
LIST_OPTIONS = [
    ("demo", ["--config-file", "c.yaml", "--output", "out"],
     ["--input", "a.jpg", "b.jpg"], "input", ["a.jpg", "b.jpg"]),
    ("demo", ["--config-file", "c.yaml", "--output", "out", "--input", "a.jpg"],
     ["--levels", "p2", "p3"], "levels", ["p2", "p3"]),
    ("demo", ["--config-file", "c.yaml", "--output", "out", "--input", "a.jpg"],
     ["--methods", "gradcam", "branch_cam"], "methods", ["gradcam", "branch_cam"]),
    ("explain", ["--config-file", "c.yaml", "--output", "out"],
     ["--levels", "p2", "p3"], "levels", ["p2", "p3"]),
    ("explain", ["--config-file", "c.yaml", "--output", "out"],
     ["--methods", "gradcam", "gradcampp"], "methods", ["gradcam", "gradcampp"]),
    ("explain", ["--config-file", "c.yaml", "--output", "out"],
     ["--budgets", "15", "50"], "budgets", [15.0, 50.0]),
    ("benchmark", [], ["--config-file", "a.yaml", "b.yaml"], "config_file", ["a.yaml", "b.yaml"]),
    ("gpu_reproduce", ["--output", "out"],
     ["--runs", "fpn_baseline_s0", "fal_p2p3_s0"], "runs", ["fpn_baseline_s0", "fal_p2p3_s0"]),
    ("gpu_reproduce", ["--output", "out"],
     ["--loader-workers", "2", "4"], "loader_workers", [2, 4]),
    ("export_model", ["--config-file", "c.yaml", "--output", "out"],
     ["--sample-image", "x.png"], "sample_image", "x.png"),
    ("train_net", ["--config-file", "c.yaml"], ["--eval-only"], "eval_only", True),
]


@pytest.mark.parametrize("form", ["trailing", "--opts"])
@pytest.mark.parametrize("tool,required,option,dest,values", LIST_OPTIONS,
                         ids=[f"{case[0]}{case[2][0]}" for case in LIST_OPTIONS])
def test_overrides_after_a_list_option_are_not_swallowed(tool, required, option, dest, values,
                                                         form):
    overrides = OVERRIDES if form == "trailing" else ["--opts", *OVERRIDES]
    args = _parse(tool, [*required, *option, *overrides])
    assert getattr(args, dest) == values
    assert args.opts == OVERRIDES


def test_trailing_pairs_are_recognised_by_their_config_keys():
    # top-level keys without a dot are keys too; a capitalised file name is not
    assert split_overrides(["--input", "a.jpg", "OUTPUT_DIR", "out", "SEED", "1"]) == (
        ["--input", "a.jpg"], ["OUTPUT_DIR", "out", "SEED", "1"])
    assert split_overrides(["--input", "A.JPG", "B.JPG"]) == (["--input", "A.JPG", "B.JPG"], [])
    # a misspelt key under a known root is still an override, for yacs to name
    assert split_overrides(["--levels", "p2", "MODEL.WEIGTHS", "w"]) == (
        ["--levels", "p2"], ["MODEL.WEIGTHS", "w"])
    # with --opts, everything after it
    assert split_overrides(["--opts", "model.weights", "w"]) == ([], ["model.weights", "w"])
    assert override_value(OVERRIDES + ["MODEL.DEVICE", "cuda"], "MODEL.DEVICE") == "cuda"
    assert override_value(OVERRIDES, "SEED", "7") == "7"
    assert without_override(OVERRIDES, "MODEL.WEIGHTS") == ["MODEL.DEVICE", "cpu"]


def test_overrides_that_are_not_pairs_fail_in_one_line(capsys):
    for argv in [["--opts", "MODEL.DEVICE", "cpu", "--output", "out"], ["--opts", "MODEL.DEVICE"]]:
        with pytest.raises(SystemExit):
            _parse("export_model", ["--config-file", "c.yaml", *argv])
        (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert "config overrides come in KEY VALUE pairs, last on the line" in line


# (tool, the arguments it requires, a deprecated flag and its values, the attribute they fill,
# what they fill it with, the new spelling)
DEPRECATED = [
    ("demo", ["--config-file", "c.yaml", "--output", "out", "--input", "a.jpg"],
     ["--device", "cpu"], "opts", ["MODEL.DEVICE", "cpu"], "--opts MODEL.DEVICE cpu"),
    ("explain", ["--config-file", "c.yaml", "--output", "out"],
     ["--weights", "w.pth"], "opts", ["MODEL.WEIGHTS", "w.pth"], "--opts MODEL.WEIGHTS w.pth"),
    ("benchmark", [], ["--configs", "a.yaml", "b.yaml"], "config_file", ["a.yaml", "b.yaml"],
     "--config-file"),
    ("benchmark", [], ["--device", "cuda"], "opts", ["MODEL.DEVICE", "cuda"],
     "--opts MODEL.DEVICE cuda"),
    ("select_levels", ["metrics.json", "-o", "out.yaml"], ["--base-config", "b.yaml"],
     "config_file", "b.yaml", "--config-file"),
    ("gpu_reproduce", [], ["--device", "cpu"], "opts", ["MODEL.DEVICE", "cpu"],
     "--opts MODEL.DEVICE cpu"),
]


@pytest.mark.parametrize("tool,required,flag,dest,value,replacement", DEPRECATED,
                         ids=[f"{case[0]}{case[2][0]}" for case in DEPRECATED])
def test_deprecated_flags_still_work_and_say_so_once(capsys, tool, required, flag, dest, value,
                                                     replacement):
    args = _parse(tool, [*required, *flag])
    assert getattr(args, dest) == value
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"warning: {flag[0]} is deprecated; use {replacement}"


def test_a_deprecated_override_comes_after_the_explicit_ones(capsys):
    args = _parse("demo", ["--config-file", "c.yaml", "--output", "out", "--device", "cuda",
                           "--input", "a.jpg", *OVERRIDES])
    assert args.opts == OVERRIDES + ["MODEL.DEVICE", "cuda"]  # as the old flag won before
    assert capsys.readouterr().err.count("deprecated") == 1


def test_gpu_reproduce_takes_its_device_from_the_overrides(capsys):
    gpu_reproduce = _tool("gpu_reproduce")
    assert gpu_reproduce.parse_args(["--output", "out"]).device == "cuda"
    assert gpu_reproduce.parse_args(["--stages", "train", "MODEL.DEVICE", "cpu"]).device == "cpu"
    assert gpu_reproduce.parse_args(["--device", "cpu"]).device == "cpu"
    with pytest.raises(SystemExit):
        gpu_reproduce.parse_args(["--opts", "MODEL.DEVICE", "mps"])
    assert "MODEL.DEVICE mps: the experiment runs on one of ('cuda', 'cpu')" in \
        capsys.readouterr().err


def test_explain_gives_model_weights_to_the_first_model_only():
    explain = _tool("explain")
    fal, fpn = (os.path.join(REPO_ROOT, "configs", name)
                for name in ("fal_p2p3.yaml", "fpn_baseline.yaml"))
    argv = ["--config-file", fal, "--compare-config", fpn, "--output", "out",
            "--allow-random-weights", "MODEL.WEIGHTS", "fal.pth", "MODEL.DEVICE", "cpu"]
    args = explain.get_parser().parse_args(argv)
    assert explain.setup_cfg(fal, args).MODEL.WEIGHTS == "fal.pth"
    compared = explain.setup_cfg(fpn, args, compare=True)
    assert compared.MODEL.WEIGHTS == "" and compared.MODEL.DEVICE == "cpu"  # its config's
    args = explain.get_parser().parse_args(["--compare-weights", "fpn.pth", *argv])
    assert explain.setup_cfg(fpn, args, compare=True).MODEL.WEIGHTS == "fpn.pth"


def test_gpu_reproduce_calls_the_tools_with_their_arguments(tmp_path, monkeypatch):
    """The analysis stage's commands, parsed by the tools they call: each model gets its own
    weights, and every override reaches both."""
    gpu_reproduce, explain = _tool("gpu_reproduce"), _tool("explain")
    runs = {}
    for run in ("fpn_baseline_s0", "fal_p2p3_s0"):
        os.makedirs(tmp_path / "runs" / run)
        runs[run] = str(tmp_path / "runs" / run / "model_final.pth")
        torch.save({}, runs[run])
    commands = []

    def record(command, log_path):
        commands.append(command)
        if "--output" in command and command[1].endswith("explain.py"):  # what select_levels reads
            output = command[command.index("--output") + 1]
            os.makedirs(output, exist_ok=True)
            open(os.path.join(output, "explanation_metrics.json"), "w").close()

    monkeypatch.setattr(gpu_reproduce, "run_logged", record)
    args = gpu_reproduce.parse_args(["--output", str(tmp_path), "--stages", "analysis",
                                     "SOLVER.MAX_ITER", "5", "MODEL.DEVICE", "cpu"])
    gpu_reproduce.stage_analysis(args, str(tmp_path))
    explained = [command[2:] for command in commands if command[1].endswith("explain.py")]
    assert len(explained) == 1 + 2  # the layer analysis, then the comparison in both masks
    layer_args = explain.get_parser().parse_args(explained[0])
    cfg = explain.setup_cfg(layer_args.config_file, layer_args)
    assert cfg.MODEL.WEIGHTS == runs["fpn_baseline_s0"] and cfg.SOLVER.MAX_ITER == 5
    for argv in explained[1:]:
        compare_args = explain.get_parser().parse_args(argv)
        first = explain.setup_cfg(compare_args.config_file, compare_args)
        second = explain.setup_cfg(compare_args.compare_config, compare_args, compare=True)
        assert (first.MODEL.WEIGHTS, second.MODEL.WEIGHTS) == (runs["fal_p2p3_s0"],
                                                               runs["fpn_baseline_s0"])
        assert first.MODEL.DEVICE == second.MODEL.DEVICE == "cpu"
    (select,) = [command for command in commands if command[1].endswith("select_levels.py")]
    _tool("select_levels").get_parser().parse_args(select[2:])


MARKUP = re.compile(r"``|:(mod|class|func|meth|attr|data|obj|ref|doc):`")


def test_every_tool_help_reads_as_plain_text():
    """Each --help in its own process, as a user runs it: usage, the tool's description from
    its docstring, and no reST markup or doubled backslashes."""
    processes = {name: subprocess.Popen([sys.executable, os.path.join("tools", f"{name}.py"),
                                         "--help"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                 for name in TOOLS}
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {err[-2000:]}"
        assert out.startswith(f"usage: {name}.py "), name
        summary = _tool(name).__doc__.strip().splitlines()[0]
        assert summary in out, name
        assert not MARKUP.search(out), f"{name}: {MARKUP.search(out).group()}"
        assert "\\\\" not in out, name
