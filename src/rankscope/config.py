"""Typed run configuration: dataclass defaults < YAML file < dotted `key=value` overrides.

Every field has a type, a default and a one-line help text. The whole tree is validated before any
compute: unknown keys, wrong types and impossible values raise one ConfigError that names the field
and the fix. A resolved config is plain data (`to_dict`), stored in each run.

This module is the schema and knows no method: the `method` section's options are each method's own
dataclass, so `load_config` / `config_from_dict` live one layer up, in `rankscope.methods`, which hands
its registry's section builder to `run_config` here.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from rankscope.core.errors import ConfigError
from rankscope.core.schema import (  # noqa: F401  (re-exported: the run config's loader)
    build, check, merge_dicts, option, parse_overrides, read_yaml, safe_load, type_name,
)
from rankscope.presets import PRESETS
from rankscope.names import BLOCK_COMPONENTS


@dataclass
class ModelConfig:
    preset: str | None = option(None, "named shape (see `rankscope info`); explicit fields override it")
    d_model: int = option(64, "hidden size")
    n_layers: int = option(4, "number of decoder blocks")
    n_heads: int = option(4, "attention heads")
    n_kv_heads: int = option(2, "key/value heads (grouped-query attention); divides n_heads")
    ffn_dim: int = option(256, "SwiGLU hidden size")
    vocab_size: int = option(2048, "embedding rows; must be >= the tokenizer's vocabulary")
    max_seq_len: int = option(128, "longest sequence RoPE is precomputed for")
    rope_theta: float = option(10000.0, "RoPE base frequency")
    norm_eps: float = option(1e-6, "RMSNorm epsilon")
    tie_embeddings: bool = option(False, "share input embedding and LM head (Pico unties them)")
    init_std: float = option(0.02, "std of the normal weight init")

    @staticmethod
    def schema_prepare(data: dict[str, Any], where: str) -> dict[str, Any]:
        """`preset: NAME` fills in that preset's fields; keys given beside it win."""
        if data.get("preset") is None:
            return data
        preset = data["preset"]
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"unknown model.preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        return {**PRESETS[preset], **data}

    def validate(self) -> None:
        # ranges first: the divisibility checks below divide by these
        _positive(self, "model", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len",
                  "rope_theta", "norm_eps", "init_std")
        check(self.d_model % self.n_heads == 0, f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}")
        check(self.n_heads % self.n_kv_heads == 0, f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        check((self.d_model // self.n_heads) % 2 == 0, "RoPE needs an even head dimension (d_model / n_heads)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class DataConfig:
    sources: list[str] = option(["shakespeare", "python", "fortunes", "jargon", "gcide"], "embedded corpus sources (see rankscope.data.sources)")
    files: list[str] = option([], "local files or globs (.txt, .jsonl, .parquet) added as their own domain(s)")
    text_field: str = option("text", "text column of jsonl/parquet files and HF datasets")
    hf_dataset: str | None = option(None, "Hugging Face dataset name or local path, streamed")
    hf_config: str | None = option(None, "Hugging Face dataset config name")
    hf_split: str = option("train", "Hugging Face split to read")
    hf_max_docs: int = option(10000, "documents read from the HF dataset")
    pretokenized: str | None = option(None, "Pico-style pretokenized data: parquet file/glob or HF dataset with a token-id column (needs a loaded tokenizer, e.g. olmo)")
    pretokenized_column: str = option("input_ids", "token-id column of the pretokenized data")
    max_bytes_per_source: int = option(4_000_000, "cap on UTF-8 bytes read from each embedded source")
    eval_only_domains: list[str] = option([], "domains held out of training (Paloma-style): all their documents go to val/test, none to train")
    eval_only_max_bytes: int = option(400_000, "cap on UTF-8 bytes read from each embedded source whose domain is eval-only")
    val_fraction: float = option(0.05, "share of documents held out for validation (per domain)")
    test_fraction: float = option(0.05, "share of documents held out for test (per domain)")
    split_seed: int = option(0, "seed of the deterministic document split")
    tokenizer: str = option("bpe", "'bpe' trains a byte-level BPE; 'olmo' or a tokenizer.json path loads one")
    tokenizer_vocab_size: int = option(2048, "vocabulary of a trained BPE")
    cache_dir: str = option("data", "where prepared corpora live (one folder per data fingerprint)")

    def validate(self) -> None:
        check(0 < self.val_fraction < 0.5 and 0 <= self.test_fraction < 0.5, "data.val_fraction must be in (0, 0.5) and data.test_fraction in [0, 0.5)")
        check(self.tokenizer_vocab_size >= 260, "data.tokenizer_vocab_size must be >= 260 (256 bytes + special tokens)")
        check(self.max_bytes_per_source > 0 and self.eval_only_max_bytes > 0,
               "data.max_bytes_per_source and data.eval_only_max_bytes must be positive")
        check(len(set(self.eval_only_domains)) == len(self.eval_only_domains)
               and all(d and isinstance(d, str) for d in self.eval_only_domains),
               "data.eval_only_domains must be distinct domain names, e.g. [python, gcide]")
        check(bool(self.files or self.hf_dataset or self.pretokenized or set(self.sources) - set(self.eval_only_domains)),
               "data.eval_only_domains holds every source: leave at least one domain to train on")
        _positive(self, "data", "hf_max_docs")
        _at_least(self, "data", 0, "split_seed")
        check(bool(self.cache_dir), "data.cache_dir must name a folder (it is empty)")
        check(bool(self.sources or self.files or self.hf_dataset or self.pretokenized), "data: name at least one of sources, files, hf_dataset or pretokenized")
        check(not (self.pretokenized and self.tokenizer == "bpe"), "data.pretokenized needs the tokenizer its ids come from: set data.tokenizer=olmo or a tokenizer.json path")


@dataclass
class TrainConfig:
    seed: int = option(0, "seed of weights, batches and adapters")
    max_steps: int = option(300, "optimiser steps")
    batch_size: int = option(16, "sequences per micro-batch (per process)")
    grad_accum: int = option(1, "micro-batches per optimiser step")
    seq_len: int = option(128, "tokens per sequence")
    lr: float = option(3e-3, "peak learning rate")
    min_lr_ratio: float = option(0.1, "cosine decays to lr * min_lr_ratio")
    warmup_steps: int = option(30, "linear warm-up steps")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (2-D weights only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "max global gradient norm; 0 disables clipping")
    precision: Literal["auto", "fp32", "bf16"] = option("auto", "auto: the faster of fp32 and bf16 autocast, timed on this model (autotune)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    compile: bool | Literal["auto"] = option("auto", "wrap the model in torch.compile; auto: where timing says it is faster")
    autotune_min_steps: int = option(300, "auto precision/compile are timed only for runs of >= this many steps (else static)")
    autotune_cache: str = option("", "JSON cache of auto choices; empty: $XDG_CACHE_HOME or ~/.cache, rankscope/autotune.json")
    parallel: Literal["ddp", "fsdp"] = option("ddp", "under torchrun: ddp replicates the model; fsdp (FSDP2) shards weights, gradients and optimiser state (full, lora, relora)")
    threads: int = option(0, "torch CPU threads; 0 keeps torch's default")
    log_every: int = option(10, "steps between metrics.jsonl rows")
    eval_every: int = option(100, "steps between validation; 0 only at the end")
    eval_batches: int = option(8, "validation batches per evaluation")
    progress: bool = option(True, "show a progress bar")
    tensorboard: bool = option(True, "also write TensorBoard event files to RUN/tensorboard")
    wandb: bool = option(False, "also log to Weights & Biases (needs the wandb package and a login)")
    wandb_project: str = option("rankscope", "Weights & Biases project name")

    def validate(self) -> None:
        _positive(self, "train", "max_steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_batches", "lr", "eps")
        _at_least(self, "train", 0, "warmup_steps", "weight_decay", "grad_clip", "eval_every", "threads")
        check(0 <= self.seed < 2**32, f"train.seed must be in [0, 2**32), got {self.seed}")
        check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            check(0 <= getattr(self, name) < 1, f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        check(self.warmup_steps <= self.max_steps,
               f"train.warmup_steps={self.warmup_steps} must be in [0, train.max_steps={self.max_steps}]; "
               f"lower train.warmup_steps or raise train.max_steps")


@dataclass
class CheckpointConfig:
    every: int = option(100, "steps between checkpoints (0: only the last)")
    keep_last: int = option(2, "rolling checkpoints kept")
    keep_steps: list[int] = option([], "steps whose checkpoints are kept forever")
    log_spaced: int = option(0, "also save and keep this many log-spaced steps (dense early in training)")
    save_grads: bool = option(False, "store each checkpoint step's loss gradients (grads.safetensors, before clipping; "
                                "LoRA-wrapped linears: w.r.t. the effective weight)")

    def validate(self) -> None:
        _at_least(self, "checkpoint", 0, "every", "log_spaced")
        _at_least(self, "checkpoint", 1, "keep_last")
        bad = [s for s in self.keep_steps if s < 1]
        check(not bad, f"checkpoint.keep_steps must hold steps >= 1, got {bad}")


@dataclass
class MethodConfig:
    """`method.name` picks a training method; `options` is that method's own config dataclass, the YAML
    section `method.<name>` (`method: {name: relora, relora: {rank: 8}}`), defined in the method's module.
    This file knows no method: `rankscope.methods.runconfig` builds the section against the methods registry.
    `others`: the sections of other methods given beside it (a config that serves several methods, as
    configs/micro.yaml does), checked, kept as given for a switch of method (`rankscope.methods.switch_method`,
    memory matching's reference), not stored."""

    name: str = option("full", "training method (see rankscope.methods)")
    options: Any = option(None, "the method's own options (method.<name>)")
    others: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    def validate(self) -> None:
        if hasattr(self.options, "validate"):
            self.options.validate()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, self.name: dataclasses.asdict(self.options) if self.options is not None else {}}


def method_options(method: dict[str, Any]) -> dict[str, Any]:
    """The options of a stored `method` dict as one flat mapping, in either form (nested or flat),
    without validation: for readers of old and new run folders."""
    name = method.get("name", "full")
    nested = method.get(name) if isinstance(method.get(name), dict) else {}
    return {**{k: v for k, v in method.items() if not isinstance(v, dict) and k != "name"}, **nested}


@dataclass
class EvalConfig:
    blimp_dir: str | None = option(None, "folder of BLiMP-format jsonl files scored during and after training ('builtin': generated substitute pairs)")
    blimp_every: int = option(0, "steps between BLiMP evaluations during training (0: only at the end)")
    blimp_max_pairs: int = option(0, "pairs per BLiMP file (0: all)")
    blimp_skip_bad_rows: bool = option(False, "skip malformed BLiMP rows (logged) instead of stopping")
    batch_size: int = option(32, "sequences per evaluation batch")
    per_domain: bool = option(True, "score per-domain loss, perplexity and bits-per-byte on held-out documents during and after training")
    every: int = option(0, "steps between per-domain evaluations during training (0: only at the end)")
    split: Literal["val", "test"] = option("val", "held-out split the per-domain evaluation scores")
    max_docs: int = option(32, "documents per domain in the in-training evaluation (0: all)")

    def validate(self) -> None:
        check(self.batch_size > 0, "eval.batch_size must be positive")
        for name in ("blimp_every", "blimp_max_pairs", "every", "max_docs"):
            check(getattr(self, name) >= 0, f"eval.{name} must be >= 0")


@dataclass
class AnalysisConfig:
    every: int = option(0, "steps between in-loop rank metrics into metrics.jsonl (0: off)")
    components: list[str] = option(["wv", "wo", "ov", "w2"], "in-loop: components measured (wq wk wv wo ov ov_layer ov_product w1 w2 w3; "
                              "ov = pico-analyze's per-head OV, see docs/metrics.md); the paper's are V, O, OV and the SwiGLU down projection")
    per_layer: bool = option(False, "in-loop: also log each layer's value (rank/per/wv/L3), not only the mean over layers")
    dtype: Literal["float64", "float32"] = option("float64", "dtype of the singular value decompositions")

    def validate(self) -> None:
        check(self.every >= 0, "analysis.every must be >= 0")
        bad = [c for c in self.components if c not in BLOCK_COMPONENTS]
        check(not bad, f"analysis.components: unknown {bad}; valid components: {', '.join(BLOCK_COMPONENTS)}")


@dataclass
class FinetuneConfig:
    """`rankscope finetune BASE`: few-shot adaptation of a pretrained model (rankscope.train.finetune, rankscope.data.fewshot)."""

    base: str = option("", "pretrained model: a rankscope run folder or a Hugging Face LlamaForCausalLM folder (empty: pretraining)")
    base_step: int = option(0, "the base run's checkpoint step (0: its newest valid checkpoint)")
    target: str = option("python", "target domain of the corpus (e.g. a held-out one: python, gcide, jargon), or 'files' for finetune.files")
    files: list[str] = option([], "the user's own target documents (.txt/.jsonl/.parquet files or globs), with finetune.target=files")
    shots: int = option(16, "k: documents drawn for training from the target's train pool (0: use finetune.shot_tokens)")
    shot_tokens: int = option(0, "token budget instead of k documents: documents drawn until their tokens reach it")
    shot_len: int = option(0, "0: a shot is a pool document; > 0: a passage of this many tokens cut from one (k in the hundreds)")
    pool_fraction: float = option(0.5, "a held-out domain has no train split: this share of its val documents (by hash) is the shot pool")
    val_docs: int = option(32, "target validation documents that pick the lr and the stopping step (0: all)")
    test_docs: int = option(64, "target test documents scored (0: all)")
    source_docs: int = option(8, "documents per source (training-role) domain scored for forgetting, the same for every method")
    eval_tokens: int = option(1024, "tokens scored per document (its first ones; 0: whole documents)")

    def validate(self) -> None:
        _at_least(self, "finetune", 0, "base_step", "shots", "shot_tokens", "shot_len", "val_docs", "test_docs", "source_docs", "eval_tokens")
        check(bool(self.shots) != bool(self.shot_tokens) or not self.base,
               "set exactly one of finetune.shots (k documents) and finetune.shot_tokens (a token budget)")
        check(0 < self.pool_fraction < 1, f"finetune.pool_fraction must be in (0, 1), got {self.pool_fraction}")
        check(self.target != "files" or bool(self.files), "finetune.target=files needs finetune.files=[PATH, ...]")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> None:
        """Every section, then the checks across them (the method's own, which need its class, are
        rankscope.methods.runconfig's)."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        check(self.train.seq_len <= self.model.max_seq_len, f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        check(self.train.max_steps > self.train.warmup_steps or self.train.warmup_steps == 0,
               f"train.warmup_steps={self.train.warmup_steps} must be below train.max_steps={self.train.max_steps}; "
               "lower train.warmup_steps or raise train.max_steps")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "method"}
        return {**{k: out[k] for k in ("model", "data", "train", "checkpoint")}, "method": self.method.to_dict(),
                **{k: out[k] for k in ("eval", "analysis")}, **({"finetune": out["finetune"]} if self.finetune.base else {})}


def _positive(obj: Any, section: str, *names: str) -> None:
    """Range check of numeric fields, up front: each must be > 0."""
    for name in names:
        value = getattr(obj, name)
        check(value > 0, f"{section}.{name} must be positive, got {value!r}")


def _at_least(obj: Any, section: str, low: int, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        check(value >= low, f"{section}.{name} must be >= {low}, got {value!r}")


MethodBuilder = Callable[[Any, str], MethodConfig]  # (the `method` mapping, its dotted place) -> MethodConfig


def run_config(data: Any, method: MethodBuilder) -> RunConfig:
    """A RunConfig from a mapping, every section validated, its `method` section built by `method` (the
    methods registry's builder, handed down by rankscope.methods: this module knows no method)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
    cfg = build(RunConfig, {k: v for k, v in data.items() if k != "method"}, "")
    cfg.method = method(data.get("method") or {}, "method")
    cfg.validate()
    return cfg


def read_config_data(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw mapping of defaults < YAML file (may name a `base:` file) < dotted overrides, not yet built."""
    data = read_yaml(path) if path else {}
    return merge_dicts(data, parse_overrides(overrides or []))


def describe_fields(cls: type = RunConfig, prefix: str = "",
                    method_rows: Callable[[str], list[tuple[str, str, Any, str]]] | None = None) -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, default, help) for every field, for `rankscope info --fields`; the `method` section's
    rows come from `method_rows(prefix)` (the registry's, rankscope.methods.describe_fields), else its name alone."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if tp is MethodConfig:
            rows += method_rows(f"{prefix}method.") if method_rows else [(f"{prefix}method.name", "str", "full", "training method")]
        elif dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, f"{prefix}{f.name}.", method_rows)
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((prefix + f.name, type_name(tp), default, f.metadata.get("help", "")))
    return rows
