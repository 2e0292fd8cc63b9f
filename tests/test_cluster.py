"""Stages on a real Ray cluster (`runtime.cluster.engine: ray`, mopd.cluster; issue 27): two Ray
nodes started here (`ray start --block`: a head, and a worker with a custom `teacher_pool`
resource), a micro pipeline whose teacher stages ask for that resource, every stage placed by
Ray's scheduler, the nodes read back from each stage's `result.json`. `make test-cluster` (marker
`cluster`; needs the `cluster` extra, ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, micro_params, write_params

pytestmark = pytest.mark.cluster
ray = pytest.importorskip("ray")

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(address: str) -> list[dict]:
    """The cluster's live nodes as a separate driver sees them (id and resources)."""
    code = (f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else []


TWO_POOLS = {"teacher": {"teacher_pool": 1}, "default": {"mopd_head": 1}}


def _project(project: Path, domains: list[str], stages: list[str], pipeline: str = "p", **sections) -> Path:
    """A micro project at ``project``: pipeline ``pipeline`` over ``domains`` and ``stages``;
    ``sections`` replace top-level params (``runtime`` is merged into the shipped one)."""
    project.mkdir()
    params = micro_params()
    params["runtime"].update(sections.pop("runtime", {}))
    params.update(sections)
    write_params(project, params)
    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["pipelines"] = {pipeline: {"domains": domains, "stages": stages}}
    (project / "pipelines.yaml").write_text(yaml.safe_dump(pipes))
    return project


def _ray_processes(temp_dir: str) -> list[str]:
    """Processes still running from this cluster's session folder."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp_dir.encode() in (proc / "cmdline").read_bytes():
                out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except OSError:
            continue
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node (2 CPUs, resource `mopd_head`) and a worker node (2 CPUs, `teacher_pool: 2`),
    both `ray start --block` processes of this test, stopped by PID at the end."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rt")  # Ray's socket paths must stay short
    common = ["--block", "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                             '--resources={"mopd_head": 4}', *common], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    worker = None
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _nodes(address):
            time.sleep(1)
        worker = subprocess.Popen([RAY, "start", f"--address={address}", '--resources={"teacher_pool": 2}',
                                   *common[:-1]], env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        nodes = []
        while time.monotonic() < deadline and len(nodes) < 2:
            nodes = _nodes(address)
            time.sleep(1)
        assert len(nodes) == 2, f"the cluster did not come up: {nodes}"
        ids = {("worker" if "teacher_pool" in n["resources"] else "head"): n["id"] for n in nodes}
        yield address, ids
    finally:
        for proc in (worker, head):  # stop what this test started, by PID (its process group)
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in (worker, head):
            if proc is not None:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _ray_processes(temp_dir) and time.monotonic() < deadline:
            time.sleep(1)
        left = _ray_processes(temp_dir)
        for line in left:  # nothing of this cluster may outlive the test
            print("left running:", line)
        assert not left


def test_stages_run_where_their_resources_are(ray_cluster, tmp_path):
    address, ids = ray_cluster
    project = _project(tmp_path / "project", ["math", "if"], ["data", "base", "sft", "teacher"],
                       runtime={"cluster": {"engine": "ray", "address": address, "resources": TWO_POOLS}})
    env = {k: v for k, v in os.environ.items() if k not in ("MOPD_PROJECT_DIR", "RAY_ADDRESS")}
    env["MOPD_THREADS"] = "1"

    def run() -> str:
        proc = subprocess.run([sys.executable, "-m", "mopd.cli", "run", "--pipeline", "p", "--no-track"],
                              cwd=project, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    out = run()
    placed = {}
    for result in project.glob("artifacts/**/result.json"):
        r = json.loads(result.read_text())
        placed[r["stage"]] = r["placement"]
    assert set(placed) == {"data", "base", "sft", "teacher:math", "teacher:if"}, out[-2000:]
    assert all(p.get("engine") == "ray" for p in placed.values()), placed
    where = {name: ("worker" if p["node"] == ids["worker"] else "head" if p["node"] == ids["head"] else p["node"])
             for name, p in placed.items()}
    print("stage -> node:", where)
    assert where == {"data": "head", "base": "head", "sft": "head", "teacher:math": "worker",
                     "teacher:if": "worker"}, where
    again = run()  # the same decision as everywhere: nothing to do
    assert again.count(": cached") == 5 and ": run" not in again, again


def test_a_data_parallel_stage_spreads_over_two_nodes(ray_cluster, tmp_path):
    """`runtime.cluster.nodes.teacher: 2` with `runtime.processes.teacher: 2`: the GRPO teacher
    runs as one data-parallel group of two processes, one on each Ray node (a STRICT_SPREAD
    placement group, node 0 the rendezvous), and completes."""
    address, ids = ray_cluster
    project = _project(tmp_path / "project", ["math"], ["data", "base", "sft", "teacher"],
                       runtime={"processes": {"default": 1, "teacher": 2},
                                "cluster": {"engine": "ray", "address": address, "nodes": {"teacher": 2}}})
    env = {k: v for k, v in os.environ.items() if k not in ("MOPD_PROJECT_DIR", "RAY_ADDRESS")}
    env["MOPD_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "mopd.cli", "run", "--pipeline", "p", "--no-track"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    placed = json.loads((project / "artifacts/teachers/math/result.json").read_text())["placement"]
    assert placed["processes"] == 2 and placed["node_processes"] == 1, placed  # one group, one process per node
    assert sorted(placed["nodes"]) == sorted(ids.values()), placed
    assert placed["node"] == placed["nodes"][0]  # process 0, on node 0, wrote the result
    assert (project / "artifacts/teachers/math/model/model.safetensors").is_file()


def test_the_flow_places_stages_on_ray_and_shares_the_cache(ray_cluster, tmp_path, monkeypatch):
    """The Prefect flow on the same cluster: the two teachers run at once on the worker (two
    `teacher_pool` slots), every stage is an MLflow child run of the flow's parent run, and
    `mopd run` afterwards finds everything cached (one cache decision for every launcher)."""
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    address, ids = ray_cluster
    project = _project(tmp_path / "project", ["math", "if"], ["data", "base", "sft", "teacher"],
                       runtime={"cluster": {"engine": "ray", "address": address, "resources": TWO_POOLS}})
    for var in ("MLFLOW_TRACKING_URI", "MOPD_PROJECT_DIR", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MOPD_THREADS", "1")
    monkeypatch.setenv("MOPD_PROJECT_ROOTS", str(tmp_path))
    with prefect_test_harness(server_startup_timeout=120):
        from flows.mopd_flow import mopd

        try:
            summary = mopd(pipeline="p", project_dir=str(project))
        finally:
            ray.shutdown()  # the flow's connection to the cluster
    assert set(summary["status"].values()) == {"computed"}, summary["status"]
    placed = {json.loads(r.read_text())["stage"]: json.loads(r.read_text())["placement"]
              for r in project.glob("artifacts/**/result.json")}
    assert {n for n, p in placed.items() if p["node"] == ids["worker"]} == {"teacher:math", "teacher:if"}, placed
    a, b = placed["teacher:math"], placed["teacher:if"]
    assert max(a["started"], b["started"]) < min(a["ended"], b["ended"]), (a, b)  # at once, on the worker
    client = MlflowClient(f"sqlite:///{project}/.mopd/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mopd").experiment_id])
    children = {r.data.tags.get("stage"): r.data.tags.get("mlflow.parentRunId") for r in runs
                if r.data.tags.get("stage")}
    assert set(children) == set(placed) and set(children.values()) == {summary["parent_run_id"]}, children
    env = {k: v for k, v in os.environ.items() if k != "MOPD_PROJECT_DIR"}
    out = subprocess.run([sys.executable, "-m", "mopd.cli", "run", "--pipeline", "p", "--no-track"], cwd=project,
                         env=env, capture_output=True, text=True, timeout=600, check=False).stdout
    assert out.count(": cached") == 5 and ": run" not in out, out


def test_a_deployment_on_a_process_work_pool_runs_on_a_worker(tmp_path, monkeypatch):
    """`python -m flows.deploy --pool P` puts `mopd/<pipeline>` on a process work pool; `prefect
    deployment run mopd/micro` queues a run, which a worker started here picks up and completes."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    project = _project(tmp_path / "project", ["math"], ["data", "base", "sft", "teacher"], pipeline="micro")
    for var in ("MLFLOW_TRACKING_URI", "MOPD_PROJECT_DIR"):
        monkeypatch.delenv(var, raising=False)
    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MOPD_PROJECT_DIR": str(project),
               "MOPD_PROJECT_ROOTS": str(tmp_path), "MOPD_THREADS": "1", "PYTHONPATH": str(ROOT)}
        prefect = [sys.executable, "-m", "prefect"]
        out = subprocess.run([sys.executable, "-m", "flows.deploy", "--pool", "mopd-test"], cwd=project, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        worker = subprocess.Popen([*prefect, "worker", "start", "--pool", "mopd-test", "--type", "process"],
                                  cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.STDOUT)
        try:
            queued = subprocess.run([*prefect, "deployment", "run", "mopd/micro"], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=120, check=False)
            assert queued.returncode == 0, queued.stdout + queued.stderr
            run_id = next(line.split()[-1] for line in queued.stdout.splitlines() if "UUID" in line)
            deadline, state = time.monotonic() + 300, None
            with get_client(sync_client=True) as client:
                while time.monotonic() < deadline:
                    state = client.read_flow_run(run_id).state
                    if state is not None and state.is_final():
                        break
                    time.sleep(2)
                pool = client.read_work_pool("mopd-test")
        finally:
            os.killpg(worker.pid, signal.SIGTERM)  # the worker this test started, by PID
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
    assert pool.type == "process"
    assert state is not None and state.is_completed(), state
    done = {json.loads(r.read_text())["stage"] for r in project.glob("artifacts/**/result.json")}
    assert done == {"data", "base", "sft", "teacher:math"}, done


def test_artifacts_on_shared_storage_seen_from_a_second_checkout(tmp_path):
    """`storage.artifacts` / `storage.checkpoints` on a path outside the project (a shared
    filesystem): the micro pipeline completes there, and `mopd plan` from a second checkout with
    the same params finds every stage cached; its project holds no outputs."""
    store = tmp_path / "shared"
    storage = {"artifacts": str(store / "artifacts"), "checkpoints": str(store / "checkpoints")}
    env = {k: v for k, v in os.environ.items() if k != "MOPD_PROJECT_DIR"}
    env["MOPD_THREADS"] = "1"
    first, second = (_project(tmp_path / name, ["math", "if"], ["data", "base", "sft", "teacher", "distill"],
                              pipeline="full", storage=storage) for name in ("node-a", "node-b"))
    out = subprocess.run([sys.executable, "-m", "mopd.cli", "run", "--pipeline", "full", "--no-track"], cwd=first,
                         env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not (first / "artifacts").exists() and (store / "artifacts/distill/mopd/result.json").is_file()
    plan = subprocess.run([sys.executable, "-m", "mopd.cli", "plan", "--pipeline", "full", "--json"], cwd=second,
                          env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    actions = {d["stage"]: d["action"] for d in json.loads(plan)}
    assert actions and set(actions.values()) == {"cached"}, actions
    # DVC tracks outputs inside its repository: a clear refusal, naming the key
    refused = subprocess.run([sys.executable, "-m", "mopd.cli", "dvc-yaml"], cwd=second, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 2 and "storage.artifacts" in refused.stderr, refused.stderr
