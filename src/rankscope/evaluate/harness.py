"""BLiMP as lm-evaluation-harness tasks, scored the way `rankscope eval` scores it.

`rankscope lm-eval-tasks -o DIR [--blimp ../shared/data/blimp]` writes one task per BLiMP file
(`blimp_local_<UID>`, its rows read by lm-eval from the local jsonl through HF `datasets`, nothing
downloaded) and a group `blimp_local` whose `acc` is the mean over paradigms, as our overall
accuracy. Each sentence is scored after the BOS token (the export's BOS is our EOS) with no
leading space (`target_delimiter: ""`), exactly as rankscope.evaluate.blimp does. Then:

    rankscope export RUN -o runs/hf
    lm_eval --model hf --model_args pretrained=runs/hf,dtype=float32 --include_path DIR --tasks blimp_local

One difference remains: lm-eval counts a tie (equal log-probabilities) as right, rankscope as wrong.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from rankscope.evaluate.blimp import SHARED_BLIMP
from rankscope.core.errors import DataError

GROUP = "blimp_local"
TEMPLATE = "_blimp_local_template_yaml"  # lm-eval reads every *.yaml as a task: the template is not one

TASK_TEMPLATE = {
    "dataset_path": "json",  # HF datasets' json builder on the local file
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "",
    "target_delimiter": "",
    "doc_to_target": 0,
    "doc_to_choice": "{{[sentence_good, sentence_bad]}}",
    "num_fewshot": 0,
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}


def write_blimp_tasks(blimp_dir: str | Path, out: str | Path) -> list[str]:
    """Write the task folder for every *.jsonl in `blimp_dir`; returns the task names."""
    blimp_dir, out = Path(blimp_dir).resolve(), Path(out)
    files = sorted(blimp_dir.glob("*.jsonl")) if blimp_dir.is_dir() else []
    if not files:
        raise DataError(f"no BLiMP *.jsonl files in {blimp_dir}; pass --blimp with the folder of the 67 BLiMP files (e.g. ../shared/data/blimp)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot make the task folder {out} ({e.strerror}); pass -o with a new or existing folder") from None
    (out / TEMPLATE).write_text(yaml.safe_dump(TASK_TEMPLATE, sort_keys=False))
    names = []
    for f in files:
        name = f"{GROUP}_{f.stem}"
        task = {"include": TEMPLATE, "task": name, "dataset_kwargs": {"data_files": {"test": str(f)}}}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
        names.append(name)
    group = {"group": GROUP, "task": names,
             "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}],  # mean over paradigms
             "metadata": {"version": 1.0}}
    (out / f"_{GROUP}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return names


def add_lm_eval_args(p) -> None:
    p.add_argument("-o", "--output", required=True, help="folder for the task yaml files (pass it to lm_eval --include_path)")
    p.add_argument("--blimp", default=str(SHARED_BLIMP), help="folder of BLiMP jsonl files (default ../shared/data/blimp beside the repository)")


def cmd_lm_eval_tasks(args) -> None:
    names = write_blimp_tasks(args.blimp, args.output)
    print(f"wrote {len(names)} tasks and the group '{GROUP}' to {args.output}")
    print(f"run: lm_eval --model hf --model_args pretrained=EXPORT_DIR,dtype=float32 --include_path {args.output} --tasks {GROUP}")
