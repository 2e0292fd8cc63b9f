"""The `mopd` flow on the real Prefect engine (temporary SQLite server) over micro stages:
caching across runs, selective recomputation, a failing teacher, stale cache entries, MLflow."""

from __future__ import annotations

import os

import pytest

from tests.conftest import _sh, dvc_env, micro_params, write_params

pytestmark = pytest.mark.slow

ALL = {"data", "base", "sft", "teacher:math", "teacher:code", "teacher:if", "difficulty", "distill",
       "merge", "evaluate"}


@pytest.fixture
def prefect_env(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


def _run(project, **kw):
    """Run the flow, return {stage: status} (also when the flow itself fails)."""
    import json

    from flows.mopd_flow import mopd

    state = mopd(project_dir=str(project), return_state=True, **kw)
    status = json.loads((project / ".mopd" / "last_run.json").read_text())["status"]
    return state, status


def _by(status, kind):
    return {k for k, v in status.items() if v == kind}


def _dvc_status(project) -> str:
    env = dvc_env()
    return _sh([env["PATH"].split(":")[0] + "/dvc", "status"], project, env)


def test_flow_caches_reruns_and_recovers(dvc_project, prefect_env, monkeypatch):
    project = dvc_project
    # 1. Everything computes the first time; dvc.lock then records Prefect's work, so DVC does
    #    not call every stage stale.
    state, status = _run(project)
    assert state.is_completed(), state.message
    assert _by(status, "computed") == ALL
    assert "up to date" in _dvc_status(project)

    # 2. Nothing changed: every stage is a cache hit, except that a cache hit whose files were
    #    deleted is recomputed (and, merges being deterministic, nothing downstream changes).
    (project / "artifacts" / "merge" / "linear" / "model.safetensors").unlink()
    state, status = _run(project)
    assert state.is_completed(), state.message
    assert _by(status, "computed") == {"merge"}
    assert _by(status, "cached") == ALL - {"merge"}

    # 3. One teacher's learning rate changes: exactly it and what depends on it recompute.
    params = micro_params()
    params["teacher"]["math"]["learning_rate"] = 1.0e-3
    write_params(project, params)
    state, status = _run(project)
    assert state.is_completed(), state.message
    assert _by(status, "computed") == {"teacher:math", "distill", "merge", "evaluate"}
    assert "up to date" in _dvc_status(project)

    # 4. SFT changes, so every teacher must be recomputed, and one of them raises: the other
    #    teachers complete, the stages that need every teacher are skipped, the flow fails.
    params["sft"]["learning_rate"] = 1.0e-3
    write_params(project, params)
    monkeypatch.setenv("MOPD_FAIL_STAGES", "teacher:code")
    state, status = _run(project)
    assert state.is_failed()
    assert status["sft"] == status["teacher:math"] == status["teacher:if"] == "computed"
    assert status["difficulty"] == "computed"
    assert status["teacher:code"] == "failed"
    assert _by(status, "skipped") == {"distill", "merge", "evaluate"}

    # 5. The next run recomputes only the failed teacher and what depends on it.
    monkeypatch.delenv("MOPD_FAIL_STAGES")
    state, status = _run(project)
    assert state.is_completed(), state.message
    assert _by(status, "computed") == {"teacher:code", "distill", "merge", "evaluate"}

    # 6. `rerun` forces a stage whatever the cache says.
    state, status = _run(project, rerun=["merge"])
    assert state.is_completed(), state.message
    assert _by(status, "computed") == {"merge"}

    # MLflow (SQLite store in the project): the last parent run has a child per stage.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.mopd' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mopd")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'pipeline'",
                                 order_by=["attributes.start_time DESC"])
    assert len(parents) == 6
    last = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{last.info.run_id}'")
    assert {c.data.tags["stage"] for c in children} == ALL
    assert {c.data.tags["stage"] for c in children if c.data.tags.get("cache") != "hit"} == {"merge"}
    teacher = [r for r in client.search_runs([exp.experiment_id], "tags.stage = 'teacher:code'")
               if r.data.tags.get("cache") != "hit"][0]
    assert teacher.data.params["teacher.code.learning_rate"] == str(params["teacher"]["code"]["learning_rate"])
    history = client.get_metric_history(teacher.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]  # per-step metrics, one point per GRPO step
    difficulty = [r for r in client.search_runs([exp.experiment_id], "tags.stage = 'difficulty'")
                  if r.data.tags.get("cache") != "hit"][0]
    assert {a.path for a in client.list_artifacts(difficulty.info.run_id, "math")} >= {
        "math/histogram.png", "math/balanced.parquet", "math/stats.json"}
    arts = {a.path for a in client.list_artifacts(last.info.run_id)}
    assert {"avg_at_k.csv", "normalized.csv", "normalized.png"} <= arts
    assert any(k.startswith("normalized/mopd/") for k in last.data.metrics)


def test_flow_rejects_bad_config_before_work(micro_project, prefect_env):
    params = micro_params()
    params["teacher"]["math"]["learning_rate"] = "fast"
    write_params(micro_project, params)
    from flows.mopd_flow import mopd

    state = mopd(project_dir=str(micro_project), return_state=True)
    assert state.is_failed()
    assert "teacher.math.learning_rate" in state.message or "learning_rate" in str(state.result(raise_on_failure=False))
    assert not (micro_project / "artifacts").exists()


def test_flow_rejects_unknown_rerun(micro_project, prefect_env):
    from flows.mopd_flow import mopd

    state = mopd(project_dir=str(micro_project), rerun=["teachr"], return_state=True)
    assert state.is_failed()
    assert "teachr" in str(state.result(raise_on_failure=False))
    assert not (micro_project / "artifacts").exists()
