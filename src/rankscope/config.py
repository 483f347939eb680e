"""Typed run configuration: dataclass defaults < YAML file < dotted `key=value` overrides.

Every field has a type, a default and a one-line help text. `load_config` validates the whole
tree before any compute: unknown keys, wrong types and impossible values raise one ConfigError
that names the field and the fix. A resolved config is plain data (`to_dict`), stored in each run.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rankscope.errors import ConfigError


def F(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------- model presets
# Pico-decoder shapes (Weiss et al. 2025, Table 1; pico-lm/pico-train configs): 12 layers,
# 12 heads, 4 KV heads, vocab 50304, seq 2048. CPU presets keep the same family, smaller.
PRESETS: dict[str, dict[str, Any]] = {
    "pico-tiny": dict(d_model=96, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=384, vocab_size=50304, max_seq_len=2048),
    "pico-small": dict(d_model=384, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=1536, vocab_size=50304, max_seq_len=2048),
    # Pico's larger decoders (not in the paper), where FSDP (train.parallel=fsdp) starts to pay
    "pico-medium": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=3072, vocab_size=50304, max_seq_len=2048),
    "pico-large": dict(d_model=1536, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=6144, vocab_size=50304, max_seq_len=2048),
    # below micro (193k parameters, most of them embeddings): the smallest point of the CPU study's size trend
    "nano": dict(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=2048, max_seq_len=128),
    "micro": dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=2048, max_seq_len=128),
    # between micro and mini on a log scale of parameters (1.07M), for a size trend with three points
    "milli": dict(d_model=96, n_layers=5, n_heads=6, n_kv_heads=2, ffn_dim=384, vocab_size=2048, max_seq_len=256),
    "mini": dict(d_model=128, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=512, vocab_size=4096, max_seq_len=256),
    "small": dict(d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1024, vocab_size=8192, max_seq_len=256),
}


@dataclass
class ModelConfig:
    preset: str | None = F(None, "named shape (see `rankscope info`); explicit fields override it")
    d_model: int = F(64, "hidden size")
    n_layers: int = F(4, "number of decoder blocks")
    n_heads: int = F(4, "attention heads")
    n_kv_heads: int = F(2, "key/value heads (grouped-query attention); divides n_heads")
    ffn_dim: int = F(256, "SwiGLU hidden size")
    vocab_size: int = F(2048, "embedding rows; must be >= the tokenizer's vocabulary")
    max_seq_len: int = F(128, "longest sequence RoPE is precomputed for")
    rope_theta: float = F(10000.0, "RoPE base frequency")
    norm_eps: float = F(1e-6, "RMSNorm epsilon")
    tie_embeddings: bool = F(False, "share input embedding and LM head (Pico unties them)")
    init_std: float = F(0.02, "std of the normal weight init")

    def validate(self) -> None:
        # ranges first: the divisibility checks below divide by these
        _positive(self, "model", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len",
                  "rope_theta", "norm_eps", "init_std")
        _check(self.d_model % self.n_heads == 0, f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}")
        _check(self.n_heads % self.n_kv_heads == 0, f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        _check((self.d_model // self.n_heads) % 2 == 0, "RoPE needs an even head dimension (d_model / n_heads)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class DataConfig:
    sources: list[str] = F(["shakespeare", "python", "fortunes", "jargon", "gcide"], "embedded corpus sources (see rankscope.data.sources)")
    files: list[str] = F([], "local files or globs (.txt, .jsonl, .parquet) added as their own domain(s)")
    text_field: str = F("text", "text column of jsonl/parquet files and HF datasets")
    hf_dataset: str | None = F(None, "Hugging Face dataset name or local path, streamed")
    hf_config: str | None = F(None, "Hugging Face dataset config name")
    hf_split: str = F("train", "Hugging Face split to read")
    hf_max_docs: int = F(10000, "documents read from the HF dataset")
    pretokenized: str | None = F(None, "Pico-style pretokenized data: parquet file/glob or HF dataset with a token-id column (needs a loaded tokenizer, e.g. olmo)")
    pretokenized_column: str = F("input_ids", "token-id column of the pretokenized data")
    max_bytes_per_source: int = F(4_000_000, "cap on UTF-8 bytes read from each embedded source")
    eval_only_domains: list[str] = F([], "domains held out of training (Paloma-style): all their documents go to val/test, none to train")
    eval_only_max_bytes: int = F(400_000, "cap on UTF-8 bytes read from each embedded source whose domain is eval-only")
    val_fraction: float = F(0.05, "share of documents held out for validation (per domain)")
    test_fraction: float = F(0.05, "share of documents held out for test (per domain)")
    split_seed: int = F(0, "seed of the deterministic document split")
    tokenizer: str = F("bpe", "'bpe' trains a byte-level BPE; 'olmo' or a tokenizer.json path loads one")
    tokenizer_vocab_size: int = F(2048, "vocabulary of a trained BPE")
    cache_dir: str = F("data", "where prepared corpora live (one folder per data fingerprint)")

    def validate(self) -> None:
        _check(0 < self.val_fraction < 0.5 and 0 <= self.test_fraction < 0.5, "data.val_fraction must be in (0, 0.5) and data.test_fraction in [0, 0.5)")
        _check(self.tokenizer_vocab_size >= 260, "data.tokenizer_vocab_size must be >= 260 (256 bytes + special tokens)")
        _check(self.max_bytes_per_source > 0 and self.eval_only_max_bytes > 0,
               "data.max_bytes_per_source and data.eval_only_max_bytes must be positive")
        _check(len(set(self.eval_only_domains)) == len(self.eval_only_domains)
               and all(d and isinstance(d, str) for d in self.eval_only_domains),
               "data.eval_only_domains must be distinct domain names, e.g. [python, gcide]")
        _check(bool(self.files or self.hf_dataset or self.pretokenized or set(self.sources) - set(self.eval_only_domains)),
               "data.eval_only_domains holds every source: leave at least one domain to train on")
        _positive(self, "data", "hf_max_docs")
        _at_least(self, "data", 0, "split_seed")
        _check(bool(self.cache_dir), "data.cache_dir must name a folder (it is empty)")
        _check(bool(self.sources or self.files or self.hf_dataset or self.pretokenized), "data: name at least one of sources, files, hf_dataset or pretokenized")
        _check(not (self.pretokenized and self.tokenizer == "bpe"), "data.pretokenized needs the tokenizer its ids come from: set data.tokenizer=olmo or a tokenizer.json path")


@dataclass
class TrainConfig:
    seed: int = F(0, "seed of weights, batches and adapters")
    max_steps: int = F(300, "optimiser steps")
    batch_size: int = F(16, "sequences per micro-batch (per process)")
    grad_accum: int = F(1, "micro-batches per optimiser step")
    seq_len: int = F(128, "tokens per sequence")
    lr: float = F(3e-3, "peak learning rate")
    min_lr_ratio: float = F(0.1, "cosine decays to lr * min_lr_ratio")
    warmup_steps: int = F(30, "linear warm-up steps")
    weight_decay: float = F(0.1, "AdamW decoupled weight decay (2-D weights only)")
    beta1: float = F(0.9, "AdamW beta1")
    beta2: float = F(0.95, "AdamW beta2")
    eps: float = F(1e-8, "AdamW epsilon")
    grad_clip: float = F(1.0, "max global gradient norm; 0 disables clipping")
    precision: Literal["auto", "fp32", "bf16"] = F("auto", "auto: the faster of fp32 and bf16 autocast, timed on this model (autotune)")
    device: str = F("auto", "auto, cpu, cuda or cuda:N")
    compile: bool | Literal["auto"] = F("auto", "wrap the model in torch.compile; auto: where timing says it is faster")
    autotune_min_steps: int = F(300, "auto precision/compile are timed only for runs of >= this many steps (else static)")
    autotune_cache: str = F("", "JSON cache of auto choices; empty: $XDG_CACHE_HOME or ~/.cache, rankscope/autotune.json")
    parallel: Literal["ddp", "fsdp"] = F("ddp", "under torchrun: ddp replicates the model; fsdp (FSDP2) shards weights, gradients and optimiser state (full, lora, relora)")
    threads: int = F(0, "torch CPU threads; 0 keeps torch's default")
    log_every: int = F(10, "steps between metrics.jsonl rows")
    eval_every: int = F(100, "steps between validation; 0 only at the end")
    eval_batches: int = F(8, "validation batches per evaluation")
    progress: bool = F(True, "show a progress bar")
    tensorboard: bool = F(True, "also write TensorBoard event files to RUN/tensorboard")
    wandb: bool = F(False, "also log to Weights & Biases (needs the wandb package and a login)")
    wandb_project: str = F("rankscope", "Weights & Biases project name")

    def validate(self) -> None:
        _positive(self, "train", "max_steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_batches", "lr", "eps")
        _at_least(self, "train", 0, "warmup_steps", "weight_decay", "grad_clip", "eval_every", "threads")
        _check(0 <= self.seed < 2**32, f"train.seed must be in [0, 2**32), got {self.seed}")
        _check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        _check(self.warmup_steps <= self.max_steps,
               f"train.warmup_steps={self.warmup_steps} must be in [0, train.max_steps={self.max_steps}]; "
               f"lower train.warmup_steps or raise train.max_steps")


@dataclass
class CheckpointConfig:
    every: int = F(100, "steps between checkpoints (0: only the last)")
    keep_last: int = F(2, "rolling checkpoints kept")
    keep_steps: list[int] = F([], "steps whose checkpoints are kept forever")
    log_spaced: int = F(0, "also save and keep this many log-spaced steps (dense early in training)")
    save_grads: bool = F(False, "store each checkpoint step's loss gradients (grads.safetensors, before clipping; "
                                "LoRA-wrapped linears: w.r.t. the effective weight)")

    def validate(self) -> None:
        _at_least(self, "checkpoint", 0, "every", "log_spaced")
        _at_least(self, "checkpoint", 1, "keep_last")
        bad = [s for s in self.keep_steps if s < 1]
        _check(not bad, f"checkpoint.keep_steps must hold steps >= 1, got {bad}")


@dataclass
class MethodConfig:
    name: str = F("full", "training method: full, lora, relora, so, so_single, galore, adaptive, hybrid (see rankscope.methods)")
    rank: int = F(16, "LoRA rank r")
    alpha: float = F(32.0, "LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = F(0.1, "dropout on the LoRA input")
    targets: list[str] = F(["wq", "wk", "wv", "wo", "w1", "w2", "w3"], "linear layers that get adapters (by name)")
    reset_every: int = F(2000, "ReLoRA: steps between merge-and-restart")
    optimizer_reset_every: int = F(0, "ReLoRA: steps between optimiser resets (0: same as reset_every)")
    restart_warmup_steps: int = F(100, "ReLoRA: re-warm-up steps after each restart")
    optimizer_reset: Literal["zero", "random_prune", "magnitude_prune"] = F("random_prune", "ReLoRA: how LoRA optimiser state is reset")
    prune_fraction: float = F(0.999, "ReLoRA: fraction of optimiser moments pruned (random_prune, magnitude_prune)")
    warm_start_steps: int = F(0, "ReLoRA: full-rank steps before switching to adapters")
    save_cycle_updates: bool = F(False, "ReLoRA: save each cycle's merged update dW to RUN/relora_updates/")
    # so (the authors' SO) and so_single (the single-support variant); docs/methods.md
    density: float = F(0.05, "so, so_single: support size k per targeted weight = floor(density * numel) (so; must be >= 1) "
                                   "or round, at least 1 (so_single)")
    support_every: int = F(50, "so: steps between re-draws of the random gradient support (the authors' T); so_single: of its one support")
    moment_keep: float = F(0.25, "so_single: fraction of the support kept at a re-draw, the entries of largest |first moment| "
                                  "(with their moments)")
    so_betas: list[float] = F([0.9, 0.999], "so, so_single: Adam (beta1, beta2) of the sparse weights (the authors' defaults); "
                                             "other weights use train.beta1/2")
    so_weight_decay: float = F(0.0, "so, so_single: weight decay of the sparse weights (the authors' default 0); "
                                     "other weights use train.weight_decay")
    so_weight_decay_mode: Literal["coupled", "decoupled"] = F("coupled", "so, so_single: coupled = L2 added to the gradient "
                                                              "(the authors'); decoupled = AdamW's, on the entries that move")
    update_proj_gap: int = F(200, "galore: steps between SVD refreshes of the gradient projector (rank: method.rank)")
    galore_scale: float = F(0.25, "galore: scale of the projected-back update")
    rank_budget: int = F(0, "adaptive: total adapter parameters sum r_i (m_i + n_i) (0: what uniform method.rank uses)")
    rank_schedule: Literal["adaptive", "grow"] = F("adaptive", "adaptive: per-layer ranks from each cycle's update effective rank, or uniform ranks growing per cycle")
    rank_min: int = F(1, "adaptive: smallest per-layer rank (and grow's first-cycle rank)")
    full_rank_targets: list[str] = F([], "hybrid: linears trained full-rank (name like wv, or module pattern like blocks.0.*); the rest of method.targets get ReLoRA")

    def validate(self) -> None:
        _check(self.rank > 0 and self.alpha > 0, "method.rank and method.alpha must be positive")
        _check(0 <= self.dropout < 1 and 0 <= self.prune_fraction <= 1, "method.dropout in [0, 1), method.prune_fraction in [0, 1]")
        _check(self.reset_every > 0 and self.restart_warmup_steps >= 0 and self.warm_start_steps >= 0, "method.reset_every > 0, restart_warmup_steps >= 0, warm_start_steps >= 0")
        _check(self.optimizer_reset_every >= 0, "method.optimizer_reset_every must be >= 0")
        _check(0 < self.density <= 1 and 0 <= self.moment_keep <= 1, "method.density in (0, 1], method.moment_keep in [0, 1]")
        _check(len(self.so_betas) == 2 and all(0 <= b < 1 for b in self.so_betas),
               f"method.so_betas={self.so_betas} must be two values in [0, 1), e.g. [0.9, 0.999]")
        _check(self.so_weight_decay >= 0, "method.so_weight_decay must be >= 0")
        _check(self.support_every > 0 and self.update_proj_gap > 0 and self.galore_scale > 0, "method.support_every, update_proj_gap and galore_scale must be positive")
        _check(self.rank_budget >= 0 and 1 <= self.rank_min <= self.rank, "method.rank_budget >= 0 and 1 <= method.rank_min <= method.rank")
        _check(self.name not in ("adaptive", "hybrid") or self.restart_warmup_steps <= (self.optimizer_reset_every or self.reset_every), "method.restart_warmup_steps must not exceed the optimiser-reset period")
        _check(self.name != "relora" or self.restart_warmup_steps <= (self.optimizer_reset_every or self.reset_every), "method.restart_warmup_steps must not exceed the optimiser-reset period (method.optimizer_reset_every or method.reset_every)")


@dataclass
class EvalConfig:
    blimp_dir: str | None = F(None, "folder of BLiMP-format jsonl files scored during and after training ('builtin': generated substitute pairs)")
    blimp_every: int = F(0, "steps between BLiMP evaluations during training (0: only at the end)")
    blimp_max_pairs: int = F(0, "pairs per BLiMP file (0: all)")
    blimp_skip_bad_rows: bool = F(False, "skip malformed BLiMP rows (logged) instead of stopping")
    batch_size: int = F(32, "sequences per evaluation batch")
    per_domain: bool = F(True, "score per-domain loss, perplexity and bits-per-byte on held-out documents during and after training")
    every: int = F(0, "steps between per-domain evaluations during training (0: only at the end)")
    split: Literal["val", "test"] = F("val", "held-out split the per-domain evaluation scores")
    max_docs: int = F(32, "documents per domain in the in-training evaluation (0: all)")

    def validate(self) -> None:
        _check(self.batch_size > 0, "eval.batch_size must be positive")
        for name in ("blimp_every", "blimp_max_pairs", "every", "max_docs"):
            _check(getattr(self, name) >= 0, f"eval.{name} must be >= 0")


@dataclass
class AnalysisConfig:
    every: int = F(0, "steps between in-loop rank metrics into metrics.jsonl (0: off)")
    components: list[str] = F(["wv", "wo", "ov", "w2"], "in-loop: components measured (wq wk wv wo ov ov_layer ov_product w1 w2 w3; "
                              "ov = pico-analyze's per-head OV, see docs/metrics.md); the paper's are V, O, OV and the SwiGLU down projection")
    per_layer: bool = F(False, "in-loop: also log each layer's value (rank/per/wv/L3), not only the mean over layers")
    dtype: Literal["float64", "float32"] = F("float64", "dtype of the singular value decompositions")

    def validate(self) -> None:
        _check(self.every >= 0, "analysis.every must be >= 0")
        valid = ("wq", "wk", "wv", "wo", "ov", "ov_layer", "ov_product", "w1", "w2", "w3")
        bad = [c for c in self.components if c not in valid]
        _check(not bad, f"analysis.components: unknown {bad}; valid components: {', '.join(valid)}")


# methods whose optimiser and weight surgery work on FSDP2 shards (rankscope.sharding)
FSDP_METHODS = ("full", "lora", "relora")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        _check(self.train.seq_len <= self.model.max_seq_len, f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        _check(self.train.max_steps > self.train.warmup_steps or self.train.warmup_steps == 0,
               f"train.warmup_steps={self.train.warmup_steps} must be below train.max_steps={self.train.max_steps}; "
               "lower train.warmup_steps or raise train.max_steps")
        if self.train.parallel == "fsdp":
            _check(self.method.name in FSDP_METHODS, f"train.parallel=fsdp supports method.name in {list(FSDP_METHODS)}, not {self.method.name!r}; use train.parallel=ddp")
            _check(self.method.warm_start_steps == 0, "train.parallel=fsdp does not support a ReLoRA warm start (method.warm_start_steps > 0); use train.parallel=ddp")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(obj: Any, section: str, *names: str) -> None:
    """Range check of numeric fields, up front: each must be > 0."""
    for name in names:
        value = getattr(obj, name)
        _check(value > 0, f"{section}.{name} must be positive, got {value!r}")


def _at_least(obj: Any, section: str, low: int, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value >= low, f"{section}.{name} must be >= {low}, got {value!r}")


# --------------------------------------------------------------------------- loading
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _coerce_float(value: Any, tp: Any) -> Any:
    """YAML 1.1 reads `3e-4` (no dot) as a string and `1` as an int; a float field takes both."""
    if tp is not float and not (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if cls is ModelConfig and data.get("preset") is not None:
        preset = data["preset"]
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"unknown model.preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        data = {**PRESETS[preset], **data}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, path)
            continue
        value = _coerce_float(value, tp)
        if not _type_ok(value, tp):
            raise ConfigError(f"config key {path!r} must be {_type_name(tp)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {path!r} must be a finite number, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-3", "method.name=relora"]` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like section.key=value, e.g. train.lr=1e-3")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


def merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass a YAML file such as configs/micro.yaml")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path} names itself as a base (directly or through others); break the `base:` cycle")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    except (OSError, RecursionError) as e:
        raise ConfigError(f"config file {path} cannot be read ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, train, ...)")
    base = data.pop("base", None)  # `base: other.yaml` inherits another config, relative to this file
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"config file {path}: `base:` must name a YAML file, got {base!r}")
    if base:
        data = merge_dicts(read_yaml(path.parent / base, (*_seen, path.resolve())), data)
    return data


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = _build(RunConfig, data, "")
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults < YAML file (may name a `base:` file) < dotted overrides; validated."""
    data = read_yaml(path) if path else {}
    data = merge_dicts(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted name, type, default, help) for every field, for `rankscope info --fields`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((prefix + f.name, _type_name(tp), default, f.metadata.get("help", "")))
    return rows
