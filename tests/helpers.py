"""Shared test helpers: tiny configs on a small slice of the embedded corpus."""

from __future__ import annotations

from pathlib import Path

import yaml

from rankscope.config import RunConfig, merge_dicts, parse_overrides
from rankscope.methods import load_config

REPO = Path(__file__).resolve().parents[1]
BLIMP_DIR = REPO.parent / "shared" / "data" / "blimp"

TINY = [
    "model.preset=micro",
    "model.vocab_size=512",
    "data.sources=[shakespeare]",
    "data.max_bytes_per_source=300000",
    "data.tokenizer_vocab_size=512",
    "train.max_steps=20",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.progress=false",
    "train.precision=fp32",
    "train.eval_batches=2",
    "train.eval_every=0",
    "train.log_every=1",
    "checkpoint.every=10",
]


def tiny_config(data_dir: str | Path, *overrides: str) -> RunConfig:
    """A ~0.1M-parameter run on 300 kB of Shakespeare; `data_dir` caches the prepared corpus."""
    return load_config(None, [*TINY, f"data.cache_dir={data_dir}", *overrides])


def tiny_overrides(data_dir: str | Path, *overrides: str) -> list[str]:
    return [*TINY, f"data.cache_dir={data_dir}", *overrides]


class Crash(Exception):
    """Raised by CrashAfter to simulate a process dying between steps."""


class CrashAfter:
    """A trainer callback that dies at the end of step `step` (checkpoints up to it are written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step):
        if step == self.step:
            raise Crash(step)


def crash_and_resume(overrides: list[str], tmp_path: Path, crash_at: int) -> tuple[Path, Path]:
    """Train the same config straight through, and again with a crash at `crash_at` followed by a
    resume in the same directory. Returns the two run directories."""
    from rankscope.train.loop import Trainer, train

    straight, resumed = Path(tmp_path) / "straight", Path(tmp_path) / "resumed"
    train(load_config(None, overrides), straight, log=lambda *_: None)
    trainer = Trainer(load_config(None, overrides), resumed, log=lambda *_: None)
    trainer.callbacks.append(CrashAfter(crash_at))
    try:
        trainer.run()
    except Crash:
        pass
    else:
        raise AssertionError(f"the run did not reach step {crash_at}")
    train(load_config(None, overrides), resumed, log=lambda *_: None)
    return straight, resumed


def final_weights(run: Path, name: str = "model") -> dict:
    from safetensors.torch import load_file

    from rankscope.store.checkpoint import list_checkpoints

    return load_file(str(list_checkpoints(Path(run) / "checkpoints")[-1][1] / f"{name}.safetensors"))


def assert_same_final_weights(a: Path, b: Path, files: tuple[str, ...] = ("model",)) -> None:
    """The newest checkpoints of two runs hold bit-identical tensors in each of `files`."""
    import torch

    for name in files:
        wa, wb = final_weights(a, name), final_weights(b, name)
        assert wa.keys() == wb.keys(), name
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}: {k} differs"


def write_study(tmp_path: Path, data_dir: str | Path, grid: dict, *overrides: str, **extra) -> Path:
    """A study file over tiny runs (checkpoints every 3 steps, plus `overrides`) in tmp_path/runs."""
    base: dict = {}
    for o in tiny_overrides(data_dir, "checkpoint.every=3", *overrides):
        base = merge_dicts(base, parse_overrides([o]))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "t", "base": "base.yaml", "grid": grid, "runs_dir": str(tmp_path / "runs"), **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def one_line_error(capsys, *needles: str) -> str:
    """The one `error: ` line a bad input printed (and no traceback), holding each of `needles`."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def write_rank_table(r, rows) -> None:
    """A run's analysis/rank_metrics.parquet from (step, layer, component, kind, metric, value) rows (head -1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {c: [] for c in ("run", "method", "step", "layer", "component", "head", "kind", "metric", "value")}
    for step, layer, comp, kind, metric, value in rows:
        for c, v in zip(cols, (r.name, r.method, step, layer, comp, -1, kind, metric, value)):
            cols[c].append(v)
    (r.dir / "analysis").mkdir(exist_ok=True)
    pq.write_table(pa.table(cols), r.dir / "analysis" / "rank_metrics.parquet")
