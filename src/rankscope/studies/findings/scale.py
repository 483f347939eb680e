"""Scale: how big the runs' models are (body parameters, by count or by arithmetic on the shape), the order of sizes, and
the phrase every verdict names its scale with; the paper's scale for the scale box beside it."""

from __future__ import annotations

import math
from typing import Any


def _sizes(runs: list[Any]) -> list[str]:
    return size_order(runs)


def shape_body_params(model: dict[str, Any]) -> int | None:
    """Non-embedding parameters of a model section (its preset's shape with any field overridden), by arithmetic:
    per block q/k/v/o (grouped-query k, v), the SwiGLU's three linears and two norm gains, and a final norm."""
    from rankscope.config import PRESETS

    shape = {**PRESETS.get(model.get("preset") or "", {}), **{k: v for k, v in model.items() if v is not None}}
    try:
        d, f, L = int(shape["d_model"]), int(shape["ffn_dim"]), int(shape["n_layers"])
        kv = int(shape["n_kv_heads"]) * (d // int(shape["n_heads"]))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d


def size_order(runs: list[Any]) -> list[str]:
    """The runs' size labels, smallest model body first (non-embedding parameters: summary.json's count less the
    embeddings, else the config's shape; the preset's place in config.PRESETS where neither is known); labels as given."""
    from rankscope.config import PRESETS

    order = list(PRESETS)
    sizes = list(dict.fromkeys(r.size for r in runs))
    params: dict[str, float] = {}
    for r in runs:
        n = body_params(r) or shape_body_params(((r.config or {}).get("model") or {}) if isinstance((r.config or {}).get("model"), dict) else {})
        if n:
            params[r.size] = min(params.get(r.size, math.inf), n)
    if len(params) < len(sizes):  # a size without a count: fall back to the preset's name (the config's shape is unknown)
        for s in sizes:
            base = s.split(" ")[0]
            if s not in params and base in PRESETS:
                params[s] = shape_body_params({"preset": base}) or math.inf
    return sorted(sizes, key=lambda s: (params.get(s, math.inf), order.index(s.split(" ")[0]) if s.split(" ")[0] in order else len(order),
                                        sizes.index(s)))



def body_params(run: Any) -> int | None:
    """Non-embedding parameters of the run's architecture, by arithmetic from its config's model shape; where the
    shape is not known, all parameters less the token embedding and (untied) output head. The arithmetic comes
    first: a LoRA run's parameter count includes its adapter factors, which are not the model's body."""
    m = (run.config or {}).get("model") or {}
    if isinstance(m, dict) and (n := shape_body_params(m)):
        return n
    total, v, d = run.summary.get("parameters"), m.get("vocab_size"), m.get("d_model")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (total, v, d)):
        return None
    return total - v * d * (1 if m.get("tie_embeddings") else 2)


def _si(x: float) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _span(xs: list[float]) -> str:
    lo, hi = min(xs), max(xs)
    return _si(lo) if _si(lo) == _si(hi) else f"{_si(lo)}-{_si(hi)}"


def scale_phrase(runs: list[Any], reference: str | None = None) -> str:
    """What a row tested, in words: `61.7k body parameters, 655k tokens (10.6 tokens per body parameter)`; parameters are
    counted on the reference method's runs (an adapter method's count includes its adapters)."""
    runs = _model_runs(runs, reference)
    bodies = [b for b in map(body_params, runs) if b]
    tokens = [float(r.summary["tokens"]) for r in runs if isinstance(r.summary.get("tokens"), (int, float))]
    parts = []
    if bodies:
        parts.append(f"{_span(bodies)} body parameters")
    if tokens:
        parts.append(f"{_span(tokens)} tokens")
    if bodies and tokens:
        per = [float(r.summary["tokens"]) / b for r in runs if (b := body_params(r)) and isinstance(r.summary.get("tokens"), (int, float))]
        parts[-1] += f" ({_span(per)} tokens per body parameter)"
    return ", ".join(parts) or "this study's scale"


# Weiss et al. (2025): the paper's scale (shared/reference/README.md, "Scale"), beside this study's in every findings table
PAPER_SCALE = {"body (non-embedding) parameters": "1.62M (pico-tiny), 25.9M (pico-small)", "tokens per run": "41.9B",
               "tokens per body parameter": "25,800 (pico-tiny), 1,620 (pico-small)",
               "ReLoRA cycle length": "2,000 steps (4.19B tokens), 10 cycles"}


def _model_runs(runs: list[Any], reference: str | None) -> list[Any]:
    """The runs whose parameter count is the model's alone: the reference method's (an adapter method's count includes its
    adapters), else all."""
    ref = [r for r in runs if reference and r.method == reference]
    return ref or runs
