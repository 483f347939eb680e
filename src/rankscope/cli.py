"""`rankscope VERB ...`: one plain function per verb, listed in the table `VERBS` (verb -> help, function,
arguments). The modules that own a verb (analysis, studies, reports, export, lm-eval tasks) define
`cmd_*` and `add_*_args` and never import this module. Errors a user can cause print one line, exit 2.

Those modules are imported only for the verb that runs (`Lazy`), so `rankscope --help` and `rankscope info`
answer without importing torch (tests/integration/test_small_cuts.py checks that torch stays out of sys.modules)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from rankscope import startup# first: Ctrl-C while the modules below import is one line (rankscope.startup)

from pathlib import Path
from typing import Any, Callable

from rankscope.core.errors import MACHINE_ERRNOS, MACHINE_EXIT_CODE, ConfigError, MachineError, RankscopeError
from rankscope.core.preemption import Preempted

startup.imported()


class Lazy:
    """`module:function`, imported on the first call: a verb's module (and torch behind it) loads only when that verb runs."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


class DefaultsFormatter(argparse.HelpFormatter):
    """--help lists each option's default where it has a meaningful one (not None, False or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config, e.g. configs/micro.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-3")


# --------------------------------------------------------------------------- verbs
def cmd_prepare(args) -> None:
    from rankscope.methods import load_config
    from rankscope.data.corpus import prepare

    cfg = load_config(args.config, args.overrides)
    corpus = prepare(cfg.data, force=args.force)
    m = corpus.manifest
    print(f"corpus: {corpus.root}")
    print(f"tokenizer: {m['tokenizer']['spec']} ({m['tokenizer']['vocab_size']} tokens, hash {m['tokenizer']['hash']})")
    for split, c in m["splits"].items():
        doms = ", ".join(f"{d} {v['tokens']:,}" for d, v in c["domains"].items())
        print(f"  {split:5s} {c['documents']:6d} docs {c['tokens']:>11,} tokens  ({doms})")
    print("sources: " + "; ".join(f"{k}: {v['licence']}" for k, v in m["sources"].items()))


def at_least(value: int, low: int, flag: str) -> int:
    """A numeric CLI option checked up front: one line naming the flag, the value and the bound."""
    if value < low:
        raise ConfigError(f"{flag} must be >= {low}, got {value}")
    return value


def cmd_train(args) -> None:
    import os

    from rankscope.methods import load_config
    from rankscope.core.errors import ConfigError
    from rankscope.train.callbacks import build_callbacks
    from rankscope.core.paths import check_output_dir
    from rankscope.train.loop import train

    at_least(args.nproc, 1, "--nproc")
    cfg = load_config(args.config, args.overrides)  # validate before launching anything
    out = Path(args.output or f"runs/{Path(args.config).stem}")
    if os.environ.get("RANK", "0") == "0":  # the other ranks never touch the run directory before rank 0
        check_output_dir(out, "-o")
    if (args.nproc > 1 or args.nnodes > 1) and "WORLD_SIZE" not in os.environ:
        from rankscope.parallel.distributed import launch

        if args.nnodes > 1 and not args.rdzv_endpoint:
            raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node), the same on every node")
        argv = ["train", args.config, *args.overrides, "-o", str(out), *(["--restart"] if args.restart else []),
                *(["--extend"] if args.extend else [])]
        raise SystemExit(launch(argv, args.nproc, args.nnodes, args.rdzv_endpoint, args.rdzv_id))
    summary = train(cfg, out, restart=args.restart, callbacks=build_callbacks(cfg), extend=args.extend)
    if summary.get("run_dir") is None:  # not rank 0
        return
    print(f"\nfinished {summary['steps']} steps ({summary['tokens']:,} tokens): train loss {summary['final_train_loss']:.4f}, "
          f"val loss {summary['final_val_loss']:.4f} (mean of train.eval_batches={cfg.train.eval_batches} val batches; "
          f"`rankscope eval` scores every held-out document), {summary['tokens_per_s'] or 0:,.0f} tokens/s ({summary['precision']})")
    print(f"run directory: {out}  (metrics.jsonl, summary.json, checkpoints/)")


def cmd_eval(args) -> None:
    from rankscope.evaluate import run_eval
    from rankscope.core.paths import check_output_file

    at_least(args.batch_size, 1, "--batch-size")
    for flag, value in (("--max-docs", args.max_docs), ("--blimp-max-pairs", args.blimp_max_pairs), ("--hf-max-docs", args.hf_max_docs)):
        at_least(value, 0, flag)
    if args.json:  # before any compute: a bad target must not cost the evaluation
        check_output_file(args.json, "--json")
    result = run_eval(args.path, cache_dir=args.cache_dir,
                      blimp_dir=args.blimp, batch_size=args.batch_size, max_docs=args.max_docs, blimp_max_pairs=args.blimp_max_pairs,
                      split=args.split, files=args.files, hf_dataset=args.hf_dataset, hf_config=args.hf_config, hf_split=args.hf_split,
                      text_field=args.text_field, hf_max_docs=args.hf_max_docs, skip_bad_rows=args.skip_bad_rows, device=args.device,
                      paloma=args.paloma, paloma_opts=dict(split=args.paloma_split, source_field=args.paloma_source_field,
                                                           ids_field=args.paloma_ids_field, text_field=args.paloma_text_field,
                                                           use_text=args.paloma_use_text, max_rows=args.paloma_max_rows,
                                                           max_length=args.paloma_max_length),
                      progress=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


def cmd_pairs(args) -> None:
    from rankscope.evaluate.pairs import write_pairs
    from rankscope.core.paths import check_output_dir

    at_least(args.n, 1, "-n")
    check_output_dir(args.output, "-o")
    counts = write_pairs(args.output, args.n, args.seed)
    print(f"wrote {sum(counts.values()):,} generated minimal pairs (a substitute, not BLiMP) in {len(counts)} files to {args.output}")


def param_count(shape: dict[str, Any], tie_embeddings: bool = False) -> int:
    """Parameters of `model.Decoder` with this shape, by arithmetic (no torch import): embeddings and head,
    per block q/k/v/o (grouped-query k, v), the SwiGLU's three linears and two RMSNorm gains, a final norm.
    tests/integration/test_small_cuts.py checks it against Decoder.num_params() for every preset."""
    d, f, v = shape["d_model"], shape["ffn_dim"], shape["vocab_size"]
    kv = shape["n_kv_heads"] * (d // shape["n_heads"])
    block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    return v * d * (1 if tie_embeddings else 2) + shape["n_layers"] * block + d


def field_rows(rows: list[tuple[str, str, Any, str]]) -> list[str]:
    """`info --fields` lines: name, type and default in columns as wide as their longest entry."""
    cells = [(name, tp, repr(default), help) for name, tp, default, help in rows]
    w = [max(len(c[i]) for c in cells) for i in range(3)]
    return [f"{a:{w[0]}s}  {b:{w[1]}s}  {c:{w[2]}s}  {h}" for a, b, c, h in cells]


def cmd_info(args) -> None:
    from rankscope.config import PRESETS

    if args.fields:
        from rankscope.methods import describe_fields  # the methods' options: imports torch

        print("\n".join(field_rows(describe_fields())))
        return
    print(f"{'preset':14s} {'d_model':>7s} {'layers':>6s} {'heads':>5s} {'kv':>3s} {'ffn':>5s} {'vocab':>6s} {'params':>12s} "
          f"{'body':>12s} {'embeddings':>12s}")
    for name, shape in PRESETS.items():
        n = param_count(shape)
        emb = 2 * shape["vocab_size"] * shape["d_model"]  # body: the blocks and the final norm; embeddings: embedding + LM head
        print(f"{name:14s} {shape['d_model']:7d} {shape['n_layers']:6d} {shape['n_heads']:5d} {shape['n_kv_heads']:3d} {shape['ffn_dim']:5d} "
              f"{shape['vocab_size']:6d} {n:12,d} {n - emb:12,d} {emb:12,d}")


def _prepare_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if prepared")


def _train_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("-o", "--output", help="run directory (default runs/<config name>)")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (runs torchrun for you)")
    p.add_argument("--nnodes", type=int, default=1, help="machines, each running this command with the same --rdzv-endpoint")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT of the first machine (torchrun's c10d rendezvous) when --nnodes > 1")
    p.add_argument("--rdzv-id", help="a run id shared by the machines of one run (e.g. the SLURM job id)")
    p.add_argument("--restart", action="store_true", help="train from step 0 although checkpoints exist (they are set aside, not deleted)")
    p.add_argument("--extend", action="store_true", help="resume with a new train.max_steps (its lr schedule re-derived over the new budget)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory or checkpoints/step_N folder")
    p.add_argument("--blimp", help="folder of BLiMP jsonl files (e.g. ../shared/data/blimp), or 'builtin' for generated substitute pairs")
    p.add_argument("--blimp-max-pairs", type=int, default=0, help="pairs per BLiMP file (0: all)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed BLiMP rows instead of stopping")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per batch (>= 1)")
    p.add_argument("--max-docs", type=int, default=0, help="documents per domain (0: all)")
    p.add_argument("--split", choices=["val", "test"], default="val", help="held-out split of the run's corpus")
    p.add_argument("--files", nargs="+", help="extra eval set: local .txt/.jsonl/.parquet files or globs (domain=path names a domain)")
    p.add_argument("--hf-dataset", help="extra eval set: a Hugging Face dataset name or local path")
    p.add_argument("--hf-config", help="its config name")
    p.add_argument("--hf-split", default="train", help="its split")
    p.add_argument("--hf-max-docs", type=int, default=1000, help="documents read from it")
    p.add_argument("--text-field", default="text", help="text column of jsonl/parquet files and HF datasets")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--paloma", help="Paloma perplexity as pico-train computes it: a parquet file/folder or HF dataset name "
                                    "(e.g. pico-lm/pretokenized-paloma-tinsy, which needs data.tokenizer=olmo)")
    p.add_argument("--paloma-split", default="val", help="split of a Hugging Face Paloma set (pico-train: val)")
    p.add_argument("--paloma-source-field", default="source", help="per-source column")
    p.add_argument("--paloma-ids-field", default="input_ids", help="token-id column, used when present")
    p.add_argument("--paloma-text-field", default="text", help="text column, tokenised with the run's tokenizer when there are no ids")
    p.add_argument("--paloma-use-text", action="store_true", help="tokenise the text column even when the ids column exists")
    p.add_argument("--paloma-max-rows", type=int, default=0, help="rows read (0: all)")
    p.add_argument("--paloma-max-length", type=int, default=0, help="tokens per row scored (0: the model's max_seq_len, as pico-train)")
    p.add_argument("--json", help="also write the results to this JSON file (checked before evaluating)")
    p.add_argument("--cache-dir", default="data",
                   help="where a corpus that must be prepared again goes (never taken from the run's metadata)")


def _pairs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="folder for the <UID>.jsonl files")
    p.add_argument("-n", type=int, default=200, help="pairs per paradigm")
    p.add_argument("--seed", type=int, default=0)


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fields", action="store_true", help="list every config field with its type, default and help")


# --------------------------------------------------------------------------- the verb table
VERBS: dict[str, tuple[str, Callable, Callable[[argparse.ArgumentParser], None]]] = {
    "prepare": ("gather the corpus, train the tokenizer, write token shards", cmd_prepare, _prepare_args),
    "train": ("train (or resume) a run", cmd_train, _train_args),
    "finetune": ("few-shot adaptation of a pretrained run or Hugging Face Llama folder with any method (resumes like train)",
                 Lazy("rankscope.train.finetune", "cmd_finetune"), Lazy("rankscope.train.finetune", "add_finetune_args")),
    "eval": ("evaluate a run or checkpoint: per-domain loss, perplexity, bits-per-byte, BLiMP", cmd_eval, _eval_args),
    "pairs": ("write generated minimal pairs in BLiMP's jsonl format (a substitute where BLiMP is absent)", cmd_pairs, _pairs_args),
    "info": ("list model presets and their parameter counts (all, body, embeddings)", cmd_info, _info_args),
    "analyze": ("rank metrics (PER, condition numbers, ...) of every checkpoint: table, spectra, plots",
                Lazy("rankscope.analysis.cli", "cmd_analyze"), Lazy("rankscope.analysis.cli", "add_analyze_args")),
    "sweep": ("run every point of a study grid (skips finished runs, resumes interrupted ones)",
              Lazy("rankscope.studies.verb", "cmd_sweep"), Lazy("rankscope.studies.verb", "add_sweep_args")),
    "report": ("compare runs and studies side by side: tables, plots, self-contained HTML + Markdown",
               Lazy("rankscope.reports.report", "cmd_report"), Lazy("rankscope.reports.report", "add_report_args")),
    "export": ("write a run or checkpoint as a Hugging Face LlamaForCausalLM folder (LoRA merged)",
               Lazy("rankscope.export", "cmd_export"), Lazy("rankscope.export", "add_export_args")),
    "lm-eval-tasks": ("write BLiMP as lm-evaluation-harness tasks that score an exported model as `rankscope eval` does",
                      Lazy("rankscope.evaluate.harness", "cmd_lm_eval_tasks"), Lazy("rankscope.evaluate.harness", "add_lm_eval_args")),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """Every verb's sub-parser; only `verb`'s arguments (all when None), whose module is imported for them."""
    parser = argparse.ArgumentParser(prog="rankscope", description="Pretrain small decoders with full-rank and low-rank methods; measure what they learn.")
    sub = parser.add_subparsers(dest="verb", required=True)
    for name, (help, fn, add_args) in VERBS.items():
        p = sub.add_parser(name, help=help, formatter_class=DefaultsFormatter)
        if verb is None or name == verb:
            add_args(p)
        p.set_defaults(fn=fn)
    return parser


def _verb(argv: list[str]) -> str | None:
    """The verb of a command line (the first word that names one), before any module is imported."""
    return next((a for a in argv if a in VERBS), None)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    """Warnings a user can act on (e.g. the flat method form's deprecation) as one line, without source."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning
    try:  # building the verb's parser imports its module (and torch): Ctrl-C there is one line too
        parser = build_parser(_verb(sys.argv[1:] if argv is None else argv) or "")
    except KeyboardInterrupt:
        print("interrupted while starting; nothing was run", file=sys.stderr)
        return 130
    # overrides may follow options too: `rankscope train CFG -o DIR train.lr=1e-3`
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        args.fn(args)
    except Preempted as e:  # a SIGTERM / SIGINT stop with a checkpoint (rankscope.core.preemption)
        if os.environ.get("RANK", "0") == "0":
            print(e, file=sys.stderr, flush=True)
        return e.exit_code
    except MachineError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return MACHINE_EXIT_CODE
    except RankscopeError as e:
        if not getattr(e, "from_rank0", False):  # under torchrun rank 0 prints what every rank learnt from it
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # the machine, not the input (train names its last good checkpoint: run_state.machine_failure)
        if e.errno not in MACHINE_ERRNOS:
            raise
        print(f"error: the machine failed: {e.strerror}{f' ({e.filename})' if e.filename else ''}; "
              "free space (or make the file system writable) and re-run the same command", file=sys.stderr)
        return MACHINE_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
