"""Choosing attention levels from a baseline's explanation metrics; the select_levels.py tool."""

import json
import os
import subprocess
import sys

import pytest

from detectron2.config import get_cfg

from fal_d2.config import add_fal_config
from fal_d2.evaluation.level_selection import (
    LevelSelectionError,
    load_explanation_rows,
    rank_levels,
    select_weakest_levels,
)
from fal_d2.evaluation.budgets import table_budgets

from conftest import load_script

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO_ROOT, "tools", "select_levels.py")


def row(level, increase, drop, method="gradcam", class_name="all"):
    return {
        "method": method,
        "level": level,
        "class": class_name,
        "average_drop": drop,
        "increase_in_confidence": increase,
        "deletion_auc": None,
        "insertion_auc": None,
        "num_images": 420,
    }


# Rows deliberately out of pyramid order. Grad-CAM, "all": p3 is weakest, then p2; p4 and p5 tie
# on Increase in Confidence and p4 has the higher Average Drop. Grad-CAM++ and "airplane" rank
# otherwise.
ROWS = [
    row("p5", 12.0, 20.0),
    row("p2", 4.0, 41.0),
    row("p4", 12.0, 30.0),
    row("p3", 3.0, 45.0),
    row("p2", 30.0, 10.0, method="gradcampp"),
    row("p3", 2.0, 50.0, method="gradcampp"),
    row("p4", 1.0, 60.0, method="gradcampp"),
    row("p2", 9.0, 5.0, class_name="airplane"),
    row("p5", 1.0, 5.0, class_name="airplane"),
]


MIRROR = {"p2": "p5", "p3": "p4", "p4": "p3", "p5": "p2"}


def budgeted(rows, budget):
    """``rows`` with AD/IC columns at ``budget`` that rank the levels the other way round: level
    pN gets the whole-map numbers of its mirror level (p2 <-> p5, p3 <-> p4) where there is one."""
    by_key = {(r["method"], r["class"], r["level"]): r for r in rows}
    result = []
    for r in rows:
        source = by_key.get((r["method"], r["class"], MIRROR[r["level"]]), r)
        result.append({**r, f"increase_in_confidence_top{budget:g}": source["increase_in_confidence"],
                       f"average_drop_top{budget:g}": source["average_drop"]})
    return result


def test_budgeted_ranking_uses_the_budget_columns():
    rows = budgeted(ROWS, 15)
    assert table_budgets(rows) == [15.0]
    assert select_weakest_levels(rows) == ["p2", "p3"]  # whole maps, as before
    assert select_weakest_levels(rows, budget=100) == ["p2", "p3"]
    # at 15 %, p5 has p2's numbers and p4 has p3's: they are the weakest
    assert select_weakest_levels(rows, budget=15) == ["p4", "p5"]
    with pytest.raises(LevelSelectionError, match=r"no AD/IC at the top 50 % of pixels "
                                                  r"\(budgets it has: \['15'\]\); re-run"):
        select_weakest_levels(rows, budget=50)


def test_rank_levels_weakest_first_with_average_drop_breaking_ties():
    ranking = rank_levels(ROWS)
    assert [s.level for s in ranking] == ["p3", "p2", "p4", "p5"]
    assert ranking[0].increase_in_confidence == 3.0 and ranking[0].average_drop == 45.0


def test_full_tie_falls_back_to_pyramid_order_not_row_order():
    rows = [row("p4", 5.0, 30.0), row("p3", 5.0, 30.0)]
    assert [s.level for s in rank_levels(rows)] == ["p3", "p4"]


def test_count_rule_returns_levels_in_pyramid_order():
    assert select_weakest_levels(ROWS) == ["p2", "p3"]  # default: the 2 weakest
    assert select_weakest_levels(ROWS, count=1) == ["p3"]
    assert select_weakest_levels(ROWS, count=3) == ["p2", "p3", "p4"]  # p4 wins the tie with p5


def test_threshold_rule():
    assert select_weakest_levels(ROWS, max_increase=4.0) == ["p2", "p3"]
    assert select_weakest_levels(ROWS, max_increase=12.0) == ["p2", "p3", "p4", "p5"]


def test_method_and_class_filters():
    assert select_weakest_levels(ROWS, method="gradcampp", count=2) == ["p3", "p4"]
    assert select_weakest_levels(ROWS, class_name="airplane", count=1) == ["p5"]


@pytest.mark.parametrize(
    "rows, kwargs, message",
    [
        (ROWS, {"method": "scorecam"}, "the table has methods ['gradcam', 'gradcampp']"),
        (ROWS, {"class_name": "beach"}, "that method has classes ['airplane', 'all']"),
        (ROWS, {"count": 5}, "count must be between 1 and the 4 level(s)"),
        (ROWS, {"count": 0}, "count must be between 1"),
        (ROWS, {"max_increase": 1.0}, "the lowest is 3 (p3)"),
        (ROWS, {"count": 2, "max_increase": 5.0}, "not both"),
        ([row("res4", 1.0, 2.0)], {}, "bad level name 'res4'"),
        ([row("P2", 1.0, 2.0)], {}, "bad level name 'P2'"),
        ([row("p2", 1.0, 2.0), row("p2", 3.0, 4.0)], {}, "more than one row"),
        ([row("p2", None, 2.0)], {}, "'increase_in_confidence' must be a finite number"),
        ([row("p2", 1.0, float("nan"))], {}, "'average_drop' must be a finite number"),
    ],
)
def test_selection_errors(rows, kwargs, message):
    with pytest.raises(LevelSelectionError) as error:
        select_weakest_levels(rows, **kwargs)
    assert message in str(error.value)


def test_load_accepts_rows_object_or_bare_list(tmp_path):
    wrapped, bare = tmp_path / "wrapped.json", tmp_path / "bare.json"
    wrapped.write_text(json.dumps({"rows": ROWS, "config": "fpn_baseline.yaml"}))
    bare.write_text(json.dumps(ROWS))
    assert load_explanation_rows(str(wrapped)) == ROWS
    assert load_explanation_rows(str(bare)) == ROWS


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "metrics file not found"),
        ("{not json", "malformed JSON"),
        (json.dumps({"table": []}), "expected a list of row objects"),
        (json.dumps([1, 2]), "expected a list of row objects"),
    ],
)
def test_load_errors(tmp_path, content, message):
    path = tmp_path / "explanation_metrics.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(LevelSelectionError, match=message):
        load_explanation_rows(str(path))


def load_tool():
    """tools/ is not a package: load select_levels.py as a module to call its main() in-process."""
    return load_script(os.path.join("tools", "select_levels.py"))


select_levels = load_tool()


def load_config(path):
    cfg = get_cfg()
    add_fal_config(cfg)
    cfg.merge_from_file(path)
    return cfg


@pytest.fixture
def metrics_file(tmp_path):
    path = tmp_path / "baseline" / "explanation_metrics.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"rows": ROWS}))
    return str(path)


def test_cli_end_to_end_writes_config_that_loads(tmp_path, metrics_file):
    output = tmp_path / "configs" / "fal_selected.yaml"
    output.parent.mkdir()
    result = subprocess.run(
        [sys.executable, TOOL, metrics_file, "--output", str(output)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "Selected levels: p2, p3" in result.stdout
    assert "Increase in Confidence" in result.stdout  # the ranking table

    text = output.read_text()
    assert text.startswith("# Generated by tools/select_levels.py")
    assert "lowest Increase in Confidence" in text and metrics_file in text
    base = os.path.join(REPO_ROOT, "configs", "Base-FAL.yaml")
    assert f'_BASE_: "{os.path.relpath(base, output.parent)}"' in text  # relative to the output
    cfg = load_config(str(output))
    assert list(cfg.MODEL.FAL.ATTENTION_LEVELS) == ["p2", "p3"]
    assert cfg.MODEL.META_ARCHITECTURE == "FALClassifier"  # inherited through _BASE_
    assert sorted(os.listdir(output.parent)) == ["fal_selected.yaml"]  # no temp file left


def test_cli_error_is_one_line_with_exit_code_1(tmp_path, metrics_file):
    output = tmp_path / "fal.yaml"
    result = subprocess.run(
        [sys.executable, TOOL, metrics_file, "-o", str(output), "--method", "scorecam"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "select_levels.py: error: no rows for method 'scorecam'; "
        "the table has methods ['gradcam', 'gradcampp']"
    )
    assert "Traceback" not in result.stderr
    assert not output.exists()


def test_cli_threshold_method_and_base_config(tmp_path, metrics_file, capsys):
    output = tmp_path / "fal_threshold.yaml"
    base = os.path.join(REPO_ROOT, "configs", "fpn_baseline.yaml")
    select_levels.main(
        [
            metrics_file,
            "-o",
            str(output),
            "--method",
            "gradcampp",
            "--max-increase",
            "2",
            "--base-config",
            base,
        ]
    )
    assert "Selected levels: p3, p4" in capsys.readouterr().out
    assert list(load_config(str(output)).MODEL.FAL.ATTENTION_LEVELS) == ["p3", "p4"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--class-name", "beach"], "no rows for method 'gradcam' and class 'beach'"),
        (["--count", "9"], "count must be between 1 and the 4 level(s)"),
        (["--base-config", "configs/missing.yaml"], "base config not found"),
    ],
)
def test_cli_errors_write_nothing(tmp_path, metrics_file, args, message):
    output = tmp_path / "fal.yaml"
    with pytest.raises(LevelSelectionError) as error:
        select_levels.main([metrics_file, "-o", str(output), *args])
    assert message in str(error.value)
    assert not output.exists()


def test_cli_missing_and_malformed_table(tmp_path):
    output = str(tmp_path / "fal.yaml")
    with pytest.raises(LevelSelectionError, match="metrics file not found"):
        select_levels.main([str(tmp_path / "none.json"), "-o", output])
    malformed = tmp_path / "bad.json"
    malformed.write_text("{")
    with pytest.raises(LevelSelectionError, match="malformed JSON"):
        select_levels.main([str(malformed), "-o", output])


def test_cli_rejects_count_with_threshold(tmp_path, metrics_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        select_levels.main(
            [metrics_file, "-o", str(tmp_path / "fal.yaml"), "--count", "2", "--max-increase", "3"]
        )
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_keeps_existing_config_when_written_config_does_not_load(tmp_path, metrics_file):
    broken_base = tmp_path / "Base-Broken.yaml"
    broken_base.write_text("MODEL:\n  NO_SUCH_KEY: 1\n")
    output = tmp_path / "fal.yaml"
    output.write_text("# previous config\n")
    with pytest.raises(LevelSelectionError, match="the written config does not load"):
        select_levels.main([metrics_file, "-o", str(output), "--base-config", str(broken_base)])
    assert output.read_text() == "# previous config\n"
    assert sorted(os.listdir(tmp_path)) == [
        "Base-Broken.yaml",
        "baseline",
        "fal.yaml",
    ]  # no temp file


def test_cli_ranks_at_the_tables_smallest_budget(tmp_path, capsys):
    metrics = tmp_path / "explanation_metrics.json"
    metrics.write_text(json.dumps({"rows": budgeted(ROWS, 15)}))
    output = tmp_path / "fal_selected.yaml"
    select_levels.main([str(metrics), "-o", str(output)])
    assert "Selected levels: p4, p5" in capsys.readouterr().out
    assert "top 15 % of each map's pixels" in output.read_text()
    select_levels.main([str(metrics), "-o", str(output), "--budget", "100"])
    assert "Selected levels: p2, p3" in capsys.readouterr().out
    assert "whole maps" in output.read_text()
