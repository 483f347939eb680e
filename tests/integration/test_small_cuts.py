"""The small cuts of the first hour (issue 23): fast --help and info, defaults in --help, aligned columns."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rankscope.cli import build_parser, field_rows, main, param_count
from rankscope.config import PRESETS, ModelConfig
from rankscope.methods import describe_fields


@pytest.mark.parametrize("argv", [["--help"], ["info"], ["train", "--help"]])
def test_help_and_info_do_not_import_torch(argv):
    code = ("import sys\nfrom rankscope.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n" % argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_is_the_decoders(name):
    import torch

    from rankscope.model import Decoder

    with torch.device("meta"):
        n = Decoder(ModelConfig(**PRESETS[name])).num_params()
    assert param_count(PRESETS[name]) == n
    with torch.device("meta"):
        tied = Decoder(ModelConfig(**PRESETS[name], tie_embeddings=True)).num_params()
    assert param_count(PRESETS[name], tie_embeddings=True) == tied


def test_info_fields_columns_line_up(capsys):
    assert main(["info", "--fields"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = describe_fields()
    assert len(lines) == len(rows)
    at_type = max(len(name) for name, *_ in rows) + 2
    at_default = at_type + max(len(tp) for _, tp, *_ in rows) + 2
    for line, (name, tp, default, _) in zip(lines, rows):  # each column starts at one offset on every line
        assert line[at_type:].startswith(tp + " ") and line[at_default:].startswith(repr(default) + " "), line
    assert field_rows([("a", "int", 1, "x"), ("bbbb", "str", "long", "y")]) == ["a     int  1       x", "bbbb  str  'long'  y"]


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser("eval").parse_args(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 16)" in text and "(default: val)" in text  # --batch-size, --split
    assert "(default: None)" not in text and "(default: False)" not in text


def test_round_off_of_zero_prints_as_zero():
    from rankscope.studies.findings.tables import _interval, _signed

    assert _signed(0.3 - 0.1 - 0.2) == "0" and _signed(-1e-17) == "0"
    assert _signed(0.01234) == "+0.01234" and _interval((-5.551e-17, 0.25)) == "[0, +0.25]"


def test_blimp_line_names_chance():
    from rankscope.evaluate import format_table

    result = {"checkpoint": "runs/demo", "step": 300, "scoring": "x", "perplexity": {}, "blimp": {"source": "builtin", "overall": {"accuracy": 0.4887, "uids": 3, "pairs": 150, "ties": 0},
                                       "phenomena": {}}}
    text = format_table(result)
    assert "chance is 0.5" in text and "-0.0113 from it" in text


def test_report_has_a_default_output_folder():
    from rankscope.reports.report import default_output

    assert default_output(["runs/demo"]) == "reports/demo" and default_output(["runs/quick/", "x"]) == "reports/quick"


def test_analyze_on_a_study_folder_analyses_its_runs(tmp_path, data_dir, capsys):
    from helpers import tiny_overrides

    study = tmp_path / "study"
    for name in ("a", "control/b"):
        over = tiny_overrides(data_dir, "train.max_steps=4", "checkpoint.every=2", "train.tensorboard=false")
        assert main(["train", "configs/micro.yaml", *over, "-o", str(study / name)]) == 0
    (study / "tune" / "t").mkdir(parents=True)  # tuning runs are left out
    assert main(["analyze", str(study), "--kinds", "weight", "--no-plots"]) == 0
    assert "analysing 2 runs" in capsys.readouterr().out
    assert (study / "a" / "analysis" / "rank_metrics.parquet").is_file()
    assert (study / "control" / "b" / "analysis" / "rank_metrics.parquet").is_file()


def test_a_report_without_findings_leads_with_the_runs():
    from rankscope.reports import html as report_html

    table = {"title": "Runs: this run", "note": "", "columns": ["a"], "rows": [[{"title": "", "text": "1"}]]}
    paper = {**table, "title": "THE PAPER"}
    common = dict(stamp="s", inputs="runs/demo", intro="i", no_findings="none", paper=paper, paper_note="n", paper_png="data:,",
                  problems=[], figures=[], key_figures=[], tables=[])
    page = report_html.render(findings=[], counts="", summary=[table], **common)  # a single run: its headline leads
    assert page.index("Runs: this run") < page.index("THE PAPER")
    primary = {**table, "title": "Primary endpoints: rule"}
    page = report_html.render(findings=[{**table, "title": "Scale: box"}], counts="rule: confirmed 1", summary=[primary, table], **common)
    assert page.index("confirmed 1") < page.index("Primary endpoints: rule") < page.index("Runs: this run") < page.index("THE PAPER")
