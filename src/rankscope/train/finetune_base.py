"""The base of a fine-tune: a rankscope run (its newest valid checkpoint or `--step N`; LoRA / ReLoRA bases merged
through the stored adapter format) or a local Hugging Face LlamaForCausalLM folder (read through transformers, no
remote code), as dense fp32 weights under the Decoder's names, with their hash; RUN/base.json records it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rankscope.config import ModelConfig
from rankscope.core.errors import RankscopeError
from rankscope.store import checkpoint as ckpt


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
