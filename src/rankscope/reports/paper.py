"""The paper's own numbers (Weiss et al. 2025, at pico scale), kept apart from any study's: the reference the report's
table and figure quote, always labelled as the paper's and never drawn on a study's axes."""

from __future__ import annotations

from typing import Any

from rankscope.reports.tables import _f

# Weiss et al. (2025), "Investigating ReLoRA", pico-decoder at step 20k (their Table/Figures).
PAPER_REFERENCE = {
    "citation": "Weiss et al. (2025), Investigating ReLoRA: Effects on the Learning Dynamics of Small Language Models",
    "scale": "pico-tiny (d=96) / pico-small (d=384), 12 layers, 20k steps x 1024 x 2048 tokens on Dolma",
    "blimp_step_20k": {("full", "pico-tiny"): 0.6504, ("full", "pico-small"): 0.7014, ("relora", "pico-tiny"): 0.6236, ("relora", "pico-small"): 0.6308},
    "paloma_ppl_relora": {"pico-tiny": 228.09, "pico-small": 83.55},
}


def paper_table() -> dict[str, Any]:
    """The paper's reference numbers as a report table (cells sourced to the paper)."""
    ref = PAPER_REFERENCE

    def c(v):
        return None if v is None else {"mean": v, "std": None, "n": 1, "values": [{"value": v, "source": ref["citation"]}]}

    rows = [{"label": f"{m} / {s} (paper)", "cells": [c(v), c(ref["paloma_ppl_relora"].get(s) if m == "relora" else None)]}
            for (m, s), v in ref["blimp_step_20k"].items()]
    return {"title": f"Reference — the PAPER's numbers, not this study's: {ref['citation']}; {ref['scale']}",
            "columns": ["method / size (paper)", "BLiMP at step 20k", "Paloma perplexity at step 20k"], "rows": rows,
            "formats": [_f(4), _f(2)], "note": "Paloma perplexity of full-rank models is not published in the paper's repository (–)."}

