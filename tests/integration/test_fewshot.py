"""`rankscope finetune`: shots, splits, forgetting, bases (run, HF export, bad ones), resume, and LoRA against peft."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, assert_same_final_weights

from rankscope.cli import main
from rankscope.methods import load_config
from rankscope.data.corpus import prepare
from rankscope.data.fewshot import build_fewshot, select_shots
from rankscope.train.finetune import SELECTION_METRIC, choose_step, finetune, finetune_config, open_base
from rankscope.core.preemption import Preempted
from rankscope.train.loop import train

QUIET = dict(log=lambda *_: None)
# a tiny corpus with a held-out target: Shakespeare to pretrain on, Python source held out
BASE = ["model.preset=micro", "model.vocab_size=512", "data.sources=[shakespeare,python]", "data.eval_only_domains=[python]",
        "data.max_bytes_per_source=200000", "data.eval_only_max_bytes=120000", "data.tokenizer_vocab_size=512",
        "train.max_steps=8", "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=1", "train.progress=false",
        "train.precision=fp32", "train.eval_every=0", "train.eval_batches=1", "train.tensorboard=false", "checkpoint.every=8",
        "eval.per_domain=false"]
FT = ["finetune.target=python", "finetune.shots=6", "finetune.shot_len=32", "finetune.val_docs=3", "finetune.test_docs=3",
      "finetune.source_docs=2", "finetune.eval_tokens=64", "train.seq_len=32", "train.batch_size=4", "train.max_steps=6",
      "train.eval_every=3", "train.log_every=1", "train.progress=false", "train.precision=fp32", "train.tensorboard=false",
      "checkpoint.every=0", "method.so.support_every=2", "method.so_single.support_every=2", "method.galore.update_proj_gap=2"]


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("fewshot") / "base"
    train(load_config(None, [*BASE, f"data.cache_dir={data_dir}"]), run, **QUIET)
    return run


def ft_config(base_run, *more):
    return finetune_config(open_base(base_run), None, [*FT, *more])


# --------------------------------------------------------------------------- shots, splits, source batches
def test_shot_selection_is_a_pure_function_of_seed_domain_k():
    keys = [f"doc{i}" for i in range(50)]
    a = select_shots(keys, 3, "python", 8)
    assert a == select_shots(list(keys), 3, "python", 8)  # no hidden state
    assert a != select_shots(keys, 4, "python", 8) and a != select_shots(keys, 3, "gcide", 8)
    assert select_shots(keys, 3, "python", 4) == a[:4]  # a smaller k is a subset of a larger one
    budget = select_shots(keys, 3, "python", 0, lengths=[10] * 50, token_budget=35)
    assert budget == a[:3]
    rng = random.Random(0)
    shuffled = keys[:]
    rng.shuffle(shuffled)  # the candidates' order does not matter, only who they are
    assert [shuffled[i] for i in select_shots(shuffled, 3, "python", 8)] == [keys[i] for i in a]


def test_shots_and_source_batches_are_identical_across_methods(base_run):
    sets = {}
    for method in ("full", "lora", "so", "galore"):
        cfg = ft_config(base_run, f"method.name={method}", "train.seed=2")
        corpus = prepare(cfg.data, log=lambda *_: None)
        sets[method] = build_fewshot(corpus, cfg.finetune, cfg.train.seed)
    ref = sets["full"]
    for fs in sets.values():
        for name in ("shots", "val", "test", "source"):
            a, b = getattr(fs, name), getattr(ref, name)
            assert np.array_equal(a.rows, b.rows) and np.array_equal(a.tokens, b.tokens), name
    other = build_fewshot(corpus, ft_config(base_run, "train.seed=3").finetune, 3)
    assert not np.array_equal(other.shots.rows, ref.shots.rows)  # another seed, other shots (rows into the same pool)
    assert np.array_equal(other.source.tokens, ref.source.tokens)  # but the same source documents
    # the target's val, test and pool never share a document
    keys = {name: {bytes(np.asarray(getattr(ref, name).tokens[s:e]).tobytes()) for s, e, _, _ in getattr(ref, name).rows}
            for name in ("val", "test", "shots")}
    assert not keys["val"] & keys["shots"] and not keys["test"] & keys["shots"]
    assert set(np.unique(ref.source.rows[:, 2])) == {ref.source.domains.index("shakespeare")}  # source domains only


def test_the_stopping_step_and_the_tuned_lr_read_validation_only():
    rows = [{"step": 3, SELECTION_METRIC: 2.0, "fewshot_test_loss": 9.0}, {"step": 6, SELECTION_METRIC: 1.5, "fewshot_test_loss": 1.0},
            {"step": 9, SELECTION_METRIC: 1.5, "fewshot_test_loss": 0.1}]
    assert choose_step(rows)["step"] == 6  # ties keep the earlier step
    for perm in ([9.0, 1.0, 0.1], [0.0, 5.0, 5.0], [1.0, 1.0, -1.0]):  # test figures never change the choice
        assert choose_step([{**r, "fewshot_test_loss": t} for r, t in zip(rows, perm)])["step"] == 6
    study = yaml.safe_load((REPO / "studies" / "fewshot-cpu.yaml").read_text())
    assert study["tune"]["metric"] == SELECTION_METRIC and "test" not in study["tune"]["metric"]


# --------------------------------------------------------------------------- bases
def test_finetune_from_a_run_and_from_its_hf_export(base_run, tmp_path):
    from rankscope.export import export

    s_run = finetune(ft_config(base_run, "method.name=lora"), tmp_path / "from-run", **QUIET)
    assert s_run["steps"] == 6 and s_run["fewshot_stop_step"] in (3, 6) and s_run["fewshot_shots"] == 6
    assert s_run["fewshot_test_loss"] < s_run["fewshot_base_test_loss"]  # six steps on Python help on held-out Python
    rec = json.loads((tmp_path / "from-run" / "base.json").read_text())
    assert rec["kind"] == "run" and rec["step"] == 8 and rec["weights_sha256"] == s_run["base"]["weights_sha256"]
    update = json.loads((tmp_path / "from-run" / "fewshot" / "update.json").read_text())
    assert len(update["matrices"]) == 4 * 7 and update["step"] == s_run["fewshot_stop_step"]

    hf = export(base_run, tmp_path / "hf")
    hf_base = open_base(hf)
    assert hf_base.kind == "hf" and hf_base.hash == rec["weights_sha256"]  # the same weights, by hash
    data = [o for o in BASE if o.startswith("data.") and "cache_dir" not in o] + [f"data.cache_dir={tmp_path / 'data'}"]
    cfg = finetune_config(hf_base, None, [*FT, *data, "method.name=lora"])
    assert cfg.data.tokenizer == str(hf / "tokenizer.json") and cfg.model.d_model == 64
    s_hf = finetune(cfg, tmp_path / "from-hf", base=hf_base, **QUIET)
    for key in ("fewshot_base_test_loss", "fewshot_base_source_loss", "fewshot_test_loss"):
        assert s_hf[key] == pytest.approx(s_run[key], abs=1e-5), key


def test_a_sigterm_stops_the_finetune_and_it_resumes_bit_exact(base_run, tmp_path):
    from test_reliability import SignalAt

    from rankscope.train.finetune import FinetuneTrainer

    cfg = ft_config(base_run, "method.name=so", "method.so.density=0.05", "method.so.support_every=2")
    straight = finetune(cfg, tmp_path / "straight", **QUIET)
    from rankscope.train.callbacks import build_callbacks
    from rankscope.train.finetune_callback import FewshotCallback

    trainer = FinetuneTrainer(cfg, tmp_path / "resumed", callbacks=[*build_callbacks(cfg), FewshotCallback(), SignalAt(4, signal.SIGTERM)],
                              **QUIET)
    with pytest.raises(Preempted):
        trainer.run()
    resumed = finetune(cfg, tmp_path / "resumed", **QUIET)
    assert_same_final_weights(tmp_path / "straight", tmp_path / "resumed", files=("model", "optimizer"))
    for key in straight:
        if key.startswith(("fewshot_", "dw_")):
            assert resumed[key] == straight[key], key


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_bad_base_is_one_line(base_run, data_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "not found" in _one_line_error(["finetune", str(tmp_path / "nope"), "-o", out], capsys)
    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert "not a LLaMA architecture" in _one_line_error(["finetune", str(gpt), "-o", out], capsys)
    assert "no checkpoint at --step 5" in _one_line_error(["finetune", str(base_run), "--step", "5", "-o", out], capsys)
    line = _one_line_error(["finetune", str(base_run), "-o", out, *FT, "data.tokenizer_vocab_size=400"], capsys)
    assert "does not match the corpus tokenizer" in line
    assert "model.* comes from BASE" in _one_line_error(["finetune", str(base_run), "-o", out, "model.d_model=32"], capsys)
    line = _one_line_error(["finetune", str(base_run), "-o", out, *FT, "finetune.shots=1", "train.seq_len=64"], capsys)
    assert "fewer than train.seq_len + 1" in line
    assert not Path(out).exists() or not any(Path(out).iterdir())


# --------------------------------------------------------------------------- LoRA against peft
def test_lora_finetune_equals_peft_lora_after_10_steps(base_run):
    from peft import LoraConfig, get_peft_model

    from rankscope.adapters.lora import lora_modules
    from rankscope.methods import build_model
    from rankscope.model import Decoder

    cfg = ft_config(base_run, "method.name=lora", "method.lora.rank=4", "method.lora.alpha=8", "method.lora.dropout=0.0",
                    "train.weight_decay=0.0", "train.grad_clip=0.0", "train.max_steps=10")
    base = open_base(base_run)
    corpus = prepare(cfg.data, log=lambda *_: None)
    fs = build_fewshot(corpus, cfg.finetune, cfg.train.seed)
    from rankscope.data.fewshot import stream_tokens
    from rankscope.data.stream import BatchStream

    stream = BatchStream(stream_tokens(fs.shots), 32, 4, 1, cfg.train.seed)
    ours, method = build_model(cfg, None, torch.device("cpu"), init=base.state)
    opt = method.build_optimizer(ours, torch.device("cpu"))

    theirs = Decoder(cfg.model)
    theirs.load_state_dict(base.state)
    targets = cfg.method.options.targets
    theirs = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    for name, layer in lora_modules(ours).items():  # the same initial adapters
        mod = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            mod.lora_A["default"].weight.copy_(layer.lora_A)
            mod.lora_B["default"].weight.copy_(layer.lora_B)
    for n, p in theirs.named_parameters():  # LoRA trains the embeddings, norms and head full-rank too (methods/lora.py)
        if "lora_" not in n and "base_layer" not in n:
            p.requires_grad_(True)
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == sum(p.numel() for p in ours.parameters() if p.requires_grad)
    t = cfg.train
    peft_opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                 weight_decay=0.0)
    for step in range(10):
        x, y = stream.get(step)
        for model, o in ((ours, opt), (theirs, peft_opt)):
            for g in o.param_groups:
                g["lr"] = t.lr * method.lr_multiplier(step)
            model.train()
            model(x, y).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    x, _ = stream.get(99)
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x)
    assert (a - b).abs().max().item() < 1e-5
    start = Decoder(cfg.model)
    start.load_state_dict(base.state)
    with torch.no_grad():
        assert (a - start.eval()(x)).abs().max() > 1e-2  # the comparison can fail: both models moved away from the base


# --------------------------------------------------------------------------- studies
def test_a_study_point_with_a_base_runs_finetune_and_pretrain_is_validated(data_dir, tmp_path):
    from helpers import write_study

    from rankscope.core.errors import ConfigError
    from rankscope.studies.points import point_commands
    from rankscope.studies.study import load_study

    (tmp_path / "pre.yaml").write_text(yaml.safe_dump({"model": {"preset": "micro"}, "train": {"max_steps": 5, "warmup_steps": 1}}))
    path = write_study(tmp_path, data_dir, {"method.name": ["lora", "so"]}, *FT, pretrain={"config": "pre.yaml"})
    study = load_study(path)
    for p in study.points:
        assert p.config["finetune"]["base"] == str(tmp_path / "runs" / "pretrain" / "base")
        (step, argv), = point_commands(p, study, 1)
        assert argv[3:7] == ["finetune", str(tmp_path / "runs" / "pretrain" / "base"), "--config", str(p.run_dir / "study-config.yaml")]
    plain = load_study(write_study(tmp_path, data_dir, {"method.name": ["lora"]}))
    assert point_commands(plain.points[0], plain, 1)[0][1][3] == "train"  # pretraining points are unchanged
    for metric in ("fewshot_test_loss", "fewshot_gain", "fewshot_gap"):  # the lr is never chosen on (or from) test data
        tune = {"field": "train.lr", "grid": [1e-3, 2e-3], "metric": metric}
        with pytest.raises(ConfigError, match="is not a validation figure"):
            load_study(write_study(tmp_path, data_dir, {"method.name": ["lora"]}, *FT, tune=tune))
    with pytest.raises(ConfigError, match="pretrain must be a mapping"):
        load_study(write_study(tmp_path, data_dir, {"method.name": ["lora"]}, pretrain="pre.yaml"))


# --------------------------------------------------------------------------- user files and the update measures
def test_user_files_are_a_target_split_by_content(base_run, tmp_path):
    for i in range(12):
        (tmp_path / f"note{i}.txt").write_text(f"note {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(60)))
    cfg = ft_config(base_run, "finetune.target=files", f"finetune.files=[{tmp_path}/*.txt]", "finetune.shots=2", "finetune.shot_len=0",
                    "finetune.val_docs=0", "finetune.test_docs=0")
    fs = build_fewshot(prepare(cfg.data, log=lambda *_: None), cfg.finetune, 0)
    assert fs.domain == "files" and len(fs.shots.rows) == 2
    n = len(fs.pool.rows) + len(fs.val.rows) + len(fs.test.rows)
    assert n == 12 and len(fs.val.rows) and len(fs.test.rows)
    again = build_fewshot(prepare(cfg.data, log=lambda *_: None), cfg.finetune, 0)
    assert np.array_equal(stream(again.shots), stream(fs.shots))


def stream(ds):
    from rankscope.data.fewshot import stream_tokens

    return stream_tokens(ds)


def test_update_measures_on_updates_whose_answer_is_known():
    from rankscope.train.finetune_callback import update_measures

    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(32, 32))
    V, _ = torch.linalg.qr(torch.randn(16, 16))
    s = torch.linspace(10, 1, 16)
    w0 = (U[:, :16] * s) @ V.T  # top-8 left singular vectors: U[:, :8]
    inside = w0 + 0.1 * torch.outer(U[:, 0], V[:, 3])  # rank 1, in the top subspace
    outside = w0 + 0.1 * torch.outer(U[:, 20], V[:, 3])  # rank 1, orthogonal to it
    sparse = w0.clone()
    sparse[0, :4] += 1.0  # 4 of 512 entries
    name = "blocks.0.attn.wv.weight"
    m_in = update_measures({name: w0}, {name: inside})[name]
    m_out = update_measures({name: w0}, {name: outside})[name]
    m_sp = update_measures({name: w0}, {name: sparse})[name]
    assert m_in["top_overlap"] == pytest.approx(1.0, abs=1e-6) and m_out["top_overlap"] == pytest.approx(0.0, abs=1e-6)
    assert m_in["per"] == pytest.approx(1 / 16, abs=1e-3)  # a rank-1 update: effective rank 1 of min(m, n) = 16
    assert m_sp["changed"] == pytest.approx(4 / 512) and m_in["random_overlap"] == 8 / 32
    assert m_sp["cond_numerical"] == pytest.approx(1.0, rel=1e-4)  # one nonzero row: a single singular value
