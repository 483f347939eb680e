"""Batched singular values of many matrices at once, and every requested metric on them.

Items of the same shape (and the same factor rank, for factored items) are stacked and decomposed
in one `torch.linalg.svdvals` call, in chunks of at most `max_chunk_bytes`. Factored items
(OV circuits, LoRA updates) never form the d x d product for their spectrum: see
`metrics.svdvals_factored`. Returns one `Result` per item, in the input order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rankscope.analysis.components import Item
from rankscope.spectral import Metric, Spectra, compute, resolve_metrics, svdvals, svdvals_factored, working_eps

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class Result:
    item: Item
    values: dict[str, float]
    s: np.ndarray | None  # singular values, descending (None unless keep_spectra)


def _group_key(it: Item) -> tuple:
    if it.mat is not None:
        return ("dense", it.mat.shape[0], it.mat.shape[1], it.mat.dtype)
    A, B = it.factors
    return ("factored", A.shape[1], A.shape[0], B.shape[1], A.dtype)


def analyze_items(items: list[Item], metrics: list[Metric] | list[str] | None = None, dtype: str | torch.dtype = "float64",
                  device: str | torch.device = "cpu", keep_spectra: bool = True, max_chunk_bytes: int = 256 << 20) -> list[Result]:
    """Metrics (and singular values) of every item, decomposing same-shape items in batches."""
    if metrics is None or (metrics and isinstance(metrics[0], str)):
        metrics = resolve_metrics(metrics)
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    need_entries = any(mt.needs_entries for mt in metrics)
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(_group_key(it), []).append(i)
    out: list[Result | None] = [None] * len(items)
    for key, idx in groups.items():
        m, n = items[idx[0]].shape
        eps = working_eps(key[-1], dt)
        per_item = m * n * torch.finfo(dt).bits // 8 if key[0] == "dense" or need_entries else (m + n) * key[1] * 8
        step = max(1, max_chunk_bytes // max(per_item, 1))
        for start in range(0, len(idx), step):
            chunk = [items[i] for i in idx[start:start + step]]
            if key[0] == "dense":
                mats = torch.stack([it.mat for it in chunk]).to(device=device, dtype=dt)  # (B, m, n)
                s = svdvals(mats, dt)
                entries = lambda mats=mats: mats  # noqa: E731
            else:
                A = torch.stack([it.factors[0] for it in chunk]).to(device=device, dtype=dt)  # (B, m, r)
                B = torch.stack([it.factors[1] for it in chunk]).to(device=device, dtype=dt)  # (B, r, n)
                s = svdvals_factored(A, B, dt)
                entries = lambda A=A, B=B: A @ B  # noqa: E731  (formed only for gini / hoyer)
            bound = torch.tensor([it.bound for it in chunk], dtype=torch.float64, device=s.device)
            spec = Spectra(s.to(torch.float64), m, n, eps, entries, bound)
            values = {name: v.cpu().numpy() for name, v in compute(spec, metrics).items()}
            s_np = spec.s.cpu().numpy() if keep_spectra else None
            for j, it in enumerate(chunk):
                out[idx[start + j]] = Result(it, {name: float(v[j]) for name, v in values.items()}, s_np[j] if s_np is not None else None)
    return out  # type: ignore[return-value]
