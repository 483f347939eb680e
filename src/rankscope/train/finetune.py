"""`rankscope finetune BASE -o DIR [key=value ...]`: few-shot adaptation of a pretrained model with any method.

BASE is a rankscope run folder (its newest valid checkpoint, or `--step N`; LoRA / ReLoRA bases are merged) or a
local Hugging Face LlamaForCausalLM folder (a `rankscope export`, or any LLaMA checkpoint on disk, read through
transformers without remote code). Its dense weights are loaded into the Decoder before the method adapts it
(`Trainer.initial_weights`), so the run folder, checkpoints, resume, preemption, metrics.jsonl and summary.json
are `train`'s own (`FinetuneTrainer` changes only where the weights and the batches come from). The base is
recorded by path and weight hash in RUN/base.json; a resume against another base is refused.

Data (rankscope.data.fewshot): the seed's k shots of the target domain are the training batches; at every
train.eval_every step and the last, `FewshotCallback` scores the target's val documents (which pick the
stopping step, and through a study's tuning stage the lr), its test documents, the shots themselves (the
train-test gap) and the source domains' fixed documents (forgetting, against the base's loss on them). The
weights at the chosen step are kept (RUN/fewshot/best.safetensors) and their update dW = W_adapted - W_base is
measured per block matrix (`update_measures`): PER, numerical-rank condition number, fraction of entries changed,
and the share of its energy in the base's top-8 left singular subspace.

Modules: finetune_base (opening the base, base.json), finetune_callback (the scores, the stopping step, the
update's measures), this one (the config, the trainer, the entry points).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rankscope.config import RunConfig, merge_dicts, parse_overrides, read_yaml
from rankscope.methods import config_from_dict
from rankscope.train.finetune_base import Base, check_vocabulary, open_base, record_base
from rankscope.train.finetune_callback import SELECTION_METRIC, FewshotCallback, choose_step
from rankscope.train.loop import Trainer

__all__ = ["DEFAULTS", "SELECTION_METRIC", "FinetuneTrainer", "choose_step", "cmd_finetune", "finetune", "finetune_config", "open_base"]

# fine-tuning budgets where the user gives no config: short, evaluated often, no per-domain pass at the end
DEFAULTS = {"train": {"max_steps": 40, "warmup_steps": 0, "lr": 1.0e-3, "batch_size": 8, "eval_every": 10, "log_every": 5,
                      "min_lr_ratio": 1.0, "weight_decay": 0.0},
            "checkpoint": {"every": 0}, "eval": {"per_domain": False}}


def finetune_config(base: Base, config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run's config: a config file (else the fine-tuning DEFAULTS, and a run base's own data config), then
    `overrides`; the model shape is always the base's, finetune.base its path."""
    from rankscope.core.errors import ConfigError

    given = parse_overrides(list(overrides))
    if "model" in given:
        raise ConfigError(f"model.* comes from BASE {base.path}; drop the override(s) of model.{', model.'.join(given['model'])}")
    data = read_yaml(config) if config else merge_dicts(DEFAULTS, {"data": base.data} if base.data else {})
    data = merge_dicts(data, given)
    if base.tokenizer_path and "tokenizer" not in (data.get("data") or {}):
        data = merge_dicts(data, {"data": {"tokenizer": str(base.tokenizer_path)}})
    data["model"] = dict(base.model)
    data = merge_dicts(data, {"finetune": {"base": str(base.path), "base_step": base.step or 0}})
    return config_from_dict(data)


# --------------------------------------------------------------------------- the trainer
@dataclass
class FinetuneTrainer(Trainer):
    """`train`'s Trainer, starting from the base's weights and drawing its batches from the few-shot data."""

    base: Base | None = None
    fewshot: Any = None  # rankscope.data.fewshot.FewshotData, built here when not given

    def __post_init__(self) -> None:
        if self.base is None:
            self.base = open_base(self.cfg.finetune.base, self.cfg.finetune.base_step)
        super().__post_init__()
        if self.dist.is_main:
            record_base(Path(self.run_dir), self.base)

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return self.base.state

    def view_extra(self) -> dict[str, Any]:
        return {"base": self.base, "fewshot": self.fewshot}  # what FewshotCallback reads besides the run's facts

    def build_data(self):
        from rankscope.data.corpus import prepare
        from rankscope.data.fewshot import build_fewshot, stream_tokens
        from rankscope.data.stream import BatchStream

        corpus = prepare(self.cfg.data, log=self.log)
        check_vocabulary(self.base, corpus)
        if self.fewshot is None:
            self.fewshot = build_fewshot(corpus, self.cfg.finetune, self.cfg.train.seed)
        self.log(f"[finetune] {self.fewshot.describe()}")
        t = self.cfg.train
        train = BatchStream(stream_tokens(self.fewshot.shots), t.seq_len, t.batch_size, t.grad_accum, t.seed, self.dist.rank,
                            self.dist.world_size)
        val = BatchStream(stream_tokens(self.fewshot.val), t.seq_len, t.batch_size, 1, t.seed + 10_007)
        return corpus, train, val


# --------------------------------------------------------------------------- entry points
def finetune(cfg: RunConfig, run_dir: str | Path, base: Base | None = None, log=print, restart: bool = False,
             callbacks: list | None = None) -> dict[str, Any]:
    """Fine-tune (or resume) the run in `run_dir` from `cfg.finetune.base` (or `base`, already opened).
    Raises rankscope.core.preemption.Preempted after a SIGTERM / SIGINT stop."""
    from rankscope.parallel import distributed
    from rankscope.train.callbacks import build_callbacks

    from rankscope.data.corpus import prepare
    from rankscope.data.fewshot import build_fewshot

    callbacks = [*(build_callbacks(cfg) if callbacks is None else callbacks), FewshotCallback()]
    base = base or open_base(cfg.finetune.base, cfg.finetune.base_step)
    corpus = prepare(cfg.data, log=log)
    check_vocabulary(base, corpus)  # this and the data below before the run folder is written
    data = build_fewshot(corpus, cfg.finetune, cfg.train.seed)
    shot_tokens = int((data.shots.rows[:, 1] - data.shots.rows[:, 0]).sum()) + len(data.shots.rows) + 1
    if shot_tokens < cfg.train.seq_len + 2:
        from rankscope.core.errors import DataError

        raise DataError(f"the {len(data.shots.rows)} shots hold {shot_tokens} tokens, fewer than train.seq_len + 1 = {cfg.train.seq_len + 1}; "
                        "raise finetune.shots (or finetune.shot_tokens) or lower train.seq_len")
    trainer = None
    try:
        trainer = FinetuneTrainer(cfg, Path(run_dir), log, restart, callbacks, base=base, fewshot=data)
        return trainer.run()
    finally:
        trainer = None
        distributed.shutdown()


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="a rankscope run folder (its newest valid checkpoint) or a local Hugging Face LlamaForCausalLM folder")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. finetune.target=python finetune.shots=8 method.name=lora")
    p.add_argument("-o", "--output", required=True, help="run directory of the fine-tune")
    p.add_argument("--step", type=int, default=0, help="the base run's checkpoint step (default: its newest valid checkpoint)")
    p.add_argument("--config", help="a full run config (YAML) instead of the fine-tuning defaults; model.* always comes from BASE")
    p.add_argument("--restart", action="store_true", help="start from step 0 although checkpoints exist (they are set aside)")


def cmd_finetune(args) -> None:
    from rankscope.core.errors import ConfigError
    from rankscope.core.paths import check_output_dir

    if args.step < 0:
        raise ConfigError(f"--step must be >= 0, got {args.step}")
    base = open_base(args.base, args.step)
    cfg = finetune_config(base, args.config, args.overrides)
    check_output_dir(Path(args.output), "-o")
    s = finetune(cfg, args.output, base=base, restart=args.restart)
    print(f"\nfine-tuned {s['steps']} steps on {s.get('fewshot_shots')} {s.get('fewshot_target')} shots; stopping step "
          f"{s.get('fewshot_stop_step')} (lowest target val loss {s.get('fewshot_val_loss', math.nan):.4f}): target test loss "
          f"{s.get('fewshot_test_loss', math.nan):.4f} ({s.get('fewshot_test_bpb', math.nan):.4f} bits/byte; base "
          f"{s.get('fewshot_base_test_loss', math.nan):.4f}), train-test gap {s.get('fewshot_gap', math.nan):+.4f}, "
          f"forgetting {s.get('fewshot_forgetting', math.nan):+.4f}")
    print(f"run directory: {args.output}  (metrics.jsonl, summary.json, base.json, fewshot/update.json, checkpoints/)")
