"""`rankscope report`: tables traced to the run files, a self-contained HTML page, failed runs
listed, and clear errors. Small real runs: 2 methods x 2 seeds, 10 steps, ReLoRA restarts every 5."""

import base64
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from helpers import BLIMP_DIR, tiny_config

from rankscope.cli import main
from rankscope.reports.report import ReportError, write_report
from rankscope.studies.record import write_sweep_summary
from rankscope.studies.study import Point, Study
from rankscope.train.loop import train

STEPS = 10


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, data_dir):
    """runs/<point>/ for full and relora x seeds 0, 1 (real training), plus a sweep.json that also
    lists a failed point, as `rankscope sweep` writes it."""
    root = tmp_path_factory.mktemp("study")
    blimp = str(BLIMP_DIR) if BLIMP_DIR.is_dir() else "builtin"
    points = []
    for method in ("full", "relora"):
        for seed in (0, 1):
            name = f"name-{method}_seed-{seed}"
            cfg = tiny_config(data_dir, f"train.max_steps={STEPS}", f"method.name={method}", f"train.seed={seed}", "method.relora.reset_every=5",
                              "method.relora.restart_warmup_steps=1", "checkpoint.every=5", "analysis.every=2", "train.eval_every=5",
                              f"eval.blimp_dir={blimp}", "eval.blimp_max_pairs=2", "eval.max_docs=4", "train.log_every=2")
            train(cfg, root / name, log=lambda *_: None)
            points.append(Point(name, {"method.name": method, "train.seed": seed}, cfg.to_dict(), root / name, status="done"))
    points.append(Point("name-broken_seed-0", {"method.name": "broken"}, {}, root / "name-broken_seed-0", status="failed",
                        error="train: error: unknown method 'broken'"))
    write_sweep_summary(Study(root / "study.yaml", "t", points, [], [], [], 1, root))
    # one run also evaluated after training (`rankscope eval --json`); all analysed (`rankscope analyze`)
    from rankscope.analysis import analyze_runs
    from rankscope.evaluate import run_eval

    ev = run_eval(root / "name-relora_seed-1", blimp_dir=blimp, blimp_max_pairs=3, max_docs=4, log=lambda *_: None)
    (root / "name-relora_seed-1" / "eval.json").write_text(json.dumps(ev))
    for p in points[:4]:
        analyze_runs([p.run_dir], log=None, kinds=("weight",), spectra_steps=[5, 10], plots=False)
    return root


@pytest.fixture(scope="module")
def report(study_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report([study_dir], out, log=lambda *_: None)
    return out, json.loads((out / "report.json").read_text())


def read_source(source: str) -> float:
    """The value at 'path#key' (eval.json keys are 'metrics.<key>'), read independently."""
    path, key = source.split("#", 1)
    data = json.loads(Path(path).read_text())
    return data["metrics"][key.removeprefix("metrics.")] if key.startswith("metrics.") else data[key]


def independent_value(run_dir: Path, key: str):
    """What a cell must hold for one run: the post-training eval.json for eval keys when it exists,
    else summary.json; the final train loss must also be the last train_loss row of metrics.jsonl."""
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = run_dir / "eval.json"
    if key.startswith(("val_", "blimp")) and ev.exists() and key in json.loads(ev.read_text())["metrics"]:
        return json.loads(ev.read_text())["metrics"][key]
    if key == "final_train_loss":
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last = [r["train_loss"] for r in rows if "train_loss" in r][-1]
        assert summary[key] == pytest.approx(last)
    return summary.get(key)


def test_every_table_cell_is_traced_to_the_run_files(study_dir, report):
    _, data = report
    groups = {}
    for d in sorted(p for p in study_dir.iterdir() if (p / "summary.json").exists()):
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        groups.setdefault(f"{cfg['method']['name']} / {cfg['model']['preset']}", []).append(d)
    assert sorted(groups) == ["full / micro", "relora / micro"]
    checked = 0
    # the findings tables come first (the paper's rules on these runs: tests/test_findings.py traces them); then the runs'
    assert len(data["findings_tables"]) == 3 and data["tables"][:3] == data["findings_tables"]
    for table in data["tables"][len(data["findings_tables"]):]:
        for row in table["rows"]:
            for col, c in zip(table["columns"][-len(row["cells"]):], row["cells"]):
                if c is None:
                    continue
                for v in c["values"]:  # each value is the one in the file it names
                    assert read_source(v["source"]) == pytest.approx(v["value"])
                # and the cell is the mean / std over the group's runs, read independently
                if table["title"].startswith("Headline"):
                    dirs, key = groups[row["label"]], c["key"]
                elif table["title"] == "Every run":
                    dirs, key = [study_dir / row["label"]], c["key"]
                else:
                    dirs, key = groups[col], row["label"]
                vals = [x for x in (independent_value(d, key) for d in dirs) if x is not None]
                assert c["n"] == len(vals) and c["mean"] == pytest.approx(statistics.fmean(vals))
                if len(vals) > 1:
                    assert c["std"] == pytest.approx(statistics.stdev(vals))
                checked += 1
    assert checked > 50
    head = next(t for t in data["tables"] if t["title"].startswith("Headline"))
    assert [r["n"] for r in head["rows"]] == [2, 2] and "BLiMP overall" in head["columns"] and "tokens/s" in head["columns"]
    # the post-training eval wins over the in-training one for that run
    blimp = head["rows"][1]["cells"][head["columns"].index("BLiMP overall") - 2]
    assert any(v["source"].endswith("eval.json#metrics.blimp_overall") for v in blimp["values"])
    merges = head["rows"][1]["cells"][head["columns"].index("ReLoRA merges") - 2]
    assert merges["mean"] == 2  # restarts at steps 5 and 10


def test_markdown_shows_the_same_numbers(report):
    out, data = report
    md = (out / "report.md").read_text()
    head = next(t for t in data["tables"] if t["title"].startswith("Headline"))
    c = head["rows"][0]["cells"][0]
    assert f"{c['mean']:.4f} ± {c['std']:.4f}" in md
    for fig in data["figures"]:
        assert f"]({fig['file']})" in md and (out / fig["file"]).stat().st_size > 1000
    assert "Weiss et al. (2025)" in md and "0.6504" in md and "228.09" in md


def test_html_is_self_contained(report):
    out, data = report
    page = (out / "report.html").read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert len(srcs) == len(data["figures"]) + 1 >= 6  # losses, BLiMP, PER, cond, ..., the paper's figure
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert not re.search(r'(src|href)="(?!data:)', page)
    titles = [f["title"] for f in data["figures"]]
    assert {"Loss vs tokens", "BLiMP per phenomenon", "Singular-value spectra"} <= set(titles)
    per = next(f for f in data["figures"] if f["title"].startswith("PER vs step: the paper"))
    assert "analysis tables" in per["caption"] and "in-loop" not in per["caption"]


def test_failed_run_is_listed_not_fatal(report):
    out, data = report
    assert [f["run"] for f in data["failed"]] == ["name-broken_seed-0"]
    assert "unknown method 'broken'" in data["failed"][0]["error"]
    assert "name-broken_seed-0" in (out / "report.md").read_text() and "name-broken_seed-0" in (out / "report.html").read_text()
    assert len(data["runs"]) == 4


def test_single_run_dirs_and_findings(study_dir, tmp_path):
    # a run without analysis tables: every run's rank curves then come from the in-loop rows
    bare = tmp_path / "runs" / "name-relora_seed-0"
    shutil.copytree(study_dir / "name-relora_seed-0", bare, ignore=shutil.ignore_patterns("analysis", "checkpoints"))
    write_report([study_dir / "name-full_seed-0", bare], tmp_path / "out", log=lambda *_: None)
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["name-full_seed-0", "name-relora_seed-0"] and not data["failed"]
    per = next(f for f in data["figures"] if f["title"].startswith("PER vs step: the paper"))
    assert "in-loop" in per["caption"] and "analysis tables" not in per["caption"]
    # plain run folders go through the one verdict engine: the paper's rules, titled as not pre-registered
    assert "not pre-registered" in data["findings_tables"][1]["title"] and "findings" not in data
    rows = {(r["id"], r["size"], r.get("kind"), r.get("component")): r for r in data["study_findings"]}
    gap = rows[("a-val-loss", "micro", None, None)]
    full = json.loads((study_dir / "name-full_seed-0" / "summary.json").read_text())["final_val_loss"]
    rel = json.loads((study_dir / "name-relora_seed-0" / "summary.json").read_text())["final_val_loss"]
    assert gap["estimate"] == pytest.approx(rel - full) and gap["n"] == 1 and gap["verdict"] == "inconclusive"  # one seed: no interval
    per = rows[("d-per", "micro", "cumulative_update", "wv")]  # the copy without analysis tables: the rank rows say what is missing
    assert per["verdict"] == "not measured" and "rankscope analyze" in per["reason"] and str(bare) in per["reason"]
    # a single run: no verdict, said in one line
    write_report([study_dir / "name-full_seed-0"], tmp_path / "one", log=lambda *_: None)
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert one["study_findings"] == [] and one["findings_tables"] == []
    assert "a single run gets no verdict" in (tmp_path / "one" / "report.md").read_text()


def test_no_runs_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no runs found"):
        write_report([tmp_path / "empty"], tmp_path / "out")
    assert main(["report", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no runs found") and "\n" not in err
    with pytest.raises(ReportError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "out")


def test_runs_differing_beyond_method_size_and_seed_are_not_averaged_together(tmp_path):
    from rankscope.reports.runs import Run, label_other_dimensions

    def run(method, lr, seed):
        cfg = {"method": {"name": method, "rank": 16 if method == "relora" else 8}, "model": {"preset": "micro"}, "train": {"lr": lr, "seed": seed, "threads": seed}}
        return Run(tmp_path, f"{method}-{lr}-{seed}", method, "micro", seed, cfg, {})

    runs = [run(m, lr, s) for m in ("full", "relora") for lr in (1e-3, 3e-3) for s in (0, 1)]
    label_other_dimensions(runs)
    assert {r.group for r in runs} == {(m, f"micro lr={lr}") for m in ("full", "relora") for lr in (0.001, 0.003)}
    same = [run("full", 1e-3, s) for s in (0, 1)]
    label_other_dimensions(same)  # seeds, threads and method fields never split groups
    assert {r.group for r in same} == {("full", "micro")}
