"""Pre-registered findings: each rule of a study file gets an estimate, a 95% interval and a verdict.

A study file states its rules before any run (`findings:`; the paper's four findings when `rules` is left out):

    findings:
      method: relora            # the method under test
      reference: full           # what it is compared with, seed by seed
      confidence: 0.95
      rules:
        - {id: a-loss, finding: a, test: paired, metric: final_val_loss, claim: higher}
        - {id: b-loss, finding: b, test: slope, metric: final_val_loss, claim: higher}
        - {id: c-blimp, finding: c, test: paired, metric: blimp_overall, claim: lower, chance: 0.5, margin: 0.05}
        - {id: d-per, finding: d, test: rank, kind: [cumulative_update, grad], component: [wv, wo, ov, w2],
           metric: per, phase: early, claim: lower}

Tests (rankscope.studies.stats does the arithmetic):
  paired  per size: d_k = metric(method, seed k) - metric(reference, seed k); the mean of d_k and its t interval
          (bootstrap beside it where n >= 5). Metrics are read as the report reads them (eval.json, else summary.json);
          a pair whose values come from different files is "not measured". val_bpb_macro / val_loss_macro average the
          training domains only (held-out domains, data.eval_only_domains, are left out). With `chance` and `margin`:
          where both methods' mean lies within `margin` of `chance`, the verdict is inconclusive, "not testable at this
          scale"; the distance from chance is always stated.
  slope   across groups (sizes, or token budgets with `axis: tokens_per_param`): one point per group, x = log(body
          parameters) or log(tokens per body parameter) of the reference runs, y = the mean gap over the group's seeds;
          OLS with k - 2 degrees of freedom (seed is nested in group), k >= 3 groups. `claim: higher` means the gap grows
          along x. `extrapolate_to: X` adds the line's value at X with its interval, labelled an extrapolation.
  rank    per size and for each (kind, component) named: from each run's analysis/rank_metrics.parquet
          (`rankscope analyze`), the mean of `metric` over layers, heads and the checkpoints of the phase that both
          runs of the pair have (early: 0 < step <= max_steps / 4; end: the last common checkpoint), then
          d_k = log(mean(method) / mean(reference)) per seed, and its t interval. Condition numbers are summarised by
          geometric means, everything else by arithmetic means; non-finite values are left out and counted in the row
          (`non_finite`); a (kind, component, metric) the analysis did not measure is reported as "not measured".
          The raw `condition_number` of a matrix whose s_min sits at the rounding floor (analysis row rank_deficient = 1)
          measures floating point: such a row is "rank-deficient", never a finite effect (use condition_number_numerical).
          `reference_kind: grad` compares the method's `kind` with the reference's gradient, as the paper's notebooks did
          ("as the paper measured it"); gradient rows and such cross-object rows carry `counts_toward_verdict: false`
          and `object`; every `update` row names its windows (one cycle, within one cycle, spans N merges).
  rank-matched  as rank, metric per: the reference's matrix truncated to the method's numerical rank at the same
          (step, layer, head), PER of that top-k spectrum (from spectra.parquet), against the method's PER.

Families and verdicts (apply_statistics): each finding pre-registers at most one primary rule (`primary: true`); its rows
form the primary family, Holm-adjusted across all findings; every other row is secondary (exploratory), adjusted within
its finding by `secondary_correction` (bh: Benjamini-Hochberg, default; or holm). The verdict uses the adjusted p (alpha =
1 - confidence): confirmed (the interval also beyond `min_effect`), "not reproduced: opposite direction", "no meaningful
difference" (TOST against the rule's pre-registered `sesoi`, adjusted in the same family), or inconclusive with the
minimum detectable effect at 80% power. A primary endpoint needs >= min_primary_seeds (5) paired seeds. A control row
whose lr equals the main lr is "= main"; it and "not measured" are not verdicts and are not counted as such. Every verdict
names the scale it was tested at; rows missing data say why; no row is dropped.

Modules, each one concern (an import runs down this list, never up): verdicts (the words, the interval rule, the counts),
rules (the spec and PAPER_RULES, through the schema loader), scale (body parameters, size order, the scale phrase), rows
(paired and slope rows), rank (rank and rank-matched rows), families (apply_statistics), engine (evaluate_findings,
study_findings, report_findings), tables (the report's tables). This package exposes what callers use.
"""

from rankscope.studies.findings.engine import default_spec, evaluate_findings, read_sweep, report_findings, study_findings
from rankscope.studies.findings.families import apply_statistics
from rankscope.studies.findings.rows import metric_value
from rankscope.studies.findings.rules import (CLAIMS, PAPER_RULES, PHASES, RANK_TESTS, SLOPE_AXES, TESTS, FindingsSpec, Rule,
                                              validate_findings)
from rankscope.studies.findings.scale import PAPER_SCALE, body_params, scale_phrase, shape_body_params, size_order
from rankscope.studies.findings.tables import findings_tables, scale_box, tuning_table
from rankscope.studies.findings.verdicts import (CONTROL_SUFFIX, EQUIVALENT, GRADIENT_NOTE, MIN_PRIMARY_SEEDS, NOT_A_VERDICT, OPPOSITE,
                                                 PAPER_NOTE, RANK_DEFICIENT, SAME_AS_MAIN, UPDATE_KINDS, VERDICTS, decide,
                                                 verdict_counts)

__all__ = ["CLAIMS", "CONTROL_SUFFIX", "EQUIVALENT", "GRADIENT_NOTE", "MIN_PRIMARY_SEEDS", "NOT_A_VERDICT", "OPPOSITE", "PAPER_NOTE",
           "PAPER_RULES", "PAPER_SCALE", "PHASES", "RANK_DEFICIENT", "RANK_TESTS", "SAME_AS_MAIN", "SLOPE_AXES", "TESTS", "UPDATE_KINDS",
           "VERDICTS", "FindingsSpec", "Rule", "apply_statistics", "body_params", "decide", "default_spec", "evaluate_findings",
           "findings_tables", "metric_value", "read_sweep", "report_findings", "scale_box", "scale_phrase", "shape_body_params",
           "size_order", "study_findings", "tuning_table", "validate_findings", "verdict_counts"]
