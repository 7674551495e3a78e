"""README.md's code, run the way a reader runs it, so that none of it can rot.

The fenced blocks are read from README.md when the tests are collected. Each block runs in a
scratch working directory laid out like the repository (``configs/`` copied, so that commands may
write there; ``tools/``, ``tests/`` and ``docs/`` linked; ``datasets/`` holding the dataset scripts
and the committed mini set as ``UCMerced_LandUse``), with the ``ucmerced_*`` datasets registered
on the mini set (tests/data/ucmerced_mini), one image per class and split:

- a ```python block runs as a script, unchanged, in a fresh interpreter;
- every command of a ```bash block runs in order, as written, except that a command given a
  config (``--config-file``) gets overrides appended that shrink the model and the schedule to a
  few seconds (2 iterations) through the same code path; ``make T`` runs the python commands that
  ``make -n T`` prints.

Weights a block loads (``MODEL.WEIGHTS``, ``--weights``, a ``.pth`` path in Python) but does not
make itself are trained first, briefly, with the config and model-shaping overrides of the command
(for Python: the config the block names, unchanged), so that they fit the model the block builds. A block opts out with an HTML comment on the lines
before its fence, ``<!-- not-tested: why -->``; any other command that this file cannot run fails
and says so.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

import pytest

from conftest import MINI_ROOT, REPO_ROOT, TINY_OVERRIDES

README = os.path.join(REPO_ROOT, "README.md")
NOT_TESTED = re.compile(r"<!--\s*not-tested:\s*(?P<reason>.*?)\s*-->", re.DOTALL)
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<language>[\w+-]*)\s*$")
PYTHON_LANGUAGES = {"python", "py"}
SHELL_LANGUAGES = {"bash", "sh", "shell"}
CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")
INTERPRETERS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}
# `make` targets whose recipes this file does not run, and what covers them instead.
MAKE_TARGETS_COVERED_ELSEWHERE = {
    "test": "the test suite, which includes this file",
    "env": "every test runs in the environment it creates",
    "data": "tests/test_prepare_ucmerced.py prepares UC Merced from a folder and from a zip",
    "clean": "removes outputs only",
}

# Seconds a command may take; a tiny model on the mini set needs about 10.
TIMEOUT_S = 300

# Appended to every command given a config, and used to train the weights it loads: a tiny model
# (conftest's, with UC Merced's 21 classes) for 2 iterations of 4 images, evaluated once at the
# end on the mini test set, with explanations scored but neither drawn nor given AUC curves.
TINY_MODEL = [str(value) for value in TINY_OVERRIDES]
TINY_MODEL[TINY_MODEL.index("MODEL.CLS_HEAD.NUM_CLASSES") + 1] = "21"
TINY_SCHEDULE = [
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "TEST.EVAL_PERIOD", "0",
    "TEST.IMS_PER_BATCH", "8",
    "TEST.EXPLAIN.AUC_STEPS", "0",  # deletion/insertion: tests/test_explanation_evaluator.py
    "TEST.EXPLAIN.VIS_PER_CLASS", "0",  # heatmaps and grids: the same, and test_html_report.py
]
CLI_OVERRIDES = TINY_MODEL + TINY_SCHEDULE
# Weights for a Python block, which runs its config unchanged: a real-size model, trained on
# small images (the size does not change the weights' shapes) for 1 iteration, not evaluated.
PYTHON_WEIGHTS_OVERRIDES = [
    "MODEL.DEVICE", "cpu",
    "INPUT.CLS.SIZE", "64",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", "1",
    "SOLVER.WARMUP_ITERS", "1",
]

# Runs a script as __main__ with the built-in UC Merced datasets on the committed mini set, one
# image per class and split (21 train, 21 test images).
LAUNCHER = f"""
import os, runpy, sys
from detectron2.data import DatasetCatalog, MetadataCatalog
from fal_d2.data import register_ucmerced
from fal_d2.data.ucmerced import SPLITS

def first_per_class(load):
    def thinned():
        records = {{}}
        for record in load():
            records.setdefault(record["label"], record)
        return list(records.values())
    return thinned

for split in SPLITS:
    DatasetCatalog.remove(f"ucmerced_{{split}}")
    MetadataCatalog.remove(f"ucmerced_{{split}}")
for name in register_ucmerced({MINI_ROOT!r}, prefix="ucmerced", allow_missing=True):
    load = DatasetCatalog[name]
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, first_per_class(load))
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class CodeBlock:
    language: str
    code: str
    line: int  # of the opening fence, 1-based
    skip_reason: Optional[str]

    @property
    def name(self):
        return f"{self.language}-line{self.line}"


def parse_blocks(markdown: str) -> List[CodeBlock]:
    """Fenced blocks in order; a `not-tested` comment ending on the last non-blank line before a
    fence opts that block out."""
    blocks = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        before = "\n".join(lines[:index]).rstrip()
        marker = None
        if before.endswith("-->"):
            start = before.rfind("<!--")
            marker = NOT_TESTED.fullmatch(before[start:]) if start >= 0 else None
        fence, indent = opening["fence"], len(opening["indent"])
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        if end == len(lines):
            raise ValueError(f"README.md:{index + 1}: code fence never closed")
        code = "\n".join(line[indent:] if not line[:indent].strip() else line
                         for line in lines[index + 1:end])
        blocks.append(CodeBlock(opening["language"].lower(), code + "\n", index + 1,
                                " ".join(marker["reason"].split()) if marker else None))
        index = end + 1
    return blocks


def shell_commands(code: str) -> List[Tuple[int, List[str]]]:
    """(line within the block, argv) of each command: continued lines joined, comments dropped."""
    commands = []
    pending, first_line = "", None
    for number, line in enumerate(code.splitlines(), start=1):
        if first_line is None:
            first_line = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        argv = shlex.split(pending + line, comments=True)
        if argv:
            commands.append((first_line, argv))
        pending, first_line = "", None
    if pending.strip():
        commands.append((first_line, shlex.split(pending, comments=True)))
    return commands


def make_commands(target: str) -> List[List[str]]:
    """The python tool commands of `make <target>`, as `make -n` prints them."""
    printed = subprocess.run(["make", "-n", target], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout
    return [argv for _, argv in shell_commands(printed)
            if len(argv) > 1 and argv[0] in INTERPRETERS and argv[1].startswith("tools/")]


def config_opts(argv: List[str]) -> Tuple[int, List[str]]:
    """(where they start, the KEY VALUE overrides) of a tool command; (len, []) without any."""
    if "--opts" in argv:
        start = argv.index("--opts") + 1
        return start, argv[start:]
    for index, token in enumerate(argv):
        if CONFIG_KEY.match(token) and not argv[index - 1].startswith("-"):
            return index, argv[index:]
    return len(argv), []


def with_overrides(argv: List[str], script_source: str, overrides: List[str]) -> List[str]:
    """`argv` with config overrides appended after its own (which they override): bare when the
    command already ends with KEY VALUE pairs, else after `--opts` when the tool takes that flag."""
    if "--opts" in argv or config_opts(argv)[1] or '"--opts"' not in script_source:
        return argv + overrides
    return argv + ["--opts"] + overrides


def weights_needed(argv: List[str]) -> List[Tuple[str, str]]:
    """(weights path, its config) for each local checkpoint the command loads."""
    opts = config_opts(argv)[1]
    pairs = dict(zip(opts[::2], opts[1::2]))
    needed = []
    if pairs.get("MODEL.WEIGHTS"):
        needed.append((pairs["MODEL.WEIGHTS"], _flag(argv, "--config-file")))
    if _flag(argv, "--weights"):
        needed.append((_flag(argv, "--weights"), _flag(argv, "--config-file")))
    if _flag(argv, "--compare-weights"):
        needed.append((_flag(argv, "--compare-weights"), _flag(argv, "--compare-config")))
    return [(path, config) for path, config in needed if "://" not in path]


def _flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def architecture_opts(argv: List[str]) -> List[str]:
    """The command's own overrides, less where it reads and writes (they shape the model)."""
    opts = config_opts(argv)[1]
    pairs = [(key, value) for key, value in zip(opts[::2], opts[1::2])
             if key not in ("MODEL.WEIGHTS", "OUTPUT_DIR")]
    return [token for pair in pairs for token in pair]


class Workspace:
    """A scratch directory laid out like the repository, where README blocks run."""

    def __init__(self, root, weights_cache):
        self.root = str(root)
        self.weights_cache = weights_cache
        shutil.copytree(os.path.join(REPO_ROOT, "configs"), os.path.join(self.root, "configs"))
        for name in ("tools", "tests", "docs"):
            os.symlink(os.path.join(REPO_ROOT, name), os.path.join(self.root, name))
        datasets = os.path.join(self.root, "datasets")
        os.makedirs(datasets)
        for name in os.listdir(os.path.join(REPO_ROOT, "datasets")):
            if name.endswith(".py"):
                os.symlink(os.path.join(REPO_ROOT, "datasets", name), os.path.join(datasets, name))
        os.symlink(MINI_ROOT, os.path.join(datasets, "UCMerced_LandUse"))
        self.env = {**os.environ, "DETECTRON2_DATASETS": datasets, "CUDA_VISIBLE_DEVICES": "",
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}

    def run_script(self, argv: List[str], where: str):
        """`python <script> args` with the mini set as UC Merced; fails with its output."""
        result = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], cwd=self.root,
                                env=self.env, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert result.returncode == 0, (
            f"{where}: `{shlex.join(argv)}` exited with {result.returncode}\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result.stdout

    def provide_weights(self, path: str, config: str, opts: List[str], where: str):
        """Put a checkpoint at `path` (unless a block made one) for `config` with `opts`."""
        target = os.path.join(self.root, path)
        if os.path.exists(target):
            return
        assert config, f"{where}: no config to train {path} with"
        key = (config, tuple(opts))
        if key not in self.weights_cache.trained:
            output = self.weights_cache.new_folder()
            # A second stage (MODEL.EXPLAIN_HEAD.TRAIN_ONLY_HEAD) loads a model trained without
            # its head, as a user's earlier run would have made it.
            without_head = ["MODEL.EXPLAIN_HEAD.ENABLED", "False",
                            "MODEL.EXPLAIN_HEAD.TRAIN_ONLY_HEAD", "False"]
            self.run_script(["tools/train_net.py", "--config-file", config, *opts, *without_head,
                             "OUTPUT_DIR", output, "DATASETS.TEST", "()"],
                            f"{where} (training weights for {path})")
            self.weights_cache.trained[key] = os.path.join(output, "model_final.pth")
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        shutil.copy(self.weights_cache.trained[key], target)

    def run_command(self, argv: List[str], where: str):
        """One README command: a python tool run on the mini set at a tiny schedule."""
        env_prefix = {}
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
            key, value = argv.pop(0).split("=", 1)
            env_prefix[key] = value
        assert not env_prefix, f"{where}: environment assignments are not run here: {argv}"
        assert not any("$" in token for token in argv), (
            f"{where}: shell variables cannot be run here; mark the block <!-- not-tested: ... -->")
        if argv[:1] == ["make"]:
            assert len(argv) == 2, f"{where}: one make target per command, got {argv}"
            if argv[1] in MAKE_TARGETS_COVERED_ELSEWHERE:
                return
            commands = make_commands(argv[1])
            assert commands, f"{where}: `make {argv[1]}` runs no python tool; mark the block"
            for command in commands:
                self.run_command(command, f"{where} (make {argv[1]})")
            return
        assert len(argv) > 1 and argv[0] in INTERPRETERS, (
            f"{where}: `{shlex.join(argv)}` is not a python command this test can run; mark the "
            "block with <!-- not-tested: why --> before its fence")
        script = argv[1]
        assert script.split("/")[0] in ("tools", "datasets") and script.endswith(".py"), (
            f"{where}: {script}: only tools/*.py and datasets/*.py run here")
        tool_argv = argv[1:]
        if "--config-file" in tool_argv or "--configs" in tool_argv:
            opts = architecture_opts(tool_argv) + CLI_OVERRIDES
            for path, config in weights_needed(tool_argv):
                self.provide_weights(path, config, opts, where)
            with open(os.path.join(REPO_ROOT, script)) as f:
                tool_argv = with_overrides(tool_argv, f.read(), CLI_OVERRIDES)
        self.run_script(tool_argv, where)

    def run_python(self, code: str, where: str):
        """A Python block as a script; a checkpoint it names is made for the config it names."""
        literals = re.findall(r"""["']([^"'\s]+)["']""", code)
        configs = [s for s in literals if s.startswith("configs/") and s.endswith(".yaml")]
        for path in (s for s in literals if s.endswith(".pth") and "://" not in s):
            assert len(configs) == 1, (
                f"{where}: {path} needs exactly one configs/*.yaml in the block, got {configs}")
            self.provide_weights(path, configs[0], PYTHON_WEIGHTS_OVERRIDES, where)
        script = os.path.join(self.root, "readme_block.py")
        with open(script, "w") as f:
            f.write(code)
        return self.run_script([script], where)


class WeightsCache:
    """Checkpoints trained for README blocks, shared by every block of the session."""

    def __init__(self, root):
        self.root = root
        self.trained = {}

    def new_folder(self):
        return str(self.root / f"weights_{len(self.trained)}")


with open(README) as readme_file:
    BLOCKS = [block for block in parse_blocks(readme_file.read())
              if block.language in PYTHON_LANGUAGES | SHELL_LANGUAGES]


@pytest.fixture(scope="module")
def weights_cache(tmp_path_factory):
    return WeightsCache(tmp_path_factory.mktemp("readme_weights"))


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_readme_block_runs(block, tmp_path, weights_cache):
    if block.skip_reason:
        pytest.skip(f"README.md:{block.line}: {block.skip_reason}")
    workspace = Workspace(tmp_path / "repo", weights_cache)
    if block.language in PYTHON_LANGUAGES:
        workspace.run_python(block.code, f"README.md:{block.line}")
        return
    commands = shell_commands(block.code)
    assert commands, f"README.md:{block.line}: an empty shell block"
    for line, argv in commands:
        workspace.run_command(list(argv), f"README.md:{block.line + line}")


def test_readme_has_tested_python_and_cli_blocks():
    tested = [block.language for block in BLOCKS if not block.skip_reason]
    assert any(language in PYTHON_LANGUAGES for language in tested), "no Python block is tested"
    assert any(language in SHELL_LANGUAGES for language in tested), "no CLI block is tested"


def test_parse_blocks_reads_fences_and_opt_outs():
    markdown = "\n".join([
        "text",
        "<!-- not-tested: needs",
        "a GPU -->",
        "",
        "```bash",
        "python tools/train_net.py \\",
        "    --num-gpus 8  # eight",
        "```",
        "<!-- a placeholder, not an opt-out -->",
        "```python",
        "print(1)",
        "```",
        "<!-- not-tested: far away -->",
        "words between",
        "  ```Python",
        "  x = 1",
        "  ```",
    ])
    blocks = parse_blocks(markdown)
    assert [(b.language, b.line, b.skip_reason) for b in blocks] == [
        ("bash", 5, "needs a GPU"), ("python", 10, None), ("python", 15, None)]
    assert blocks[2].code == "x = 1\n"
    assert shell_commands(blocks[0].code) == [
        (1, ["python", "tools/train_net.py", "--num-gpus", "8"])]
    with pytest.raises(ValueError, match="never closed"):
        parse_blocks("```bash\nmake demo\n")


def test_overrides_follow_the_commands_own_convention():
    overrides = ["SOLVER.MAX_ITER", "2"]
    positional = "parser.add_argument('opts', nargs=argparse.REMAINDER)"
    flagged = 'parser.add_argument("--opts", nargs=argparse.REMAINDER)'
    plain = ["tools/x.py", "--config-file", "c.yaml"]
    assert with_overrides(plain, positional, overrides) == plain + overrides
    assert with_overrides(plain, flagged, overrides) == plain + ["--opts"] + overrides
    trailing = plain + ["MODEL.WEIGHTS", "w.pth"]
    assert with_overrides(trailing, flagged, overrides) == trailing + overrides
    opts = plain + ["--opts", "MODEL.WEIGHTS", "w.pth", "OUTPUT_DIR", "o"]
    assert with_overrides(opts, flagged, overrides) == opts + overrides
    assert weights_needed(opts) == [("w.pth", "c.yaml")]
    assert architecture_opts(opts + ["MODEL.FAL.ATTENTION_LEVELS", "[]"]) == [
        "MODEL.FAL.ATTENTION_LEVELS", "[]"]
    compared = plain + ["--weights", "a.pth", "--compare-config", "b.yaml",
                        "--compare-weights", "b.pth", "--output", "o"]
    assert weights_needed(compared) == [("a.pth", "c.yaml"), ("b.pth", "b.yaml")]
    assert config_opts(["tools/x.py", "--levels", "p2"]) == (3, [])


def test_make_demo_runs_a_python_tool():
    """`make demo` maps to tools/train_net.py, so its README mention is run, not skipped."""
    commands = make_commands("demo")
    assert commands and all(command[1] == "tools/train_net.py" for command in commands)


@pytest.mark.parametrize("command, message", [
    ("pip install detectron2", "not a python command this test can run"),
    ("python tools/train_net.py SEED $s", "shell variables"),
    ("python setup.py develop", "only tools/\\*.py and datasets/\\*.py"),
])
def test_commands_it_cannot_run_fail_and_say_so(command, message, tmp_path, weights_cache):
    workspace = Workspace(tmp_path / "repo", weights_cache)
    with pytest.raises(AssertionError, match=message):
        workspace.run_command(shlex.split(command), "README.md:1")
