"""Learning-dynamics analysis: rank metrics of weights, gradients and updates across checkpoints.

API (for reports and notebooks):
  analyze_run(run_dir, kinds=..., metrics=..., dtype=..., steps=...) -> RunAnalysis
      .rows     dict of columns run, method, step, layer, component, head, kind, metric, value
      .spectra  dict of columns run, method, step, layer, component, head, kind, index, value
      .arrow() / .pandas()  the same as pyarrow Tables / pandas DataFrames
  analyze_runs(run_dirs, out_dir) -> {name: path}: rank_metrics.parquet, spectra.parquet, plots
  compare_subspaces(run_a, run_b, step, kind="cumulative_update", r=16) -> principal-angle rows
  matrix_metrics(mats, names) -> {metric: (B,) tensor}; principal_angles(X, Y, r)
  METRICS / register_metric: the metric registry (see rankscope.spectral for the formulas)
Layer is -1 and head is -1 where they do not apply (embeddings; non-OV components).
Components: wq wk wv wo w1 w2 w3 (embed lm_head), and the OV circuit in three forms: `ov` =
pico-analyze's per-head V_g O_h (hd x hd), `ov_layer` = its per-layer concatenation (hd x d, head -1),
`ov_product` = O_h V_g (d x d, rank <= hd); for weights, and as the circuit's change for update and
cumulative_update. Kinds: weight, lora_update, grad, update, cumulative_update, cycle_update. Every item
also has a `rank_bound` row (the ceiling of its PER); every `update` item `window_start` / `window_merges`
rows (its window and the ReLoRA merges in it).
Definitions, shapes and alignment at cycle boundaries: docs/metrics.md.
Modules: metrics (formulas), components (what is measured), spectra (batched SVD), run (a run's analysis and
its cache keys), tables (table I/O, the cache), reading (checkpoints, cycle files), bounds (rank bounds from the
method's capability), angles (subspace angles), compare (cycle ends, window labels, geometric summaries, rank-matched truncation: what the
findings' rank rows use), plots, callback (in-loop metrics), cli (`rankscope analyze`).
"""

from rankscope.spectral import METRICS, matrix_metrics, principal_angles, register_metric
from rankscope.analysis.run import AnalysisOptions, RunAnalysis, analyze_run, analyze_runs, compare_subspaces

__all__ = ["METRICS", "AnalysisOptions", "RunAnalysis", "analyze_run", "analyze_runs", "compare_subspaces", "matrix_metrics", "principal_angles", "register_metric"]
