"""Tracker protocol: null tracker in memory, MLflow tracker read back from a real SQLite store."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mopd.tracking import (
    MLflowTracker,
    NullTracker,
    Tracker,
    default_tracking_uri,
    flatten_params,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module: creating the schema (migrations) takes a few seconds."""
    root = tmp_path_factory.mktemp("mlflow_project")
    uri = f"sqlite:///{root / '.mopd' / 'mlflow.db'}"
    (root / ".mopd").mkdir()
    from mlflow.tracking import MlflowClient

    return uri, MlflowClient(tracking_uri=uri), root


def test_default_tracking_uri_creates_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = default_tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve() / '.mopd' / 'mlflow.db'}"
    assert (tmp_path / ".mopd").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert default_tracking_uri(tmp_path) == "http://mlflow:5000"


def test_flatten_params_nested():
    assert flatten_params({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2]}) == {
        "a.b": "1",
        "a.c.d": "x",
        "e": "[1, 2]",
    }
    with pytest.raises(TypeError, match="params must be a mapping"):
        flatten_params([("a", 1)])


def test_null_tracker_records_in_memory(tmp_path):
    t = NullTracker()
    assert isinstance(t, Tracker)
    assert t.run_id is None
    t.log_params({"lr": 1e-5, "opt": {"beta": 0.9}})
    t.log_metrics({"loss": 2.0})
    t.log_metrics({"loss": 1.5})
    t.log_metrics({"acc": 0.5}, step=10)
    t.log_metric_series("reward", [0.1, 0.2, 0.3], steps=[5, 6, 7])
    c = t.child("domain=math", domain="math")
    c.log_metrics({"x": 1})
    f = tmp_path / "a.txt"
    f.write_text("hi")
    t.log_artifact(f)
    t.end("FAILED")
    assert t.params == {"lr": "1e-05", "opt.beta": "0.9"}
    assert t.metrics["loss"] == [(0, 2.0), (1, 1.5)]
    assert t.metrics["acc"] == [(10, 0.5)]
    assert t.metrics["reward"] == [(5, 0.1), (6, 0.2), (7, 0.3)]
    assert t.last("reward") == 0.3
    assert t.children["domain=math"].tags == {"domain": "math"}
    assert t.status == "FAILED"
    with pytest.raises(KeyError, match="'nope' was never logged"):
        t.last("nope")


def test_bad_inputs_are_named():
    t = NullTracker()
    with pytest.raises(TypeError, match="metric 'loss' must be a number"):
        t.log_metrics({"loss": "high"})
    with pytest.raises(ValueError, match="3 values but 2 steps"):
        t.log_metric_series("r", [1, 2, 3], steps=[0, 1])
    with pytest.raises(ValueError, match="status must be one of"):
        t.end("DONE")
    with pytest.raises(FileNotFoundError, match="no such file"):
        t.log_artifact("/nonexistent/file.txt")


def test_mlflow_parent_children_threads(store):
    uri, client, root = store
    parent = MLflowTracker.start("pipeline", "full", tracking_uri=uri, tags={"pipeline": "tiny"})
    assert isinstance(parent, Tracker)
    # the UI opens the experiment on its runs, not on MLflow 3's GenAI traces view
    assert client.get_experiment_by_name("pipeline").tags["mlflow.experimentKind"] == "custom_model_development"
    parent.log_params({"seed": 7, "distill": {"lr": 1e-6}})
    errors: list[BaseException] = []

    def work(domain: str, scale: float) -> None:
        try:
            with parent.child(f"teacher-{domain}", domain=domain) as c:
                c.log_params({"domain": domain})
                for step in range(30):
                    c.log_metrics({"reward": scale * step, "loss": 1.0 / (step + 1)}, step=step)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(d, s)) for d, s in [("math", 1.0), ("code", 2.0), ("qa", 3.0)]]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    parent.end()

    runs = client.search_runs(
        [parent.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'"
    )
    assert sorted(r.info.run_name for r in runs) == ["teacher-code", "teacher-math", "teacher-qa"]
    for r in runs:
        assert r.data.tags["mlflow.parentRunId"] == parent.run_id
        assert r.info.status == "FINISHED"
        scale = {"math": 1.0, "code": 2.0, "qa": 3.0}[r.data.tags["domain"]]
        hist = sorted(client.get_metric_history(r.info.run_id, "reward"), key=lambda m: m.step)
        assert [m.step for m in hist] == list(range(30))
        assert [m.value for m in hist] == pytest.approx([scale * s for s in range(30)])
        assert r.data.params["domain"] == r.data.tags["domain"]
    p = client.get_run(parent.run_id)
    assert p.data.params == {"seed": "7", "distill.lr": "1e-06"}
    assert p.data.tags["pipeline"] == "tiny"
    assert p.info.status == "FINISHED"
    # artifacts of a local SQLite store live in <db dir>/mlartifacts
    exp = client.get_experiment(parent.experiment_id)
    assert exp.artifact_location == (root / ".mopd" / "mlartifacts").resolve().as_uri()


def test_mlflow_batched_series_over_1000(store, monkeypatch):
    uri, client, _ = store
    t = MLflowTracker.start("pipeline", "series", tracking_uri=uri)
    calls: list[int] = []
    real = t._client.log_batch

    def spy(run_id, metrics=(), params=(), tags=(), **kw):
        if metrics:
            calls.append(len(metrics))
        return real(run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(t._client, "log_batch", spy)
    t.log_metric_series("kl", [0.5 * i for i in range(1500)], steps=range(100, 1600))
    t.log_metrics({"kl_final": 3.0})
    t.end()
    # the 1500-point series overflows the buffer, which is sent in chunks of at most 1000;
    # the last metric waits in the buffer until end()
    assert calls == [1000, 500, 1]
    hist = sorted(client.get_metric_history(t.run_id, "kl"), key=lambda m: m.step)
    assert len(hist) == 1500
    assert (hist[0].step, hist[0].value) == (100, 0.0)
    assert (hist[-1].step, hist[-1].value) == (1599, 749.5)
    assert client.get_run(t.run_id).data.metrics["kl_final"] == 3.0


def test_mlflow_artifact_figure_failed_and_attach(store, tmp_path):
    uri, client, _ = store
    t = MLflowTracker.start("pipeline", "broken", tracking_uri=uri)
    report = tmp_path / "report.json"
    report.write_text('{"score": 1}')
    t.log_artifact(report, artifact_path="eval")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    t.log_figure(fig, "curve")
    plt.close(fig)

    again = MLflowTracker.attach(t.run_id, tracking_uri=uri)
    again.set_tags({"stage": "distill"})
    again.log_metrics({"late": 1.25}, step=3)
    again.flush()

    with pytest.raises(RuntimeError, match="boom"):
        with t:
            raise RuntimeError("boom")
    run = client.get_run(t.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["stage"] == "distill"
    assert run.data.metrics["late"] == 1.25
    assert [f.path for f in client.list_artifacts(t.run_id, "eval")] == ["eval/report.json"]
    assert [f.path for f in client.list_artifacts(t.run_id, "figures")] == ["figures/curve.png"]
    local = Path(client.download_artifacts(t.run_id, "eval/report.json", str(tmp_path / "dl")))
    assert local.read_text() == '{"score": 1}'


def test_mlflow_attach_unknown_run(store):
    uri, _, _ = store
    with pytest.raises(ValueError, match="no MLflow run with id 'deadbeef'"):
        MLflowTracker.attach("deadbeef", tracking_uri=uri)


def test_a_dataset_input_is_logged_with_its_context_and_digest(tmp_path):
    """A stage's splits as MLflow dataset inputs (the runs table's "Datasets used"): name, source,
    a digest of the content (another content, another digest) and the training/eval context."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = tmp_path / "math"
    data.mkdir()
    pd.DataFrame({"prompt": ["1+1=", "2+2="], "reference": ["2", "4"]}).to_parquet(data / "train.parquet")
    pd.DataFrame({"prompt": ["3+3="], "reference": ["6"]}).to_parquet(data / "eval.parquet")
    run = MLflowTracker.start("mopd", "teacher:math", tracking_uri=uri)
    run.log_dataset(data / "train.parquet", "math-train", "training")
    run.log_dataset(data / "eval.parquet", "math-eval", "eval")
    run.end()
    inputs = MlflowClient(tracking_uri=uri).get_run(run.run_id).inputs.dataset_inputs
    got = {i.dataset.name: (i.dataset.source, i.dataset.digest, {t.key: t.value for t in i.tags}) for i in inputs}
    assert set(got) == {"math-train", "math-eval"}
    assert str(data / "train.parquet") in got["math-train"][0]
    assert got["math-train"][2]["mlflow.data.context"] == "training" and got["math-eval"][2]["mlflow.data.context"] == "eval"
    assert got["math-train"][1] != got["math-eval"][1]  # a digest of the content
