"""Packaging: one version everywhere (setup.py, CITATION.cff, the metrics files), one license, and a
CITATION.cff with the fields CFF 1.2.0 requires."""
import json
import os
import subprocess
import sys

import yaml

from detectron2.config import CfgNode

import fal_d2

from conftest import REPO_ROOT, load_script


def _setup_py(field):
    result = subprocess.run([sys.executable, "setup.py", f"--{field}"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120, check=True)
    return result.stdout.strip().splitlines()[-1]


def _citation():
    with open(os.path.join(REPO_ROOT, "CITATION.cff")) as f:
        return yaml.safe_load(f)


def test_setup_py_and_citation_take_the_package_version_and_license():
    assert _setup_py("version") == fal_d2.__version__
    citation = _citation()
    assert str(citation["version"]) == fal_d2.__version__
    assert _setup_py("license") == citation["license"] == "Apache-2.0"
    with open(os.path.join(REPO_ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_citation_has_the_fields_cff_1_2_0_requires():
    citation = _citation()
    assert citation["cff-version"] == "1.2.0"
    assert isinstance(citation["message"], str) and isinstance(citation["title"], str)
    references = citation["references"]
    for entry in [citation, *references]:
        assert entry["authors"], entry.get("title")
        for author in entry["authors"]:  # a person (family-names) or an entity (name)
            assert author.get("family-names") or author.get("name"), author
    for reference in references:
        assert isinstance(reference["type"], str) and isinstance(reference["title"], str)
    assert not any("doi" in entry for entry in [citation, *references])  # none is known


def test_eval_only_metrics_record_the_version(tmp_path):
    train_net = load_script(os.path.join("tools", "train_net.py"))
    cfg = CfgNode({"OUTPUT_DIR": str(tmp_path)})
    (tmp_path / "metrics.json").write_text('{"iteration": 9, "loss_cls": 1.0}')  # a training line
    train_net.write_eval_metrics(cfg, {"classification": {"top1": 50.0}}, "w.pth", "ab", 9)
    with open(tmp_path / "metrics.json") as f:
        training, record = [json.loads(line) for line in f]
    assert training == {"iteration": 9, "loss_cls": 1.0}
    assert record["fal_d2_version"] == fal_d2.__version__
    assert record["classification/top1"] == 50.0 and record["eval_only"]
