"""Adaptive-rank and hybrid ReLoRA, and equal-memory matching."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from rankscope.methods import load_config
from rankscope.core.errors import ConfigError
from rankscope.evaluate.loading import load_trained
from rankscope.methods import build_method
from rankscope.methods.adaptive import allocate_ranks, update_effective_rank
from rankscope.methods.memory import match_memory, measured_state_bytes
from rankscope.adapters.lora import LoRALinear, lora_modules
from rankscope.model import Decoder
from rankscope.train.loop import train
from helpers import assert_same_final_weights, crash_and_resume, tiny_config, tiny_overrides

CYCLE = ["method.relora.reset_every=10", "method.relora.restart_warmup_steps=1"]  # ReLoRA cycles that fit a tiny run


def rows_of(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def learned(rows, drop=0.3):
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    return sum(losses[-4:]) / 4 < losses[0] - drop


# --------------------------------------------------------------------------- rank allocation
def test_allocation_never_exceeds_budget_and_respects_bounds():
    rnd = random.Random(0)
    for _ in range(300):
        n = rnd.randint(1, 8)
        names = [f"l{i}" for i in range(n)]
        costs = {k: rnd.randint(8, 200) for k in names}
        caps = {k: rnd.randint(1, 64) for k in names}
        scores = {k: rnd.choice([0.0, rnd.random() * 10]) for k in names}
        rank_min = rnd.randint(1, 3)
        floor = sum(min(rank_min, caps[k]) * costs[k] for k in names)
        budget = floor + rnd.randint(0, 5000)
        ranks = allocate_ranks(scores, costs, caps, budget, rank_min)
        assert sum(ranks[k] * costs[k] for k in names) <= budget
        assert all(min(rank_min, caps[k]) <= ranks[k] <= caps[k] for k in names)
        # nothing affordable is left on the table
        free = budget - sum(ranks[k] * costs[k] for k in names)
        assert all(ranks[k] == caps[k] or costs[k] > free for k in names)
    with pytest.raises(ConfigError):
        allocate_ranks({"a": 1.0}, {"a": 10}, {"a": 4}, 5, 1)


def test_allocation_is_proportional_to_scores():
    ranks = allocate_ranks({"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 10, "b": 10, "c": 10}, {"a": 64, "b": 64, "c": 64}, 700, 1)
    assert ranks == {"a": 10, "b": 20, "c": 40}


def test_new_ranks_follow_the_effective_rank_of_each_update(data_dir):
    cfg = tiny_config(data_dir, "method.name=adaptive", "method.adaptive.rank=4", "method.adaptive.targets=[wq,wo]", "method.adaptive.reset_every=5", "method.adaptive.restart_warmup_steps=1")
    model = Decoder(cfg.model)
    method = build_method(cfg)
    method.prepare_model(model)
    mods = lora_modules(model)
    budget = method.budget({n: m.base for n, m in mods.items()})
    assert set(method.ranks.values()) == {4}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, m in mods.items():
            B = torch.randn(m.lora_B.shape, generator=g)
            if name.endswith("wo"):  # rank-1 updates: effective rank 1
                B[:, 1:] = 0
            else:  # orthogonal columns, equal norms, orthonormal A rows: effective rank exactly 4
                B = torch.linalg.qr(B).Q
                m.lora_A.copy_(torch.linalg.qr(torch.randn(m.lora_A.shape[1], 4, generator=g)).Q.T)
            m.lora_B.copy_(B)
    eranks = {n: update_effective_rank(m) for n, m in mods.items()}
    for n, e in eranks.items():
        assert e == pytest.approx(1.0 if n.endswith("wo") else 4.0, rel=1e-6)
    rows = method.merge_and_restart(5, model)
    assert method.pending and rows["adaptive_rank_max"] > 4
    costs = {n: m.base.in_features + m.base.out_features for n, m in mods.items()}
    assert sum(method.ranks[n] * costs[n] for n in mods) <= budget
    for n in mods:
        if n.endswith("wq"):
            assert method.ranks[n] > 4
        else:
            assert method.ranks[n] < 4


def test_adaptive_run_changes_ranks_within_budget_and_resumes_bit_exactly(data_dir, tmp_path):
    # merges (and re-wraps) after steps 6, 12, 18, 24; checkpoint at 16 (mid-cycle, non-uniform ranks), crash at 17
    over = tiny_overrides(data_dir, "method.name=adaptive", "method.adaptive.rank=8", "method.adaptive.reset_every=6", "method.adaptive.restart_warmup_steps=2",
                          "method.adaptive.dropout=0", "train.max_steps=24", "checkpoint.every=4", "checkpoint.keep_steps=[16]")
    summary = train(load_config(None, over), tmp_path / "straight", log=lambda s: None)
    assert summary["adaptive_adapter_params"] <= summary["adaptive_rank_budget"]
    assert len(set(summary["adaptive_ranks"].values())) > 1  # no longer uniform
    rows = rows_of(tmp_path / "straight")
    assert learned(rows) and [r["relora_merge"] for r in rows if "relora_merge" in r] == [1, 2, 3, 4]
    _, resumed = crash_and_resume(over, tmp_path, crash_at=17)  # "straight" was trained above and is reused
    ranks = json.loads((tmp_path / "resumed/checkpoints/step_000016/meta.json").read_text())["method"]["ranks"]
    assert ranks.keys() == summary["adaptive_ranks"].keys() and len(set(ranks.values())) > 1  # re-chosen at step 12
    ckpt = load_file(str(tmp_path / "resumed/checkpoints/step_000016/model.safetensors"))
    assert all(ckpt[f"{n}.lora_A"].shape[0] == r for n, r in ranks.items())
    loaded = load_trained(tmp_path / "straight").model  # built from the config alone: ranks come from the weights
    assert {n: m.rank for n, m in lora_modules(loaded).items()} == summary["adaptive_ranks"]
    assert all(m.scaling == 32.0 / 8 for m in lora_modules(loaded).values())  # alpha / method.rank on every layer
    assert_same_final_weights(tmp_path / "straight", resumed, files=("model", "optimizer"))


def test_grow_schedule_raises_uniform_ranks_per_cycle(data_dir):
    cfg = tiny_config(data_dir, "method.name=adaptive", "method.adaptive.rank_schedule=grow", "method.adaptive.rank=8", "method.adaptive.rank_min=2",
                      "method.adaptive.reset_every=10", "train.max_steps=40", "method.adaptive.restart_warmup_steps=1")
    model = Decoder(cfg.model)
    method = build_method(cfg)
    method.prepare_model(model)
    seen = [sorted(set(method.ranks.values()))]
    for c in range(1, 4):
        method.merge_and_restart(10 * c, model)
        seen.append(sorted(set(method.ranks.values())))
    assert seen == [[2], [4], [6], [8]]


# --------------------------------------------------------------------------- hybrid
def test_hybrid_trains_chosen_components_full_rank(data_dir, tmp_path):
    over = tiny_overrides(data_dir, "method.name=hybrid", "method.hybrid.rank=4", "method.hybrid.full_rank_targets=[wv,blocks.0.mlp.w2]",
                          "method.hybrid.reset_every=10", "method.hybrid.restart_warmup_steps=2", "train.max_steps=20", "checkpoint.every=20")
    cfg = load_config(None, over)
    model = Decoder(cfg.model)
    method = build_method(cfg)
    method.prepare_model(model)
    for name, m in model.named_modules():
        if name.endswith(".wv") or name == "blocks.0.mlp.w2":
            assert isinstance(m, torch.nn.Linear) and m.weight.requires_grad
        elif name.rsplit(".", 1)[-1] in ("wq", "wk", "wo", "w1", "w2", "w3"):
            assert isinstance(m, LoRALinear)
    summary = train(cfg, tmp_path / "run", log=lambda s: None)
    assert learned(rows_of(tmp_path / "run")) and summary["full_rank_layers"] == cfg.model.n_layers + 1
    torch.manual_seed(cfg.train.seed)
    init = Decoder(cfg.model).state_dict()
    final = load_file(str(tmp_path / "run/checkpoints/step_000020/model.safetensors"))
    assert "blocks.0.attn.wv.weight" in final and "blocks.0.attn.wv.lora_A" not in final
    assert not torch.equal(final["blocks.0.attn.wv.weight"], init["blocks.0.attn.wv.weight"])
    assert not torch.equal(final["blocks.0.mlp.w2.weight"], init["blocks.0.mlp.w2.weight"])
    assert "blocks.1.mlp.w2.lora_A" in final
    with pytest.raises(ConfigError):
        build_method(tiny_config(data_dir, "method.name=hybrid", "method.hybrid.full_rank_targets=[nope]")).prepare_model(Decoder(cfg.model))


# --------------------------------------------------------------------------- equal memory
def test_match_memory_sets_rank_and_density(data_dir):
    ref = tiny_config(data_dir, "method.name=relora", "method.relora.rank=4", *CYCLE)
    target = measured_state_bytes(ref)
    got = match_memory(tiny_config(data_dir, "method.name=relora", "method.relora.rank=1", *CYCLE), target)
    assert got.method.options.rank == 4 and measured_state_bytes(got) == target
    so = match_memory(tiny_config(data_dir, "method.name=so", "method.so.support_every=10"), target)
    b = measured_state_bytes(so)
    assert 0.98 * target <= b <= target
    with pytest.raises(ConfigError):
        match_memory(tiny_config(data_dir), target)


def test_study_option_match_memory_sets_each_points_knob(data_dir, tmp_path):
    from rankscope.methods import config_from_dict
    from rankscope.studies.study import load_study

    study = tmp_path / "s.yaml"
    overrides = "\n".join(f"  - {o}" for o in tiny_overrides(data_dir, "method.relora.rank=4", "method.relora.reset_every=10",
                                                                "method.relora.restart_warmup_steps=1", "method.so.support_every=10",
                                                                "method.galore.rank=4", "method.galore.update_proj_gap=10"))
    study.write_text(f"name: mm\noverrides:\n{overrides}\ngrid:\n  method.name: [full, relora, so, galore]\nmatch_memory: relora\n")
    points = {p.values["method.name"]: config_from_dict(p.config) for p in load_study(study, tmp_path / "runs").points}
    target = measured_state_bytes(points["relora"])
    assert points["relora"].method.options.rank == 4 and points["galore"].method.name == "galore"
    for name in ("so", "galore"):
        b = measured_state_bytes(points[name])
        assert 0.95 * target <= b <= target, name
    assert points["so"].method.options.density != 0.05  # the default was replaced
    bigger = points["galore"]
    bigger.method.options.rank += 1
    assert measured_state_bytes(bigger) > target  # the largest rank that fits
