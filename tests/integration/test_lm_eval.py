"""lm-evaluation-harness opens an exported run with no custom code and scores BLiMP as we do.

`rankscope lm-eval-tasks` turns a slice of two real BLiMP files into lm-eval tasks; lm-eval's `hf`
model loads the export of a trained ReLoRA run (merged on export). Its per-sentence
log-likelihoods must equal rankscope's own scoring of the same pairs, and so must the accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import BLIMP_DIR, tiny_config

from rankscope.cli import main
from rankscope.evaluate.blimp import evaluate_blimp, load_pairs, sentence_logprobs
from rankscope.evaluate.harness import GROUP
from rankscope.export import export
from rankscope.evaluate.loading import load_trained
from rankscope.train.loop import train

# two paradigms whose rows have different extra fields (one_prefix_* in the second only)
PARADIGMS = ("regular_plural_subject_verb_agreement_1", "determiner_noun_agreement_1")
N_PAIRS = 20


@pytest.fixture(scope="module")
def exported(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    run = root / "relora"
    train(tiny_config(data_dir, "train.max_steps=12", "checkpoint.every=0", "method.name=relora", "method.relora.rank=4",
                      "method.relora.reset_every=5", "method.relora.restart_warmup_steps=1"), run, log=lambda *a: None)
    return run, export(run, root / "hf")


def blimp_slice(tmp_path: Path) -> Path:
    """The first N_PAIRS rows of each of PARADIGMS, copied into tmp_path (never into the repo)."""
    data = tmp_path / "blimp"
    data.mkdir()
    for uid in PARADIGMS:
        source = BLIMP_DIR / f"{uid}.jsonl"
        if not source.is_file():
            pytest.skip(f"{source} is absent (the shared BLiMP data sits beside the repository)")
        (data / source.name).write_text("\n".join(source.read_text().splitlines()[:N_PAIRS]) + "\n")
    return data


def test_lm_eval_scores_the_export_as_rankscope_does(exported, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    run, folder = exported
    data = blimp_slice(tmp_path)
    assert main(["lm-eval-tasks", "-o", str(tmp_path / "tasks"), "--blimp", str(data)]) == 0
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=[GROUP],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")), device="cpu", batch_size=8,
                                  log_samples=True)
    loaded = load_trained(run)  # unmerged: the LoRA factors applied on the fly
    pairs = load_pairs(str(data))
    ours = sentence_logprobs(loaded.model, loaded.corpus.tokenizer, [t for p in pairs for t in (p.good, p.bad)], 8).reshape(-1, 2)
    samples = [s for uid in sorted(PARADIGMS) for s in sorted(out["samples"][f"{GROUP}_{uid}"], key=lambda s: s["doc_id"])]
    assert [s["doc"]["sentence_good"] for s in samples] == [p.good for p in pairs]  # load_pairs reads files sorted by name
    theirs = [[r[0][0] for r in s["resps"]] for s in samples]  # [good, bad] log-likelihoods
    assert np.abs(np.array(theirs) - ours).max() < 1e-3, np.abs(np.array(theirs) - ours).max()
    result = evaluate_blimp(loaded.model, loaded.corpus.tokenizer, pairs, 8)
    assert result["overall"]["ties"] == 0  # lm-eval counts a tie as right, rankscope as wrong
    # the group's acc is the mean over paradigms, as rankscope's overall accuracy
    assert out["results"][GROUP]["acc,none"] == pytest.approx(result["overall"]["accuracy"])
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_lm_eval_tasks_errors_are_one_line(tmp_path, capsys):
    assert main(["lm-eval-tasks", "-o", str(tmp_path / "tasks"), "--blimp", str(tmp_path)]) == 2
    assert "no BLiMP *.jsonl files" in capsys.readouterr().err
    (tmp_path / "x.jsonl").write_text('{"sentence_good": "a", "sentence_bad": "b"}\n')
    (tmp_path / "taken").write_text("a file")
    assert main(["lm-eval-tasks", "-o", str(tmp_path / "taken"), "--blimp", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot make the task folder") and err.count("\n") == 1
