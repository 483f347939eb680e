"""The pieces a comparison of two runs' rank rows needs, kept beside the metrics they summarise.

  cycle_end_steps(config)         ReLoRA's merge steps of a run config (empty for a method without cycles): the
                                  checkpoints that make `update` windows whole cycles (studies keep them early on)
  window_label(start, end, ends)  "one cycle", "within one cycle", "spans N merges" or "no cycles" for the
                                  `update` window (start, end] of a run whose cycles end at `ends`
  summarise(values, how)          the mean ("arithmetic") or geometric mean ("geometric": exp(mean(ln v)), for
                                  condition numbers) of the finite values, and how many were not finite
  truncated_per(s, k)             PER of the top-k singular values: exp(H(p)) / len(s), p_i = s_i / sum_{j<=k} s_j
                                  (i <= k), the PER a matrix would have if it were cut to rank k (Eckart-Young);
                                  divided by min(m, n) = len(s), as the untruncated PER is
  read_spectra(path, ...)         singular values from a spectra.parquet, keyed by (step, layer, head)

The formulas are in docs/metrics.md ("Comparing two runs").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from rankscope.spectral import AnalysisError

CYCLE_METHODS = ("relora", "hybrid", "adaptive")  # methods that merge and restart every `reset_every` steps


def _as_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise AnalysisError(f"a run config must be a mapping or a RunConfig, got {type(config).__name__}")


def has_cycles(config: Any) -> bool:
    """Whether the run's method merges and restarts (ReLoRA and the methods built on it)."""
    from rankscope.methods import method_class
    from rankscope.methods.relora import ReLoRAMethod

    name = str(((_as_dict(config).get("method") or {}).get("name")) or "full")
    try:
        return issubclass(method_class(name), ReLoRAMethod)
    except Exception:  # an unknown method name: judged by name alone
        return name in CYCLE_METHODS


def cycle_start(config: Any) -> int:
    """The step the first cycle starts at: the end of the full-rank warm start (0 without one)."""
    from rankscope.config import method_options

    return int(method_options(dict(_as_dict(config).get("method") or {})).get("warm_start_steps", 0) or 0)


def cycle_end_steps(config: Any, until: int | None = None) -> list[int]:
    """ReLoRA's merge steps warm_start + k * reset_every (k >= 1) up to `until` (default train.max_steps);
    empty for a method without cycles. A checkpoint at each makes the `update` between consecutive
    ones exactly one cycle (docs/metrics.md, "Alignment"); e.g. a study's `checkpoint.keep_steps`."""
    from rankscope.config import method_options

    cfg = _as_dict(config)
    if not has_cycles(cfg):
        return []
    every = int(method_options(dict(cfg.get("method") or {})).get("reset_every", 0) or 0)
    last = int((cfg.get("train") or {}).get("max_steps", 0)) if until is None else int(until)
    if every <= 0 or last <= 0:
        return []
    start = cycle_start(cfg)
    return list(range(start + every, last + 1, every))


def early_cycle_end_steps(config: Any, fraction: float = 0.25) -> list[int]:
    """The cycle ends of the early phase (step <= fraction * max_steps, findings' `phase: early`)."""
    max_steps = int((_as_dict(config).get("train") or {}).get("max_steps", 0))
    return cycle_end_steps(config, until=int(fraction * max_steps))


def window_label(start: int, end: int, ends: Iterable[int], first: int = 0) -> str:
    """What the `update` window (start, end] is, for a run whose cycles end at `ends` and start at `first`:
    "one cycle" (start and end are consecutive cycle boundaries), "within one cycle" (no merge inside),
    "spans N merge(s)" (N merges strictly inside: the update is a sum of N + 1 adapters' pieces), or
    "no cycles" where the run has none. The merge at `end` itself belongs to the window (a checkpoint
    is written after its step's merge)."""
    ends = sorted(set(ends))
    if not ends:
        return "no cycles"
    if start < first:  # full-rank warm-start steps lie in the window: no rank bound of the adapters holds
        return "includes the warm start"
    inside = [e for e in ends if start < e < end]
    if inside:
        return f"spans {len(inside)} merge{'s' if len(inside) > 1 else ''}"
    bounds = {first, *ends}
    return "one cycle" if start in bounds and end in ends else "within one cycle"


@dataclass
class Summary:
    value: float | None  # None when no finite (positive, for geometric) value is left
    n: int  # values summarised
    non_finite: int  # inf / NaN values, counted and not summarised
    non_positive: int = 0  # finite values <= 0 (a geometric mean cannot take them)


def summarise(values: Iterable[float | None], how: str = "arithmetic") -> Summary:
    """Arithmetic or geometric mean of the finite values; the others are counted, never silently dropped."""
    if how not in ("arithmetic", "geometric"):
        raise AnalysisError(f"summary must be 'arithmetic' or 'geometric', got {how!r}")
    vals = [math.nan if v is None else float(v) for v in values]  # a missing value counts as not finite
    finite = [v for v in vals if math.isfinite(v)]
    bad = len(vals) - len(finite)
    if how == "arithmetic":
        return Summary(sum(finite) / len(finite) if finite else None, len(finite), bad)
    pos = [v for v in finite if v > 0]
    value = math.exp(sum(math.log(v) for v in pos) / len(pos)) if pos else None
    return Summary(value, len(pos), bad, len(finite) - len(pos))


def truncated_per(s: np.ndarray, k: int) -> float:
    """PER of the spectrum cut to its top k values: exp(-sum_{i<=k} p_i ln p_i) / len(s), p_i = s_i / sum_{j<=k} s_j.
    `s` holds all min(m, n) singular values, descending. k >= len(s) is the plain PER; k = 0 or a zero
    spectrum gives 0."""
    s = np.asarray(s, dtype=np.float64)
    k = max(0, min(int(k), len(s)))
    top = s[:k]
    total = top.sum()
    if k == 0 or total <= 0:
        return 0.0
    p = top[top > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()) / len(s))


def read_spectra(path: str | Path, kind: str, component: str, steps: Iterable[int] | None = None) -> dict[tuple[int, int, int], np.ndarray]:
    """Singular values (descending) from a spectra.parquet (`rankscope analyze`), keyed by (step, layer, head),
    for one kind and component (and the given steps)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["step", "layer", "component", "head", "kind", "index", "value"])
    mask = pc.and_(pc.equal(t["kind"], kind), pc.equal(t["component"], component))
    t = t.filter(mask)
    if steps is not None:
        t = t.filter(pc.is_in(t["step"], value_set=pa.array(sorted(set(steps)), type=t.schema.field("step").type)))
    cols = {c: t[c].to_numpy() for c in ("step", "layer", "head", "index", "value")}
    out: dict[tuple[int, int, int], list[tuple[int, float]]] = {}
    for st, la, he, ix, v in zip(*cols.values()):
        out.setdefault((int(st), int(la), int(he)), []).append((int(ix), float(v)))
    return {key: np.array([v for _, v in sorted(vals)]) for key, vals in out.items()}
