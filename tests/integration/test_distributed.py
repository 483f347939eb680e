"""Data parallelism on CPU with gloo (DDP and FSDP2): N processes behave like one with N times the batch."""

import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_config

from rankscope.parallel import distributed
from rankscope.train.loop import Trainer, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MergeChecker:
    """On every rank: after each ReLoRA merge, gather a hash of all weights and record whether equal."""

    def __init__(self, out: Path, stop_at: int | None = None):
        self.out, self.stop_at, self.checks = out, stop_at, []

    def wants(self, trainer, step):
        return False  # reads trainer.model's own tensors, not the gathered eval model

    def on_step_end(self, trainer, step):
        if self.stop_at is not None and step == self.stop_at + 1:
            raise KeyboardInterrupt
        if trainer.cfg.method.name == "relora" and not trainer.sharded and step % trainer.cfg.method.options.reset_every == 0:
            h = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in trainer.model.state_dict().values())).hexdigest()
            hashes = [None] * dist.get_world_size()
            dist.all_gather_object(hashes, h)
            self.checks.append((step, len(set(hashes)) == 1))
            if dist.get_rank() == 0:
                self.out.write_text(json.dumps(self.checks))


def worker(rank, world, port, data_dir, run_dir, overrides, stop_at):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if os.environ.get("TEST_LORA_PATH"):  # every LoRA layer on one forward path (adapters.paths.choose_path's pick)
        from rankscope.adapters import paths

        paths.choose_path = lambda *a, path=os.environ["TEST_LORA_PATH"], **k: path
    trainer = Trainer(tiny_config(data_dir, *overrides), Path(run_dir), log=lambda *_: None)
    trainer.callbacks.append(MergeChecker(Path(run_dir) / "merge_checks.json", stop_at))
    try:
        trainer.run()
    except KeyboardInterrupt:
        pass
    trainer = None  # as rankscope.train.loop.train: drop the trainer, then shut the group down
    distributed.shutdown()


def spawn(world, data_dir, run_dir, overrides, stop_at=None):
    mp.spawn(worker, args=(world, free_port(), str(data_dir), str(run_dir), list(overrides), stop_at), nprocs=world, join=True)


def assert_same_curve(a, b, rel=1e-5):
    """Two loss curves of the same length agree step by step to `rel` (relative)."""
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b), 1):
        assert abs(x - y) <= rel * abs(x), (step, x, y)


def losses(run):
    return [json.loads(x)["train_loss"] for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if "train_loss" in x]


COMMON = ("train.max_steps=12", "checkpoint.every=4", "train.tensorboard=false")


@pytest.fixture(scope="module")
def prepared(data_dir):
    train(tiny_config(data_dir, "train.max_steps=3", "train.tensorboard=false"), Path(data_dir) / "warm", log=lambda *_: None)
    return data_dir


def test_two_processes_match_one_with_the_same_global_batch(prepared, tmp_path):
    train(tiny_config(prepared, *COMMON, "train.batch_size=8"), tmp_path / "one", log=lambda *_: None)
    spawn(2, prepared, tmp_path / "two", [*COMMON, "train.batch_size=4"])
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 12
    assert_same_curve(a, b)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens"] == 12 * 8 * 32


def test_so_ranks_draw_the_same_supports_and_match_one_process(prepared, tmp_path):
    # so's G is seeded by (seed, tensor, period): two DDP ranks re-draw it every 3 steps like one process
    so = [*COMMON, "method.name=so", "method.so.density=0.1", "method.so.support_every=3"]
    train(tiny_config(prepared, *so, "train.batch_size=8"), tmp_path / "one", log=lambda *_: None)
    spawn(2, prepared, tmp_path / "two", [*so, "train.batch_size=4"])
    assert_same_curve(losses(tmp_path / "one"), losses(tmp_path / "two"))
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / r / "checkpoints/step_000012/optimizer.safetensors")) for r in ("one", "two"))
    supports = [k for k in a if k.endswith("support")]
    assert supports and all(torch.equal(a[k], b[k]) for k in supports)


def test_relora_ranks_hold_identical_weights_after_every_merge(prepared, tmp_path):
    spawn(2, prepared, tmp_path / "relora", [*COMMON, "train.batch_size=2", "method.name=relora", "method.relora.rank=4", "method.relora.reset_every=3", "method.relora.restart_warmup_steps=1"])
    checks = json.loads((tmp_path / "relora" / "merge_checks.json").read_text())
    assert [s for s, _ in checks] == [3, 6, 9, 12] and all(ok for _, ok in checks)


def test_resume_on_a_different_number_of_ranks(prepared, tmp_path):
    train(tiny_config(prepared, *COMMON, "train.batch_size=8"), tmp_path / "ref", log=lambda *_: None)
    spawn(2, prepared, tmp_path / "run", [*COMMON, "train.batch_size=4"], stop_at=8)
    # continue the 2-rank run on 1 process with the same global batch (8 rows per step)
    run = tmp_path / "run"
    import yaml

    cfg_file = run / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["train"]["batch_size"] = 8  # same global batch on one process
    cfg_file.write_text(yaml.safe_dump(cfg))
    from rankscope.methods import config_from_dict

    train(config_from_dict(cfg), run, log=lambda *_: None)
    a, b = losses(tmp_path / "ref"), losses(run)
    assert len(b) == 12
    assert_same_curve(a, b)


# --------------------------------------------------------------------------- FSDP2 (fully_shard)
RELORA = ("method.name=relora", "method.relora.rank=3", "method.relora.reset_every=3", "method.relora.restart_warmup_steps=1")


def final_state(run):
    from rankscope.store.checkpoint import open_checkpoint

    ck = open_checkpoint(run)
    return ck.load("model"), ck.load("optimizer")


def assert_close_states(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, (a[k].float() - b[k].float()).abs().max())


def test_fsdp_two_processes_match_one_with_gradient_accumulation(prepared, tmp_path):
    train(tiny_config(prepared, *COMMON, "train.batch_size=8"), tmp_path / "one", log=lambda *_: None)
    layout = [*COMMON, "train.batch_size=2", "train.grad_accum=2"]
    spawn(2, prepared, tmp_path / "fsdp", [*layout, "train.parallel=fsdp"])
    spawn(2, prepared, tmp_path / "ddp", layout)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert len(a) == len(b) == 12
    assert_same_curve(a, b)
    # the checkpoint of a sharded run holds full tensors under the same names as an unsharded one;
    # against DDP with the same layout only the reduction (reduce-scatter vs all-reduce) differs. Its rounding,
    # through 12 AdamW steps at lr 3e-3 (m / sqrt(v) of a near-zero gradient), moves a parameter by ~1e-6: measured
    # 9.7e-7 (embed.weight) with the earlier loss arithmetic, 1.5e-6 with the in-place log-sum-exp. A sharding
    # error moves parameters by lr-sized steps, over 1,000x that; the moments stay within 1e-6 (measured 2.4e-8).
    (ma, oa), (mb, ob) = final_state(tmp_path / "ddp"), final_state(tmp_path / "fsdp")
    assert_close_states(ma, mb, 5e-6)
    assert_close_states(oa, ob, 1e-6)


def shard_ops_worker(rank, world, port, out):
    """On uneven shards (5 output rows, LoRA rank 3, over 2 ranks): every ReLoRA reset mode and
    the merge give exactly the tensors the same operation gives on the unsharded layer."""
    import copy
    import os

    from torch.distributed.fsdp import fully_shard

    from rankscope.adapters.common import seeded_generator
    from rankscope.adapters.lora import LoRALinear
    from rankscope.methods.relora import reset_state_
    from rankscope.parallel.sharding import full

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    plain = LoRALinear(torch.nn.Linear(7, 5, bias=False), rank=3, alpha=6.0)
    sharded = copy.deepcopy(plain)
    fully_shard(sharded)
    results = {}
    for name, layer in (("plain", plain), ("sharded", sharded)):
        opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=0.1)
        for _ in range(2):  # B and A both non-zero and with moments
            layer(torch.randn(4, 7, generator=torch.Generator().manual_seed(1))).square().sum().backward()
            opt.step()
            opt.zero_grad()
        got = {}
        for mode in ("random_prune", "magnitude_prune", "zero"):
            for i, p in enumerate((layer.lora_A, layer.lora_B)):
                state = {k: v.clone() for k, v in opt.state[p].items()}
                reset_state_(state, mode, 0.5, seeded_generator(9, i))
                got.update({f"{mode}.{i}.{k}": full(v) for k, v in state.items() if k != "step"})
        layer.merge()
        got["merged"] = full(layer.base.weight)
        results[name] = got
    same = all(torch.equal(results["plain"][k], results["sharded"][k]) for k in results["plain"])
    if rank == 0:
        Path(out).write_text(json.dumps({"same": same, "keys": len(results["plain"])}))
    sharded = opt = None
    distributed.shutdown()


def test_relora_resets_and_merge_on_uneven_shards_equal_the_unsharded_ones(tmp_path):
    out = tmp_path / "result.json"
    mp.spawn(shard_ops_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    assert json.loads(out.read_text()) == {"same": True, "keys": 13}


def test_fsdp_relora_matches_ddp_through_merges_resets_and_in_loop_analysis(prepared, tmp_path):
    """Merges, re-drawn adapters and pruned moments on uneven shards (rank 3 over 2 ranks), the
    per-cycle updates saved, and the in-loop rank metrics and evaluation read from rank 0's
    gathered replica. (magnitude_prune is left to the test above: its top-k cut is discontinuous,
    so 1e-7 differences between the two reductions pick other entries over a run.)"""
    extra = [*COMMON, "train.batch_size=2", *RELORA, "analysis.every=4", "method.relora.save_cycle_updates=true"]
    spawn(2, prepared, tmp_path / "ddp", extra)
    spawn(2, prepared, tmp_path / "fsdp", [*extra, "train.parallel=fsdp"])
    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("ddp", "fsdp")}
    assert len(rows["ddp"]) == len(rows["fsdp"])
    merged_keys = 0
    for r, s in zip(rows["ddp"], rows["fsdp"]):
        assert r.keys() == s.keys()
        for k, v in r.items():
            if isinstance(v, float) and k != "tokens_per_s":
                # condition numbers (s_max / s_min ~ 1e4 here) magnify 1e-6 weight differences
                tol = 1e-2 if k.startswith("rank/cond/") else 1e-4
                assert abs(v - s[k]) <= tol * max(1.0, abs(v)), (r["step"], k, v, s[k])
        merged_keys += sum(k.endswith("/after_merge") for k in r)
    assert merged_keys > 0 and any("rank/per/ov" in r for r in rows["fsdp"])
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["relora_merges"] == 4 and "val_loss_macro" in summary
    # moments of every parameter split over 2 ranks (uneven rows: rank 0 holds at least half)
    assert 0.5 <= summary["optimizer_state_bytes_per_rank"] / summary["optimizer_state_bytes"] < 0.6
    (ma, oa), (mb, ob) = final_state(tmp_path / "ddp"), final_state(tmp_path / "fsdp")
    assert_close_states(ma, mb, 1e-5)
    assert_close_states(oa, ob, 1e-5)
    from safetensors.torch import load_file

    updates = {name: sorted((tmp_path / name / "relora_updates").iterdir()) for name in ("ddp", "fsdp")}
    assert [f.name for f in updates["ddp"]] == [f.name for f in updates["fsdp"]] and len(updates["fsdp"]) == 4
    for a, b in zip(updates["ddp"], updates["fsdp"]):
        assert_close_states(load_file(a), load_file(b), 1e-5)


@pytest.mark.parametrize("path", ["merged", "hybrid"])
def test_fsdp_relora_on_each_dropout_free_path_matches_ddp(prepared, tmp_path, monkeypatch, path):
    """Adapter dropout 0, every layer on the merged or the hybrid path: FSDP (the factors' gradients
    reach uneven shards, merges write them) trains as DDP. That the paths are one function is
    tested in fp64 in test_lora.py; across paths fp32 rounding grows through Adam to ~1e-4 here."""
    extra = [*COMMON, "train.batch_size=2", *RELORA, "method.relora.dropout=0.0"]
    monkeypatch.setenv("TEST_LORA_PATH", path)
    spawn(2, prepared, tmp_path / "ddp", extra)
    spawn(2, prepared, tmp_path / "fsdp", [*extra, "train.parallel=fsdp"])
    assert_same_curve(losses(tmp_path / "ddp"), losses(tmp_path / "fsdp"))
    (ma, _), (mb, _) = final_state(tmp_path / "ddp"), final_state(tmp_path / "fsdp")
    assert_close_states(ma, mb, 1e-5)


def test_fsdp_bf16_trains_like_ddp_bf16(prepared, tmp_path):
    """bf16: FSDP all-gathers bf16 weights (norms included) where DDP autocasts the matmuls only,
    so the curves agree closely but not to fp32 precision."""
    extra = [*COMMON, "train.batch_size=4", "train.precision=bf16"]
    spawn(2, prepared, tmp_path / "ddp", extra)
    spawn(2, prepared, tmp_path / "fsdp", [*extra, "train.parallel=fsdp"])
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert len(a) == len(b) == 12 and b[-1] < b[0] - 0.2
    assert_same_curve(a, b, 1e-2)


@pytest.mark.slow
def test_fsdp_with_torch_compile_matches_eager(prepared, tmp_path):
    # no adapter dropout: compiled code draws its masks from another generator than eager
    extra = [*COMMON, "train.batch_size=4", "train.parallel=fsdp", *RELORA, "method.relora.dropout=0"]
    spawn(2, prepared, tmp_path / "eager", extra)
    spawn(2, prepared, tmp_path / "compiled", [*extra, "train.compile=true"])
    assert_same_curve(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), 1e-4)


def set_run_config(run, **train_fields):
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"].update(train_fields)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return cfg


def test_fsdp_checkpoints_resume_across_layouts(prepared, tmp_path):
    """FSDP(2) stopped at step 8 resumes on one unsharded process; DDP(2) stopped at step 8
    resumes under FSDP(2): the checkpoint is the same either way (full tensors)."""
    from rankscope.methods import config_from_dict

    # no adapter dropout: one process with 8 rows draws other masks than two with 4
    relora = [*RELORA, "method.relora.dropout=0"]
    train(tiny_config(prepared, *COMMON, "train.batch_size=8", *relora), tmp_path / "ref", log=lambda *_: None)
    sharded = tmp_path / "fsdp_then_one"
    spawn(2, prepared, sharded, [*COMMON, "train.batch_size=4", *relora, "train.parallel=fsdp"], stop_at=8)
    train(config_from_dict(set_run_config(sharded, batch_size=8, parallel="ddp")), sharded, log=lambda *_: None)
    replicated = tmp_path / "ddp_then_fsdp"
    spawn(2, prepared, replicated, [*COMMON, "train.batch_size=4", *relora], stop_at=8)
    set_run_config(replicated, parallel="fsdp")
    spawn(2, prepared, replicated, [*COMMON, "train.batch_size=4", *relora, "train.parallel=fsdp"])
    ref = losses(tmp_path / "ref")
    for run in (sharded, replicated):
        got = losses(run)
        assert len(got) == 12
        assert_same_curve(ref, got)
