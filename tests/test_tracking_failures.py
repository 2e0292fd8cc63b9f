"""Tracking never costs data (issue 29), and one run of a stage at a time.

The MLflow store (the project's SQLite file) is locked by another writer, as a stuck `mlflow ui`
or a second run would hold it: before the stage's run can be created (the stage fails at once,
naming the store, its previous outputs untouched) and after it started (a tracking gap: the stage
completes, and its MLflow run is closed by the next process that reaches the store). The rule is
stated in docs/tracking.md and mopd.trackstore."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STORE = Path(".mopd") / "mlflow.db"


def _env(**extra) -> dict:
    env = {**os.environ, "MOPD_THREADS": "1", "MOPD_TRACKING_RETRY_S": "2", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _stage(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mopd.cli", "stage", *args], cwd=project, env=env or _env(),
                          capture_output=True, text=True, timeout=600)


def _plan(project: Path) -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-m", "mopd.cli", "plan", "--json"], cwd=project, env=_env(),
                         capture_output=True, text=True, check=True).stdout
    return {d["stage"]: d for d in json.loads(out)}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _Lock:
    """An exclusive SQLite transaction on the store, held from a thread until released."""

    def __init__(self, db: Path):
        self.db, self.locked, self.release = db, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self):
        con = sqlite3.connect(self.db, isolation_level=None, timeout=30)
        con.execute("BEGIN EXCLUSIVE")
        self.locked.set()
        self.release.wait(300)
        con.execute("COMMIT")
        con.close()

    def __enter__(self):
        self.thread.start()
        assert self.locked.wait(30)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(30)


def _runs(project: Path, stage: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / STORE}")
    exp = client.get_experiment_by_name("mopd")
    return client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'", order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def _built(tmp_path_factory):
    import shutil

    from tests.conftest import ROOT, micro_params, write_params

    project = tmp_path_factory.mktemp("tracking") / "project"
    project.mkdir()
    write_params(project, micro_params())
    shutil.copy(ROOT / "pipelines.yaml", project / "pipelines.yaml")
    for name in ("data", "base"):
        out = _stage(project, name, "--pipeline", "full")
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return project


@pytest.fixture
def base_done(_built, tmp_path):
    """A micro project with `data` and `base` done and tracked (a copy per test; built once)."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(_built, project, symlinks=True)
    return project


def test_store_locked_before_the_work_fails_the_stage_and_changes_nothing(base_done):
    project = base_done
    before = _files(project / "artifacts/base")
    runs = len(_runs(project, "base"))
    with _Lock(project / STORE):
        out = _stage(project, "base", "--force", "--pipeline", "full")
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    said = out.stdout + out.stderr
    assert f"MLflow tracking store sqlite:///{project / STORE}" in said and "database is locked" in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    assert _files(project / "artifacts/base") == before  # its previous outputs, byte for byte
    assert not list((project / "artifacts").glob(".*.building"))
    assert _plan(project)["base"]["action"] == "cached"  # the record still stands
    assert len(_runs(project, "base")) == runs  # and no run was made for the attempt


def test_store_locked_after_the_run_started_is_a_gap_closed_later(base_done):
    """The lock comes once the stage's MLflow run exists: the stage completes (exit 0, record
    written, `plan` cached) with a warning naming the store; its run's final status waits in
    .mopd/tracking_gaps.jsonl and is set by the next stage that reaches the store."""
    from mopd.trackstore import GAP_TAG, GAPS_FILE

    project = base_done
    record = project / "artifacts/base/result.json"
    old = record.stat().st_mtime_ns
    proc = subprocess.Popen([sys.executable, "-m", "mopd.cli", "stage", "base", "--force", "--pipeline", "full"],
                            cwd=project, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    lock = _Lock(project / STORE)
    try:
        for line in proc.stdout:
            lines.append(line)
            if "MLflow run base" in line and "started" in line:
                lock.__enter__()  # the run exists; everything it logs from here meets a locked store
        proc.wait(600)
        said = "".join(lines)
        assert proc.returncode == 0, said[-3000:]
        assert f"tracking gap: MLflow tracking store sqlite:///{project / STORE}" in said, said[-3000:]
        assert record.stat().st_mtime_ns > old and _plan(project)["base"]["action"] == "cached"
        gaps = [json.loads(x) for x in (project / ".mopd" / GAPS_FILE).read_text().splitlines()]
        assert [g["status"] for g in gaps] == ["FINISHED"]
    finally:
        lock.__exit__()
    run = next(r for r in _runs(project, "base") if r.info.run_id == gaps[0]["run_id"])
    assert run.info.status == "RUNNING"  # nothing could tell the store yet
    out = _stage(project, "data", "--force", "--pipeline", "full")  # the next process that reaches the store
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = next(r for r in _runs(project, "base") if r.info.run_id == gaps[0]["run_id"])
    assert run.info.status == "FINISHED" and "not logged" in run.data.tags[GAP_TAG], run.data.tags
    assert (project / ".mopd" / GAPS_FILE).read_text() == ""


def test_a_second_run_of_a_stage_waits_says_who_holds_it_and_takes_its_result(base_done):
    """Two `mopd stage sft` at once: the second says which process holds the stage, waits, then
    finds the stage finished under the same cache key and does not train it again."""
    project = base_done
    env = _env()
    held = _env(MOPD_HOLD_STAGES="sft", MOPD_HOLD_SECONDS="120")  # the first holds the stage until released
    first = subprocess.Popen([sys.executable, "-m", "mopd.cli", "stage", "sft", "--pipeline", "full", "--no-track"],
                             cwd=project, env=held, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = project / ".mopd/locks/sft.lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (lock.is_file() and lock.read_text()):
        time.sleep(0.05)
    holder = json.loads(lock.read_text())["pid"]  # (the stage process `mopd stage` started)
    log = project / "second.log"
    with open(log, "w") as f:  # as `dvc repro` runs it: the stage module itself
        second = subprocess.Popen([sys.executable, "-m", "tasks.sft", "--pipeline", "full", "--no-track"],
                                  cwd=project, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        while time.monotonic() < deadline and "waiting for it to end" not in log.read_text():
            time.sleep(0.1)
        (project / ".mopd/hold").mkdir(parents=True, exist_ok=True)
        (project / ".mopd/hold/sft.release").touch()
        second.wait(600)
    out1 = first.communicate(timeout=600)[0]
    said = log.read_text()
    assert first.returncode == 0 and second.returncode == 0, out1[-2000:] + said[-2000:]
    assert f"another run of this stage holds {lock}: pid {holder} on" in said, said[-3000:]
    assert "not redone" in said, said[-3000:]
    assert "sft: models on" not in said  # it placed no model: it trained nothing
