"""The `mopd` command line. Subcommands: ``plan`` (what would run and why), ``run`` (a pipeline
in the foreground), ``results`` (a pipeline's comparison table), ``dvc-yaml``
(generate dvc.yaml from the stage table), ``watch`` (a run's progress), ``serve-teacher`` (a
teacher as a prefill service)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _plan(args: argparse.Namespace) -> int:
    import json

    from mopd.config import ConfigError, load_config
    from mopd.overrides import parse_set
    from mopd.plan import format_plan, plan

    try:
        cfg = load_config(args.project_dir, pipeline=args.pipeline, overrides=parse_set(args.overrides))
        decisions = plan(cfg, rerun=args.rerun)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([d.to_dict() for d in decisions], indent=2))
    else:
        print(f"pipeline {args.pipeline} ({cfg.project_dir}):")
        print(format_plan(decisions))
    return 0


def _dvc_yaml(args: argparse.Namespace) -> int:
    from mopd import dvcgen
    from mopd.config import ConfigError, load_config

    try:
        cfg = load_config(args.project_dir)
        dvcgen.build(cfg)  # what cannot become a dvc.yaml fails here, naming the key
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if dvcgen.is_current(cfg):
            print("dvc.yaml is up to date")
            return 0
        print(f"error: {cfg.project_dir / dvcgen.DVC_FILE} is stale: run `mopd dvc-yaml`",
              file=sys.stderr)
        return 1
    print(f"wrote {dvcgen.write(cfg)}")
    return 0


def _watch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mopd.progress import PROGRESS_DIR, latest_run, render, watch

    project = Path(args.project_dir).resolve()
    run_dir = project / PROGRESS_DIR / args.run if args.run else latest_run(project)
    if run_dir is None or not run_dir.is_dir():
        print(f"error: no run recorded under {project / PROGRESS_DIR}", file=sys.stderr)
        return 2
    if args.once:
        print(render(run_dir)[0])
    else:
        watch(run_dir, interval=args.interval)
    return 0


def _run(args: argparse.Namespace) -> int:
    from mopd.config import ConfigError, load_config
    from mopd.local_run import StageError, run_pipeline
    from mopd.overrides import parse_set

    try:
        cfg = load_config(args.project_dir, pipeline=args.pipeline, overrides=parse_set(args.overrides))
        status = run_pipeline(cfg, rerun=args.rerun, track=not args.no_track)
    except (ConfigError, ValueError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{sum(v == 'computed' for v in status.values())} computed, "
          f"{sum(v == 'cached' for v in status.values())} cached")
    return 0


def _stage(args: argparse.Namespace) -> int:
    from mopd.config import ConfigError, load_config
    from mopd.local_run import StageError, run_one
    from mopd.overrides import parse_set

    try:
        cfg = load_config(args.project_dir, pipeline=args.pipeline, overrides=parse_set(args.overrides))
        run_one(cfg, args.name, force=args.force, track=not args.no_track)
    except (ConfigError, ValueError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _results(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from mopd.config import ConfigError, load_config
    from mopd.graph import stored

    try:
        root = stored(load_config(args.project_dir, pipeline=args.pipeline), "artifacts")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = Path(args.project_dir) / root / "report" / args.pipeline / "table.json"
    if not path.is_file():
        print(f"error: {path}: no completed report for pipeline {args.pipeline!r} "
              f"(run it: prefect deployment run mopd/{args.pipeline}, or mopd run --pipeline "
              f"{args.pipeline})", file=sys.stderr)
        return 2
    table = json.loads(path.read_text())
    if args.json:
        out = {"pipeline": args.pipeline, "level": table["level"], "methods": {
            m: {"domains": {b: {"avg": c["avg"], "ci": c["ci"], "pass": c["pass"],
                                "pass_ci": c["pass_ci"]} for b, c in e["domains"].items()},
                "normalized": e["normalized"], "normalized_ci": e["normalized_ci"],
                "normalized_note": e["normalized_note"], "teacher_cost": e.get("teacher_cost"),
                "budget": e.get("budget")}
            for m, e in table["methods"].items()}}
        print(json.dumps(out, indent=2))
        return 0
    benches = list(dict.fromkeys(b for e in table["methods"].values() for b in e["domains"]))
    width = max(len(m) for m in table["methods"])
    print(f"{'method':<{width}}  " + "  ".join(f"{b:<22}" for b in benches)
          + "  normalized  teacher ms/token  rollouts (integration / with teachers)")
    for m, e in table["methods"].items():
        cells = [f"{e['domains'][b]['avg']:.3f} [{e['domains'][b]['ci'][0]:.3f}, {e['domains'][b]['ci'][1]:.3f}]"
                 if b in e["domains"] else "—" for b in benches]
        norm = "—" if e["normalized"] is None else f"{e['normalized']:.3f}"
        per_tok = (e.get("teacher_cost") or {}).get("seconds_per_student_token")
        cost = "—" if per_tok is None else f"{1000 * per_tok:.3f}"
        b = e.get("budget")
        spent = "—" if not b else f"{b['integration_rollouts']:,.0f} / {b['total_rollouts']:,.0f}"
        print(f"{m:<{width}}  " + "  ".join(f"{c:<22}" for c in cells) + f"  {norm:<10}  {cost:<16}  {spent}")
    notes = {n for e in table["methods"].values() for n in [e.get("normalized_note")] if n}
    for d, g in table["teacher_gain"].items():
        if g.get("gain") is not None:
            print(f"teacher gain on {d}: {g['gain']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]"
                  f"{'' if g['significant'] else '  (not significant: no normalised score)'}")
    for n in sorted(notes):
        print(f"note: {n}")
    return 0


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="a params.yaml setting for this run without editing the file, e.g. "
                        "--set distill.learning_rate=1e-4 (dotted key, JSON or YAML value; repeatable; "
                        "validated like the file and part of each stage's cache key)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mopd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="what a pipeline run would compute and why, before it runs",
                       description="One line per stage: run or cached, with the reasons (config "
                                   "key, upstream stage, code file, forced, missing/altered output).")
    p.add_argument("--pipeline", default="full")
    p.add_argument("--project-dir", default=".")
    p.add_argument("--rerun", nargs="*", default=[], help="stages or kinds to force")
    p.add_argument("--json", action="store_true",
                   help='print [{"stage", "action": "run"|"cached", "reasons": [...]}, ...]')
    _add_set(p)
    p.set_defaults(func=_plan)
    p = sub.add_parser("run", help="run a pipeline in the foreground, stage after stage (no Prefect)",
                       description="The flow's stages and cache decisions, sequentially in this "
                                   "terminal: for debugging, scripts and the seeds study.")
    p.add_argument("--pipeline", default="full")
    p.add_argument("--project-dir", default=".")
    p.add_argument("--rerun", nargs="*", default=[], help="stages or kinds to force")
    p.add_argument("--no-track", action="store_true", help="do not log the stages to MLflow")
    _add_set(p)
    p.set_defaults(func=_run)
    p = sub.add_parser("stage", help="run one stage in the foreground, as the flow and DVC run it",
                       description="The stage's own command line, with the cache decision of the flow: "
                                   "cached when its result.json matches, else run here (its log on this "
                                   "terminal). Its upstream stages must be up to date.")
    p.add_argument("name", help="stage name, e.g. teacher:math or copd:2:opd:code")
    p.add_argument("--pipeline", default="full")
    p.add_argument("--project-dir", default=".")
    p.add_argument("--force", action="store_true", help="run it even if it is cached")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    _add_set(p)
    p.set_defaults(func=_stage)
    p = sub.add_parser("results", help="a pipeline's last comparison table (avg@k with CIs, "
                                       "normalised score)")
    p.add_argument("--pipeline", default="full")
    p.add_argument("--project-dir", default=".")
    p.add_argument("--json", action="store_true", help='{"methods": {m: {"domains": {d: {"avg", '
                                                        '"ci"}}, "normalized"}}}')
    p.set_defaults(func=_results)
    p = sub.add_parser("dvc-yaml", help="generate dvc.yaml from the stage table (every pipeline)")
    p.add_argument("--project-dir", default=".")
    p.add_argument("--check", action="store_true", help="exit 1 if the committed file is stale")
    p.set_defaults(func=_dvc_yaml)
    p = sub.add_parser("watch", help="follow a flow run's stages: state, step/total, time left")
    p.add_argument("--project-dir", default=".")
    p.add_argument("--run", default=None, help="flow run id (default: the latest)")
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--once", action="store_true", help="print the table once and exit")
    p.set_defaults(func=_watch)
    from mopd.teachers.command import add_parser

    add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("MOPD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
