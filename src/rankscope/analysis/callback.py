"""In-loop rank metrics: every `analysis.every` steps, and just before / after each ReLoRA merge.

Logs into metrics.jsonl, for each component c in `analysis.components` (default the paper's
attention V, O, per-head OV circuit and SwiGLU down projection w2; Weiss et al. 2025, §4):
  rank/per/c    PER of the effective weight, mean over layers (and heads, for ov / ov_product)
  rank/cond/c   condition number s_max / s_min, geometric mean over layers (and heads); for ov_product the
                condition number over its numerical rank (the d x d product O_h V_g has rank <= hd,
                so its s_min is 0)
  .../L{i}      the same per layer with `analysis.per_layer`
The OV forms are those of the offline analysis (analysis.components): `ov` pico-analyze's per-head
V_g O_h (hd x hd, PER / hd), `ov_layer` its per-layer concatenation (hd x d), `ov_product` O_h V_g.
Merge events add the same keys suffixed `/before_merge` and `/after_merge`. Weights are read from
the model's state dict (LoRA-wrapped linears: W0 + (alpha/r) B A) and decomposed batched, on the
model's device.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from rankscope.analysis import components as C
from rankscope.analysis.spectra import analyze_items
from rankscope.adapters.stored import adapter_layout

MERGE_EVENTS = ("before_merge", "after_merge")


class RankCallback:
    def __init__(self, cfg):
        self.cfg = cfg
        self.every = cfg.analysis.every
        self.components = list(cfg.analysis.components)
        self.config = cfg.to_dict()
        self.layout = (cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.head_dim)

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        ov = [c for c in self.components if c in C.OV_FORMS]
        want = set(self.components) | ({"wo", "wv"} if ov else set())
        state = {}
        for key, t in model.state_dict().items():
            key = key.removeprefix("_orig_mod.").removeprefix("module.")  # torch.compile / DDP wrappers
            for suffix in (".base.weight", ".lora_A", ".lora_B", ".weight"):
                if key.endswith(suffix):
                    parsed = C.parse_module(key[: -len(suffix)])
                    if parsed and parsed[1] in want and t.dim() == 2:
                        state[key] = t.detach()
                    break
        adapters = {n.removeprefix("_orig_mod.").removeprefix("module."): f for n, f in adapter_layout(model).items()}
        weights, _ = C.effective_weights(state, adapters)
        items = [it for it in C.weight_items(weights, self.layout, ov) if it.component in self.components]
        device = next(iter(weights.values())).device if weights else "cpu"
        results = analyze_items(items, ["per", "condition_number", "condition_number_numerical"], self.cfg.analysis.dtype, device, keep_spectra=False)
        per_layer: dict[tuple[str, str, int], list[float]] = defaultdict(list)
        for r in results:
            comp = r.item.component
            per_layer[("per", comp, r.item.layer)].append(r.values["per"])
            cond = "condition_number_numerical" if comp == "ov_product" else "condition_number"  # O_h V_g: rank <= hd
            per_layer[("cond", comp, r.item.layer)].append(r.values[cond])
        out: dict[str, float] = {}
        by_comp: dict[tuple[str, str], list[float]] = defaultdict(list)
        for (metric, comp, layer), vals in sorted(per_layer.items()):
            v = _mean(metric, vals)
            by_comp[(metric, comp)].append(v)
            if self.cfg.analysis.per_layer:
                out[f"rank/{metric}/{comp}/L{layer}"] = v
        for (metric, comp), vals in by_comp.items():
            out[f"rank/{metric}/{comp}"] = _mean(metric, vals)
        return out

    def wants(self, run, step: int) -> bool:
        return step % self.every == 0

    def on_step_end(self, run, step: int) -> dict[str, Any] | None:
        if self.wants(run, step):
            return self.measure(run.eval_model)  # run: rankscope.train.callbacks.RunView
        return None

    def on_train_end(self, run) -> dict[str, Any] | None:
        return None

    def on_method_event(self, run, event: str, step: int, model: nn.Module) -> dict[str, Any] | None:
        if event not in MERGE_EVENTS:
            return None
        return {f"{k}/{event}": v for k, v in self.measure(model).items()}


def _mean(metric: str, vals: list[float]) -> float:
    """PER: the arithmetic mean; condition numbers: the geometric mean of the finite ones (NaN when none is)."""
    if metric != "cond":
        return float(np.mean(vals))
    from rankscope.analysis.compare import summarise

    g = summarise(vals, "geometric").value
    return math.nan if g is None else g


def build_rank_callback(cfg) -> RankCallback | None:
    return RankCallback(cfg) if cfg.analysis.every > 0 else None
