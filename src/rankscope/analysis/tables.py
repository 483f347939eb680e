"""The analysis tables and their cache: columns of rows and spectra as plain dicts of lists, written as
parquet (atomic), and the per-checkpoint cache RUN/analysis/cache/<name>.{rows,spectra}.parquet under a key
(rankscope.analysis.run decides what goes into the key)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from rankscope.analysis.spectra import Result

ROW_COLUMNS = ("run", "method", "step", "layer", "component", "head", "kind", "metric", "value")
SPECTRA_COLUMNS = ("run", "method", "step", "layer", "component", "head", "kind", "index", "value")

Table = dict[str, list]


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


def with_run(table: Table, run: str, method: str) -> Table:
    n = len(next(iter(table.values()))) if table else 0
    return {"run": [run] * n, "method": [method] * n, **table}


def key_hash(obj: Any) -> str:
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
