"""tools/aggregate_explanations.py: means over seeds, ratios to Grad-CAM and margins over the
random control are those of the input tables."""
import json

import pytest

from conftest import load_script

aggregate = load_script("tools/aggregate_explanations.py")


def _row(model, method, level, ad15, ad50, cls="all"):
    return {"model": model, "method": method, "level": level, "class": cls,
            "average_drop_top15": ad15, "increase_in_confidence_top15": 10.0,
            "average_drop_top50": ad50, "increase_in_confidence_top50": 20.0,
            "deletion_auc": 0.2, "insertion_auc": None}


def _write(path, rows, mode="binary"):
    path.write_text(json.dumps({"mask": "normalized", "budgets": [15.0, 50.0],
                                "budget_mode": mode, "rows": rows}))
    return str(path)


def test_means_ratios_and_margins(tmp_path):
    seed0 = _write(tmp_path / "s0.json", [
        _row("fal", "gradcam", "p2", 80.0, 50.0), _row("fal", "head", "p2", 60.0, 30.0),
        _row("fal", "random", "p2", 90.0, 60.0), _row("fal", "head", "p2", 0.0, 0.0, "beach"),
        _row("fpn", "gradcam", "p2", 40.0, 20.0)])
    seed1 = _write(tmp_path / "s1.json", [
        _row("fal", "gradcam", "p2", 70.0, 50.0), _row("fal", "head", "p2", 50.0, 20.0),
        _row("fal", "random", "p2", 80.0, 60.0), _row("fpn", "gradcam", "p2", 40.0, 20.0)])
    output = tmp_path / "out.md"
    rows = aggregate.main([seed0, seed1, "--output", str(output)])
    head = next(r for r in rows if (r["model"], r["method"]) == ("fal", "head"))
    assert head["average_drop_top15"] == pytest.approx(55.0)  # the per-class row is left out
    assert head["average_drop_top15_half_range"] == pytest.approx(5.0)
    # against the same model's Grad-CAM (75, 50), never the other model's (40, 20)
    assert head["average_drop_top15_vs_gradcam"] == pytest.approx(55.0 / 75.0)
    assert head["average_drop_top50_vs_gradcam"] == pytest.approx(25.0 / 50.0)
    assert head["average_drop_top15_margin_over_random"] == pytest.approx(85.0 - 55.0)
    assert "insertion_auc" not in head  # None in every input: no value is made up
    gradcam = next(r for r in rows if (r["model"], r["method"]) == ("fal", "gradcam"))
    assert "average_drop_top15_vs_gradcam" not in gradcam
    fpn = next(r for r in rows if r["model"] == "fpn")
    assert "average_drop_top15_margin_over_random" not in fpn  # no control for that model
    text = output.read_text()
    assert "(binary)" in text and "0.73×" in text and "+30.0" in text
    assert json.loads((tmp_path / "out.json").read_text())["budget_mode"] == "binary"


def test_mixed_protocols_fail(tmp_path):
    binary = _write(tmp_path / "a.json", [_row("fal", "gradcam", "p2", 1.0, 1.0)])
    valued = _write(tmp_path / "b.json", [_row("fal", "gradcam", "p2", 1.0, 1.0)], "valued")
    with pytest.raises(ValueError, match="different protocols"):
        aggregate.main([binary, valued, "--output", str(tmp_path / "out.md")])


def test_unreadable_table_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        aggregate.main([str(bad), "--output", str(tmp_path / "out.md")])
