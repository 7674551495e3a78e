#!/usr/bin/env python
"""Average tools/explain.py tables over seeds, and compare each map with Grad-CAM of the same
model and with the random control.

A map can only be judged against another map of the same, unchanged model: this tool puts beside
every row the ratio of its Average Drop to that of the same model's Grad-CAM at the same level and
budget, and its margin over the random control (positive: the map drops less than a map that
explains nothing).

    python tools/aggregate_explanations.py out/s0/layer_analysis.json out/s1/layer_analysis.json \
        --output out/explanations_2seeds.md

Each input is one seed's layer_analysis.json (same models, methods, levels and protocol). Cells
are means over the inputs, with half their range after "±".
"""
import argparse
import json
import sys
from collections import defaultdict

from fal_d2.evaluation.budgets import budget_suffix
from fal_d2.evaluation.seed_means import format_mean, mean_half_range
from fal_d2.utils.atomic_io import atomic_write_json, atomic_write_text

REFERENCE = "gradcam"
CONTROL = "random"


def load_tables(paths):
    """The tables' rows for all classes, and their shared protocol; fails on mixed protocols."""
    tables = []
    for path in paths:
        try:
            with open(path) as f:
                tables.append(json.load(f))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: cannot be read as a layer_analysis.json: {error}") from None
    protocols = {json.dumps({key: table.get(key) for key in ("mask", "budgets", "budget_mode")})
                 for table in tables}
    if len(protocols) > 1:
        raise ValueError(f"the tables were measured under different protocols: {sorted(protocols)}")
    return tables, json.loads(protocols.pop())


def metric_keys(budgets):
    """(key, title, lower is better) of the aggregated columns, budgets first."""
    keys = []
    for percent in budgets:
        suffix = budget_suffix(percent)
        keys += [(f"average_drop{suffix}", f"AD {percent:g} %", True),
                 (f"increase_in_confidence{suffix}", f"IC {percent:g} %", False)]
    return keys + [("deletion_auc", "Del AUC", True), ("insertion_auc", "Ins AUC", False)]


def aggregate(tables, budgets):
    """{(model, method, level): {key: per-seed values}} for the rows over all classes."""
    values = defaultdict(lambda: defaultdict(list))
    for table in tables:
        for row in table["rows"]:
            if row.get("class") != "all":
                continue
            cell = values[(row["model"], row["method"], row["level"])]
            for key, _, _ in metric_keys(budgets):
                if row.get(key) is not None:
                    cell[key].append(float(row[key]))
    return values


def summary_rows(values, budgets):
    """One dict per (model, method, level): means, half-ranges, AD ratio to the same model's
    Grad-CAM and AD margin over its random control, at each budget."""
    rows = []
    for (model, method, level), cell in sorted(values.items()):
        row = {"model": model, "method": method, "level": level,
               "seeds": max((len(v) for v in cell.values()), default=0)}
        for key, series in cell.items():
            row[key], row[f"{key}_half_range"], _ = mean_half_range(series)
            row[f"{key}_per_seed"] = list(series)
        for percent in budgets:
            key = f"average_drop{budget_suffix(percent)}"
            if key not in row:
                continue
            reference = values.get((model, REFERENCE, level), {}).get(key)
            control = values.get((model, CONTROL, level), {}).get(key)
            if reference and method != REFERENCE:
                row[f"{key}_vs_gradcam"] = row[key] / mean_half_range(reference)[0]
            if control and method != CONTROL:
                row[f"{key}_margin_over_random"] = mean_half_range(control)[0] - row[key]
        rows.append(row)
    return rows


def markdown_table(rows, budgets, protocol):
    columns = metric_keys(budgets)
    header = ["model", "map", "level"] + [title for _, title, _ in columns]
    header += [f"AD {p:g} % / Grad-CAM" for p in budgets]
    header += [f"random − AD {p:g} %" for p in budgets]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["model"], row["method"], row["level"]]
        for key, _, _ in columns:
            auc = key.endswith("_auc")
            cells.append(format_mean(row.get(f"{key}_per_seed", []), 3 if auc else 1))
        for suffix_key in ("vs_gradcam", "margin_over_random"):
            for percent in budgets:
                value = row.get(f"average_drop{budget_suffix(percent)}_{suffix_key}")
                cells.append("–" if value is None else
                             f"{value:.2f}×" if suffix_key == "vs_gradcam" else f"{value:+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    mode = protocol.get("budget_mode") or "valued"
    note = (f"Mask: {protocol.get('mask')}; budgets: top "
            f"{', '.join(f'{p:g}' for p in budgets)} % of each map's pixels ({mode}); means of "
            f"{max((r['seeds'] for r in rows), default=0)} seed(s) ± half their range. "
            f"'random − AD' is the random control's AD minus the map's: positive beats the "
            f"control.")
    return note + "\n\n" + "\n".join(lines) + "\n"


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", help="layer_analysis.json of tools/explain.py, one per "
                                                  "seed")
    parser.add_argument("--output", required=True, help="Markdown file; a .json beside it")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    tables, protocol = load_tables(args.tables)
    budgets = [float(b) for b in protocol.get("budgets") or []]
    rows = summary_rows(aggregate(tables, budgets), budgets)
    markdown = markdown_table(rows, budgets, protocol)
    atomic_write_text(args.output, markdown)
    stem = args.output[:-3] if args.output.endswith(".md") else args.output
    atomic_write_json(stem + ".json", {**protocol, "inputs": args.tables, "rows": rows})
    print(markdown)
    return rows


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"tools/aggregate_explanations.py: error: {e}")
