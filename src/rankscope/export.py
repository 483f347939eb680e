"""`rankscope export RUN_OR_CHECKPOINT -o DIR`: a Hugging Face `LlamaForCausalLM` folder.

Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
special_tokens_map.json, so `transformers` (AutoModelForCausalLM / AutoTokenizer) and
lm-evaluation-harness load the model with no custom code.

Works from the checkpoint's tensors and config only (no method classes): LoRA / ReLoRA layers,
stored as `<name>.base.weight`, `<name>.lora_A` (r x in) and `<name>.lora_B` (out x r), are merged
in fp32 as W = base + (alpha / r) * B @ A (Hu et al. 2021, eq. 3; ReLoRA merges the same way).
Our RoPE already uses Hugging Face Llama's rotate-half layout (rankscope.model.rope_tables), so
wq / wk need no permutation; tests/integration/test_export.py checks the logits agree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rankscope.store.checkpoint import Checkpoint, open_checkpoint
from rankscope.config import ModelConfig, RunConfig
from rankscope.methods import config_from_dict
from rankscope.data.tokenizer import EOS, PAD, TextTokenizer
from rankscope.core.errors import CheckpointError, RankscopeError
from rankscope.adapters.stored import merged_state_dict, stored_adapters
from rankscope.core.paths import check_output_dir


class ExportError(RankscopeError):
    """The export cannot be written (output folder in the way, non-finite weights, unknown tensors)."""


# our parameter name (inside blocks.i) -> Hugging Face Llama name (inside model.layers.i)
BLOCK_NAMES = {
    "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj", "mlp.w2": "mlp.down_proj",
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
}
TOP_NAMES = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


# --------------------------------------------------------------------------- weights
def merge_adapters(state: dict[str, torch.Tensor], adapters: dict[str, dict[str, float]]) -> dict[str, torch.Tensor]:
    """Dense fp32 weights under our own names: each adapted layer (`X.base.weight` + `X.lora_A` +
    `X.lora_B`, its rank and scaling in `adapters`) becomes `X.weight` (adapters.stored.merged_state_dict);
    plain tensors pass through. Non-finite merged weights are refused."""
    try:
        merged = merged_state_dict(state, adapters)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    for name in adapters:
        if not torch.isfinite(merged[f"{name}.weight"]).all():
            raise ExportError(f"merging the LoRA update of {name} gives non-finite weights; the checkpoint has diverged")
    return {k: t.float() for k, t in merged.items()}


def to_hf_names(dense: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Our dense state dict -> Hugging Face Llama keys; the tied LM head is not stored twice."""
    out = {}
    for key, t in dense.items():
        if not key.endswith(".weight"):
            raise ExportError(f"checkpoint tensor {key} has no Hugging Face Llama counterpart")
        mod = key[: -len(".weight")]
        if mod in TOP_NAMES:
            if mod == "lm_head" and tied:
                continue
            out[f"{TOP_NAMES[mod]}.weight"] = t
            continue
        parts = mod.split(".", 2)  # blocks, i, rest
        if len(parts) != 3 or parts[0] != "blocks" or parts[2] not in BLOCK_NAMES:
            raise ExportError(f"checkpoint tensor {key} has no Hugging Face Llama counterpart")
        out[f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.weight"] = t
    return out


def dense_state_dict(ck: Checkpoint) -> tuple[dict[str, torch.Tensor], RunConfig]:
    """The checkpoint's weights as a plain (merged, fp32) Decoder state dict, and its config."""
    if "config" not in ck.meta:
        raise CheckpointError(f"checkpoint {ck.path} has no config in meta.json; it was not written by rankscope train")
    raw = ck.meta["config"]
    state = ck.load("model")
    try:
        adapters = stored_adapters(ck.meta, state)  # per-layer rank and scaling (older checkpoints: from the config)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return merge_adapters(state, adapters), config_from_dict(raw, schedule=False)


# --------------------------------------------------------------------------- config and tokenizer
def hf_config(m: ModelConfig, eos_id: int, dtype: str, pad_id: int | None = None) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM with our shape. rope_theta is written both flat
    (transformers 4.x, lm-eval) and as rope_parameters (transformers 5)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
        "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
    }


def write_tokenizer(tok: TextTokenizer, out: Path, max_len: int) -> None:
    """tokenizer.json plus the two small files PreTrainedTokenizerFast reads. `<|endoftext|>` is
    both BOS and EOS (it starts every training document); no special tokens are added on encode,
    matching how the corpus was tokenised."""
    tok.save(out / "tokenizer.json")
    special = {"bos_token": EOS, "eos_token": EOS}
    if tok.tok.token_to_id(PAD) is not None:
        special["pad_token"] = PAD
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def load_tokenizer(cfg: RunConfig, ck: Checkpoint) -> TextTokenizer:
    from rankscope.evaluate.loading import open_corpus  # prepares the corpus again only if it was moved

    return open_corpus(cfg, ck).tokenizer


# --------------------------------------------------------------------------- export
def export(path: str | Path, out: str | Path, force: bool = False, dtype: str = "float32") -> Path:
    """Write the Hugging Face folder for the run / checkpoint at `path`; returns the folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} is a file; give a folder for -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"output folder {out} is not empty; choose another -o or pass --force to overwrite")
    if dtype not in ("float32", "bfloat16"):
        raise ExportError(f"--dtype {dtype!r} is not supported; use float32 or bfloat16")
    ck = open_checkpoint(path)
    check_output_dir(out, "-o")  # after the input is known good, before the weights are merged and written
    dense, cfg = dense_state_dict(ck)
    tok = load_tokenizer(cfg, ck)
    tensors = to_hf_names(dense, cfg.model.tie_embeddings)
    torch_dtype = getattr(torch, dtype)
    tensors = {k: v.to(torch_dtype).contiguous() for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg.model, tok.eos_id, dtype, tok.tok.token_to_id(PAD)), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id}, indent=2))
    write_tokenizer(tok, out, cfg.model.max_seq_len)
    return out


def check_export(out: Path, dense: dict[str, torch.Tensor], cfg: RunConfig, n_tokens: int = 16) -> float:
    """Max |logit difference| between the exported folder in transformers and our Decoder."""
    from transformers import LlamaForCausalLM

    from rankscope.model import Decoder

    ours = Decoder(cfg.model)
    ours.load_state_dict(dense)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar would fill logs; our own lines say what happens
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, cfg.model.vocab_size, (1, min(n_tokens, cfg.model.max_seq_len)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((hf(ids).logits - ours.eval()(ids)).abs().max())


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory (its newest valid checkpoint) or checkpoints/step_N folder")
    p.add_argument("-o", "--output", required=True, help="folder to write the Hugging Face model into")
    p.add_argument("--force", action="store_true", help="overwrite files in a non-empty output folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the stored weights")
    p.add_argument("--check", action="store_true", help="load the export with transformers and compare logits with ours")


def cmd_export(args) -> None:
    out = export(args.path, args.output, force=args.force, dtype=args.dtype)
    print(f"wrote {out} ({', '.join(f for f in EXPORT_FILES if (out / f).exists())})")
    if args.check:
        dense, cfg = dense_state_dict(open_checkpoint(args.path))
        diff = check_export(out, dense, cfg)
        print(f"check: max |logit difference| transformers vs rankscope = {diff:.2e}")
    print(f"load it with: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
