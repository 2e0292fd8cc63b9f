"""The MLflow UI, rendered by headless Chromium, shows a pipeline's runs (benchmarks/ui_check.py).

A small store written through mopd.tracking exactly as a pipeline writes it (parent run
`mopd-<pipeline>` tagged kind=pipeline, one child run per stage); no pipeline runs. `make ui-check`
runs the same check on the project's own store, and on Prefect's flow-run page."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import ui_check
from mopd.tracking import MLflowTracker

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None,
                                reason="chromium not installed (Debian: apt-get install chromium; make ui-check)")

STAGES = ["sft", "teacher:math", "distill:mopd", "evaluate:distill:mopd"]


def _store(project: Path) -> Path:
    db = project / ".mopd" / "mlflow.db"
    db.parent.mkdir(parents=True)
    uri = f"sqlite:///{db}"
    parent = MLflowTracker.start("mopd", "mopd-micro", tracking_uri=uri, tags={"pipeline": "micro", "kind": "pipeline"})
    for name in STAGES:
        with parent.child(name, stage=name, kind=name.split(":")[0], pipeline="micro") as child:
            child.log_metrics({"avg_at_k/math": 0.5})
    parent.end()
    return db


def test_mlflow_ui_opens_on_the_runs_and_names_every_stage(tmp_path: Path) -> None:
    db = _store(tmp_path)
    runs = ui_check.pipeline_runs(db)
    assert (runs.parent_name, runs.stage_names) == ("mopd-micro", STAGES)
    shots = tmp_path / "shots"
    # `/` (MLflow's Home page: experiments, no runs) is left to `make ui-check`: 5-10 s more here
    with ui_check.mlflow_ui(db) as base:
        runs_page, compare = ui_check.check_mlflow_pages(base, runs, shots, pages=["runs", "compare"])
    assert runs_page.title.startswith("Runs - ") and "workflowType=machine_learning" in runs_page.url
    assert compare.title.startswith("Compare Runs")
    assert compare.missing(["mopd-micro", *STAGES]) == []
    for name in ("runs", "compare"):
        assert (shots / f"mlflow-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a run the store holds and the page does not show fails the check, named
    renamed = replace(runs, stages=(*runs.stages[:-1], (runs.stages[-1][0], "teacher:nope")))
    with pytest.raises(ui_check.UICheckFailed, match=r"(?s)compare page .*missing \['teacher:nope'\] of 5"):
        ui_check.verify_mlflow_pages(base, renamed, {"compare": compare})
