"""Subspace angles: between consecutive ReLoRA cycle updates (rows of `cycle_update` items) and between the
same matrix of two runs at one step (`compare_subspaces`)."""

from __future__ import annotations

from pathlib import Path

import torch

from rankscope.analysis import components as C
from rankscope.spectral import AnalysisError, principal_angles
from rankscope.analysis.reading import load_state, read_meta
from rankscope.analysis.tables import ROW_COLUMNS, Table, empty


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
