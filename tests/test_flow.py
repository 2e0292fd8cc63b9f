"""The `mopd` flow on the real Prefect engine (temporary SQLite server) over micro stages:
caching across runs and across pipelines, scheduling by upstream stages (not waves), selective
recomputation, a failing teacher, stale outputs, `mopd plan` against the code, MLflow, DVC."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import pytest
import yaml

from tests.conftest import ROOT, _sh, dvc_env, micro_params, write_params

pytestmark = pytest.mark.slow

TEACHERS = {"teacher:math", "teacher:code", "teacher:if"}
EVALS = {"evaluate:sft", "evaluate:distill", "evaluate:merge"} | {f"evaluate:{t}" for t in TEACHERS}
ALL = {"data", "base", "sft", "difficulty", "distill", "merge", "report:full"} | TEACHERS | EVALS
# MOPD Table 2's baselines and the weight-shift analysis run once, in the second pipeline (`full`
# here keeps MOPD and the merges, so its several reruns stay within the suite's time budget)
BASELINES = {"mix_rl", "cascade_rl:code", "cascade_rl:if", "offpolicy_ft", "weight_shift", "evaluate:mix_rl",
             "evaluate:cascade_rl:if", "evaluate:offpolicy_ft"}
FULL = ["data", "base", "sft", "teacher", "difficulty", "distill", "merge", "evaluate"]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """One temporary Prefect server (SQLite) for this module's tests (it takes ~15 s to start)."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture
def prefect_env(prefect_server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MOPD_MAX_PARALLEL", "8")  # every ready stage starts at once
    monkeypatch.setenv("MOPD_THREADS", "1")  # stage outputs deterministic across runs
    monkeypatch.setenv("MOPD_PROJECT_ROOTS", str(tmp_path))
    yield


def _run(project, **kw):
    """Run the flow, return (state, {stage: status}) (also when the flow itself fails)."""
    from flows.mopd_flow import mopd

    state = mopd(project_dir=str(project), return_state=True, **kw)
    status = json.loads((project / ".mopd" / "last_run.json").read_text())["status"]
    return state, status


def _by(status, kind):
    return {k for k, v in status.items() if v == kind}


def _dvc(project, *args) -> str:
    env = dvc_env()
    return _sh([env["PATH"].split(":")[0] + "/dvc", *args], project, env)


def _plan(project) -> dict[str, dict]:
    """`mopd plan --json` in a subprocess run from the project, so it sees the project's copy of
    the code (as the stage subprocesses do)."""
    out = subprocess.run([sys.executable, "-m", "mopd.cli", "plan", "--json"], cwd=project,
                         capture_output=True, text=True, check=True).stdout
    return {d["stage"]: d for d in json.loads(out)}


def _task_times(state) -> dict[str, tuple[float, float]]:
    """Task run name -> (start, end) timestamps, from the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {r.name: (r.start_time.timestamp(), r.end_time.timestamp()) for r in runs
            if r.start_time and r.end_time}


def _release_when(path, release, stop: threading.Event) -> threading.Thread:
    def loop():
        while not stop.is_set() and not path.exists():
            time.sleep(0.2)
        release.parent.mkdir(parents=True, exist_ok=True)
        release.touch()
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _assert_downstream_of(project, computed: set[str], teacher: str) -> None:
    """``computed`` is ``teacher`` and what depends on it: its evaluation, distill and merge
    always; their evaluations and the report exactly when their inputs' content changed."""
    assert {teacher, f"evaluate:{teacher}", "distill", "merge"} <= computed
    assert computed <= {teacher, f"evaluate:{teacher}", "distill", "merge", "evaluate:distill",
                        "evaluate:merge", "report:full"}
    from mopd.artifacts import load_result

    for model in ("distill", "merge"):
        ev = load_result(project / f"artifacts/evaluate/{model}")
        now = load_result(project / {"distill": "artifacts/distill/mopd"}.get(model, "artifacts/merge"))
        assert ev.inputs["upstream"][model] == now.content_hash  # evaluated the current model


def test_flow_caches_reruns_and_recovers(dvc_project, prefect_env, monkeypatch):
    project = dvc_project
    pipes = yaml.safe_load((project / "pipelines.yaml").read_text())
    pipes["pipelines"]["full"]["stages"] = FULL
    (project / "pipelines.yaml").write_text(yaml.safe_dump(pipes, sort_keys=False))
    _sh([sys.executable, "-m", "mopd.cli", "dvc-yaml"], project)
    # 1. Everything computes the first time. `difficulty` is held (a scheduling drill) until
    #    `merge` has finished: merge needs only SFT + teachers, so it must not wait for difficulty.
    monkeypatch.setenv("MOPD_HOLD_STAGES", "difficulty")
    monkeypatch.setenv("MOPD_HOLD_SECONDS", "240")
    #    Placement (issue 26) with a faked inventory of six devices: once SFT is done, the three
    #    teachers, the held difficulty stage and SFT's evaluation each get one, at once.
    monkeypatch.setenv("MOPD_DEVICES", "0,1,2,3,4,5")
    monkeypatch.setenv("MOPD_DEVICE_LOCKS", str(project / ".mopd" / "device-locks"))
    stop = threading.Event()
    _release_when(project / "artifacts" / "merge" / "result.json",
                  project / ".mopd" / "hold" / "difficulty.release", stop)
    state, status = _run(project)
    stop.set()
    monkeypatch.delenv("MOPD_HOLD_STAGES")
    assert state.is_completed(), state.message
    assert _by(status, "computed") == ALL
    times = _task_times(state)
    assert times["merge"][0] < times["difficulty"][1], times  # started before difficulty ended
    where = _teacher_placements(project)
    assert len({d for p in where.values() for d in p["devices"]}) == 3, where  # pairwise disjoint
    assert max(p["leased_at"] for p in where.values()) < min(p["ended"] for p in where.values()), where  # at once
    from mopd.artifacts import load_result, load_run_record

    assert load_run_record(project, "data")["placement"]["devices"] == []  # runs no model
    # The difficulty stage scores a subset but hands every training prompt to distillation.
    import pandas as pd

    for d in ("math", "code", "if"):
        train = set(pd.read_parquet(project / f"artifacts/data/{d}/train.parquet")["id"])
        balanced = pd.read_parquet(project / f"artifacts/difficulty/{d}/balanced.parquet")
        assert set(balanced["id"]) == train and len(balanced) >= len(train)
    # dvc.lock records Prefect's work, so DVC does not call every stage stale (the other
    # pipelines' stages in dvc.yaml have not run yet).
    assert "up to date" in _dvc(project, "status", "--with-deps", "report-full")
    # `dvc metrics show` lists every method's scores (the report's metrics.json) ...
    from tests.test_dvc import _metrics

    shown = _metrics(_dvc(project, "metrics", "show", "--json"))["artifacts/report/full/metrics.json"]
    table_methods = json.loads((project / "artifacts/report/full/table.json").read_text())["methods"]
    assert {f"avg_at_k/{m}/math" for m in table_methods} <= set(shown), sorted(shown)
    # ... and the flow run carries the score table and the teacher-cost ledger as Prefect artifacts
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["full-score-table", "full-scores", "full-teacher-cost"])))
    assert {a.key for a in arts} == {"full-score-table", "full-scores", "full-teacher-cost"}
    assert {str(a.flow_run_id) for a in arts} == {str(state.state_details.flow_run_id)}
    rows = json.loads(next(a for a in arts if a.key == "full-score-table").data)
    assert {r["method"] for r in rows} == set(table_methods)
    #     every computed stage's task run has a progress artifact, at 100 when it ended
    from prefect.client.schemas.filters import ArtifactFilterFlowRunId, ArtifactFilterType

    with get_client(sync_client=True) as client:
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            type=ArtifactFilterType(any_=["progress"])))
    assert len(progress) == len(ALL) and {float(a.data) for a in progress} == {100.0}, progress
    assert any(a.description.endswith("done") for a in progress)
    # The watchable progress record: every stage ended, with its step counts.
    from mopd.progress import latest_run, render

    text, ended = render(latest_run(project))
    assert ended and "teacher:math" in text and "done" in text and "2/2" in text, text
    #    A copy of the finished project in another folder is finished too (issue 29).
    moved = project.parent / "moved" / "project"
    shutil.copytree(project, moved, symlinks=True)
    assert {s for s, d in _plan(moved).items() if d["action"] != "cached"} == set()
    assert "up to date" in _dvc(moved, "status", "--with-deps", "report-full")
    shutil.rmtree(moved.parent)

    # 2. `mopd plan` after a completed run: every stage cached. A comment appended to a module of
    #    mopd/objectives/ reruns exactly the stages that import it and what depends on them.
    assert {s for s, d in _plan(project).items() if d["action"] != "cached"} == set()
    opd = project / "mopd" / "objectives" / "opd.py"
    original = opd.read_text()
    opd.write_text(original + "\n# a comment\n")
    plan = _plan(project)
    to_run = {s for s, d in plan.items() if d["action"] == "run"}
    assert to_run == {"distill", "evaluate:distill", "report:full"}, plan
    assert "code mopd/objectives/opd.py: changed" in plan["distill"]["reasons"]
    assert plan["evaluate:distill"]["reasons"] == ["upstream distill will run"]
    dvc_stale = {line[:-1] for line in _dvc(project, "status", "--with-deps", "report-full").splitlines()
                 if line.endswith(":") and not line[0].isspace()}
    assert "distill" in dvc_stale and not dvc_stale & {"sft", "teacher-math", "difficulty"}, dvc_stale
    opd.write_text(original)
    assert {s for s, d in _plan(project).items() if d["action"] != "cached"} == set()

    # 3. A second pipeline sharing SFT and teachers, with a distillation variant: it computes
    #    only its own stages, plus a shared stage whose output was deleted (a cache hit whose files
    #    are gone is recomputed); the first pipeline's other outputs are untouched.
    pipes = yaml.safe_load((project / "pipelines.yaml").read_text())
    #    The variants run TrOPD with teacher prefixes and full Uni-OPD through the real verifiers.
    pipes["pipelines"]["alt"] = {"domains": ["math", "code", "if"],
                                 "stages": ["data", "base", "sft", "teacher", "distill:tg",
                                            "distill:uo", "mix_rl", "cascade_rl", "offpolicy_ft",
                                            "weight_shift", "evaluate", "budget_curve"]}
    (project / "pipelines.yaml").write_text(yaml.safe_dump(pipes, sort_keys=False))
    params = micro_params()
    params["variants"]["distill"] |= {
        "tg": {"objective": "tropd", "prefix_share": 1.0},
        "uo": {"samples_per_prompt": 2, "uniopd": {"online_balance": True, "calibration": "mean",
                                                    "strategy": "mask", "gamma": 0.1}}}
    write_params(project, params)
    _sh([sys.executable, "-m", "mopd.cli", "dvc-yaml"], project)
    (project / "artifacts" / "evaluate" / "sft" / "scores.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in (project / "artifacts").rglob("result.json")
              if "evaluate/sft" not in str(p)}
    state, status = _run(project, pipeline="alt")
    assert state.is_completed(), state.message
    assert _by(status, "computed") == {"report:alt", "evaluate:sft", "distill:tg", "evaluate:distill:tg",
                                       "distill:uo", "evaluate:distill:uo", "budget_curve:alt"} | BASELINES
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (project / "artifacts" / "distill" / "tg" / "model" / "model.safetensors").is_file()
    table = (project / "artifacts" / "report" / "alt" / "avg_at_k.csv").read_text()
    assert "distill:tg" in table and "teacher:math" in table
    for method in ("mix_rl", "cascade_rl", "offpolicy_ft"):
        assert method in table
    # Each method's budget (issue 25): student rollouts of the integrating stages, and with the
    # teachers' GRPO rollouts (micro: distill 2 steps x 3 prompts x 2, Mix-RL and teachers 2 x 6 / 2 x 4).
    budget = {m: e["budget"] for m, e in
              json.loads((project / "artifacts/report/alt/table.json").read_text())["methods"].items()}
    assert budget["distill:tg"]["integration_rollouts"] == 12 and budget["distill:tg"]["total_rollouts"] == 36
    assert budget["mix_rl"]["integration_rollouts"] == budget["mix_rl"]["total_rollouts"] == 12
    assert budget["cascade_rl"]["integration_rollouts"] == 16 and budget["cascade_rl"]["total_rollouts"] == 24
    assert budget["sft"]["total_rollouts"] == 0 and budget["teacher:math"]["integration_rollouts"] == 0
    assert budget["distill:tg"]["integration_tokens"] > 0
    # The budget curve: every distillation stage and Mix-RL at its snapshot (step 1) and its end.
    curve = pd.read_csv(project / "artifacts/analysis/budget_curve/alt/budget_curve.csv")
    points = {m: sorted(rows.student_rollouts) for m, rows in curve.groupby("method")}
    assert points == {"distill:tg": [6, 12], "distill:uo": [6, 12], "mix_rl": [6, 12]}
    final = curve[(curve.method == "mix_rl") & (curve.student_rollouts == 12)].iloc[0]
    mix_scores = json.loads((project / "artifacts/evaluate/mix_rl/scores.json").read_text())["mix_rl"]
    assert final["avg_math"] == pytest.approx(mix_scores["math"]["avg@k"])  # the same evaluation as the table's
    assert (project / "artifacts/analysis/budget_curve/alt/budget_curve.png").is_file()
    shift = (project / "artifacts" / "analysis" / "weight_shift" / "pairs.csv").read_text()
    assert shift.startswith("a,b,group,n_params,rate_a,rate_b,jaccard,random_reference")
    state, status = _run(project)  # (evaluations are deterministic at a fixed thread count)
    assert state.is_completed(), state.message
    assert _by(status, "cached") == ALL  # nothing of `full` was recomputed or deleted
    #    (Multi-round MOPD, whose round-2 teachers start from `distill`'s student, runs in
    #    tests/test_dvc.py through `dvc repro`: the same stages, not run twice in the suite.)

    # 4. Two teachers' learning rates change and one of them raises: the other completes, only
    #    the stages that need the failed one are skipped, the flow fails.
    params["teacher"]["math"]["learning_rate"] = 1.0e-3
    params["teacher"]["code"]["learning_rate"] = 1.0e-3
    write_params(project, params)
    monkeypatch.setenv("MOPD_FAIL_STAGES", "teacher:code")
    state, status = _run(project)
    assert state.is_failed()
    assert _by(status, "failed") == {"teacher:code"}
    assert _by(status, "computed") == {"teacher:math", "evaluate:teacher:math"}
    assert _by(status, "skipped") == {"distill", "merge", "evaluate:teacher:code",
                                      "evaluate:distill", "evaluate:merge", "report:full"}

    # 5. The next run recomputes only the failed teacher and what depends on it (a stage downstream
    #    of a recomputed one reruns only if its inputs' *content* changed: a micro GRPO run can
    #    leave the weights bit-identical, and then the distilled student and the merges come out
    #    identical too, and their evaluations stay cached).
    #    On one device (placement, issue 26) the stages that need it run one after another, all on
    #    it; a stage waiting for the device shows Prefect's AwaitingConcurrencySlot, not Running.
    monkeypatch.delenv("MOPD_FAIL_STAGES")
    monkeypatch.setenv("MOPD_DEVICES", "0")
    state, status = _run(project)
    assert state.is_completed(), state.message
    computed = _by(status, "computed")
    _assert_downstream_of(project, computed, "teacher:code")
    assert "up to date" not in _dvc(project, "status")  # `alt`'s variant is stale for DVC now
    from mopd.artifacts import load_run_record

    placed = [p for p in (load_run_record(project, n)["placement"] for n in computed) if p["devices"]]
    spans = sorted((p["leased_at"], p["ended"], tuple(p["devices"])) for p in placed)
    assert len(spans) >= 3 and {s[2] for s in spans} == {("0",)}, spans
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # one after another
    waited = _task_state_names(state, computed)
    assert any("AwaitingConcurrencySlot" in names for names in waited.values()), waited
    assert all(names[-1] == "Completed" for names in waited.values()), waited
    monkeypatch.setenv("MOPD_DEVICES", "0,1,2,3,4,5")

    # 6. `rerun` forces a stage (here by kind) whatever the cache says. Killed after its work and
    #    before its record, the forced stage fails and leaves its previous outputs as they were:
    #    `mopd plan` and DVC both still call it done (issue 29). Run again, it computes.
    monkeypatch.setenv("MOPD_KILL_BEFORE_RECORD", "report:full")
    state, status = _run(project, rerun=["report"])
    monkeypatch.delenv("MOPD_KILL_BEFORE_RECORD")
    assert state.is_failed() and _by(status, "failed") == {"report:full"}, status
    assert {s for s, d in _plan(project).items() if d["action"] != "cached"} == set()
    assert "up to date" in _dvc(project, "status", "report-full")
    state, status = _run(project, rerun=["report"])
    assert state.is_completed(), state.message
    assert _by(status, "computed") == {"report:full"}
    assert "up to date" in _dvc(project, "status", "report-full", "distill", "sft")

    # MLflow (SQLite store in the project): the last parent run has a child per stage.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.mopd' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mopd")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'pipeline'",
                                 order_by=["attributes.start_time DESC"])
    assert len(parents) == 7
    last = parents[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{last.info.run_id}'")
    stages = [c for c in children if c.data.tags.get("kind") != "comparison"]  # (method runs: below)
    assert {c.data.tags["stage"] for c in stages} == ALL
    assert {c.data.tags["stage"] for c in stages if c.data.tags.get("cache") != "hit"} == {"report:full"}
    teacher = [r for r in client.search_runs([exp.experiment_id], "tags.stage = 'teacher:code'")
               if r.data.tags.get("cache") != "hit"][0]
    assert teacher.data.params["teacher.code.learning_rate"] == str(params["teacher"]["code"]["learning_rate"])
    history = client.get_metric_history(teacher.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]  # per-step metrics, one point per GRPO step
    #    the splits each stage read are its MLflow dataset inputs ("Datasets used"), with their context
    used = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"]
            for i in client.get_run(teacher.info.run_id).inputs.dataset_inputs}
    assert used == {"code-train": "training"}, used
    difficulty = [r for r in client.search_runs([exp.experiment_id], "tags.stage = 'difficulty'")
                  if r.data.tags.get("cache") != "hit"][0]
    assert {a.path for a in client.list_artifacts(difficulty.info.run_id, "math")} >= {
        "math/histogram.png", "math/balanced.parquet", "math/stats.json"}
    arts = {a.path for a in client.list_artifacts(last.info.run_id)}
    assert {"avg_at_k.csv", "normalized.csv", "avg_at_k.png"} <= arts
    # the parent's metric keys name no method; each method of the comparison is a child run of
    # the pipeline run (kind comparison) with the same keys, and its model is registered
    methods_ran = set(json.loads((project / "artifacts/report/full/table.json").read_text())["methods"])
    assert not [k for k in last.data.metrics if any(m in k.split("/") for m in methods_ran)], last.data.metrics
    rows = {r.data.tags["method"]: r for r in children if r.data.tags.get("kind") == "comparison"}
    assert set(rows) == methods_ran
    assert set(rows["mopd"].data.metrics) >= {"avg_at_k/math", "avg_at_k_ci_lo/math", "pass_at_k/code",
                                              "teacher_cost/seconds_per_student_token"}  # (normalized/*: where significant)
    assert set(rows["sft"].data.metrics) >= {k for k in rows["mopd"].data.metrics if k.startswith("avg_at_k")}
    assert "score_table.json" in {a.path for a in client.list_artifacts(last.info.run_id)}
    from mopd.config import load_config
    from mopd.graph import build_graph
    from mopd.publish import registered_name

    graph = {s.name: s for s in build_graph(load_config(project))}
    for m in methods_ran:  # a version per content of each method's model, the newest the current one
        versions = client.search_model_versions(f"name = '{registered_name('full', m)}'")
        hashes = [v.tags["content_hash"] for v in versions]
        newest = max(versions, key=lambda v: int(v.version))
        assert len(set(hashes)) == len(hashes), (m, hashes)  # a cached rerun registers nothing new
        assert newest.tags["content_hash"] == load_result(project / graph[rows[m].data.tags["model_stage"]].out_dir).content_hash
    mopd = max(client.search_model_versions(f"name = '{registered_name('full', 'mopd')}'"), key=lambda v: int(v.version))
    assert mopd.source.endswith("artifacts/distill/mopd/model") and mopd.tags["stage"] == "distill"
    assert mopd.tags["dvc_lock_md5"] != "not in dvc.lock"
    # every method has a run with the same metric names: the UI's comparison lines them up
    methods = {r.data.tags["method"]: set(r.data.metrics)
               for r in client.search_runs([exp.experiment_id], "tags.kind = 'method'")}
    assert {"mopd", "mix_rl", "cascade_rl", "offpolicy_ft", "merge:linear", "sft"} <= set(methods)
    assert methods["mopd"] == methods["mix_rl"] == methods["merge:linear"]
    assert {"avg_at_k/math", "avg_at_k_ci_lo/math", "avg_at_k_ci_hi/math", "pass_at_k/code"} <= methods["mopd"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # The teacher cost ledger, read back from the SQLite store: per step on the distill run,
    # totals in its result metrics, and a column of the comparison table (parent run + table.json).
    distill = [r for r in client.search_runs([exp.experiment_id], "tags.stage = 'distill'")
               if r.data.tags.get("cache") != "hit"][0]
    per_step = {d: client.get_metric_history(distill.info.run_id, f"teacher/{d}/requests") for d in ("math", "code", "if")}
    assert all([m.step for m in h] == [1, 2] for h in per_step.values()), per_step
    assert all(sum(h[i].value for h in per_step.values()) >= 1 for i in range(2))  # every step asked a teacher
    assert distill.data.metrics["result/teacher_cost/all/requests"] == sum(m.value for h in per_step.values() for m in h)
    assert distill.data.metrics["result/teacher_cost/all/seconds_per_student_token"] > 0
    assert rows["mopd"].data.metrics["teacher_cost/seconds_per_student_token"] > 0
    costs = {m: e["teacher_cost"] for m, e in
             json.loads((project / "artifacts/report/alt/table.json").read_text())["methods"].items()}
    assert costs["distill:tg"]["prefill_tokens"] > 0 and costs["offpolicy_ft"]["generated_tokens"] > 0
    assert costs["distill:tg"]["generated_tokens"] > 0  # TrOPD's teacher prefixes are sampled by the teacher
    assert costs["mix_rl"] is None and costs["sft"] is None  # they query no teacher
    # Every model-running stage placed its models where `runtime` says (CPU here), recorded on its run.
    for stage in ("sft", "teacher:math", "difficulty", "distill", "mix_rl", "evaluate:distill"):
        run = [r for r in client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'")
               if r.data.tags.get("cache") != "hit" and r.data.tags["kind"] != "method"][0]  # not evaluate's per-method child
        assert run.data.tags["runtime/device"] == "cpu" and run.data.tags["runtime/models"].startswith("cpu/"), stage
    assert run.data.tags["runtime/devices"] in tuple("012345")  # the lease, on the run



def _task_state_names(state, tasks) -> dict[str, list[str]]:
    """Task run name -> the names of its states in order, for the tasks ``tasks`` of a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    time.sleep(2)  # task states are recorded from events, a moment after the flow ends
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        return {r.name: [s.name for s in sorted(client.read_task_run_states(r.id), key=lambda s: s.timestamp)]
                for r in runs if r.name in tasks}


def _teacher_placements(project) -> dict[str, dict]:
    from mopd.artifacts import load_run_record

    return {t: load_run_record(project, t)["placement"] for t in TEACHERS}


def test_copd_killed_during_cycle_2_resumes_from_cycle_2(micro_project, prefect_env):
    """CoPD's branch-cycle-phase stages on the real engine: SIGKILL the flow (and its stage
    processes) while a cycle-2 stage runs; the next run takes cycle 1 from the cache and
    recomputes only cycle 2 onward (the stage killed mid-run included)."""
    import os
    import signal

    from prefect.settings import PREFECT_API_URL

    from mopd.progress import LATEST, PROGRESS_DIR, RUN_FILE

    params = micro_params()
    params["copd"].update(branches=["math", "if"], hub=None)
    write_params(micro_project, params)
    pipes = yaml.safe_load((micro_project / "pipelines.yaml").read_text())
    pipes["pipelines"]["copd"]["stages"] = ["data", "base", "sft", "copd"]
    (micro_project / "pipelines.yaml").write_text(yaml.safe_dump(pipes))
    code = f"from flows.mopd_flow import mopd; mopd(pipeline='copd', project_dir={str(micro_project)!r})"
    log = open(micro_project / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}, start_new_session=True)
    progress, running, deadline = micro_project / PROGRESS_DIR, None, time.monotonic() + 600
    try:
        while running is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                run_id = (progress / LATEST).read_text().strip()
                stages = json.loads((progress / run_id / RUN_FILE).read_text())["stages"]
            except (OSError, ValueError):
                continue
            running = next((n for n, st in stages.items() if n.startswith("copd:2:") and st["state"] == "running"), None)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert running, f"no cycle-2 stage started:\n{(micro_project / 'killed.log').read_text()[-3000:]}"
    cycle1 = {f"copd:1:{ph}:{d}" for ph in ("rl", "opd") for d in ("math", "if")}
    cycle2 = {n.replace("copd:1:", "copd:2:") for n in cycle1}
    state, status = _run(micro_project, pipeline="copd")
    assert state.is_completed()
    assert _by(status, "cached") >= {"data", "base", "sft"} | cycle1
    computed = _by(status, "computed")
    assert running in computed and computed <= cycle2 | {"copd_merge", "copd_monitor"}
    assert {"copd_merge", "copd_monitor", "copd:2:opd:math", "copd:2:opd:if"} <= computed
    assert json.loads((micro_project / "artifacts/copd/merge/models.json").read_text()) == {"copd": "model"}
    # `mopd stage NAME`: the same cache decision, one stage in the foreground
    def stage(*args):
        return subprocess.run([sys.executable, "-m", "mopd.cli", "stage", *args, "--pipeline", "copd", "--no-track"],
                              cwd=micro_project, capture_output=True, text=True)
    assert "copd_merge: cached" in stage("copd_merge").stdout
    before = (micro_project / "artifacts/copd/merge/result.json").stat().st_mtime_ns
    out = stage("copd_merge", "--force")
    assert out.returncode == 0 and "copd_merge: run (forced (rerun))" in out.stdout, out.stdout + out.stderr
    assert (micro_project / "artifacts/copd/merge/result.json").stat().st_mtime_ns > before
    (micro_project / "artifacts/copd/2/rl/if/result.json").unlink()
    out = stage("copd:2:opd:math")
    assert out.returncode == 2 and "needs ['copd:2:rl:if']" in out.stderr


def test_flow_rejects_bad_config_before_work(micro_project, prefect_env):
    params = micro_params()
    params["teacher"]["math"]["learning_rate"] = "fast"
    write_params(micro_project, params)
    from flows.mopd_flow import mopd

    state = mopd(project_dir=str(micro_project), return_state=True)
    assert state.is_failed()
    assert "teacher.math.learning_rate" in str(state.result(raise_on_failure=False))
    assert not (micro_project / "artifacts").exists()


def test_flow_rejects_unknown_rerun(micro_project, prefect_env):
    from flows.mopd_flow import mopd

    state = mopd(project_dir=str(micro_project), rerun=["teachr"], return_state=True)
    assert state.is_failed()
    assert "teachr" in str(state.result(raise_on_failure=False))
    assert not (micro_project / "artifacts").exists()


def test_flow_refuses_project_dir_outside_allowed_roots(micro_project, prefect_env, tmp_path_factory):
    from flows.mopd_flow import mopd

    elsewhere = tmp_path_factory.mktemp("elsewhere")
    state = mopd(project_dir=str(elsewhere), return_state=True)
    assert state.is_failed()
    assert "outside the allowed project roots" in str(state.result(raise_on_failure=False))


def test_serve_builds_one_deployment_per_pipeline(micro_project):
    from flows.serve import deployments

    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["pipelines"]["small"] = {"domains": ["math", "code", "if"], "stages": ["data", "base", "sft"]}
    (micro_project / "pipelines.yaml").write_text(yaml.safe_dump(pipes))
    deps = {d.name: d for d in deployments(micro_project)}
    assert set(deps) == set(pipes["pipelines"])
    assert deps["small"].parameters == {"pipeline": "small", "project_dir": str(micro_project)}


def test_priority_gate_serves_waiting_stages_in_graph_order():
    from flows.mopd_flow import _PriorityGate

    gate, order = _PriorityGate(1), []

    def stage(priority):
        with gate.hold(priority):
            order.append(priority)
            time.sleep(0.02)

    with gate.hold(0):  # the only slot is taken while the others queue up
        threads = [threading.Thread(target=stage, args=(p,)) for p in (5, 3, 9, 1)]
        for t in threads:
            t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(10)
    assert order == [1, 3, 5, 9]


def test_flow_params_override_is_validated_recorded_and_keyed(micro_project, prefect_env):
    """The deployments' `params` parameter (`prefect deployment run mopd/full -p params=...`)
    through the real Prefect engine: an unknown key fails the run naming it before any work; a
    valid one reaches the stage process, its recorded configuration, its cache key and MLflow."""
    from mlflow.tracking import MlflowClient

    from flows.mopd_flow import mopd

    schema = mopd.to_deployment(name="x")._parameter_openapi_schema.model_dump()
    assert "params" in schema["properties"]  # what `prefect deployment run -p` is checked against
    state = mopd(project_dir=str(micro_project), params={"distill": {"no_such_key": 1}}, return_state=True)
    assert state.is_failed() and "distill.no_such_key" in str(state.result(raise_on_failure=False))
    assert not (micro_project / "artifacts").exists()

    pipes = yaml.safe_load((micro_project / "pipelines.yaml").read_text())
    pipes["pipelines"]["d"] = {"domains": ["math", "code", "if"], "stages": ["data"]}
    (micro_project / "pipelines.yaml").write_text(yaml.safe_dump(pipes))
    _, status = _run(micro_project, pipeline="d")
    assert status == {"data": "computed"}
    state, status = _run(micro_project, pipeline="d", params={"data": {"n_train": 40}})
    assert state.is_completed() and status == {"data": "computed"}  # another key: not the cached one
    assert json.loads((micro_project / "artifacts/data/stage_config.json").read_text())["data"]["n_train"] == 40
    _, status = _run(micro_project, pipeline="d", params={"data": {"n_train": 40}})
    assert status == {"data": "cached"}
    client = MlflowClient(f"sqlite:///{micro_project}/.mopd/mlflow.db")
    exp = client.get_experiment_by_name("mopd").experiment_id
    child = [r for r in client.search_runs([exp], "tags.stage = 'data'") if "overrides" in r.data.tags]
    assert [json.loads(r.data.tags["overrides"]) for r in child] == [{"data.n_train": 40}]
    assert child[0].data.params["data.n_train"] == "40"
    parents = client.search_runs([exp], "tags.kind = 'pipeline'")
    assert sum(r.data.params.get("override/data.n_train") == "40" for r in parents) == 2
