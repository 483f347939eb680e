"""The run directory's own files, checked and written by rank 0 before training starts.

A run directory holds:
  config.yaml         the resolved config (plain data; `rankscope train RUN/config.yaml` re-runs it)
  env.json            torch/python/device facts, the git commit, and the chosen precision / compile
  metrics.jsonl       one JSON object per logged step (train rows, eval rows, method events)
  checkpoints/        step_NNNNNN folders (see rankscope.store.checkpoint, rankscope.train.state)
  summary.json        final facts: losses, tokens/s, peak memory, method report (rankscope.train.summary)

Re-running `train` on an existing run directory resumes it, provided its config.yaml describes the
same run: only the fields in RESUMABLE_TRAIN_FIELDS and RESUMABLE_SECTIONS may differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from rankscope.core.errors import ConfigError
from rankscope.core.paths import check_output_dir
from rankscope.core.runtime import describe

# train.* fields that may change when a run is resumed: a longer budget, logging, the progress bar, where and how it runs
RESUMABLE_TRAIN_FIELDS = (
    "max_steps", "progress", "log_every", "eval_every", "threads", "device", "tensorboard", "wandb", "wandb_project",
    "parallel", "compile", "autotune_min_steps", "autotune_cache",
)  # fmt: skip
# whole sections that may change on resume: they decide what is saved, evaluated and analysed, not what is trained
RESUMABLE_SECTIONS = ("checkpoint", "eval", "analysis")


def write_run_dir(run_dir: Path, cfg, device, world_size: int, new_schedule_ok: bool = False, normalise=lambda d: d) -> dict | None:
    """Check that `run_dir` is writable and that a config.yaml already there describes this same run
    (a changed train.max_steps of a run with checkpoints only with `new_schedule_ok`: --extend or
    --restart), then write config.yaml and env.json. Returns the precision / compile settings a previous attempt
    chose (env.json `settings`), which a resumed run keeps; None for a fresh one. `normalise` reads a stored config as
    this version resolves it (the loader lives above this module: rankscope.methods.runconfig.normalised_config)."""
    check_output_dir(run_dir, "the run directory (-o)")
    cfg_path = run_dir / "config.yaml"
    resolved = cfg.to_dict()
    if cfg_path.exists():
        try:
            previous = yaml.safe_load(cfg_path.read_text())
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            previous = None
        if not isinstance(previous, dict):
            raise ConfigError(f"{cfg_path} is not a readable rankscope config; restore it, or choose a new -o directory")
        if without_budget(normalise(previous)) != without_budget(resolved):
            raise ConfigError(f"{run_dir} holds a run with a different config; choose a new -o directory (or delete that one)")
        if not new_schedule_ok:
            check_same_schedule(run_dir, previous, resolved)
    write_atomic(cfg_path, yaml.safe_dump(resolved, sort_keys=False))
    env = {
        **describe(device),
        "git_commit": git_commit(),
        "world_size": world_size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    env_path = run_dir / "env.json"
    previous_settings = read_settings(env_path)
    write_atomic(env_path, json.dumps(env, indent=1))
    return previous_settings


def check_same_schedule(run_dir: Path, previous: dict, resolved: dict) -> None:
    """A resumed run keeps its learning-rate schedule: warm-up, cosine and ReLoRA cycles are functions of
    train.max_steps, so a new budget re-derives the lr of every step left (a finished 60-step run
    extended to 80 would climb back from its final lr). Refused in one line unless asked for (--extend)."""
    old = (previous.get("train") or {}).get("max_steps") if isinstance(previous.get("train"), dict) else None
    new = resolved["train"]["max_steps"]
    if old is None or old == new or not any((run_dir / "checkpoints").glob("step_*")):
        return
    raise ConfigError(f"{run_dir} was trained for train.max_steps={old}; train.max_steps={new} re-derives the learning-rate "
                      f"schedule of the steps left: add --extend to train on under the new schedule, or pass train.max_steps={old} "
                      f"to resume the schedule it had")


def write_settings(run_dir: Path, settings: dict[str, Any]) -> None:
    """Add the chosen precision / compile (and autotune's timings) to env.json."""
    env_path = run_dir / "env.json"
    write_atomic(env_path, json.dumps({**json.loads(env_path.read_text()), "settings": settings}, indent=1))


def read_settings(env_path: Path) -> dict | None:
    """The precision / compile a previous attempt of this run chose (env.json `settings`), if readable."""
    try:
        settings = json.loads(env_path.read_text()).get("settings") if env_path.exists() else None
    except (OSError, ValueError, AttributeError):
        return None
    return settings if isinstance(settings, dict) else None



def without_budget(cfg: dict) -> dict:
    """`cfg` without the fields that may change on resume (RESUMABLE_TRAIN_FIELDS, RESUMABLE_SECTIONS)."""
    out = json.loads(json.dumps(cfg))
    train = out.get("train") if isinstance(out.get("train"), dict) else {}
    for key in RESUMABLE_TRAIN_FIELDS:
        train.pop(key, None)
    for section in RESUMABLE_SECTIONS:
        out.pop(section, None)
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def git_commit() -> str | None:
    """The commit of the rankscope checkout this runs from, or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def lock_run_dir(run_dir: Path):
    """The run folder's lock (rankscope.core.lock: one writer, rank 0), taken before anything in it is written; a
    second writer gets one line naming the holder. Held while the returned handle lives (or until release())."""
    from rankscope.core import lock

    check_output_dir(run_dir, "the run directory (-o)")
    return lock.acquire(run_dir, f"run folder {run_dir}", "wait for it to end, or choose another -o")
