"""In-training evaluation: per-domain perplexity / bits-per-byte and BLiMP on a cadence.

Rows go into metrics.jsonl with the step (keys `val_loss/<domain>`, `val_ppl/<domain>`,
`val_bpb/<domain>`, `val_{loss,ppl,bpb}_macro` (domains weighted equally), `val_{loss,ppl,bpb}_all`
(every scored token pooled), `blimp_overall`, `blimp/<phenomenon>`; `test_`
instead of `val_` when eval.split=test) and the final values into summary.json. eval.every and
eval.blimp_every set the cadence; 0 means only at the end of training. The in-training evaluation
scores the first eval.max_docs documents of each domain (summary.json records the cap as
`eval_max_docs`), so it is a different estimate from `rankscope eval`'s (all documents by default).
"""

from __future__ import annotations

from typing import Any

from rankscope.config import RunConfig
from rankscope.evaluate.blimp import evaluate_blimp, load_pairs
from rankscope.evaluate.perplexity import corpus_docset, domain_perplexity


def flat_perplexity(result: dict, prefix: str = "val") -> dict[str, float]:
    row: dict[str, float] = {}
    for dom, r in result["domains"].items():
        for k in ("loss", "ppl", "bpb"):
            row[f"{prefix}_{k}/{dom}"] = r[k]
    for k in ("loss", "ppl", "bpb"):
        row[f"{prefix}_{k}_macro"] = result["macro"][k]
        row[f"{prefix}_{k}_all"] = result["all"][k]  # every scored token pooled (`rankscope eval`'s val_loss)
    return row


def flat_blimp(result: dict) -> dict[str, float]:
    return {"blimp_overall": result["overall"]["accuracy"], **{f"blimp/{ph}": r["accuracy"] for ph, r in result["phenomena"].items()}}


class EvalCallback:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.pairs = None
        self.latest: dict[str, Any] = {}
        self.latest_step = {"ppl": -1, "blimp": -1}

    def due(self, every: int, step: int, trainer) -> bool:
        return step == trainer.cfg.train.max_steps or bool(every and step % every == 0)

    def perplexity(self, trainer, step: int) -> dict[str, float]:
        e = self.cfg.eval
        result = domain_perplexity(trainer.eval_model, corpus_docset(trainer.corpus, e.split), self.cfg.train.seq_len,
                                   e.batch_size, e.max_docs, trainer.precision)
        self.latest_step["ppl"] = step
        return flat_perplexity(result, e.split)

    def blimp(self, trainer, step: int) -> dict[str, float]:
        e = self.cfg.eval
        if self.pairs is None:
            self.pairs = load_pairs(e.blimp_dir, e.blimp_max_pairs, e.blimp_skip_bad_rows, log=trainer.log)
        result = evaluate_blimp(trainer.eval_model, trainer.corpus.tokenizer, self.pairs, e.batch_size, trainer.precision)
        self.latest_step["blimp"] = step
        return flat_blimp(result)

    def perplexity_due(self, trainer, step: int) -> bool:
        return bool(self.cfg.eval.per_domain and self.due(self.cfg.eval.every, step, trainer))

    def blimp_due(self, trainer, step: int) -> bool:
        return bool(self.cfg.eval.blimp_dir and self.due(self.cfg.eval.blimp_every, step, trainer))

    def wants(self, trainer, step: int) -> bool:
        return self.perplexity_due(trainer, step) or self.blimp_due(trainer, step)

    def on_step_end(self, trainer, step: int) -> dict[str, Any] | None:
        row: dict[str, Any] = {}
        if self.perplexity_due(trainer, step):
            row.update(self.perplexity(trainer, step))
        if self.blimp_due(trainer, step):
            row.update(self.blimp(trainer, step))
        self.latest.update(row)
        return row or None

    def on_train_end(self, trainer) -> dict[str, Any] | None:
        # a resumed, already finished run never passed through on_step_end: evaluate it now
        e = self.cfg.eval
        if e.per_domain and self.latest_step["ppl"] != trainer.step:
            self.latest.update(self.perplexity(trainer, trainer.step))
        if e.blimp_dir and self.latest_step["blimp"] != trainer.step:
            self.latest.update(self.blimp(trainer, trainer.step))
        return {**self.latest, "eval_max_docs": e.max_docs} if self.latest else None


def build_eval_callback(cfg: RunConfig) -> EvalCallback | None:
    return EvalCallback(cfg) if (cfg.eval.per_domain or cfg.eval.blimp_dir) else None
