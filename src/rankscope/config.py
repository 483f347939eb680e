"""Typed run configuration: dataclass defaults < YAML file < dotted `key=value` overrides.

Every field has a type, a default and a one-line help text. `load_config` validates the whole
tree before any compute: unknown keys, wrong types and impossible values raise one ConfigError
that names the field and the fix. A resolved config is plain data (`to_dict`), stored in each run.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rankscope.core.errors import ConfigError
from rankscope.core.schema import (  # noqa: F401  (re-exported: the run config's loader)
    build, check, merge_dicts, option, parse_overrides, read_yaml, safe_load, type_name,
)




# --------------------------------------------------------------------------- model presets
# Pico-decoder shapes (Weiss et al. 2025, Table 1; pico-lm/pico-train configs): 12 layers,
# 12 heads, 4 KV heads, vocab 50304, seq 2048. CPU presets keep the same family, smaller.
PRESETS: dict[str, dict[str, Any]] = {
    "pico-tiny": dict(d_model=96, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=384, vocab_size=50304, max_seq_len=2048),
    # pico-tiny's transformer body exactly, with the small vocabulary of the CPU corpus's BPE (the CPU studies' model)
    "pico-tiny-body": dict(d_model=96, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=384, vocab_size=2048, max_seq_len=2048),
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


class MethodConfig:
    """`method.name` picks a training method; its options are that method's own config dataclass
    (`method.<name>` in the YAML, e.g. `method: {name: relora, relora: {rank: 8}}`), defined in its
    module under rankscope.methods. The flat form of earlier releases (`method: {name: relora,
    rank: 8}`, or `method.rank=8` overrides) is still read, with a deprecation line.

    Reading `cfg.method.rank` (and setting it) goes to the options; setting `name` switches to the
    new method's options, keeping the values of the options both methods have. Flat options of the
    earlier form that belong to other methods only are kept in `extra` (checked, unused by this
    method, written back flat) so a study point keeps them when its method changes."""

    @staticmethod
    def schema_build(data: Any, where: str) -> "MethodConfig":
        return _build_method(data, where)

    def __init__(self, name: str = "full", options: Any = None, extra: dict[str, Any] | None = None):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "options", options if options is not None else _method_class(name).config_class())
        object.__setattr__(self, "extra", dict(extra or {}))

    def __getattr__(self, key: str) -> Any:
        options, extra = self.__dict__.get("options"), self.__dict__.get("extra") or {}
        if not key.startswith("__") and options is not None and hasattr(options, key):
            return getattr(options, key)
        if not key.startswith("__") and key in extra:
            return extra[key]
        if not key.startswith("__") and options is not None:  # the earlier flat form had every option: its default
            from rankscope.methods import METHODS

            for m in METHODS.values():
                if key in {f.name for f in dataclasses.fields(m.config_class)}:
                    return getattr(m.config_class(), key)
        raise AttributeError(f"method {self.__dict__.get('name')!r} has no option {key!r}")

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "name":
            if value != self.name:
                old, new_cls = self.options, _method_class(value).config_class
                names = {f.name for f in dataclasses.fields(new_cls)}
                pool = {**self.extra, **{f.name: getattr(old, f.name) for f in dataclasses.fields(old)}}
                object.__setattr__(self, "options", new_cls(**{k: v for k, v in pool.items() if k in names}))
                object.__setattr__(self, "extra", {k: v for k, v in pool.items() if k not in names and k in self.extra})
            object.__setattr__(self, "name", value)
        elif key in ("options", "extra"):
            object.__setattr__(self, key, value)
        elif dataclasses.is_dataclass(self.options) and key in {f.name for f in dataclasses.fields(self.options)}:
            setattr(self.options, key, value)
        else:
            raise AttributeError(f"method {self.name!r} has no option {key!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodConfig) and (self.name, self.options, self.extra) == (other.name, other.options, other.extra)

    def __repr__(self) -> str:
        return f"MethodConfig(name={self.name!r}, options={self.options!r})"

    def validate(self) -> None:
        if hasattr(self.options, "validate"):
            self.options.validate()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, self.name: dataclasses.asdict(self.options), **json_copy(self.extra)}


def json_copy(value: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(value))


def _method_class(name: str):
    from rankscope.methods import method_class  # the registry imports torch: only when a method is named

    return method_class(name)


def _build_method(data: Any, where: str) -> MethodConfig:
    """`method: {name, <name>: {...}}`; flat keys (the earlier form) are mapped to the section of
    `name`, keys that belong to other methods only are dropped, other keys are refused."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    from rankscope.methods import METHODS

    name = data.get("name", "full")
    if not isinstance(name, str):
        raise ConfigError(f"config key '{where}.name' must be str, got {name!r}")
    cls = _method_class(name).config_class
    own = {f.name for f in dataclasses.fields(cls)}
    anyone = {f.name for m in METHODS.values() for f in dataclasses.fields(m.config_class)}
    section = data.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}.{name} must be a mapping of {name}'s options, got {type(section).__name__}")
    for other in set(data) & set(METHODS) - {name}:  # sections of other methods (a study may name several): checked, unused
        built = build(METHODS[other].config_class, data[other] or {}, f"{where}.{other}")
        if hasattr(built, "validate"):  # validated like the active one: a bad value is refused, not ignored
            built.validate()
    flat = {k: v for k, v in data.items() if k != "name" and k not in METHODS}
    unknown = sorted(set(flat) - anyone)
    if unknown:
        raise ConfigError(f"unknown config key '{where}.{unknown[0]}'; valid keys here: name, {', '.join(sorted(METHODS))} "
                          f"(the options of method {name!r}: {', '.join(sorted(own))})")
    ignored = set(flat) - own
    for m in METHODS.values():  # kept but unused: still checked, together, by each method that has them
        theirs = {k: flat[k] for k in ignored & {f.name for f in dataclasses.fields(m.config_class)}}
        if theirs:
            built = build(m.config_class, theirs, where)
            if hasattr(built, "validate"):
                built.validate()
    mapped = {k: v for k, v in flat.items() if k in own}
    both = sorted(k for k in mapped if k in section and section[k] != mapped[k])
    if both:
        raise ConfigError(f"{where}.{both[0]} and {where}.{name}.{both[0]} disagree; keep only {where}.{name}.{both[0]}")
    if flat:
        warnings.warn(flat_notice(where, name, flat, own), FutureWarning, stacklevel=4)
    return MethodConfig(name, build(cls, {**mapped, **section}, f"{where}.{name}"), {k: v for k, v in flat.items() if k not in own})


def override_text(value: Any) -> str:
    """`value` as the right-hand side of a `key=value` override that parses back to it (one shell word
    where the value has no spaces): [wq,wk], 0.999, true."""
    if isinstance(value, list):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def flat_notice(where: str, name: str, flat: dict[str, Any], own: set[str]) -> str:
    """The deprecation line for flat method options, with a fix that loads as printed: the option under the
    section of a method that has it (this run's method if it does; a section of another method is checked
    and kept, unused)."""
    from rankscope.methods import METHODS

    key = sorted(flat)[0]
    having = {m: len(dataclasses.fields(c.config_class)) for m, c in METHODS.items() if key in {f.name for f in dataclasses.fields(c.config_class)}}
    owner = name if key in own else min(having, key=having.get)  # else the method that defines it (lora's alpha, not adaptive's)
    unused = sorted(set(flat) - own)
    return (f"flat method options ({', '.join(sorted(flat))}) are deprecated in a run config: write each under the section of the "
            f"method that has it, e.g. {where}.{owner}.{key}={override_text(flat[key])}"
            + (f"; {', '.join(unused)} (not options of {name}) are kept, unused by {name}" if unused else "")
            + "; a study grid over several methods keeps the flat form (docs/studies.md)")


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
        valid = ("wq", "wk", "wv", "wo", "ov", "ov_layer", "ov_product", "w1", "w2", "w3")
        bad = [c for c in self.components if c not in valid]
        check(not bad, f"analysis.components: unknown {bad}; valid components: {', '.join(valid)}")


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

    def validate(self, schedule: bool = True) -> None:
        """Every section, then the checks across them; `schedule`: also that the method's schedule fits the run
        (off for the stored config of a run already trained, which must stay readable)."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        check(self.train.seq_len <= self.model.max_seq_len, f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        check(self.train.max_steps > self.train.warmup_steps or self.train.warmup_steps == 0,
               f"train.warmup_steps={self.train.warmup_steps} must be below train.max_steps={self.train.max_steps}; "
               "lower train.warmup_steps or raise train.max_steps")
        _method_class(self.method.name).check_run(self)  # what the method allows across sections (FSDP, ...)
        if schedule:
            _method_class(self.method.name).check_schedule(self)  # a period that never comes round (methods/*.py)

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


def config_from_dict(data: dict[str, Any], schedule: bool = True) -> RunConfig:
    """A validated RunConfig; `schedule=False` for a stored run's config (read, not trained again)."""
    cfg = build(RunConfig, data, "")
    cfg.validate(schedule)
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
        if tp is MethodConfig:
            from rankscope.methods import METHODS

            rows.append((f"{prefix}method.name", "str", "full", f"training method: {', '.join(METHODS)} (see rankscope.methods)"))
            for name, m in METHODS.items():
                rows += describe_fields(m.config_class, f"{prefix}method.{name}.")
        elif dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            rows.append((prefix + f.name, type_name(tp), default, f.metadata.get("help", "")))
    return rows
