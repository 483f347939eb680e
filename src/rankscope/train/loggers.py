"""Where metric rows go: metrics.jsonl (`MetricsLog`), and besides it TensorBoard event files (on by
default) and Weights & Biases (off by default). Both receive exactly the rows metrics.jsonl gets."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rankscope.core.errors import ConfigError


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        step = row.get("step", 0)
        for key, value in row.items():
            if key not in ("step",) and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, cfg, project: str):
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.wandb=true needs the wandb package (pip install wandb), or set train.wandb=false") from None
        self.run = wandb.init(project=project, dir=str(run_dir), name=run_dir.name, config=cfg.to_dict(), resume="allow")

    def log(self, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row.get("step"))

    def close(self) -> None:
        self.run.finish()


def build_loggers(cfg, run_dir: Path) -> list:
    loggers = []
    if cfg.train.tensorboard:
        try:
            loggers.append(TensorBoardLogger(run_dir))
        except ImportError:
            raise ConfigError("train.tensorboard=true needs the tensorboard package (make setup), or set train.tensorboard=false") from None
    if cfg.train.wandb:
        loggers.append(WandbLogger(run_dir, cfg, cfg.train.wandb_project))
    return loggers


class MetricsLog:
    """A run's metric rows: appended to RUN/metrics.jsonl and handed to the loggers the config turns on.
    Only rank 0 logs (`enabled`); elsewhere every call does nothing."""

    def __init__(self, cfg, run_dir: Path, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.loggers = build_loggers(cfg, run_dir) if enabled else []

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        for logger in self.loggers:
            logger.log(row)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


class TokenRate:
    """Tokens per second over the current logging window (steady state, not averaged from the start):
    `rate(tokens)` at every step, `new_window(tokens)` when a row is logged; `elapsed` is the seconds
    from the start to the last `rate` call."""

    def __init__(self, tokens: int):
        self.start = self.window_start = self.now = time.perf_counter()
        self.window_tokens = tokens

    def rate(self, tokens: int) -> float:
        self.now = time.perf_counter()
        return (tokens - self.window_tokens) / max(self.now - self.window_start, 1e-9)

    def new_window(self, tokens: int) -> None:
        self.window_start, self.window_tokens = self.now, tokens

    @property
    def elapsed(self) -> float:
        return self.now - self.start
