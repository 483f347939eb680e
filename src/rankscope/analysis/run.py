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
Every item also gets a `rank_bound` row (see analysis.metrics), from the run's known ranks: the
ReLoRA merge count in meta.json, the adapters' rank, the tokens of a step. Every `update` item gets
`window_start` and `window_merges` rows (its window (start, t] and the merges in it; labels:
analysis.compare.window_label). OV circuits are measured for weights and, as the circuit's change,
for `update` and `cumulative_update` (components.delta_ov_items).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rankscope.analysis import components as C
from rankscope.analysis.metrics import AnalysisError, principal_angles, resolve_metrics
from rankscope.analysis.spectra import Result, analyze_items
from rankscope.store.checkpoint import check_meta, list_checkpoints
from rankscope.config import method_options
from rankscope.core.errors import CheckpointError
from rankscope.adapters.stored import stored_adapters
from rankscope.core.paths import check_output_dir

KINDS = ("weight", "lora_update", "grad", "update", "cumulative_update", "cycle_update")
ROW_COLUMNS = ("run", "method", "step", "layer", "component", "head", "kind", "metric", "value")
SPECTRA_COLUMNS = ("run", "method", "step", "layer", "component", "head", "kind", "index", "value")
CACHE_VERSION = 3  # 2: pico-analyze OV forms, rank_bound rows, effective-weight grads; 3: rank_deficient, OV of updates, windows
WINDOW_METRICS = ("window_start", "window_merges")  # rows of each `update` item: its window (start, step] and the merges in it
LOW_RANK_METHODS = ("lora", "relora", "hybrid")  # fixed adapter rank: the rank of an update is bounded by merges x r
_CYCLE = re.compile(r"^cycle_(\d+)_step_(\d+)\.safetensors$")

Table = dict[str, list]


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


# --------------------------------------------------------------------------- tables
def empty(columns: Iterable[str]) -> Table:
    return {c: [] for c in columns}


def extend(table: Table, other: Table) -> None:
    for c in table:
        table[c].extend(other[c])


def save_table(table: Table, path: Path) -> Path:
    """Parquet via pyarrow (CSV with the same stem where pyarrow is missing); atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        import csv

        path = path.with_suffix(".csv")
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(table)
            w.writerows(zip(*table.values()))
        tmp.replace(path)
        return path
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(table), tmp)
    tmp.replace(path)
    return path


def load_table(path: Path) -> Table:
    if path.suffix == ".csv":  # pragma: no cover
        import csv

        with open(path) as fh:
            rows = list(csv.reader(fh))
        cols = {c: [r[i] for r in rows[1:]] for i, c in enumerate(rows[0])}
        for c in cols:
            if c in ("step", "layer", "head", "index"):
                cols[c] = [int(v) for v in cols[c]]
            elif c == "value":
                cols[c] = [float(v) for v in cols[c]]
        return cols
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()


def results_to_tables(results: list[Result], step: int) -> tuple[Table, Table]:
    """Rows and spectra of one checkpoint, without the run / method columns (added on assembly)."""
    rows = empty(ROW_COLUMNS[2:])
    spectra = empty(SPECTRA_COLUMNS[2:])
    for r in results:
        it = r.item
        for metric, value in r.values.items():
            for c, v in zip(ROW_COLUMNS[2:], (step, it.layer, it.component, it.head, it.kind, metric, value)):
                rows[c].append(v)
        if r.s is not None:
            k = len(r.s)
            for c, v in zip(SPECTRA_COLUMNS[2:7], (step, it.layer, it.component, it.head, it.kind)):
                spectra[c].extend([v] * k)
            spectra["index"].extend(range(k))
            spectra["value"].extend(r.s.tolist())
    return rows, spectra


def _with_run(table: Table, run: str, method: str) -> Table:
    n = len(next(iter(table.values()))) if table else 0
    return {"run": [run] * n, "method": [method] * n, **table}


# --------------------------------------------------------------------------- cache
def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Cache:
    """RUN/analysis/cache/<name>.{rows,spectra}.parquet + <name>.key (written last)."""

    def __init__(self, root: Path, enabled: bool = True):
        self.root, self.enabled = root, enabled

    def get(self, name: str, key: str) -> tuple[Table, Table] | None:
        kf = self.root / f"{name}.key"
        if not self.enabled or not kf.is_file() or kf.read_text().strip() != key:
            return None
        try:
            return tuple(load_table(self._path(name, part)) for part in ("rows", "spectra"))  # type: ignore[return-value]
        except (OSError, ValueError):
            return None

    def put(self, name: str, key: str, rows: Table, spectra: Table) -> None:
        if not self.enabled:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / f"{name}.key").unlink(missing_ok=True)
        save_table(rows, self.root / f"{name}.rows.parquet")
        save_table(spectra, self.root / f"{name}.spectra.parquet")
        (self.root / f"{name}.key").write_text(key)

    def _path(self, name: str, part: str) -> Path:
        p = self.root / f"{name}.{part}.parquet"
        return p if p.exists() or not p.with_suffix(".csv").exists() else p.with_suffix(".csv")


# --------------------------------------------------------------------------- reading
@dataclass
class CheckpointState:
    step: int
    weights: dict[str, torch.Tensor]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    grads: dict[str, torch.Tensor]
    merges: int = 0  # ReLoRA merges done by this step (meta.json method.merges)
    tokens_per_step: int | None = None  # tokens of one optimiser step (bounds the rank of a gradient)
    is_init: bool = False  # the re-created initialisation (step 0), not a checkpoint


def read_meta(path: Path) -> dict[str, Any] | None:
    """A checkpoint's meta.json if it passes the checkpoint schema (rankscope.store.checkpoint.check_meta)
    and its files exist; None (skipped) otherwise. The tensors' hashes are not re-read here."""
    try:
        meta = check_meta(json.loads((path / "meta.json").read_text()), path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError, CheckpointError):
        return None
    return meta if all((path / f).is_file() for f in meta["files"]) else None


def load_state(path: Path, meta: dict[str, Any], include_embeddings: bool = False, with_grads: bool = True) -> CheckpointState:
    """Effective weights, LoRA factors and gradients of one checkpoint folder (lazy reads)."""
    aliases = meta.get("aliases", {})
    model = _read(path, "model.safetensors", include_embeddings, aliases.get("model"))
    try:
        adapters = stored_adapters(meta, model)
    except CheckpointError as e:
        raise AnalysisError(f"checkpoint {path}: {e}") from None
    weights, lora = C.effective_weights(model, adapters)
    grads = {}
    if with_grads and (path / "grads.safetensors").is_file():
        grads = _read(path, "grads.safetensors", include_embeddings, aliases.get("grads"))
    train = (meta.get("config") or {}).get("train") or {}
    tokens = None
    if {"batch_size", "grad_accum", "seq_len"} <= train.keys():
        tokens = int(train["batch_size"]) * int(train["grad_accum"]) * int(train["seq_len"]) * int(meta.get("world_size", 1))
    return CheckpointState(int(meta["step"]), weights, lora, grads, int((meta.get("method") or {}).get("merges", 0)), tokens)


def _read(path: Path, name: str, include_embeddings: bool, aliases: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """One safetensors file of a checkpoint; a truncated or foreign one is an AnalysisError naming it (read_meta
    does not re-hash the tensors, so this is where a corrupt file shows)."""
    try:
        return C.read_tensors(path / name, include_embeddings, aliases)
    except (OSError, SafetensorError) as e:  # SafetensorError (not an OSError): a truncated or foreign header
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        raise AnalysisError(f"checkpoint {path}: {name} is unreadable ({why}); restore it from a copy, "
                            f"or leave step {path.name.removeprefix('step_').lstrip('0') or 0} out with --steps") from None


def update_bounds(new: CheckpointState, old: CheckpointState, method: str, old_is_init: bool = False) -> dict[str, int]:
    """Rank bounds of new - old for each LoRA-wrapped linear of a fixed-rank method: the change of
    W0 + s B A is the cycle updates merged in between plus the live adapter delta at each end, each of
    rank <= r, so rank <= (merges + [B_new != 0] + [B_old != 0]) * r. The re-created initialisation
    (`old_is_init`) counts as wrapped with B = 0. Other modules and methods: no entry (min(m, n))."""
    if method not in LOW_RANK_METHODS:
        return {}
    out = {}
    for name, (B, A) in new.lora.items():
        if name in old.lora:
            r_old, live_old = old.lora[name][1].shape[0], bool(old.lora[name][0].any())
        elif old_is_init:
            r_old, live_old = 0, False
        else:  # wrapped after `old` (full-rank warm start): unbounded
            continue
        out[name] = (new.merges - old.merges + bool(B.any()) + live_old) * max(A.shape[0], r_old)
    return out


def prefetch(fn: Callable[[Any], Any], args: Iterable[Any], ahead: int) -> Iterator[Any]:
    """fn(a) for each a, in order, with up to `ahead` calls running in threads ahead of the consumer."""
    ahead = max(1, ahead)
    with ThreadPoolExecutor(ahead) as pool:
        it = iter(args)
        pending = deque(pool.submit(fn, a) for a in islice(it, ahead))
        while pending:
            fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield fut.result()


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
    cycles = _cycle_files(run_dir) if "cycle_update" in opts.kinds else []
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
    base_id = _hash(config) if use_init else (found[0][2].get("files") if found else None)

    # 1. keys: a checkpoint's rows depend on itself, its predecessor (update) and the base (cumulative)
    plan = []
    for i, (step, path, meta) in enumerate(found):
        prev_files = found[i - 1][2].get("files") if i else ("init" if use_init else None)
        key = _hash({"opts": fp, "files": meta.get("files"), "step": step, "prev": prev_files, "base": base_id})
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
        key = _hash({"opts": fp, "file": path.name, "size": st.st_size, "mtime": st.st_mtime_ns, "prev": prev_key})
        hit = store.get(path.stem, key)
        if hit is None:
            tensors = load_file(str(path))
            rank = _cycle_rank(path) if method in LOW_RANK_METHODS else None
            items = C.dense_items(tensors, "cycle_update", opts.include_embeddings, rank)
            r, s = results_to_tables(analyze_items(items, opts.metrics, opts.dtype, opts.device), step)
            prev_t = prev_t if prev_t is not None else _previous_cycle(cycles, cycle)
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
    result.rows, result.spectra = _with_run(rows, run, method), _with_run(spectra, run, method)
    return result


def _cycle_files(run_dir: Path) -> list[tuple[int, int, Path]]:
    folder = run_dir / "relora_updates"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), int(m.group(2)), p) for p in folder.iterdir() if (m := _CYCLE.match(p.name))]
    return sorted(found)


def _previous_cycle(cycles: list[tuple[int, int, Path]], cycle: int) -> dict[str, torch.Tensor] | None:
    earlier = [p for c, _, p in cycles if c < cycle]
    return load_file(str(earlier[-1])) if earlier else None


def _cycle_rank(path: Path) -> int | None:
    """The adapter rank a cycle-update file records in its safetensors metadata, if any."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        rank = (fh.metadata() or {}).get("rank")
    return int(rank) if rank and rank.isdigit() else None


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


def angle_rows(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], step: int, r: int, dtype: str = "float64") -> Table:
    """Principal angles (degrees) between the top-r left singular subspaces of matching matrices."""
    rows = empty(ROW_COLUMNS[2:])
    names = [n for n in sorted(new) if n in old and new[n].shape == old[n].shape and C.parse_module(n) and new[n].dim() == 2]
    by_shape: dict[tuple, list[str]] = {}
    for n in names:
        by_shape.setdefault(tuple(new[n].shape), []).append(n)
    dt = torch.float64 if dtype == "float64" else torch.float32
    for group in by_shape.values():
        ang = principal_angles(torch.stack([new[n].float() for n in group]), torch.stack([old[n].float() for n in group]), r, "left", dt)
        deg = torch.rad2deg(ang).to(torch.float64).numpy()
        for n, a in zip(group, deg):
            layer, comp = C.parse_module(n)
            for metric, v in (("angle_to_prev_mean", float(a.mean())), ("angle_to_prev_min", float(a.min()))):
                for c, val in zip(ROW_COLUMNS[2:], (step, layer, comp, -1, "cycle_update", metric, v)):
                    rows[c].append(val)
    return rows


def compare_subspaces(run_a: str | Path, run_b: str | Path, step: int, kind: str = "cumulative_update", r: int = 16, side: str = "left") -> Table:
    """Principal angles (degrees, mean and min over the top r) between the same matrix of two runs at
    one step, e.g. a ReLoRA run's cumulative update vs a full-rank run's (kind weight or
    cumulative_update). Rows have run = 'A vs B'."""
    if kind not in ("weight", "cumulative_update"):
        raise AnalysisError("compare_subspaces supports kind 'weight' or 'cumulative_update'")
    mats = []
    for run in (Path(run_a), Path(run_b)):
        path = run / "checkpoints" / f"step_{step:06d}"
        meta = read_meta(path)
        if meta is None:
            raise AnalysisError(f"{run} has no checkpoint at step {step}")
        w = load_state(path, meta, with_grads=False).weights
        if kind == "cumulative_update":
            init = C.init_weights(meta["config"])
            w = {n: w[n] - init[n] for n in w if n in init}
        mats.append(w)
    names = [n for n in sorted(mats[0]) if n in mats[1] and mats[0][n].shape == mats[1][n].shape]
    out = empty(ROW_COLUMNS)
    for n in names:
        ang = torch.rad2deg(principal_angles(mats[0][n], mats[1][n], r, side))[0].numpy()
        layer, comp = C.parse_module(n)
        for metric, v in ((f"angle_{side}_mean", float(ang.mean())), (f"angle_{side}_min", float(ang.min()))):
            for c, val in zip(ROW_COLUMNS, (f"{Path(run_a).name} vs {Path(run_b).name}", "compare", step, layer, comp, -1, kind, metric, v)):
                out[c].append(val)
    return out


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
