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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from rankscope.store import checkpoint as ckpt
from rankscope.config import ModelConfig, RunConfig, merge_dicts, parse_overrides, read_yaml
from rankscope.methods import config_from_dict
from rankscope.core.errors import RankscopeError
from rankscope.train.loop import Trainer

TOP_K = 8  # the base's top singular directions the update's overlap is measured against
SCORED_SHOTS = 32  # the train loss of the train-test gap: the first this many shots in draw order (all of a smaller k)
# fine-tuning budgets where the user gives no config: short, evaluated often, no per-domain pass at the end
DEFAULTS = {"train": {"max_steps": 40, "warmup_steps": 0, "lr": 1.0e-3, "batch_size": 8, "eval_every": 10, "log_every": 5,
                      "min_lr_ratio": 1.0, "weight_decay": 0.0},
            "checkpoint": {"every": 0}, "eval": {"per_domain": False}}


class BaseError(RankscopeError):
    """The fine-tune's BASE cannot be used (missing, not a LLaMA decoder, another vocabulary)."""


# --------------------------------------------------------------------------- the base
@dataclass
class Base:
    path: Path
    kind: str  # "run" or "hf"
    state: dict[str, torch.Tensor]  # dense fp32 weights under our names
    model: dict[str, Any]  # ModelConfig fields
    hash: str  # of the dense weights
    step: int | None = None  # the run checkpoint's step
    tokenizer_hash: str | None = None
    tokenizer_path: Path | None = None  # an HF folder's tokenizer.json
    data: dict[str, Any] | None = None  # a run's data config

    def record(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "kind": self.kind, "step": self.step, "weights_sha256": self.hash,
                "tokenizer_hash": self.tokenizer_hash}


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and fp32 bytes of the dense weights (independent of how they were stored)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to(torch.float32).contiguous().cpu()
        h.update(f"{k}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def open_base(path: str | Path, step: int = 0) -> Base:
    """The base at `path` (a run folder, a checkpoints/step_N folder, or an HF LlamaForCausalLM folder)."""
    path = Path(path)
    if not str(path) or not path.exists():
        raise BaseError(f"finetune BASE {path} not found; give a rankscope run folder or a Hugging Face LlamaForCausalLM folder")
    if not path.is_dir():
        raise BaseError(f"finetune BASE {path} is a file; give a rankscope run folder or a Hugging Face LlamaForCausalLM folder")
    if (path / "meta.json").is_file() or (path / "checkpoints").is_dir():
        return run_base(path, step)
    if (path / "config.json").is_file():
        if step:
            raise BaseError(f"--step {step} applies to a rankscope run; {path} is a Hugging Face folder")
        return hf_base(path)
    raise BaseError(f"finetune BASE {path} is neither a rankscope run (checkpoints/) nor a Hugging Face model folder (config.json)")


def run_base(path: Path, step: int) -> Base:
    from rankscope.export import ExportError, dense_state_dict

    where = path / "checkpoints" / ckpt.step_dir(Path(""), step).name if step else path
    if step and not where.is_dir():
        have = ", ".join(str(s) for s, _ in ckpt.list_checkpoints(path / "checkpoints")) or "none"
        raise BaseError(f"finetune BASE {path} has no checkpoint at --step {step} (steps: {have})")
    try:
        ck = ckpt.open_checkpoint(where)
        dense, cfg = dense_state_dict(ck)
    except (RankscopeError, ExportError) as e:
        raise BaseError(f"finetune BASE {path}: {e}") from None
    return Base(path, "run", dense, _model_dict(cfg.model), weights_hash(dense), ck.step, ck.meta.get("tokenizer_hash"),
                data=cfg.to_dict()["data"])


def _model_dict(m: ModelConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(m)


# Hugging Face Llama name -> ours (the inverse of rankscope.export's tables)
def _hf_to_ours() -> dict[str, str]:
    from rankscope.export import BLOCK_NAMES, TOP_NAMES

    return {**{v: k for k, v in TOP_NAMES.items()}, **{v: k for k, v in BLOCK_NAMES.items()}}


def hf_model_config(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """Our ModelConfig fields from a LlamaForCausalLM config.json; a feature our Decoder lacks is one BaseError."""
    arch = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" or (arch and "LlamaForCausalLM" not in arch):
        raise BaseError(f"finetune BASE {path} is a {cfg.get('model_type')!r} model ({', '.join(arch) or 'no architectures'}), "
                        "not a LLaMA architecture (LlamaForCausalLM); give a LLaMA checkpoint or a rankscope run")
    rope = cfg.get("rope_parameters") or {}
    unsupported = [f"{k}={cfg.get(k)!r}" for k, ok in (("hidden_act", cfg.get("hidden_act", "silu") == "silu"),
                                                        ("attention_bias", not cfg.get("attention_bias")),
                                                        ("mlp_bias", not cfg.get("mlp_bias")),
                                                        ("rope_scaling", not cfg.get("rope_scaling")))
                   if not ok]
    if rope.get("rope_type", "default") != "default":
        unsupported.append(f"rope_type={rope.get('rope_type')!r}")
    heads = cfg.get("num_attention_heads")
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads):
        unsupported.append(f"head_dim={cfg.get('head_dim')} (not hidden_size / num_attention_heads)")
    if unsupported:
        raise BaseError(f"finetune BASE {path} uses {', '.join(unsupported)}, which rankscope's decoder does not have")
    return _model_dict(ModelConfig(
        d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"], max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), init_std=float(cfg.get("initializer_range", 0.02))))


def hf_base(path: Path) -> Base:
    from rankscope.data.tokenizer import TextTokenizer

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BaseError(f"finetune BASE {path}/config.json is not readable JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(cfg, dict):
        raise BaseError(f"finetune BASE {path}/config.json is not a JSON object")
    try:
        model = hf_model_config(cfg, path)
    except KeyError as e:
        raise BaseError(f"finetune BASE {path}/config.json lacks {e.args[0]!r}; it is not a complete LlamaForCausalLM config") from None
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise BaseError(f"finetune BASE {path} has no tokenizer.json; the corpus must be tokenised with the base's own tokenizer")
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:  # a local folder only, the class named here: no remote code, no download
        hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise BaseError(f"finetune BASE {path}: transformers cannot load it ({str(e).splitlines()[0][:160]})") from None
    names = _hf_to_ours()
    state = {}
    for key, t in hf.state_dict().items():
        mod = key[: -len(".weight")] if key.endswith(".weight") else key
        parts = mod.split(".")
        if mod in names:
            ours = names[mod]
        elif len(parts) >= 4 and parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in names:
            ours = f"blocks.{parts[2]}.{names['.'.join(parts[3:])]}"
        else:
            raise BaseError(f"finetune BASE {path}: tensor {key} has no counterpart in rankscope's decoder")
        state[f"{ours}.weight"] = t.detach().clone().float()
    if model["tie_embeddings"]:
        state["lm_head.weight"] = state["embed.weight"]
    return Base(path, "hf", state, model, weights_hash(state), None, TextTokenizer.load(tok_path).hash, tok_path)


def check_vocabulary(base: Base, corpus) -> None:
    """The corpus must be tokenised with the base's tokenizer (same hash), within the base's embedding rows."""
    tok = corpus.manifest["tokenizer"]
    if base.tokenizer_hash != tok["hash"]:
        fix = (f"set data.tokenizer={base.tokenizer_path}" if base.tokenizer_path else "keep the base run's data.* settings")
        raise BaseError(f"finetune BASE {base.path}'s vocabulary (tokenizer {base.tokenizer_hash}) does not match the corpus tokenizer "
                        f"({tok['hash']}, {tok['vocab_size']} tokens); {fix}")
    if tok["vocab_size"] > base.model["vocab_size"]:
        raise BaseError(f"the corpus tokenizer has {tok['vocab_size']} tokens but BASE {base.path} has {base.model['vocab_size']} embedding rows")


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


def record_base(run_dir: Path, base: Base) -> None:
    """RUN/base.json: the base's path and hash; a run folder fine-tuned from another base is refused."""
    path = run_dir / "base.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("weights_sha256") not in (None, base.hash):
            raise BaseError(f"{run_dir} was fine-tuned from another base ({old.get('path')}, weights {str(old.get('weights_sha256'))[:12]}); "
                            "choose a new -o directory")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(base.record(), indent=1))
    tmp.replace(path)


# --------------------------------------------------------------------------- measures
def dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as a plain fp32 Decoder state dict (LoRA factors merged)."""
    from rankscope.methods import lora

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: v.float() for k, v in lora.merged_state_dict(state, lora.adapter_layout(model)).items()}


def update_measures(base: dict[str, torch.Tensor], adapted: dict[str, torch.Tensor], top_k: int = TOP_K) -> dict[str, dict[str, float]]:
    """Per block matrix (2-D weights but the embedding and head), of dW = adapted - base in float64:
    per (proportional effective rank), cond_numerical (s_max / smallest s above max(m, n) eps s_max),
    changed (fraction of entries whose stored value changed at all), top_overlap (||U_k^T dW||_F^2 / ||dW||_F^2
    with U_k the base's top-k left singular vectors; k / m for a random direction) and norm (||dW||_F)."""
    from rankscope.analysis.metrics import matrix_metrics

    out = {}
    for name, w0 in base.items():
        if w0.dim() != 2 or not name.startswith("blocks."):
            continue
        w1 = adapted[name]
        dw = w1.double() - w0.double()
        norm = float(torch.linalg.matrix_norm(dw))
        m = matrix_metrics(dw.float(), ["per", "condition_number_numerical"])  # fp32 eps: the weights are stored in fp32
        k = min(top_k, *w0.shape)
        U = torch.linalg.svd(w0.double(), full_matrices=False).U[:, :k]  # (m, k)
        overlap = float((U.T @ dw).square().sum() / dw.square().sum()) if norm > 0 else math.nan
        out[name] = {"per": float(m["per"][0]), "cond_numerical": float(m["condition_number_numerical"][0]),
                     "changed": float((w1 != w0).double().mean()), "top_overlap": overlap, "norm": norm,
                     "random_overlap": k / w0.shape[0]}
    return out


def mean_finite(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


# --------------------------------------------------------------------------- the callback
SELECTION_METRIC = "fewshot_val_loss"  # the one figure that picks the stopping step here and the lr in a study's tuning stage


def choose_step(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The evaluation row with the lowest target val loss (ties: the earlier step). Reads nothing else: test
    figures ride along in the rows but never choose."""
    return min(history, key=lambda r: (r[SELECTION_METRIC], r["step"]))


class FewshotCallback:
    """Scores the target (val, test, shots) and the source domains at every train.eval_every step and the last;
    keeps the weights of the lowest target val loss; at the end reports the chosen step's figures (summary.json).
    The stopping step is chosen on val only: test is scored at every candidate step and read at the chosen one."""

    def __init__(self):
        self.history: list[dict[str, Any]] | None = None  # rows of earlier evaluations (from metrics.jsonl on a resume)
        self.base_scores: dict[str, float] | None = None

    def wants(self, trainer, step: int) -> bool:
        t = trainer.cfg.train
        return step == t.max_steps or bool(t.eval_every and step % t.eval_every == 0)

    def scores(self, trainer, model: nn.Module) -> dict[str, float]:
        from rankscope.data.fewshot import first
        from rankscope.evaluate.perplexity import score_documents, summarize

        fs, t = trainer.fewshot, trainer.cfg.train
        out = {}
        model.eval()
        try:
            for name, ds in (("val", fs.val), ("test", fs.test), ("train", first(fs.shots, SCORED_SHOTS)), ("source", fs.source)):
                nll = score_documents(model, ds, ds.rows, t.seq_len, trainer.cfg.eval.batch_size, trainer.precision)
                s = summarize(nll.sum(), int((ds.rows[:, 1] - ds.rows[:, 0]).sum()), int(ds.rows[:, 3].sum()))
                out[f"fewshot_{name}_loss"], out[f"fewshot_{name}_bpb"] = s["loss"], s["bpb"]
        finally:
            model.train()
        return out

    def load(self, trainer, upto: int) -> None:
        from rankscope.train.summary import read_metrics

        if self.history is None:
            rows = read_metrics(Path(trainer.run_dir))
            self.history = [r for r in rows if "fewshot_val_loss" in r and r.get("step", 0) <= upto]
        if self.base_scores is None:
            path = Path(trainer.run_dir) / "fewshot" / "base_scores.json"
            if path.is_file():
                self.base_scores = json.loads(path.read_text())
            else:
                from rankscope.model import Decoder

                with torch.random.fork_rng(devices=[]):
                    model = Decoder(trainer.cfg.model)
                model.load_state_dict(trainer.base.state)
                self.base_scores = self.scores(trainer, model.to(trainer.device))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(self.base_scores, indent=1))

    def on_step_end(self, trainer, step: int) -> dict[str, Any] | None:
        if not self.wants(trainer, step):
            return None
        self.load(trainer, step - 1)
        row = self.scores(trainer, trainer.eval_model)
        best = min((r[SELECTION_METRIC] for r in self.history), default=math.inf)
        self.history.append({"step": step, **row})
        if row[SELECTION_METRIC] < best:  # the stopping step so far: keep its weights (ties keep the earlier step)
            ckpt.save_tensors_atomic(Path(trainer.run_dir) / "fewshot" / "best.safetensors", dense_weights(trainer.eval_model),
                                     {"step": str(step)})
        return row

    def on_train_end(self, trainer) -> dict[str, Any]:
        from safetensors import safe_open
        from safetensors.torch import load_file

        from rankscope.train.summary import read_metrics

        self.load(trainer, trainer.step)
        if not self.history:
            return {}
        chosen = choose_step(self.history)
        path = Path(trainer.run_dir) / "fewshot" / "best.safetensors"
        with safe_open(str(path), "pt") as f:
            kept = int(f.metadata()["step"])
        if kept != chosen["step"]:
            raise RankscopeError(f"{path} holds step {kept}, not the chosen step {chosen['step']}; delete {path.parent} and the run's "
                                 "checkpoints to fine-tune again")
        per_matrix = update_measures(trainer.base.state, load_file(str(path)))
        (path.parent / "update.json").write_text(json.dumps({"step": chosen["step"], "top_k": TOP_K, "matrices": per_matrix}, indent=1))
        b = self.base_scores
        fs = trainer.fewshot
        steps = [r for r in self.history if r["step"] > 0]
        t = trainer.cfg.train
        per_step = t.batch_size * t.grad_accum * t.seq_len * trainer.dist.world_size
        step_seconds = [per_step / r["tokens_per_s"] for r in read_metrics(Path(trainer.run_dir)) if r.get("tokens_per_s")]
        out = {
            "fewshot_target": fs.domain, "fewshot_shots": int(len(fs.shots.rows)),
            "fewshot_shot_tokens": int((fs.shots.rows[:, 1] - fs.shots.rows[:, 0]).sum()),
            "fewshot_stop_step": int(chosen["step"]), "fewshot_evaluated_steps": [int(r["step"]) for r in steps],
            **{k: chosen[k] for k in chosen if k.startswith("fewshot_")},
            "fewshot_gap": chosen["fewshot_test_loss"] - chosen["fewshot_train_loss"],
            "fewshot_forgetting": chosen["fewshot_source_loss"] - b["fewshot_source_loss"],
            "fewshot_gain": b["fewshot_test_loss"] - chosen["fewshot_test_loss"],
            **{f"fewshot_base_{k[len('fewshot_'):]}": v for k, v in b.items()},
            "dw_per": mean_finite([m["per"] for m in per_matrix.values()]),
            "dw_cond_numerical": mean_finite([m["cond_numerical"] for m in per_matrix.values()]),
            "dw_changed_fraction": mean_finite([m["changed"] for m in per_matrix.values()]),
            "dw_top_overlap": mean_finite([m["top_overlap"] for m in per_matrix.values()]),
            "step_seconds": float(np.median(step_seconds)) if step_seconds else None,
            "base": trainer.base.record(),
        }
        return out


# --------------------------------------------------------------------------- entry points
def finetune(cfg: RunConfig, run_dir: str | Path, base: Base | None = None, log=print, restart: bool = False,
             callbacks: list | None = None) -> dict[str, Any]:
    """Fine-tune (or resume) the run in `run_dir` from `cfg.finetune.base` (or `base`, already opened).
    Raises rankscope.train.preemption.Preempted after a SIGTERM / SIGINT stop."""
    from rankscope.train import distributed
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
