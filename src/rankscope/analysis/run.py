"""Analyse every checkpoint of a run into one tidy table, cached per checkpoint.

    from rankscope.analysis import analyze_run
    res = analyze_run("runs/relora")           # RunAnalysis
    res.rows      # dict of columns: run, method, step, layer, component, head, kind, metric, value
    res.spectra   # dict of columns: run, method, step, layer, component, head, kind, index, value
    res.arrow()   # (rows, spectra) as pyarrow Tables; res.pandas() as pandas DataFrames

Checkpoints are read lazily (safetensors `safe_open`, only target matrices) on a thread pool while
the previous one is decomposed. Each checkpoint's rows and spectra are cached in
RUN/analysis/cache/step_NNNNNN.{rows,spectra}.parquet under a key hashing the checkpoint's file
hashes (meta.json), the previous checkpoint's (for `update`), the run config (for the re-created
initialisation) and the analysis options; re-running computes only what is new or changed.
ReLoRA cycle updates (RUN/relora_updates/cycle_C_step_S.safetensors) are cached the same way and
also get `angle_to_prev_mean` / `angle_to_prev_min` rows: principal angles in degrees between the
top-r left singular subspaces of consecutive cycles' updates (r = `angles_rank`).

Alignment (docs/metrics.md): a checkpoint at step t is written after step t's optimiser step and
after ReLoRA's merge at t, so with `checkpoint.every = method.reset_every` the `update` between
consecutive checkpoints covers exactly the steps of one ReLoRA cycle, for either method (for ReLoRA
it equals that cycle's `cycle_update`, B being zero right after a merge). The `grad` at step t is the
gradient of step t's loss (the one step t's optimiser update used), before clipping.
Every item also gets a `rank_bound` row (see rankscope.spectral), from the run's known ranks: the
ReLoRA merge count in meta.json, the adapters' rank, the tokens of a step. Every `update` item gets
`window_start` and `window_merges` rows (its window (start, t] and the merges in it; labels:
analysis.compare.window_label). OV circuits are measured for weights and, as the circuit's change,
for `update` and `cumulative_update` (components.delta_ov_items).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from safetensors.torch import load_file

from rankscope.analysis import components as C
from rankscope.analysis.angles import angle_rows, compare_subspaces
from rankscope.analysis.bounds import low_rank_updates, update_bounds
from rankscope.spectral import AnalysisError, resolve_metrics
from rankscope.analysis.reading import (CheckpointState, cycle_files, cycle_rank, load_state, prefetch, previous_cycle,
                                        read_meta)
from rankscope.analysis.spectra import analyze_items
from rankscope.analysis.tables import (ROW_COLUMNS, SPECTRA_COLUMNS, Cache, Table, empty, extend, key_hash, load_table,
                                       results_to_tables, save_table, with_run)
from rankscope.config import method_options
from rankscope.core.paths import check_output_dir
from rankscope.store.checkpoint import list_checkpoints

__all__ = ["KINDS", "AnalysisOptions", "RunAnalysis", "analyze_run", "analyze_runs", "compare_subspaces", "load_table"]

KINDS = ("weight", "lora_update", "grad", "update", "cumulative_update", "cycle_update")
CACHE_VERSION = 3  # 2: pico-analyze OV forms, rank_bound rows, effective-weight grads; 3: rank_deficient, OV of updates, windows
WINDOW_METRICS = ("window_start", "window_merges")  # rows of each `update` item: its window (start, step] and the merges in it


@dataclass
class AnalysisOptions:
    kinds: tuple[str, ...] = KINDS
    metrics: list[str] | None = None  # None: every registered metric
    dtype: str = "float64"  # SVD dtype: float64 or float32
    device: str = "cpu"
    include_embeddings: bool = False
    cumulative_from: str = "init"  # "init": re-created initial weights; "first": the first checkpoint
    angles_rank: int = 16
    workers: int = 2  # checkpoint-reading threads

    def fingerprint(self) -> dict[str, Any]:
        return {"v": CACHE_VERSION, "kinds": sorted(self.kinds), "metrics": self.metrics, "dtype": self.dtype,
                "emb": self.include_embeddings, "cum": self.cumulative_from, "r": self.angles_rank}

    def validate(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise AnalysisError(f"unknown kind(s) {', '.join(bad)}; valid kinds: {', '.join(KINDS)}")
        if self.dtype not in ("float64", "float32"):
            raise AnalysisError(f"dtype must be float64 or float32, got {self.dtype!r}")
        if self.cumulative_from not in ("init", "first"):
            raise AnalysisError("cumulative_from must be 'init' or 'first'")
        resolve_metrics(self.metrics)


@dataclass
class RunAnalysis:
    rows: Table
    spectra: Table
    computed: list[int] = field(default_factory=list)  # checkpoint steps decomposed in this call
    cached: list[int] = field(default_factory=list)  # checkpoint steps read from the cache
    cycles_computed: list[int] = field(default_factory=list)  # ReLoRA cycle-update steps, likewise
    cycles_cached: list[int] = field(default_factory=list)

    def arrow(self):
        import pyarrow as pa

        return pa.table(self.rows), pa.table(self.spectra)

    def pandas(self):
        rows, spectra = self.arrow()
        return rows.to_pandas(), spectra.to_pandas()


def checkpoint_items(state: CheckpointState, prev: CheckpointState | None, base: CheckpointState | None,
                     layout, kinds: Iterable[str], include_embeddings: bool = False, method: str = "unknown",
                     init_is_lora_base: bool = False) -> list[C.Item]:
    """The items of one checkpoint. `prev` / `base` are the previous checkpoint and the cumulative base
    (step 0 for the re-created initialisation); `init_is_lora_base`: the run wrapped its linears at
    step 0 (no full-rank warm start), so the initialisation is the adapters' base with B = 0."""
    kinds = set(kinds)
    items: list[C.Item] = []
    if "weight" in kinds:
        items += C.weight_items(state.weights, layout)
    if "lora_update" in kinds:
        items += C.lora_items(state.lora)
    if "grad" in kinds:
        items += C.grad_items(state.grads, include_embeddings, state.tokens_per_step)
    for kind, old in (("update", prev), ("cumulative_update", base)):
        if kind in kinds and old is not None:
            bounds = update_bounds(state, old, method, old.is_init and init_is_lora_base)
            items += C.delta_items(state.weights, old.weights, kind, bounds)
            items += C.delta_ov_items(state.weights, old.weights, layout, kind)
    return items


def window_rows(items: Iterable[C.Item], state: CheckpointState, prev: CheckpointState | None) -> Table:
    """For every `update` item: `window_start` (the previous checkpoint's step, 0 for the re-created
    initialisation) and `window_merges` (ReLoRA merges done in (window_start, step], from meta.json), so a
    reader can tell a one-cycle window from one that spans a merge (analysis.compare.window_label)."""
    rows = empty(ROW_COLUMNS[2:])
    if prev is None:
        return rows
    values = (float(prev.step), float(state.merges - prev.merges))
    for it in items:
        if it.kind != "update":
            continue
        for metric, v in zip(WINDOW_METRICS, values):
            for c, val in zip(ROW_COLUMNS[2:], (state.step, it.layer, it.component, it.head, it.kind, metric, v)):
                rows[c].append(val)
    return rows


# --------------------------------------------------------------------------- the run
def run_method(run_dir: Path, metas: list[dict[str, Any]]) -> str:
    for meta in metas:
        name = meta.get("method_name") or ((meta.get("config") or {}).get("method") or {}).get("name")
        if name:
            return str(name)
    return "unknown"


def analyze_run(run_dir: str | Path, options: AnalysisOptions | None = None, steps: Iterable[int] | None = None,
                cache: bool = True, log: Callable[[str], None] | None = None, **kw: Any) -> RunAnalysis:
    """Rows and spectra of every checkpoint (and ReLoRA cycle update) of one run.

    `options` (or its fields as keywords: kinds, metrics, dtype, device, include_embeddings,
    cumulative_from, angles_rank, workers) picks what is computed; `steps` limits the checkpoints."""
    opts = options or AnalysisOptions(**kw)
    opts.validate()
    run_dir = Path(run_dir)
    found = [(s, p, read_meta(p)) for s, p in list_checkpoints(run_dir / "checkpoints")]
    found = [(s, p, m) for s, p, m in found if m is not None]
    cycles = cycle_files(run_dir) if "cycle_update" in opts.kinds else []
    if not found and not cycles:
        raise AnalysisError(f"{run_dir} has no checkpoints (checkpoints/step_N/meta.json) to analyse; train it first")
    wanted_steps = set(steps) if steps is not None else None
    if wanted_steps is not None:
        have = {s for s, _, _ in found} | {s for _, s, _ in cycles}
        if missing := sorted(wanted_steps - have):
            raise AnalysisError(f"--steps {' '.join(map(str, missing))}: {run_dir} has no valid checkpoint at "
                                f"{'that step' if len(missing) == 1 else 'those steps'}; its steps: {', '.join(map(str, sorted(have)))}")
    run, method = run_dir.name, run_method(run_dir, [m for _, _, m in found])
    config = next((m.get("config") for _, _, m in found if m.get("config")), None)
    store = Cache(run_dir / "analysis" / "cache", cache)
    fp = opts.fingerprint()
    use_init = opts.cumulative_from == "init" and config is not None
    base_id = key_hash(config) if use_init else (found[0][2].get("files") if found else None)

    # 1. keys: a checkpoint's rows depend on itself, its predecessor (update) and the base (cumulative)
    plan = []
    for i, (step, path, meta) in enumerate(found):
        prev_files = found[i - 1][2].get("files") if i else ("init" if use_init else None)
        key = key_hash({"opts": fp, "files": meta.get("files"), "step": step, "prev": prev_files, "base": base_id})
        if (wanted_steps is None or step in wanted_steps) and set(opts.kinds) - {"cycle_update"}:
            plan.append((i, step, path, meta, key, store.get(f"step_{step:06d}", key)))
    todo = [p for p in plan if p[5] is None]
    rows, spectra = empty(ROW_COLUMNS[2:]), empty(SPECTRA_COLUMNS[2:])
    result = RunAnalysis(rows, spectra, [p[1] for p in todo], [p[1] for p in plan if p[5] is not None])
    for p in plan:
        if p[5] is not None:
            extend(rows, p[5][0])
            extend(spectra, p[5][1])

    # 2. decompose what is new; read checkpoint i-1 too where checkpoint i needs its weights
    if todo:
        layout = C.head_layout(config, {})
        need = sorted({p[0] for p in todo} | ({p[0] - 1 for p in todo if p[0] > 0} if "update" in opts.kinds else set()))
        base = _base_state(opts, config, found, use_init)
        init_is_lora_base = use_init and int(method_options((config or {}).get("method") or {}).get("warm_start_steps", 0) or 0) == 0
        todo_idx = {p[0]: p for p in todo}
        states: dict[int, CheckpointState] = {}
        load = lambda i: load_state(found[i][1], found[i][2], opts.include_embeddings, "grad" in opts.kinds)  # noqa: E731
        from rankscope.core.progress import Progress

        bar = Progress(len(todo), f"analyze {Path(run).name}", unit="checkpoint", enabled=log is not None)
        for i, state in zip(need, prefetch(load, need, opts.workers)):
            states[i] = state
            states.pop(i - 2, None)
            if i not in todo_idx:
                continue
            _, step, _, _, key, _ = todo_idx[i]
            prev = states[i - 1] if i - 1 in states else (base if use_init and i == 0 else None)
            items = checkpoint_items(state, prev, base, layout, opts.kinds, opts.include_embeddings, method, init_is_lora_base)
            r, s = results_to_tables(analyze_items(items, opts.metrics, opts.dtype, opts.device), step)
            extend(r, window_rows(items, state, prev))
            store.put(f"step_{step:06d}", key, r, s)
            extend(rows, r)
            extend(spectra, s)
            bar.update(1, step=step, matrices=len(items))
        bar.close()

    # 3. ReLoRA cycle updates, each with the angles to the previous cycle's update
    prev_key, prev_t = None, None
    for cycle, step, path in cycles:
        if wanted_steps is not None and step not in wanted_steps:
            prev_key, prev_t = None, None
            continue
        st = path.stat()
        key = key_hash({"opts": fp, "file": path.name, "size": st.st_size, "mtime": st.st_mtime_ns, "prev": prev_key})
        hit = store.get(path.stem, key)
        if hit is None:
            tensors = load_file(str(path))
            rank = cycle_rank(path) if low_rank_updates(method) else None
            items = C.dense_items(tensors, "cycle_update", opts.include_embeddings, rank)
            r, s = results_to_tables(analyze_items(items, opts.metrics, opts.dtype, opts.device), step)
            prev_t = prev_t if prev_t is not None else previous_cycle(cycles, cycle)
            if prev_t is not None:
                extend(r, angle_rows(tensors, prev_t, step, opts.angles_rank, opts.dtype))
            store.put(path.stem, key, r, s)
            result.cycles_computed.append(step)
            prev_t = tensors
        else:
            r, s = hit
            result.cycles_cached.append(step)
            prev_t = None  # re-read lazily only if the next cycle must be computed
        extend(rows, r)
        extend(spectra, s)
        prev_key = key
    result.rows, result.spectra = with_run(rows, run, method), with_run(spectra, run, method)
    return result


def _base_state(opts: AnalysisOptions, config, found, use_init: bool) -> CheckpointState | None:
    """The base of cumulative updates (and of the first checkpoint's update): the re-created
    initialisation as a step-0 state (no adapters, no merges), or the first checkpoint."""
    if "cumulative_update" not in opts.kinds and "update" not in opts.kinds:
        return None
    if use_init:
        try:
            return CheckpointState(0, C.init_weights(config, opts.include_embeddings), {}, {}, is_init=True)
        except Exception as e:  # a config this version cannot rebuild: fall back to the first checkpoint
            raise AnalysisError(f"cannot re-create the initial weights from the run config ({e}); use cumulative_from='first'") from None
    if not found or "cumulative_update" not in opts.kinds:
        return None
    return load_state(found[0][1], found[0][2], opts.include_embeddings, with_grads=False)


def analyze_runs(run_dirs: Iterable[str | Path], out_dir: str | Path | None = None, plots: bool = True,
                 spectra_steps: list[int] | None = None, cache: bool = True, log: Callable[[str], None] | None = print, **kw: Any) -> dict[str, Path]:
    """`rankscope analyze`: analyse runs, write rank_metrics.parquet, spectra.parquet and plots to out_dir."""
    run_dirs = [Path(p) for p in run_dirs]
    out = Path(out_dir) if out_dir else (run_dirs[0] / "analysis" if len(run_dirs) == 1 else Path("analysis"))
    if out_dir:  # before any decomposition: a bad target must not cost the analysis (RUN/analysis lies in the run)
        check_output_dir(out, "-o")
    rows, spectra = empty(ROW_COLUMNS), empty(SPECTRA_COLUMNS)
    for rd in run_dirs:
        res = analyze_run(rd, cache=cache, log=log, **kw)
        if log:
            log(f"[analyze] {rd}: {len(res.computed)} new, {len(res.cached)} cached")
        extend(rows, res.rows)
        extend(spectra, select_steps(res.spectra, spectra_steps))
    written = {"rows": save_table(rows, out / "rank_metrics.parquet"), "spectra": save_table(spectra, out / "spectra.parquet")}
    if plots:
        from rankscope.analysis.plots import plot_all

        written.update(plot_all(rows, spectra, out, spectra_steps))
    return written


def select_steps(spectra: Table, steps: list[int] | None) -> Table:
    """Spectra at the given steps (all when None); a step absent from the run picks the nearest."""
    if not steps or not spectra["step"]:
        return spectra
    have = np.array(sorted(set(spectra["step"])))
    keep = {int(have[np.abs(have - s).argmin()]) for s in steps}
    mask = [s in keep for s in spectra["step"]]
    return {c: [v for v, k in zip(col, mask) if k] for c, col in spectra.items()}
