"""New-user bad input, one case per fix: each verb meets a corrupt, empty or misplaced file or a bad option value
and answers with one line naming the file or option and the fix (exit 2), never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import one_line_error, tiny_config, write_study

from rankscope.cli import main
from rankscope.train.loop import train


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """A finished 4-step run with checkpoints at 2 and 4, its corpus in data_dir."""
    out = tmp_path_factory.mktemp("bad") / "run"
    train(tiny_config(data_dir, "train.max_steps=4", "checkpoint.every=2", "train.tensorboard=false"), out, log=lambda *_: None)
    return out


@pytest.fixture
def copy(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / "run"))


def corpus_of(run: Path) -> Path:
    meta = json.loads((run / "checkpoints" / "step_000004" / "meta.json").read_text())
    return Path(meta["corpus"])


# --------------------------------------------------------------------------- a prepared corpus
@pytest.mark.parametrize("content,why", [(b"", "not readable JSON"), (b'{"format": 1, "tok', "not readable JSON"),
                                         (b"[1]", "a JSON list, not an object"), (b"{}", "no tokenizer"),
                                         (b'{"tokenizer": {"hash": "x", "vocab_size": 512, "eos_id": 0}, "domains": ["a"]}', "no counts")])
def test_a_corrupt_corpus_manifest_is_one_line_for_eval(run, tmp_path, capsys, content, why):
    src = corpus_of(run)
    corpus = tmp_path / src.name
    shutil.copytree(src, corpus)
    (corpus / "manifest.json").write_bytes(content)
    from rankscope.data.corpus import Corpus
    from rankscope.core.errors import DataError

    with pytest.raises(DataError, match="rankscope prepare CONFIG --force"):
        Corpus.open(corpus)
    run2 = Path(shutil.copytree(run, tmp_path / "run"))
    for mf in run2.glob("checkpoints/*/meta.json"):  # point the copy at the broken corpus, hashes kept valid
        _repoint(mf, corpus)
    assert main(["eval", str(run2), "--max-docs", "1"]) == 2
    one_line_error(capsys, "manifest.json is corrupt", why)


def _repoint(meta_file: Path, corpus: Path) -> None:
    """Point a checkpoint at another corpus folder, its meta.json hash kept valid."""
    from rankscope.store.checkpoint import canonical_sha256

    meta = json.loads(meta_file.read_text())
    meta["corpus"] = str(corpus)
    meta["meta_sha256"] = canonical_sha256(meta)
    meta_file.write_text(json.dumps(meta))


def test_a_corrupt_corpus_manifest_is_one_line_for_prepare(data_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(data_dir, cache)
    for mf in cache.glob("*/manifest.json"):
        mf.write_text('{"tokenizer": ')
    from helpers import TINY

    assert main(["prepare", "configs/micro.yaml", *TINY, f"data.cache_dir={cache}"]) == 2
    one_line_error(capsys, "manifest.json is corrupt", "--force")


@pytest.mark.parametrize("name,damage", [("val.npy", "truncate"), ("val.npy", "delete"), ("val.npy", "garbage"),
                                         ("val.docs.npy", "truncate")])
def test_a_damaged_token_shard_is_one_line(run, capsys, name, damage):
    from rankscope.data.corpus import Corpus
    from rankscope.core.errors import DataError

    corpus = Corpus.open(corpus_of(run))
    path = corpus.root / name
    saved = path.read_bytes()
    try:
        if damage == "truncate":
            path.write_bytes(saved[: len(saved) // 2])
        elif damage == "delete":
            path.unlink()
        else:
            path.write_bytes(b"not numpy")
        with pytest.raises(DataError, match=f"{name} is missing or corrupt"):
            corpus.docs("val") if name.endswith("docs.npy") else corpus.tokens("val")
    finally:
        path.write_bytes(saved)


def test_unwritable_cache_dirs_are_one_line(run, data_dir, tmp_path, capsys):
    from helpers import TINY

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["prepare", "configs/micro.yaml", *TINY, f"data.cache_dir={a_file}"]) == 2
    one_line_error(capsys, "data.cache_dir", "exists and is not a folder")
    moved = Path(shutil.copytree(run, tmp_path / "run"))
    for mf in moved.glob("checkpoints/*/meta.json"):  # the run's corpus is gone: eval must prepare it in --cache-dir
        _repoint(mf, tmp_path / "gone")
    assert main(["eval", str(moved), "--cache-dir", str(a_file)]) == 2
    one_line_error(capsys, "--cache-dir", "exists and is not a folder")


# --------------------------------------------------------------------------- config files
def test_empty_and_folder_config_files_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert main(["train", str(empty), "-o", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "is empty", "{}")
    assert main(["train", str(tmp_path), "-o", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "is a folder")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- report
REPORT_CASES = [("summary.json", b"", "summary.json is not valid JSON"), ("summary.json", b"[1]", "holds a JSON list"),
                ("config.yaml", b"model: [", "config.yaml is not valid YAML"), ("config.yaml", b"[1, 2]", "holds a YAML list"),
                ("config.yaml", b"model: 3", "section model is not a mapping"),
                ("eval.json", b'{"metrics":', "eval.json is not valid JSON"),
                ("eval.json", b"[1]", "eval.json holds a JSON list")]


@pytest.mark.parametrize("name,content,message", REPORT_CASES)
def test_report_names_a_corrupt_run_file(copy, tmp_path, capsys, name, content, message):
    (copy / name).write_bytes(content)
    assert main(["report", str(copy), "-o", str(tmp_path / "rep")]) == 2
    one_line_error(capsys, message)


def test_report_lists_one_unreadable_run_and_reports_the_others(run, tmp_path, capsys):
    study = tmp_path / "study"
    shutil.copytree(run, study / "a")
    shutil.copytree(run, study / "b")
    (study / "b" / "summary.json").write_text("")
    assert main(["report", str(study), "-o", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "unreadable" in md and "summary.json is not valid JSON" in md


def test_report_skips_foreign_metrics_lines(copy, tmp_path):
    with open(copy / "metrics.jsonl", "ab") as fh:
        fh.write(b'[1]\n3\n"x"\nnull\n{"step": 1, "lo\n\xff\xfe\n')
    assert main(["report", str(copy), "-o", str(tmp_path / "rep")]) == 0


@pytest.mark.parametrize("content,message", [(b'{"runs": [', "sweep.json is not valid JSON"), (b"[1]", "holds a JSON list"),
                                             (b'{"runs": [{"x": 1}]}', "`runs` must be a list"),
                                             (b'{"runs": [1]}', "`runs` must be a list"),
                                             (b'{"runs": [], "tuning": 3}', "`tuning` must be an object")])
def test_report_names_a_corrupt_sweep_json(run, tmp_path, capsys, content, message):
    shutil.copytree(run, tmp_path / "study" / "a")
    (tmp_path / "study" / "sweep.json").write_bytes(content)
    assert main(["report", str(tmp_path / "study"), "-o", str(tmp_path / "rep")]) == 2
    one_line_error(capsys, message)


# --------------------------------------------------------------------------- output folders
@pytest.mark.parametrize("verb", [["report"], ["analyze", "--no-plots"], ["export"]])
def test_an_unusable_output_folder_is_one_line(run, tmp_path, capsys, verb):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for target, why in ((a_file / "sub", "cannot be written"), (Path("/proc/rankscope-x"), "cannot be written")):
        assert main([verb[0], str(run), *verb[1:], "-o", str(target)]) == 2
        one_line_error(capsys, f"-o {target}", why)


# --------------------------------------------------------------------------- analyze
@pytest.mark.parametrize("extra,message", [(["--device", "tpu"], "--device='tpu' is not a device"),
                                           (["--device", "meta"], "only cpu and cuda"),
                                           (["--workers", "0"], "--workers must be >= 1, got 0"),
                                           (["--steps", "99"], "--steps 99: "), (["--steps", "2", "7"], "--steps 7: ")])
def test_analyze_options_are_checked(run, tmp_path, capsys, extra, message):
    assert main(["analyze", str(run), "--no-plots", "-o", str(tmp_path / "a"), *extra]) == 2
    line = one_line_error(capsys, message)
    if "--steps" in extra:
        assert "its steps: 2, 4" in line


def test_analyze_names_an_unreadable_safetensors_file(copy, tmp_path, capsys):
    shutil.rmtree(copy / "analysis", ignore_errors=True)
    model = copy / "checkpoints" / "step_000004" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    assert main(["analyze", str(copy), "--no-plots", "--no-cache"]) == 2
    one_line_error(capsys, "step_000004: model.safetensors is unreadable", "--steps")
    assert main(["analyze", str(copy), "--no-plots", "--no-cache", "--steps", "2"]) == 0


def test_eval_device_errors_name_the_eval_option(run, capsys):
    assert main(["eval", str(run), "--device", "tpu"]) == 2
    one_line_error(capsys, "--device='tpu'")


# --------------------------------------------------------------------------- sweep
def test_sweep_options_and_corrupt_study_files(data_dir, tmp_path, capsys):
    study = write_study(tmp_path, data_dir, {"train.lr": [1e-3]}, "train.max_steps=2", "train.warmup_steps=1",
                        "checkpoint.every=2", "train.tensorboard=false")
    assert main(["sweep", str(study), "--parallel", "0"]) == 2
    one_line_error(capsys, "--parallel must be >= 1, got 0")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["sweep", str(study), "--runs-dir", str(a_file)]) == 2
    one_line_error(capsys, f"--runs-dir {a_file}", "not a folder")
    assert main(["sweep", str(study)]) == 0
    capsys.readouterr()
    runs = tmp_path / "runs"
    point = next(p for p in runs.iterdir() if p.is_dir())
    good = {n: (point / n).read_bytes() for n in ("study.json", "summary.json")} | {"sweep.json": (runs / "sweep.json").read_bytes()}
    for target, message in ((point / "study.json", 'write {"study": "t"} into it'),
                            (point / "summary.json", "delete it and run the sweep again"),
                            (runs / "sweep.json", "delete it: it is rewritten")):
        target.write_text("{")
        assert main(["sweep", str(study)]) == 2
        one_line_error(capsys, f"{target} is not valid JSON", message)
        target.write_bytes(good[target.name])
    (point / "summary.json").unlink()  # the advertised fix: training resumes and rewrites it
    assert main(["sweep", str(study)]) == 0
    assert json.loads((point / "summary.json").read_text())["steps"] == 2


# --------------------------------------------------------------------------- a finished run, trained again
def test_a_finished_run_with_a_corrupt_summary_and_a_torn_metrics_line_is_rewritten(data_dir, copy):
    """`train` on a finished run whose summary.json is garbage and whose metrics.jsonl ends in a torn
    line (a kill mid-write): no traceback, the summary is rebuilt from the metrics."""
    (copy / "summary.json").write_text('{"steps": 4, "final_')
    with open(copy / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "train_lo')
    out = train(tiny_config(data_dir, "train.max_steps=4", "checkpoint.every=2", "train.tensorboard=false"), copy, log=lambda *_: None)
    stored = json.loads((copy / "summary.json").read_text())
    assert stored == out and stored["steps"] == 4 and stored["final_train_loss"] is not None
    assert stored["peak_memory_bytes"] is None and stored["tokens_per_s"] is not None


@pytest.mark.parametrize("name", ["missing.txt", "none-*.txt", "empty.txt"])
def test_eval_files_errors_name_the_files_option(run, tmp_path, capsys, name):
    (tmp_path / "empty.txt").write_text("")
    assert main(["eval", str(run), "--files", str(tmp_path / name)]) == 2
    assert "data.files" not in one_line_error(capsys, "--files")
