import json

import pytest
import helpers

from rankscope.core.errors import ConfigError
from rankscope.studies.points import point_state
from rankscope.studies.study import load_study
from rankscope.studies.sweep import run_study


# schedules that fit the 3- and 6-step runs below, shared by the grids' methods (each takes those it has)
FITS = {"reset_every": 2, "restart_warmup_steps": 1, "support_every": 2, "update_proj_gap": 2}


def own_options(method: str, **options) -> list[str]:
    """Run-config overrides that put each of `options` its method has under `method.<method>` (the nested form)."""
    from rankscope.studies.study import method_fields

    return [f"method.{method}.{k}={v}" for k, v in options.items() if k in method_fields(method)]


def write_study(tmp_path, data_dir, grid, *overrides, **extra):
    return helpers.write_study(tmp_path, data_dir, grid, "train.max_steps=6", "train.threads=1", *overrides, **extra)


def test_grid_expands_to_the_cartesian_product(tmp_path, data_dir):
    study = load_study(write_study(tmp_path, data_dir, {"train.seed": [0, 1, 2], "train.lr": [1e-3, 2e-3]}, when={"train.seed=2": ["train.max_steps=8"]}))
    assert len(study.points) == 6
    names = [p.name for p in study.points]
    assert len(set(names)) == 6 and names[0] == "seed=0,lr=1e-3"
    assert {p.config["train"]["max_steps"] for p in study.points if p.values["train.seed"] == 2} == {8}
    assert {p.config["train"]["max_steps"] for p in study.points if p.values["train.seed"] != 2} == {6}


@pytest.mark.parametrize(
    "grid,message",
    [({"train.nonsense": [1]}, "not a config field"), ({}, "non-empty lists"), ({"train.seed": []}, "non-empty lists"), ({"model.n_heads": [5]}, "must divide")],
)
def test_bad_studies_are_clear_errors(tmp_path, data_dir, grid, message):
    with pytest.raises(ConfigError, match=message):
        load_study(write_study(tmp_path, data_dir, grid))


def test_sweep_runs_skips_finished_resumes_partial_and_reports_failures(tmp_path, data_dir):
    path = write_study(tmp_path, data_dir, {"train.seed": [0, 1], "data.tokenizer": ["bpe", str(tmp_path / "missing.json")]})
    study = load_study(path)
    # a run interrupted earlier: train the first point to step 3 only
    from rankscope.methods import config_from_dict
    from rankscope.studies.points import prepare_point as _start
    from rankscope.train.loop import Trainer

    first = study.points[0]
    _start(first, study, 1)

    class Stop:
        def on_step_end(self, trainer, step):
            if step == 4:
                raise KeyboardInterrupt

    trainer = Trainer(config_from_dict(first.config), first.run_dir, log=lambda *_: None)
    trainer.callbacks.append(Stop())
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert point_state(first, study) == "left"

    points = run_study(study, parallel=2, show=lambda *_: None)
    status = {p.name: p.status for p in points}
    assert sum(s == "done" for s in status.values()) == 2 and sum(s == "failed" for s in status.values()) == 2
    failed = [p for p in points if p.status == "failed"][0]
    assert "tokenizer file" in failed.error and "not found" in failed.error
    assert "resumed from" in (first.run_dir / "sweep.log").read_text()
    summary = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert [r["status"] for r in summary["runs"]].count("failed") == 2

    # a second sweep re-runs nothing that finished
    mtimes = {p.name: (p.run_dir / "summary.json").stat().st_mtime for p in points if p.status == "done"}
    again = run_study(load_study(path), show=lambda *_: None)
    assert {p.name: (p.run_dir / "summary.json").stat().st_mtime for p in again if p.name in mtimes} == mtimes


def test_run_directory_of_another_study_is_refused(tmp_path, data_dir):
    path = write_study(tmp_path, data_dir, {"train.seed": [0]})
    study = load_study(path)
    study.points[0].run_dir.mkdir(parents=True)
    (study.points[0].run_dir / "study.json").write_text(json.dumps({"study": "other"}))
    with pytest.raises(ConfigError, match="belongs to study 'other'"):
        run_study(study, show=lambda *_: None)


# ------------------------------------------------------------------ method options shared across a grid over methods
def test_method_options_go_to_each_points_own_method_section(tmp_path, data_dir):
    shared = {"rank": 4, "reset_every": 2, "restart_warmup_steps": 1, "support_every": 3}
    when = {"train.seed=1": ["method_options.rank=2", "train.max_steps=8"], "method.name=so": ["method.so.density=0.1"]}
    study = load_study(write_study(tmp_path, data_dir, {"method.name": ["full", "relora", "so"], "train.seed": [0, 1]},
                                   "method.relora.rank=16", "method.relora.alpha=8", method_options=shared, when=when))
    cfg = {(p.values["method.name"], p.values["train.seed"]): p.config["method"] for p in study.points}
    assert cfg["full", 0] == {"name": "full", "full": {}}  # full has none of them: nothing, and no flat leftovers
    # the mapping overrides the base's relora section (rank 16), keeps what it does not name (alpha 8)
    relora = cfg["relora", 0]["relora"]
    assert (relora["rank"], relora["alpha"], relora["reset_every"], relora["restart_warmup_steps"]) == (4, 8, 2, 1)
    assert "support_every" not in relora and set(cfg["relora", 0]) == {"name", "relora"}
    assert cfg["relora", 1]["relora"]["rank"] == 2  # a matching `when` entry's method_options.* come after the mapping
    assert cfg["so", 0]["so"]["support_every"] == 3 and cfg["so", 0]["so"]["density"] == 0.1 and "rank" not in cfg["so", 0]["so"]


@pytest.mark.parametrize("shared,when,message", [
    ({"rnak": 4}, {}, "method_options.rnak is an option of no method of the grid (full, relora)"),
    ({}, {"train.seed=0": ["method_options.support_every=2"]}, "method_options.support_every is an option of no method"),
    ({"rank": 4, "reset_every": 2, "restart_warmup_steps": 1}, {}, None),
])
def test_a_shared_method_option_no_method_of_the_grid_has_is_one_line(tmp_path, data_dir, shared, when, message):
    path = write_study(tmp_path, data_dir, {"method.name": ["full", "relora"], "train.seed": [0]}, method_options=shared, when=when)
    if message is None:
        assert load_study(path).points
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_study(path)


def test_flat_method_overrides_in_a_study_point_to_method_options(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="go under `method_options:`"):
        load_study(write_study(tmp_path, data_dir, {"train.seed": [0]}, overrides=["method_options.rank=4"]))


@pytest.mark.filterwarnings("error::FutureWarning")  # the shipped studies hold no flat method option
@pytest.mark.parametrize("study,point,nested", [
    ("pico-body-cpu", {"model.d_model": 24, "method.name": "relora", "train.seed": 0},
     ["model.n_heads=3", "model.n_kv_heads=1", "model.ffn_dim=96", "method.relora.reset_every=20", "method.relora.restart_warmup_steps=1",
      "method.relora.dropout=0.1", "method.relora.targets=[wq,wk,wv,wo,w1,w2,w3]", "method.relora.optimizer_reset_every=0",
      "method.relora.optimizer_reset=random_prune", "method.relora.prune_fraction=0.999", "method.relora.warm_start_steps=0",
      "method.relora.rank=4", "method.relora.alpha=8", "train.lr=3e-3"]),
    ("pico-body-cpu", {"model.d_model": 96, "method.name": "full", "train.seed": 4}, ["train.lr=3e-3"]),
    ("quick", {"model.d_model": 32, "method.name": "relora", "train.seed": 1}, ["model.ffn_dim=128"]),
])
def test_a_migrated_shipped_study_resolves_to_the_nested_run_config(study, point, nested):
    """Each point's resolved config is the run config written out in the nested form by hand (what the flat form gave)."""
    import yaml

    from helpers import REPO
    from rankscope.methods import load_config

    path = REPO / "studies" / f"{study}.yaml"
    spec = yaml.safe_load(path.read_text())
    got = {json.dumps(v, sort_keys=True): p.config for v, p in load_study(path).planned()}
    values = {**point, **({"train.lr": spec["tune"]["grid"][0]} if "tune" in spec else {})}  # planned() puts a tuned field at its first value
    over = [*spec["overrides"], *(f"{k}={v}" for k, v in point.items()), *nested]
    want = load_config(path.parent / spec["base"], over).to_dict()
    assert got[json.dumps(values, sort_keys=True)] == want


# ------------------------------------------------------------------ staged studies (tuning, main, control)
import math  # noqa: E402

from rankscope.studies.local import LocalLauncher  # noqa: E402
from rankscope.studies.naming import point_name  # noqa: E402
from rankscope.studies.points import after_steps, mark_step_done, prepare_point  # noqa: E402
from rankscope.studies.progress import ProgressTable  # noqa: E402
from rankscope.studies.tuning import tune_decision  # noqa: E402

# each method's loss has its minimum at a known learning rate (a synthetic objective for the tuner)
OPTIMUM = {"full": 2.5e-3, "relora": 12e-3, "so": 0.1, "galore": 1e-5}


class FakeLauncher:
    """'Trains' a point by writing a summary whose loss is a known function of its learning rate."""

    def __init__(self, loss=None):
        self.calls: list[list[str]] = []
        self.loss = loss or (lambda cfg: 4.0 + math.log(cfg["train"]["lr"] / OPTIMUM[cfg["method"]["name"]]) ** 2)

    def run(self, points, study):
        self.calls.append([str(p.run_dir.relative_to(study.runs_dir)) for p in points])
        for p in points:
            prepare_point(p, study)
            summary = {"steps": p.config["train"]["max_steps"], "final_val_loss": self.loss(p.config)}
            (p.run_dir / "summary.json").write_text(json.dumps(summary))
            for step in after_steps(p, study):
                mark_step_done(p, step)
            p.status = "done"


def staged(tmp_path, data_dir, **extra):
    tune = {"field": "train.lr", "grid": [1e-3, 2e-3, 4e-3, 8e-3], "overrides": ["train.max_steps=3"], "widen": 2, **extra.pop("tune", {})}
    extra.setdefault("control", {"where": {"method.name": "relora"}, "lr_from": {"method.name": "full"}})
    return write_study(tmp_path, data_dir, {"method.name": ["full", "relora", "so", "galore"], "train.seed": [0, 1]}, method_options=FITS, tune=tune,
                       after=["eval"], **extra)


def test_tuner_picks_the_argmin_and_widens_at_both_edges(tmp_path, data_dir):
    path = staged(tmp_path, data_dir)
    study = load_study(path)
    assert [p.stage for p in study.points] == ["tune"] * 16  # 4 cells x 4 values, before any run
    fake = FakeLauncher()
    points = run_study(study, launcher=fake, show=lambda *_: None)
    cells = {ct.label: ct for ct in study.tuning}
    assert set(cells) == {"method=full", "method=relora", "method=so", "method=galore"}
    full, rel, so, gal = (cells[f"method={m}"] for m in ("full", "relora", "so", "galore"))
    assert (full.chosen, full.position, [d["value"] for d in full.tried]) == (2e-3, "interior", [1e-3, 2e-3, 4e-3, 8e-3])
    # best at 8e-3 -> 1.6e-2 -> (best 1.6e-2) -> 3.2e-2, where 1.6e-2 is interior
    assert (rel.chosen, rel.position, rel.widenings) == (0.016, "interior", {"low": 0, "high": 2})
    assert (so.chosen, so.position, so.edge_side, max(d["value"] for d in so.tried)) == (0.032, "edge", "high", 0.032)
    assert (gal.chosen, gal.position, gal.edge_side, min(d["value"] for d in gal.tried)) == (2.5e-4, "edge", "low", 2.5e-4)
    assert len(fake.calls[0]) == 16 and all(c.startswith("tune/") for c in fake.calls[0])
    assert len(fake.calls) == 5  # 3 tuning rounds (2 widenings), then one call for main and one for control
    main = [p for p in points if p.stage == "main"]
    assert len(main) == 8 and all(p.status == "done" for p in points)
    lrs = {p.values["method.name"]: p.config["train"]["lr"] for p in main}
    assert lrs == {"full": 2e-3, "relora": 0.016, "so": 0.032, "galore": 2.5e-4}
    assert {p.config["train"]["max_steps"] for p in main} == {6}
    assert {p.config["train"]["max_steps"] for p in points if p.stage == "tune"} == {3}
    control = [p for p in points if p.stage == "control"]
    assert [(p.values["method.name"], p.config["train"]["lr"], p.name) for p in control] == \
        [("relora", 2e-3, "method=relora,seed=0,lr=2e-3"), ("relora", 2e-3, "method=relora,seed=1,lr=2e-3")]
    assert control[0].run_dir == tmp_path / "runs" / "control" / "method=relora,seed=0,lr=2e-3"

    summary = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert summary["tuning"]["field"] == "train.lr" and summary["tuning"]["metric_source"] == "summary.json"
    rows = {c["label"]: c for c in summary["tuning"]["cells"]}
    assert rows["method=so"]["position"] == "edge" and rows["method=so"]["tried"][-1]["loss"] == pytest.approx(4 + math.log(0.32) ** 2)
    assert sorted({r["stage"] for r in summary["runs"]}) == ["control", "main", "tune"]
    assert summary["control"]["lr_from"] == {"method.name": "full"}

    # a second sweep re-uses every finished run and re-derives the same choices
    again_fake = FakeLauncher()
    again = load_study(path)
    run_study(again, launcher=again_fake, show=lambda *_: None)
    assert again_fake.calls == []
    assert [(c.label, c.chosen, c.position) for c in again.tuning] == [(c.label, c.chosen, c.position) for c in study.tuning]


@pytest.mark.parametrize(
    "losses,widen,expected",
    [
        ({1.0: 3.0, 2.0: 2.0, 4.0: 2.5}, 2, (None, "interior", 2.0, None)),
        ({1.0: 2.0, 2.0: 2.5, 4.0: 3.0}, 2, (0.5, "pending", None, None)),
        ({1.0: 3.0, 2.0: 2.5, 4.0: 2.0}, 2, (8.0, "pending", None, None)),
        ({0.25: 1.0, 0.5: 2.0, 1.0: 2.1, 2.0: 2.5, 4.0: 3.0}, 2, (None, "edge", 0.25, "low")),
        ({1.0: 2.0, 2.0: 2.5, 4.0: 3.0}, 0, (None, "edge", 1.0, "low")),
        ({1.0: 3.0, 2.0: 2.0, 4.0: float("nan")}, 2, (None, "interior", 2.0, None)),  # a diverged run brackets the optimum
        ({1.0: 3.0, 2.0: 2.5, 4.0: None}, 2, (None, "interior", 2.0, None)),  # so does a failed one
        ({1.0: None, 2.0: float("inf"), 4.0: None}, 2, (None, "failed", None, None)),
        ({1.0: 2.0, 2.0: 2.0, 4.0: 3.0}, 2, (0.5, "pending", None, None)),  # ties go to the smaller value
    ],
)
def test_tune_decision(losses, widen, expected):
    assert tune_decision([1.0, 2.0, 4.0], losses, widen) == expected


def test_a_cell_whose_tuning_fails_fails_its_main_points(tmp_path, data_dir):
    path = staged(tmp_path, data_dir, tune={"widen": 0})
    fake = FakeLauncher(lambda cfg: float("nan") if cfg["method"]["name"] == "galore" else 4.0 + cfg["train"]["lr"])
    points = run_study(load_study(path), launcher=fake, show=lambda *_: None)
    gal = [p for p in points if p.stage == "main" and p.values["method.name"] == "galore"]
    assert len(gal) == 2 and all(p.status == "failed" and "found no finite final_val_loss" in p.error for p in gal)
    assert not any("galore" in c for call in fake.calls[1:] for c in call)  # never launched
    assert all(p.status == "done" for p in points if p.stage == "main" and p.values["method.name"] != "galore")
    # full and relora both chose 1e-3: the control would repeat the main relora runs, so it is recorded as "= main" and not run
    control = [p for p in points if p.stage == "control"]
    assert control and all(p.status == "= main" and p.same_as == f"method=relora,seed={p.values['train.seed']},lr=1e-3" for p in control)
    assert not any(c.startswith("control/") for call in fake.calls for c in call)


def test_tuning_seed_is_outside_the_main_seeds_and_the_choice_is_confirmed_at_the_main_horizon(tmp_path, data_dir):
    path = staged(tmp_path, data_dir, tune={"confirm": 2})
    study = load_study(path)
    assert study.tune.seed == 1000 and all(p.values["train.seed"] == 1000 for p in study.points if p.stage == "tune")
    # at the short horizon the loss is lowest at 2e-3; at the main horizon (6 steps) 4e-3 wins: the choice changes
    fake = FakeLauncher(lambda cfg: 4.0 + (math.log(cfg["train"]["lr"] / (4e-3 if cfg["train"]["max_steps"] == 6 else 2.5e-3))) ** 2)
    points = run_study(study, launcher=fake, show=lambda *_: None)
    full = next(ct for ct in study.tuning if ct.label == "method=full")
    assert full.confirm["short_choice"] == 2e-3 and sorted(full.confirm["values"]) == [2e-3, 4e-3] and full.chosen == 4e-3
    confirm = [p for p in points if p.stage == "confirm"]
    assert confirm and {p.config["train"]["max_steps"] for p in confirm} == {6} and all(p.run_dir.parent.name == "tune-confirm" for p in confirm)
    assert {p.config["train"]["lr"] for p in points if p.stage == "main"} == {4e-3}
    with pytest.raises(ConfigError, match="confirm must be 0"):
        load_study(staged(tmp_path, data_dir, tune={"confirm": 1}))


@pytest.mark.parametrize("extra,message", [
    ({"tune": {"grid": [1e-3]}}, "at least 2 positive"),
    ({"tune": {"field": "train.seed"}}, "also a grid field"),
    ({"tune": {"cell": ["model.preset"]}}, "must list grid fields"),
    ({"tune": {"widen": -1}}, "widen"),
    ({"tune": {"typo": 1}}, "unknown study key 'tune.typo'; valid keys here: field, grid"),
    ({"run_name": "{method}"}, "same folder"),
    ({"run_name": "{nope}"}, "not a grid or tuned field"),
])
def test_bad_staged_studies_are_clear_errors(tmp_path, data_dir, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_study(staged(tmp_path, data_dir, **extra))


def test_control_needs_tuning_and_grid_values(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="needs a `tune:` stage"):
        control = {"where": {"method.name": "relora"}, "lr_from": {"method.name": "full"}}
        load_study(write_study(tmp_path, data_dir, {"method.name": ["full", "relora"]}, method_options=FITS, control=control))
    with pytest.raises(ConfigError, match="not a value of the grid"):
        load_study(staged(tmp_path, data_dir, control={"where": {"method.name": "lora"}, "lr_from": {"method.name": "full"}}))


def test_run_names_and_template(tmp_path, data_dir):
    assert point_name({"method.name": "relora", "train.lr": 3e-3, "train.seed": 1}) == "method=relora,lr=3e-3,seed=1"
    assert point_name({"train.lr": 0.016, "train.warmup_steps": 10, "model.preset": "mini", "train.weight_decay": 0.1}) == \
        "lr=1.6e-2,warmup_steps=10,preset=mini,weight_decay=0.1"
    assert point_name({"method.rank": 8, "galore.rank": 4}) == "method.rank=8,galore.rank=4"  # ambiguous short names stay whole
    study = load_study(staged(tmp_path, data_dir, run_name="{method}-s{train.seed}-lr{lr}"))
    run_study(study, launcher=FakeLauncher(), show=lambda *_: None)
    assert "relora-s1-lr1.6e-2" in {p.name for p in study.points if p.stage == "main"}
    assert "full-s1000-lr1e-3" in {p.name for p in study.points if p.stage == "tune"}  # the tuning seed: 1000


def test_progress_lines_off_a_terminal_count_runs_and_give_an_eta(tmp_path, data_dir):
    study = load_study(write_study(tmp_path, data_dir, {"train.seed": [0, 1, 2]}))
    lines = []
    progress = ProgressTable(study.points, lines.append, "main")
    with progress:
        study.points[0].status = "done"
        progress.refresh()
    assert "\r" not in lines[0] and "1/3 runs finished" in lines[0] and "ETA" in lines[0] and "sweep main [" in lines[0]
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(progress.table())  # what a terminal shows: the table and the same line, the bar not eaten as markup
    text = console.export_text()
    assert "[######" in text and "seed=1" in text
    assert LocalLauncher(2).parallel == 2


@pytest.mark.slow
def test_a_real_staged_sweep(tmp_path, data_dir):
    """Real subprocess training: 2 tuning runs, 1 main run, through LocalLauncher (about 30 s)."""
    path = write_study(tmp_path, data_dir, {"train.seed": [0]}, tune={"grid": [1e-3, 3e-3], "widen": 0, "overrides": ["train.max_steps=4"]})
    shown = []
    points = run_study(load_study(path), parallel=2, show=shown.append)
    assert [p.status for p in points] == ["done"] * 3, [p.error for p in points]
    tuned = json.loads((tmp_path / "runs" / "sweep.json").read_text())["tuning"]["cells"][0]
    losses = [d["loss"] for d in tuned["tried"]]
    assert tuned["chosen"] == [1e-3, 3e-3][losses.index(min(losses))] and tuned["position"] == "edge"
    assert any(line.startswith("tuned train.lr for all:") for line in shown)


# ------------------------------------------------------------------ paired seeds
@pytest.mark.parametrize("seed", [0, 3])
def test_seed_k_gives_every_method_the_same_shared_weights_and_batches(tmp_path, data_dir, seed):
    """What the paired statistics rely on: the methods differ only in what they add, not in where they start."""
    import torch

    from helpers import tiny_config
    from rankscope.train.loop import Trainer

    def build(method):
        cfg = tiny_config(data_dir, f"method.name={method}", f"train.seed={seed}", *own_options(method, rank=4, **FITS))
        return Trainer(cfg, tmp_path / method, log=lambda *_: None)

    trainers = {m: build(m) for m in ("full", "relora", "lora", "so", "galore")}
    ref = trainers.pop("full")
    ref_state = ref.model.state_dict()
    other_seed = Trainer(tiny_config(data_dir, f"train.seed={seed + 1}"), tmp_path / "other", log=lambda *_: None).model.state_dict()
    assert not torch.equal(ref_state["embed.weight"], other_seed["embed.weight"])  # the seed does change the weights
    for name, tr in trainers.items():
        state = {k.replace(".base.weight", ".weight"): v for k, v in tr.model.state_dict().items() if "lora_" not in k}
        assert state.keys() == ref_state.keys(), name  # embeddings, norms, head and every base linear
        for k, v in ref_state.items():
            assert torch.equal(v, state[k]), f"{name}: {k} differs from full-rank's at seed {seed}"
        for step in (0, 1, 7):
            for stream in ("train_stream", "val_stream"):
                xa, ya = getattr(ref, stream).get(step)
                xb, yb = getattr(tr, stream).get(step)
                assert torch.equal(xa, xb) and torch.equal(ya, yb), f"{name}: {stream} batch {step}"
