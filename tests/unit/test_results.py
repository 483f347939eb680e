"""Run identity (a study's runs are the ones its sweep record names; duplicates refused or excluded by name), "= main"
controls, and the committed results folder (report.json, runs.csv, tuned_lr.csv, environment.json) with the documents
that quote it."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from rankscope.cli import main
from rankscope.core.errors import ConfigError
from rankscope.studies.findings import SAME_AS_MAIN, validate_findings
from rankscope.reports.report import write_report
from rankscope.reports.runs import ReportError, collect
from rankscope.reports.results import BLOCK, render_summary, sync_docs
from rankscope.studies.record import write_sweep_summary
from rankscope.studies.study import Point, Study

PARAMS = {"micro": 508_480, "mini": 2_524_800}
RULES = [{"id": "a-loss", "finding": "a", "test": "paired", "metric": "final_val_loss", "claim": "higher", "sesoi": 0.5}]


def write_run(d: Path, method: str, size: str, seed: int, lr: float, loss: float, stage_steps: int = 8) -> None:
    d.mkdir(parents=True)
    cfg = {"model": {"preset": size, "vocab_size": 2048, "d_model": 64 if size == "micro" else 128},
           "method": {"name": method, **({"reset_every": 2} if method == "relora" else {})},
           "train": {"seed": seed, "lr": lr, "max_steps": stage_steps, "batch_size": 4, "seq_len": 16}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "summary.json").write_text(json.dumps({"steps": stage_steps, "final_val_loss": loss, "parameters": PARAMS[size],
                                                "tokens": stage_steps * 64}))


def study_dir(tmp_path: Path, control_same: bool = False) -> Path:
    """2 sizes x 2 methods x 3 seeds, written as `rankscope sweep` leaves them, with a sweep.json naming every run."""
    root = tmp_path / "runs"
    points = []
    lr = {"full": 2e-3, "relora": 8e-3}
    for method in ("full", "relora"):
        for size in ("micro", "mini"):
            for k in range(3):
                name = f"method={method},preset={size},seed={k},lr={lr[method]:g}"
                write_run(root / name, method, size, k, lr[method], 4.0 + 0.2 * (method == "relora") + 0.01 * k + 0.003 * k * k * (method == "relora"))
                points.append(Point(name, {"method.name": method}, {}, root / name, status="done"))
    if control_same:  # the control's lr equals the main lr at micro: recorded, not run
        for k in range(3):
            p = Point(f"c{k}", {}, {}, root / "control" / f"c{k}", status=SAME_AS_MAIN, stage="control")
            p.same_as = f"method=relora,preset=micro,seed={k},lr=0.008"
            points.append(p)
    study = Study(root / "s.yaml", "s", points, [], [], [], 1, root, findings=validate_findings({"rules": RULES}))
    write_sweep_summary(study)
    sweep = json.loads((root / "sweep.json").read_text())  # each cell at its own tuned lr: not a dimension that splits groups
    sweep["tuning"] = {"field": "train.lr", "seed": 100, "overrides": ["train.max_steps=4"], "metric": "final_val_loss", "widen": 2, "cells": []}
    (root / "sweep.json").write_text(json.dumps(sweep))
    return root


def verdicts(out: Path) -> dict:
    return {(r["id"], r["size"]): (r["verdict"], r["estimate"]) for r in json.loads((out / "report.json").read_text())["study_findings"]}


def test_a_stray_folder_in_a_study_is_excluded_by_name_and_changes_no_verdict(tmp_path):
    root = study_dir(tmp_path)
    write_report([root], tmp_path / "clean", log=lambda *_: None)
    # a leftover of a re-tuned study: the same (method, size, seed) at another lr, with a loss that would flip the row
    write_run(root / "method=relora,preset=micro,seed=0,lr=0.004", "relora", "micro", 0, 4e-3, 3.0)
    write_report([root], tmp_path / "stray", log=lambda *_: None)
    assert verdicts(tmp_path / "stray") == verdicts(tmp_path / "clean")
    data = json.loads((tmp_path / "stray" / "report.json").read_text())
    (ex,) = [p for p in data["failed"] if p["status"] == "excluded"]
    assert ex["run"] == "method=relora,preset=micro,seed=0,lr=0.004" and "does not name it" in ex["error"]
    assert "1 excluded by name (method=relora,preset=micro,seed=0,lr=0.004)" in (tmp_path / "stray" / "report.md").read_text()


def test_duplicate_runs_without_a_sweep_record_are_one_line_or_excluded(tmp_path, capsys):
    root = study_dir(tmp_path)
    (root / "sweep.json").unlink()
    dup = root / "zz-copy-of-relora-micro-0"
    shutil.copytree(root / "method=relora,preset=micro,seed=0,lr=0.008", dup)
    with pytest.raises(ReportError, match="two runs of relora at micro[^,]*, seed 0: .*method=relora,preset=micro,seed=0.* and .*zz-copy"):
        collect([root])
    assert main(["report", str(root), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zz-copy-of-relora-micro-0" in err and "--exclude-duplicates" in err
    runs, problems = collect([root], exclude_duplicates=True)
    assert len(runs) == 12 and [p["run"] for p in problems] == [dup.name] and problems[0]["status"] == "excluded"


def test_a_control_at_the_main_lr_is_shown_as_main_and_not_counted(tmp_path):
    root = study_dir(tmp_path, control_same=True)
    sweep = json.loads((root / "sweep.json").read_text())
    rule = {"id": "a-control", "finding": "a", "test": "paired", "metric": "final_val_loss", "claim": "higher", "method": "relora (control)"}
    sweep["findings"] = validate_findings({"rules": [*RULES, rule]})
    (root / "sweep.json").write_text(json.dumps(sweep))
    write_report([root], tmp_path / "r", log=lambda *_: None)
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    rows = {(r["id"], r["size"]): r for r in data["study_findings"]}
    assert rows[("a-control", "micro")]["verdict"] == SAME_AS_MAIN and rows[("a-control", "micro")]["p"] is None
    assert "= main" in data["findings_tables"][1]["note"] and "not a verdict" in data["findings_tables"][1]["note"]
    assert len(data["runs"]) == 12  # the recorded "= main" points are not runs


def test_the_results_folder_holds_every_run_config_metric_and_source(tmp_path):
    root = study_dir(tmp_path)
    sweep = json.loads((root / "sweep.json").read_text())
    sweep["tuning"] = {"field": "train.lr", "seed": 100, "overrides": ["train.max_steps=4"], "metric": "final_val_loss", "widen": 2,
                       "cells": [{"label": "method=full", "tried": [{"value": 1e-3, "loss": 4.3, "status": "done", "run_dir": "a"},
                                                                    {"value": 2e-3, "loss": 4.1, "status": "done", "run_dir": "b"}],
                                  "chosen": 2e-3, "position": "edge", "edge_side": "high"}]}
    (root / "sweep.json").write_text(json.dumps(sweep))
    written = write_report([root], tmp_path / "r", log=lambda *_: None, results_dir=tmp_path / "results" / "s")
    res = written["results"]
    rows = list(csv.DictReader(open(res / "runs.csv")))
    assert len(rows) == 12 and rows[0]["config.train.lr"] and rows[0]["final_val_loss.source"] == "summary.json"
    tuned = list(csv.DictReader(open(res / "tuned_lr.csv")))
    assert [float(t["value"]) for t in tuned] == [1e-3, 2e-3] and tuned[0]["tuning_seed"] == "100"
    env = json.loads((res / "environment.json").read_text())
    assert env["cores"] and env["versions"]["scipy"] and env["date_utc"]
    data = json.loads((res / "report.json").read_text())
    row = data["study_findings"][0]
    assert {"family", "role", "p", "p_adj", "mde", "tost", "verdict_text"} <= set(row) and row["tost"]["sesoi"] == 0.5
    assert (res / "summary.md").read_text() == render_summary(data)
    # a document quoting the folder: in sync after sync_docs, and a changed number is caught
    doc = tmp_path / "docs" / "study.md"
    doc.parent.mkdir()
    doc.write_text("intro\n<!-- results: results/s -->\nold\n<!-- end results -->\nend\n")
    assert sync_docs(doc, root=tmp_path) == ["results/s"] and sync_docs(doc, root=tmp_path, check=True) == []
    doc.write_text(doc.read_text().replace(f"{row['estimate']:+.4g}", "+0.0001"))
    assert sync_docs(doc, root=tmp_path, check=True) == ["results/s"]


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("doc", ["docs/results.md", "docs/fewshot.md", "docs/methods.md", "README.md"])
def test_committed_documents_quote_the_committed_results(doc):
    """Every results block of the document equals what its committed folder renders (python -m rankscope.reports.results DOC)."""
    text = (REPO / doc).read_text()
    for m in BLOCK.finditer(text):
        assert (REPO / m.group("dir") / "report.json").is_file(), f"{doc} quotes {m.group('dir')}, which holds no report.json"
    assert sync_docs(REPO / doc, root=REPO, check=True) == [], f"{doc} disagrees with its results; run python -m rankscope.reports.results {doc}"


def test_a_preset_with_its_width_overridden_is_another_size():
    from rankscope.reports.runs import size_label

    assert size_label({"preset": "pico-tiny-body", "d_model": 96, "n_layers": 12, "n_heads": 12, "n_kv_heads": 4, "ffn_dim": 384}) == "pico-tiny-body"
    assert size_label({"preset": "pico-tiny-body", "d_model": 48, "n_layers": 12, "n_heads": 6, "n_kv_heads": 2, "ffn_dim": 192}) == "d48-L12"
    assert size_label({"preset": "micro"}) == "micro" and size_label({"d_model": 64, "n_layers": 4}) == "d64-L4"


def test_a_primary_block_quotes_the_scale_the_primary_rows_and_every_verdict_count(tmp_path):
    """`<!-- results: DIR primary -->`: a short quote (README) of the committed quick study, in sync with its folder."""
    data = json.loads((REPO / "results" / "quick" / "report.json").read_text())
    short, full = render_summary(data, primary_only=True), render_summary(data)
    rows = data["study_findings"]
    primaries = [r for r in rows if r.get("primary")]
    assert 0 < len(primaries) < len(rows)
    assert short.count("\n| ") - full.count("\n| ") == len(primaries) - len(rows)  # the same scale box, only the primary rows
    assert f"All {len(rows)} findings rows: " in short and "not measured" not in short
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    assert all(f"{n} {v}" in short for v, n in counts.items()) and sum(counts.values()) == len(rows)
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    (tmp_path / "results").symlink_to(REPO / "results")
    doc.write_text("<!-- results: results/quick primary -->\nold\n<!-- end results -->\n")
    assert sync_docs(doc, root=tmp_path) == ["results/quick"] and short in doc.read_text()
    assert "<!-- results: results/quick primary -->" in doc.read_text() and sync_docs(doc, root=tmp_path, check=True) == []


def test_a_block_quoting_a_folder_without_results_is_a_one_line_error(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n<!-- results: results/none -->\n<!-- end results -->\n")
    with pytest.raises(ConfigError, match=r"quotes results/none, which has no report.json: run `rankscope report"):
        sync_docs(doc, root=tmp_path)
    (tmp_path / "results" / "none").mkdir(parents=True)
    (tmp_path / "results" / "none" / "report.json").write_text("{not json")
    with pytest.raises(ConfigError, match="report.json"):
        sync_docs(doc, root=tmp_path)
