"""`rankscope export`: the Hugging Face folder reproduces our logits and our tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_config

from rankscope.store.checkpoint import open_checkpoint, save_checkpoint, write_meta
from rankscope.cli import main
from rankscope.methods import config_from_dict
from rankscope.export import ExportError, export
from rankscope.evaluate.loading import load_trained
from rankscope.model import Decoder
from rankscope.train.loop import train

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "full"
    train(tiny_config(data_dir, "train.max_steps=12", "checkpoint.every=0"), run, log=lambda *a: None)
    return run


def tokens(vocab: int, T: int = 32, B: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def hf_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model(ids).logits


@torch.no_grad()
def our_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(ids)


def test_full_rank_run_matches_transformers(full_run, tmp_path):
    out = export(full_run, tmp_path / "hf")
    loaded = load_trained(full_run)
    ids = tokens(loaded.cfg.model.vocab_size)  # 32 positions: a wrong RoPE layout would show
    ref = our_logits(loaded.model, ids)
    got = hf_logits(out, ids)
    assert (got - ref).abs().max() < 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert cfg["eos_token_id"] == loaded.corpus.tokenizer.eos_id
    auto = transformers.AutoModelForCausalLM.from_pretrained(out)  # no custom code needed
    assert type(auto).__name__ == "LlamaForCausalLM"


def make_lora_checkpoint(full_run, root, tie: bool, rank: int = 4, alpha: float = 8.0):
    """A ReLoRA-style checkpoint by hand: some linears stored as base + lora_A + lora_B (random,
    non-zero B). Returns (checkpoint path, dense reference model merged here)."""
    ck = open_checkpoint(full_run)
    raw = json.loads(json.dumps(ck.meta["config"]))
    raw["model"]["tie_embeddings"] = tie
    raw["method"] = {"name": "relora", "relora": {"rank": rank, "alpha": alpha, "reset_every": 4, "restart_warmup_steps": 1}}
    cfg = config_from_dict(raw)
    torch.manual_seed(3)
    dense = Decoder(cfg.model)
    sd = dense.state_dict()
    stored = {k: v.clone() for k, v in sd.items() if not (tie and k == "lm_head.weight")}
    g = torch.Generator().manual_seed(4)
    for name in ("blocks.0.attn.wq", "blocks.1.attn.wk", "blocks.2.mlp.w2", "blocks.3.mlp.w1"):
        w = stored.pop(f"{name}.weight")
        a = torch.randn(rank, w.shape[1], generator=g) * 0.1
        b = torch.randn(w.shape[0], rank, generator=g) * 0.1
        stored[f"{name}.base.weight"], stored[f"{name}.lora_A"], stored[f"{name}.lora_B"] = w, a, b
        sd[f"{name}.weight"] = w + (alpha / rank) * (b @ a)  # the reference: merged here, in fp32
    if tie:
        stored["lm_head.weight"] = stored["embed.weight"]  # shared storage, as Decoder saves it
    dense.load_state_dict(sd)
    meta = {k: v for k, v in ck.meta.items() if k not in ("step", "files", "aliases")}
    path = save_checkpoint(root / "checkpoints", 7, {"model": stored}, {**meta, "config": raw})
    return path, dense


@pytest.mark.parametrize("tie", [False, True])
def test_lora_checkpoint_is_merged(full_run, tmp_path, tie):
    path, dense = make_lora_checkpoint(full_run, tmp_path / "lora", tie)
    out = export(path, tmp_path / "hf")
    ids = tokens(dense.cfg.vocab_size)
    assert (hf_logits(out, ids) - our_logits(dense, ids)).abs().max() < 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tie
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) is not tie
    assert not any("lora" in k or ".base." in k for k in keys)


def test_lora_rank_mismatch_is_reported(full_run, tmp_path):
    path, _ = make_lora_checkpoint(full_run, tmp_path / "lora", tie=False, rank=4)
    meta = json.loads((path / "meta.json").read_text())
    meta["config"]["method"]["relora"]["rank"] = 8
    write_meta(path, meta)  # re-sealed: meta.json carries its own hash
    with pytest.raises(ExportError, match="rank"):
        export(path, tmp_path / "hf")


def test_autotokenizer_round_trips(full_run, tmp_path):
    out = export(full_run, tmp_path / "hf")
    ours = load_trained(full_run).corpus.tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(out)
    text = "To be, or not to be: that is the question.\n  Whether 'tis nobler — 42 ünïcode"
    ids = ours.encode(text)
    assert hf(text)["input_ids"] == ids
    assert hf.decode(ids) == ours.decode(ids) == text
    assert hf.eos_token == hf.bos_token == "<|endoftext|>" and hf.eos_token_id == ours.eos_id


def test_cli_errors_are_one_line(full_run, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "does not exist" in err and "\n" not in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    assert main(["export", str(full_run), "-o", str(busy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "--force" in err and "\n" not in err
    assert main(["export", str(full_run), "-o", str(busy), "--force", "--check"]) == 0
    out = capsys.readouterr().out
    assert (busy / "model.safetensors").is_file() and (busy / "notes.txt").is_file()
    diff = float(out.split("= ")[1].split()[0])
    assert diff < 1e-4


def test_trained_relora_run_matches_transformers(data_dir, tmp_path):
    pytest.importorskip("rankscope.adapters.stored")
    run = tmp_path / "relora"
    cfg = tiny_config(data_dir, "method.name=relora", "method.relora.rank=4", "method.relora.reset_every=5", "method.relora.restart_warmup_steps=1",
                      "train.max_steps=12", "checkpoint.every=0")
    train(cfg, run, log=lambda *a: None)
    loaded = load_trained(run)
    assert any(k.endswith("lora_B") for k in loaded.model.state_dict())  # adapters are in the checkpoint
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in open_checkpoint(run).load("model").items())  # and trained after the last merge
    out = export(run, tmp_path / "hf")
    ids = tokens(loaded.cfg.model.vocab_size)
    assert (hf_logits(out, ids) - our_logits(loaded.model, ids)).abs().max() < 1e-4
