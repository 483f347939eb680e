"""What a fine-tune measures: `FewshotCallback` scores the target (val, test, shots) and the source domains at every
train.eval_every step and the last, keeps the weights of the lowest target val loss (RUN/fewshot/best.safetensors),
and at the end reports the chosen step's figures and the update dW = W_adapted - W_base per block matrix
(`update_measures`). It reads the run through the callbacks' view (rankscope.train.callbacks.RunView), with the
fine-tune's `base` and `fewshot` data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from rankscope.core.errors import RankscopeError
from rankscope.store import checkpoint as ckpt

TOP_K = 8  # the base's top singular directions the update's overlap is measured against
SCORED_SHOTS = 32  # the train loss of the train-test gap: the first this many shots in draw order (all of a smaller k)


def dense_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as a plain fp32 Decoder state dict (LoRA factors merged)."""
    from rankscope.adapters.stored import adapter_layout, merged_state_dict

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: v.float() for k, v in merged_state_dict(state, adapter_layout(model)).items()}


def update_measures(base: dict[str, torch.Tensor], adapted: dict[str, torch.Tensor], top_k: int = TOP_K) -> dict[str, dict[str, float]]:
    """Per block matrix (2-D weights but the embedding and head), of dW = adapted - base in float64:
    per (proportional effective rank), cond_numerical (s_max / smallest s above max(m, n) eps s_max),
    changed (fraction of entries whose stored value changed at all), top_overlap (||U_k^T dW||_F^2 / ||dW||_F^2
    with U_k the base's top-k left singular vectors; k / m for a random direction) and norm (||dW||_F)."""
    from rankscope.spectral import matrix_metrics

    out = {}
    for name, w0 in base.items():
        if w0.dim() != 2 or not name.startswith("blocks."):
            continue
        w1 = adapted[name]
        dw = w1.double() - w0.double()
        norm = float(torch.linalg.matrix_norm(dw))
        m = matrix_metrics(dw.float(), ["per", "condition_number_numerical"])  # fp32 eps: the weights are stored in fp32
        k = min(top_k, *w0.shape)
        U = torch.linalg.svd(w0.double(), full_matrices=False).U[:, :k]  # (m, k)
        overlap = float((U.T @ dw).square().sum() / dw.square().sum()) if norm > 0 else math.nan
        out[name] = {"per": float(m["per"][0]), "cond_numerical": float(m["condition_number_numerical"][0]),
                     "changed": float((w1 != w0).double().mean()), "top_overlap": overlap, "norm": norm,
                     "random_overlap": k / w0.shape[0]}
    return out


def mean_finite(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


# --------------------------------------------------------------------------- the callback
SELECTION_METRIC = "fewshot_val_loss"  # the one figure that picks the stopping step here and the lr in a study's tuning stage


def choose_step(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The evaluation row with the lowest target val loss (ties: the earlier step). Reads nothing else: test
    figures ride along in the rows but never choose."""
    return min(history, key=lambda r: (r[SELECTION_METRIC], r["step"]))


class FewshotCallback:
    """Scores the target (val, test, shots) and the source domains at every train.eval_every step and the last;
    keeps the weights of the lowest target val loss; at the end reports the chosen step's figures (summary.json).
    The stopping step is chosen on val only: test is scored at every candidate step and read at the chosen one."""

    def __init__(self):
        self.history: list[dict[str, Any]] | None = None  # rows of earlier evaluations (from metrics.jsonl on a resume)
        self.base_scores: dict[str, float] | None = None

    def wants(self, trainer, step: int) -> bool:
        t = trainer.cfg.train
        return step == t.max_steps or bool(t.eval_every and step % t.eval_every == 0)

    def scores(self, trainer, model: nn.Module) -> dict[str, float]:
        from rankscope.data.fewshot import first
        from rankscope.evaluate.perplexity import score_documents, summarize

        fs, t = trainer.fewshot, trainer.cfg.train
        out = {}
        model.eval()
        try:
            for name, ds in (("val", fs.val), ("test", fs.test), ("train", first(fs.shots, SCORED_SHOTS)), ("source", fs.source)):
                nll = score_documents(model, ds, ds.rows, t.seq_len, trainer.cfg.eval.batch_size, trainer.precision)
                s = summarize(nll.sum(), int((ds.rows[:, 1] - ds.rows[:, 0]).sum()), int(ds.rows[:, 3].sum()))
                out[f"fewshot_{name}_loss"], out[f"fewshot_{name}_bpb"] = s["loss"], s["bpb"]
        finally:
            model.train()
        return out

    def load(self, trainer, upto: int) -> None:
        from rankscope.train.summary import read_metrics

        if self.history is None:
            rows = read_metrics(Path(trainer.run_dir))
            self.history = [r for r in rows if "fewshot_val_loss" in r and r.get("step", 0) <= upto]
        if self.base_scores is None:
            path = Path(trainer.run_dir) / "fewshot" / "base_scores.json"
            if path.is_file():
                self.base_scores = json.loads(path.read_text())
            else:
                from rankscope.model import Decoder

                with torch.random.fork_rng(devices=[]):
                    model = Decoder(trainer.cfg.model)
                model.load_state_dict(trainer.base.state)
                self.base_scores = self.scores(trainer, model.to(trainer.device))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(self.base_scores, indent=1))

    def on_step_end(self, trainer, step: int) -> dict[str, Any] | None:
        if not self.wants(trainer, step):
            return None
        self.load(trainer, step - 1)
        row = self.scores(trainer, trainer.eval_model)
        best = min((r[SELECTION_METRIC] for r in self.history), default=math.inf)
        self.history.append({"step": step, **row})
        if row[SELECTION_METRIC] < best:  # the stopping step so far: keep its weights (ties keep the earlier step)
            ckpt.save_tensors_atomic(Path(trainer.run_dir) / "fewshot" / "best.safetensors", dense_weights(trainer.eval_model),
                                     {"step": str(step)})
        return row

    def on_train_end(self, trainer) -> dict[str, Any]:
        from safetensors import safe_open
        from safetensors.torch import load_file

        from rankscope.train.summary import read_metrics

        self.load(trainer, trainer.step)
        if not self.history:
            return {}
        chosen = choose_step(self.history)
        path = Path(trainer.run_dir) / "fewshot" / "best.safetensors"
        with safe_open(str(path), "pt") as f:
            kept = int(f.metadata()["step"])
        if kept != chosen["step"]:
            raise RankscopeError(f"{path} holds step {kept}, not the chosen step {chosen['step']}; delete {path.parent} and the run's "
                                 "checkpoints to fine-tune again")
        per_matrix = update_measures(trainer.base.state, load_file(str(path)))
        (path.parent / "update.json").write_text(json.dumps({"step": chosen["step"], "top_k": TOP_K, "matrices": per_matrix}, indent=1))
        b = self.base_scores
        fs = trainer.fewshot
        steps = [r for r in self.history if r["step"] > 0]
        t = trainer.cfg.train
        per_step = t.batch_size * t.grad_accum * t.seq_len * trainer.dist.world_size
        step_seconds = [per_step / r["tokens_per_s"] for r in read_metrics(Path(trainer.run_dir)) if r.get("tokens_per_s")]
        out = {
            "fewshot_target": fs.domain, "fewshot_shots": int(len(fs.shots.rows)),
            "fewshot_shot_tokens": int((fs.shots.rows[:, 1] - fs.shots.rows[:, 0]).sum()),
            "fewshot_stop_step": int(chosen["step"]), "fewshot_evaluated_steps": [int(r["step"]) for r in steps],
            **{k: chosen[k] for k in chosen if k.startswith("fewshot_")},
            "fewshot_gap": chosen["fewshot_test_loss"] - chosen["fewshot_train_loss"],
            "fewshot_forgetting": chosen["fewshot_source_loss"] - b["fewshot_source_loss"],
            "fewshot_gain": b["fewshot_test_loss"] - chosen["fewshot_test_loss"],
            **{f"fewshot_base_{k[len('fewshot_'):]}": v for k, v in b.items()},
            "dw_per": mean_finite([m["per"] for m in per_matrix.values()]),
            "dw_cond_numerical": mean_finite([m["cond_numerical"] for m in per_matrix.values()]),
            "dw_changed_fraction": mean_finite([m["changed"] for m in per_matrix.values()]),
            "dw_top_overlap": mean_finite([m["top_overlap"] for m in per_matrix.values()]),
            "step_seconds": float(np.median(step_seconds)) if step_seconds else None,
            "base": trainer.base.record(),
        }
        return out
