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


def test_prefect_flow_run_page_shows_the_score_table(tmp_path: Path) -> None:
    """A Prefect server with its UI (SQLite, a temporary home), one flow run that publishes a micro
    pipeline's comparison (tests/data/report_table_micro.json, a real `report:full` output) through
    flows.prefect_report, as the pipeline's flow does; the flow-run page's Artifacts tab, rendered
    by Chromium, shows the run and its score table. `make ui-check` does it on a whole pipeline."""
    import json
    import os
    import subprocess
    import sys

    from benchmarks.ui_e2e import prefect_server

    table = Path(__file__).parent / "data" / "report_table_micro.json"
    home = tmp_path / "prefect"
    home.mkdir()
    with prefect_server(home, tmp_path / "prefect.log") as url:
        code = ("import json, pathlib\nfrom prefect import flow\nfrom flows.prefect_report import comparison_artifacts\n"
                "@flow(name='mopd')\ndef publish():\n"
                f"    comparison_artifacts(pathlib.Path({str(table)!r}), 'micro')\n"
                "state = publish(return_state=True)\nprint(json.dumps(str(state.state_details.flow_run_id)))\n")
        env = {**os.environ, "PREFECT_API_URL": f"{url}/api", "PREFECT_HOME": str(home),
               "PREFECT_LOGGING_LEVEL": "WARNING"}
        proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        run_id = json.loads(proc.stdout.strip().splitlines()[-1])
        page = ui_check.check_prefect(url, run_id, artifact_key="micro-score-table", out_dir=tmp_path / "shots")
        with pytest.raises(ui_check.UICheckFailed, match="has no artifact 'micro-nope'"):
            ui_check.check_prefect(url, run_id, artifact_key="micro-nope", out_dir=None)
    assert (tmp_path / "shots" / "prefect-flow-run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.missing(["micro-score-table", "micro-teacher-cost"]) == []
