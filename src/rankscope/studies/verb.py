"""The `rankscope sweep` verb (cli.py loads it by module path): load a study, check it before any compute
(rankscope.studies.preflight), then run it here (LocalLauncher) or as SLURM jobs (rankscope.studies.slurm), or
only list its points, print its job scripts (--dry-run) or its jobs' states (--status)."""

from __future__ import annotations

from rankscope.core.errors import ConfigError
from rankscope.studies import slurm
from rankscope.studies.points import point_state
from rankscope.studies.study import Study, grid_values, load_study


def add_sweep_args(p) -> None:
    p.add_argument("study", help="study YAML, e.g. studies/paper-cpu.yaml (format: docs/studies.md)")
    p.add_argument("--parallel", type=int, help="runs at once (default: the study's `parallel`)")
    p.add_argument("--runs-dir", help="where the runs go (default: the study's runs_dir or runs/<name>)")
    p.add_argument("--list", action="store_true", help="only list the points and their state")
    p.add_argument("--check", action="store_true", help="only the pre-flight check: is each findings rule measurable, "
                                                        "and the sweep's estimated wall time (rankscope.studies.preflight)")
    slurm.add_args(p)


def list_points(study: Study, show=print) -> None:
    for p in study.points:
        show(f"{point_state(p, study):8s} {p.stage:7s} {p.run_dir}")
    if study.tune is not None:
        n_main = len(grid_values(study))
        n_control = sum(all(v[k] == x for k, x in study.control.where.items()) for v in grid_values(study)) if study.control else 0
        show(f"then {n_main} main runs{f' and {n_control} control runs' if n_control else ''} at the tuned {study.tune.field} "
             f"(tuning may add up to {study.tune.widen} values per edge and cell)")


def cmd_sweep(args) -> None:
    if args.parallel is not None and args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    study = load_study(args.study, args.runs_dir)
    if args.list:
        list_points(study)
        return
    from rankscope.studies.preflight import run_preflight

    run_preflight(study, args.parallel, timing=not (args.status or args.dry_run))  # before any compute; --check: only this
    if args.check:
        return
    launcher = None
    if args.launcher == "slurm" or args.dry_run or args.status:
        launcher = slurm.cli_launcher(study, args)
        if launcher is None:  # --dry-run / --status printed what was asked
            return
    from rankscope.core.paths import check_output_dir

    check_output_dir(study.runs_dir, "--runs-dir" if args.runs_dir else f"runs_dir of {study.path}")
    from rankscope.core import lock
    from rankscope.studies.sweep import run_study

    held = lock.acquire(study.runs_dir, f"sweep folder {study.runs_dir}", "wait for that sweep to end, or use another --runs-dir")
    try:
        points = run_study(study, launcher=launcher, parallel=args.parallel)
    finally:
        held.release()
    failed = sum(p.status == "failed" for p in points)
    print(f"sweep finished: {len(points) - failed} ok, {failed} failed; summary {study.runs_dir / 'sweep.json'}")
    if failed:
        raise SystemExit(1)
