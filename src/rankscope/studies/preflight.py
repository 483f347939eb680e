"""Pre-flight check of a study: will each findings rule be measurable, and how long will the sweep take?

`rankscope sweep --check STUDY` (and the start of every sweep) reads the study's points as they will run
and lists each findings rule (per kind and component for rank rules) as "measurable" or the reason it
cannot be: the method or reference not in the grid, one seed (no interval), fewer than 3 sizes (or token budgets) for a slope, a
metric no run writes (BLiMP without --blimp), `analyze` not run after training, a kind `analyze` is not
asked for or does not compute (OV circuits of updates), gradients not saved, no kept checkpoint in the
early phase. A rule that cannot be measured is an error before any compute unless the study lists its id
under `expect_unmeasured`.

The wall-time estimate times a few optimiser steps of each distinct (model, method) of the study on
random tokens (no corpus needed), then adds up steps x seconds per step over every run, tuning included,
divided by the runs that go at once. Evaluation, analysis and corpus preparation are not included.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from rankscope.core.errors import ConfigError
from rankscope.studies.findings import CONTROL_SUFFIX, MIN_PRIMARY_SEEDS
from rankscope.studies.progress import duration

MIN_SLOPE_GROUPS = 3  # a slope rule's groups (sizes or token budgets), as rankscope.studies.findings.slope_row requires

EVAL_METRICS = {"val_bpb_macro": "per-domain evaluation", "blimp_overall": "BLiMP"}
ALWAYS = {"final_val_loss", "final_train_loss"}  # summary.json of every finished run


@dataclass
class RuleCheck:
    rule: str  # the rule id, with kind / component for rank rules
    measurable: bool
    reason: str = ""
    expected: bool = False  # listed under the study's expect_unmeasured


@dataclass
class Preflight:
    checks: list[RuleCheck] = field(default_factory=list)
    seconds: float | None = None  # estimated wall time of the training runs
    timing: dict[str, float] = field(default_factory=dict)  # seconds per step by "preset/method"
    notes: list[str] = field(default_factory=list)

    @property
    def unexpected(self) -> list[RuleCheck]:
        return [c for c in self.checks if not c.measurable and not c.expected]

    def lines(self) -> list[str]:
        out = []
        width = max((len(c.rule) for c in self.checks), default=0)
        for c in self.checks:
            state = "measurable" if c.measurable else f"NOT measurable: {c.reason}" + (" (expected by the study)" if c.expected else "")
            out.append(f"  {c.rule:{width}s}  {state}" + (f" ({c.reason})" if c.measurable and c.reason else ""))
        if self.seconds is not None:
            per = ", ".join(f"{k} {v * 1000:.0f} ms/step" for k, v in self.timing.items())
            out.append(f"  estimated training wall time: {duration(self.seconds)} on this machine ({per}; "
                       "evaluation, analysis and corpus preparation come on top)")
        out += [f"  note: {n}" for n in self.notes]
        return out


# --------------------------------------------------------------------------- the points as they will run
def planned_runs(study) -> list[dict[str, Any]]:
    """Every main and control run as {method label, size, seed, config dict}; a tuned field at its first grid value."""
    runs = []
    for values, p in study.planned():
        runs.append(_run(p.config, p.config["method"]["name"]))
        if study.control and all(values.get(k) == v for k, v in study.control.where.items()):
            runs.append(_run(p.config, p.config["method"]["name"] + CONTROL_SUFFIX))
    return runs


def _run(cfg: dict[str, Any], method: str) -> dict[str, Any]:
    m = cfg["model"]
    size = m.get("preset") or f"d{m['d_model']}x{m['n_layers']}"
    return {"method": method, "size": (size, m["d_model"], m["n_layers"], m["ffn_dim"], m["vocab_size"]), "seed": cfg["train"]["seed"],
            "config": cfg}


def kept_checkpoints(cfg: dict[str, Any]) -> set[int]:
    """The checkpoint steps a finished run still has after retention (rankscope.train.state, checkpoint.prune_checkpoints)."""
    from rankscope.train.state import log_spaced_steps

    c, steps = cfg["checkpoint"], int(cfg["train"]["max_steps"])
    forever = set(c.get("keep_steps") or []) | log_spaced_steps(steps, int(c.get("log_spaced") or 0))
    saved = {s for s in range(1, steps + 1) if (c["every"] and s % c["every"] == 0) or s == steps or s in forever}
    rolling = sorted(saved)[-int(c["keep_last"]):]
    return {s for s in saved if s in forever or s in rolling}


def _flag_values(args: list[str], flag: str) -> list[str] | None:
    """The values after `flag` in an argument list (up to the next --option); None when absent."""
    if flag not in args:
        return None
    i = args.index(flag) + 1
    out = []
    while i < len(args) and not args[i].startswith("--"):
        out.append(args[i])
        i += 1
    return out


def ov_kinds() -> tuple[str, ...]:
    """The kinds whose OV circuits `analyze` computes (rankscope.analysis.components: weights only, unless it says more)."""
    from rankscope.analysis import components

    return tuple(getattr(components, "OV_KINDS", ("weight",)))


# --------------------------------------------------------------------------- the rules
def check_rules(study) -> list[RuleCheck]:
    if not study.findings:
        return []
    from rankscope.analysis.components import OV_FORMS
    from rankscope.analysis.run import KINDS

    runs = planned_runs(study)
    spec, expected = study.findings, set(getattr(study, "expect_unmeasured", None) or [])
    analyze_kinds = _flag_values(study.analyze_args, "--kinds") or list(KINDS)
    analyze_steps = _flag_values(study.analyze_args, "--steps")
    min_primary = int(spec.get("min_primary_seeds", MIN_PRIMARY_SEEDS))
    out = []
    for rule in spec["rules"]:
        method, ref = rule.get("method", spec["method"]), rule.get("reference", spec["reference"])
        a = [r for r in runs if r["method"] == method]
        b = [r for r in runs if r["method"] == ref]
        base = _pair_reason(method, ref, a, b, rule)
        if rule["test"] not in ("rank", "rank-matched"):
            reason = base or _metric_reason(rule["metric"], a + b, study)
            out.append(RuleCheck(rule["id"], not reason, reason or _seed_note(a, b, rule, min_primary), rule["id"] in expected))
            continue
        kinds = rule["kind"] if isinstance(rule["kind"], list) else [rule["kind"]]
        comps = rule["component"] if isinstance(rule["component"], list) else [rule["component"]]
        for kind in kinds:
            ref_kind = rule.get("reference_kind", kind)  # the paper's comparison: the reference's gradient
            for comp in comps:
                reason = base or (_rank_reason(kind, comp, rule, a, study, analyze_kinds, analyze_steps, OV_FORMS)
                                  or _rank_reason(ref_kind, comp, rule, b, study, analyze_kinds, analyze_steps, OV_FORMS))
                name = f"{rule['id']} [{kind} {comp}]"
                out.append(RuleCheck(name, not reason, reason or _seed_note(a, b, rule, min_primary), rule["id"] in expected or name in expected))
    return out


def _pair_reason(method: str, ref: str, a: list, b: list, rule: dict) -> str:
    if not a:
        return f"no {method!r} runs in the grid (method labels: add it to method.name, or a control for '{method}')"
    if not b:
        return f"no {ref!r} runs in the grid"
    seeds = {r["seed"] for r in a} & {r["seed"] for r in b}
    if not seeds:
        return f"no seed shared by {method} and {ref} runs (pairs are by train.seed)"
    # as rankscope.studies.findings: one point per group (its seeds' mean gap), k - 2 degrees of freedom, so k >= 3 groups
    if rule["test"] == "slope" and rule.get("axis") == "tokens_per_param":
        k = len({_tokens(r) for r in a} & {_tokens(r) for r in b})
        if k < MIN_SLOPE_GROUPS:
            return (f"{k} token budget(s) for a slope on tokens per parameter: it needs {MIN_SLOPE_GROUPS} or more (one point "
                    f"per budget, k - 2 degrees of freedom); give train.max_steps {MIN_SLOPE_GROUPS} or more values")
    elif rule["test"] == "slope":
        k = len({r["size"] for r in a} & {r["size"] for r in b})
        if k < MIN_SLOPE_GROUPS:
            return (f"{k} size(s) for a slope: it needs {MIN_SLOPE_GROUPS} or more (one point per size, k - 2 degrees of "
                    f"freedom); give the grid {MIN_SLOPE_GROUPS} or more model sizes (e.g. model.preset: [nano, micro, milli])")
    return ""


def _tokens(run: dict) -> int:
    t = run["config"]["train"]
    return int(t["max_steps"]) * int(t["batch_size"]) * int(t["seq_len"])


def _seed_note(a: list, b: list, rule: dict, min_primary: int) -> str:
    n = len({r["seed"] for r in a} & {r["seed"] for r in b})
    if n < 2:
        return "1 seed: the verdict stays inconclusive without 2 or more paired seeds"
    if rule.get("primary") and n < min_primary:
        return (f"{n} paired seeds: a primary endpoint needs {min_primary} or more (findings.min_primary_seeds), "
                f"so its verdict stays inconclusive")
    return ""


def _metric_reason(metric: str, runs: list, study) -> str:
    if metric in ALWAYS:
        return ""
    has_eval = "eval" in study.after
    if metric == "blimp_overall" or metric.startswith("blimp/"):
        if all(r["config"]["eval"].get("blimp_dir") for r in runs) or (has_eval and "--blimp" in study.eval_args):
            return ""
        return "BLiMP is not scored: add `eval` to `after` and `--blimp DIR` (or builtin) to eval_args, or set eval.blimp_dir"
    if metric.startswith(("val_", "test_")):
        if has_eval or all(r["config"]["eval"].get("per_domain") for r in runs):
            return ""
        return f"{metric} is not written: add `eval` to `after` or set eval.per_domain=true"
    return ""  # another summary.json key: not checked here


def _rank_reason(kind: str, comp: str, rule: dict, runs: list, study, analyze_kinds: list[str], analyze_steps, ov_forms) -> str:
    if "analyze" not in study.after:
        return "`analyze` does not run: add it to the study's `after`"
    if kind not in analyze_kinds:
        return f"analyze_args --kinds leaves out {kind}: add it"
    if comp in ov_forms and kind not in ov_kinds():
        return f"analyze computes OV circuits ({comp}) for {', '.join(ov_kinds())} only, not for {kind}: use wv and wo"
    for r in runs:
        cfg = r["config"]
        if kind == "grad" and not cfg["checkpoint"].get("save_grads"):
            return "gradients are not saved: set checkpoint.save_grads=true"
        if kind == "cycle_update" and not (cfg["method"].get(cfg["method"]["name"]) or {}).get("save_cycle_updates"):
            return f"{r['method']} runs save no cycle updates: set method.save_cycle_updates=true (ReLoRA only)"
        if kind == "lora_update" and cfg["method"]["name"] == "full":
            return "a full-rank run has no LoRA update: compare update or cumulative_update instead"
        steps = kept_checkpoints(cfg)
        if analyze_steps is not None:
            steps &= {int(s) for s in analyze_steps if re.fullmatch(r"\d+", s)}
        if rule.get("phase") == "early":
            limit = int(cfg["train"]["max_steps"]) / 4
            early = sorted(s for s in steps if 0 < s <= limit)
            if not early:
                return (f"no early checkpoint kept (0 < step <= {limit:g}): set checkpoint.log_spaced (e.g. 6) or "
                        f"checkpoint.keep_steps")
    return ""


# --------------------------------------------------------------------------- time
def time_steps(cfg_dict: dict[str, Any], steps: int = 3, threads: int = 1) -> float:
    """Seconds per optimiser step of this config at its precision, on random tokens (after one untimed step)."""
    import torch

    from rankscope.core.runtime import autocast
    from rankscope.methods import build_model, config_from_dict

    cfg = config_from_dict(cfg_dict)
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        model, method = build_model(cfg)
        opt = method.build_optimizer(model, torch.device("cpu"))
        t = cfg.train
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), generator=g)
        start = 0.0
        for i in range(steps + 1):
            if i == 1:
                start = time.perf_counter()
            for _ in range(t.grad_accum):
                with autocast(torch.device("cpu"), t.precision):  # "auto" times as fp32, the static choice on a CPU
                    loss = model(x[:, :-1], x[:, 1:])
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / steps
    finally:
        torch.set_num_threads(old)


def estimate_seconds(study, parallel: int, cores: int | None = None) -> tuple[float, dict[str, float]]:
    """Training wall time: every run's steps x the timed seconds per step of its (size, method), over `parallel`."""
    import os

    cores = cores or os.cpu_count() or 1
    threads = max(1, cores // max(1, parallel))
    configs = [r["config"] for r in planned_runs(study)] + study.tuning_configs()
    timing: dict[str, float] = {}
    total = 0.0
    for cfg in configs:
        size = _run(cfg, "")["size"]
        key = f"{size[0]}{'' if not cfg['model'].get('preset') else f' d{size[1]}'}/{cfg['method']['name']}"
        if key not in timing:
            timing[key] = time_steps(cfg, threads=threads)
        total += timing[key] * int(cfg["train"]["max_steps"])
    return total / max(1, min(parallel, len(configs))), timing


def preflight(study, parallel: int | None = None, timing: bool = True) -> Preflight:
    out = Preflight(check_rules(study))
    if not study.findings:
        out.notes.append("the study states no findings rules: nothing to check")
    if timing:
        out.seconds, out.timing = estimate_seconds(study, parallel or study.parallel)
    return out


def run_preflight(study, parallel: int | None = None, timing: bool = True, show=print) -> Preflight:
    """Print the check; raise ConfigError (one line) where a rule cannot be measured and the study does not expect it."""
    result = preflight(study, parallel, timing)
    show(f"pre-flight check of {study.path}:")
    for line in result.lines():
        show(line)
    bad = result.unexpected
    if bad:
        raise ConfigError(f"{len(bad)} findings rule(s) of {study.path} cannot be measured ({bad[0].rule}: {bad[0].reason}); "
                          f"fix the study, or list the rule ids under `expect_unmeasured:` in it")
    return result
