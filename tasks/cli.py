"""The one way a stage is executed, from DVC (`python -m tasks.<stage>`), Prefect or a test.

`execute` resolves the stage in the pipeline graph, checks its upstream results, clears its output
directory, opens an MLflow run (a child of the pipeline's parent run when one is given), calls the
stage's `run(cfg, inputs, out_dir, tracker, domain=...)`, and writes `result.json` (files + sha256
+ metrics + cache key) last: a directory without `result.json` is not a finished stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from mopd.artifacts import Result, load_result, write_result
from mopd.config import Config, ConfigError, load_config
from mopd.graph import cache_key, config_sections, get_spec
from mopd.security import redact_secrets
from mopd.tracking import MLflowTracker, NullTracker, default_tracking_uri

log = logging.getLogger("mopd.stage")

EXPERIMENT = os.environ.get("MOPD_EXPERIMENT", "mopd")
# Fault injection for resilience tests and drills: a comma-separated list of stage names that
# raise before doing any work (e.g. MOPD_FAIL_STAGES=teacher:code). Never set in normal runs.
FAIL_ENV = "MOPD_FAIL_STAGES"
CONFIG_FILE = "stage_config.json"

StageFn = Callable[..., Result]


class InjectedFault(RuntimeError):
    pass


def execute(cfg: Config, name: str, run: StageFn, *, parent_run_id: str | None = None,
            track: bool = True) -> Result:
    spec = get_spec(cfg, name)
    project = cfg.project_dir
    inputs = {u: project / get_spec(cfg, u).out_dir for u in spec.upstream}
    upstream = {u: load_result(path) for u, path in inputs.items()}
    key = cache_key(cfg, spec, {u: r.content_hash for u, r in upstream.items()})

    if name in {s.strip() for s in os.environ.get(FAIL_ENV, "").split(",")}:
        raise InjectedFault(f"stage {name}: failure injected through ${FAIL_ENV}")

    out_dir = project / spec.out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    # Provenance: every output carries the configuration it was made with, so a changed setting
    # changes the stage's content hash (and reruns what depends on it) even when the weights
    # happen to come out identical (e.g. a GRPO run whose groups all had equal rewards).
    sections = redact_secrets(config_sections(cfg, spec))  # no URL credentials in files or MLflow
    (out_dir / CONFIG_FILE).write_text(json.dumps(sections, indent=2, sort_keys=True) + "\n")

    tags = {"stage": name, "pipeline": cfg.pipeline, "cache_key": key}
    if spec.domain:
        tags["domain"] = spec.domain
    tracker = (MLflowTracker.start(EXPERIMENT, name, tracking_uri=default_tracking_uri(project),
                                   parent_run_id=parent_run_id, tags=tags)
               if track else NullTracker())
    tracker.log_params(sections)
    tracker.set_tags({"torch_threads": _set_threads()})
    t0 = time.time()
    try:
        result = run(cfg, inputs, out_dir, tracker, domain=spec.domain)
    except BaseException:
        tracker.end("FAILED")
        raise
    result = replace(result, metrics={**result.metrics, "stage_seconds": time.time() - t0}, cache_key=key)
    write_result(out_dir, result)
    tracker.log_metrics({f"result/{k}": v for k, v in result.metrics.items()})
    tracker.set_tags({"out_dir": result.out_dir, "content_hash": result.content_hash,
                      **{f"sha256/{rel}"[:250]: digest for rel, digest in list(result.files.items())[:50]}})
    tracker.end("FINISHED")
    return result


def _set_threads() -> int:
    """Apply $MOPD_THREADS (the flow sets it per stage; set it yourself for `dvc repro`): floating
    point reductions, hence sampled tokens, depend on the thread count, so a stage's numbers are
    reproducible only for a fixed one. Returns the count in use (recorded on the MLflow run)."""
    import torch

    if os.environ.get("MOPD_THREADS"):
        torch.set_num_threads(int(os.environ["MOPD_THREADS"]))
    return torch.get_num_threads()


def main(stage: str, run: StageFn, argv: list[str] | None = None) -> int:
    """Command line of every stage module: ``python -m tasks.<stage> [--domain D] ...``."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=run.__doc__)
    parser.add_argument("--project-dir", default=".", help="directory holding params.yaml")
    parser.add_argument("--pipeline", default="full", help="pipeline name in pipelines.yaml")
    if stage == "teacher":
        parser.add_argument("--domain", required=True, help="the teacher's domain")
    parser.add_argument("--mlflow-parent", default=None, help="MLflow run id to nest under")
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MOPD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = f"{stage}:{args.domain}" if stage == "teacher" else stage
    try:
        cfg = load_config(args.project_dir, pipeline=args.pipeline)
        result = execute(cfg, name, run, parent_run_id=args.mlflow_parent, track=not args.no_track)
    except (ConfigError, FileNotFoundError, ValueError, InjectedFault) as exc:
        print(f"error: {name}: {exc}", file=sys.stderr)
        return 2
    print(f"{name}: done -> {result.out_dir} " +
          " ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items())))
    return 0
