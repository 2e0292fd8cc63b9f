"""`make demo`: start a local Prefect server (SQLite under .mopd/prefect), serve one deployment
per pipeline, trigger `mopd/full` (what `prefect deployment run mopd/full` does), follow it stage
by stage in the terminal (state, step/total, time left: `mopd.progress`), print the score table
and where to look, then stop what it started. `MOPD_DEMO_PIPELINE` picks another pipeline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROJECT = Path(os.environ.get("MOPD_PROJECT_DIR", Path.cwd())).resolve()
PORT = int(os.environ.get("MOPD_PREFECT_PORT", "4200"))
API = f"http://127.0.0.1:{PORT}/api"
BIN = Path(sys.executable).parent
PIPELINE = os.environ.get("MOPD_DEMO_PIPELINE", "full")


def _env() -> dict[str, str]:
    home = PROJECT / ".mopd" / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": API,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MOPD_PROJECT_DIR": str(PROJECT),
            "PREFECT_UI_URL": f"http://127.0.0.1:{PORT}"}


def _wait_http(url: str, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"demo: {what} did not answer at {url} within {seconds:.0f} s")


def _wait_deployment(env: dict, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        r = subprocess.run([BIN / "prefect", "deployment", "inspect", f"mopd/{PIPELINE}"], env=env,
                           capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(2)
    raise SystemExit(f"demo: deployment mopd/{PIPELINE} was not registered in time")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _print_scores() -> None:
    import pandas as pd

    rep = PROJECT / "artifacts" / "report" / PIPELINE
    if (rep / "table.csv").is_file():
        t = pd.read_csv(rep / "table.csv")
        t["cell"] = [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in zip(t.avg_at_k, t.ci_lo, t.ci_hi)]
        wide = t.pivot(index="method", columns="benchmark", values="cell").reindex(t.method.unique())
        print("\navg@k per domain [95% bootstrap CI over prompts]:\n" + wide.to_string())
    if (rep / "normalized.csv").is_file():
        norm = pd.read_csv(rep / "normalized.csv", index_col=0)
        notes = norm.pop("note") if "note" in norm else None
        print("\nMOPD normalised score (0 = SFT student, 1 = teacher; NaN = teacher gain not "
              "significant):\n" + norm.round(3).to_string())
        if notes is not None and notes.notna().any():
            for note in dict.fromkeys(n for n in notes.dropna() for n in str(n).split(" | ")):
                print(f"  note: {note}")


def _run_and_follow(env: dict) -> str:
    """Trigger the deployment, print its stages' progress until it ends; returns its final state."""
    os.environ.update({k: v for k, v in env.items() if k.startswith("PREFECT_")})
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from mopd.progress import PROGRESS_DIR, watch

    flow_run = run_deployment(f"mopd/{PIPELINE}", timeout=0)
    print(f"demo: triggered mopd/{PIPELINE}, flow run {flow_run.name} ({flow_run.id}); "
          f"`mopd watch` follows it from another terminal too\n")
    final: dict[str, str] = {}

    def done() -> bool:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run.id).state
        if state is not None and state.is_final():
            final["state"] = state.type.value
            return True
        return False

    watch(PROJECT / PROGRESS_DIR / str(flow_run.id), interval=3.0, is_done=done)
    while "state" not in final and not done():
        time.sleep(2)
    return final["state"]


def main() -> int:
    env = _env()
    logs = PROJECT / ".mopd" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = serve = None
    try:
        print(f"demo: starting Prefect server on 127.0.0.1:{PORT} (log: {logs}/prefect-server.log)")
        server = subprocess.Popen([BIN / "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(PORT)], env=env, cwd=PROJECT, start_new_session=True,
                                  stdout=open(logs / "prefect-server.log", "w"), stderr=subprocess.STDOUT)
        _wait_http(f"{API}/health", 120, "the Prefect server")
        print(f"demo: serving one deployment per pipeline (log: {logs}/serve.log)")
        serve = subprocess.Popen([sys.executable, "-m", "flows.serve"], env=env, cwd=PROJECT,
                                 start_new_session=True, stdout=open(logs / "serve.log", "w"),
                                 stderr=subprocess.STDOUT)
        _wait_deployment(env, 120)
        t0 = time.time()
        state = _run_and_follow(env)
        print(f"demo: pipeline run took {time.time() - t0:.0f} s ({state})")
        _print_scores()
        print(f"\nPrefect UI (while a server runs): http://127.0.0.1:{PORT}  — restart it with "
              f"`make server`\nMLflow UI: `make ui` then http://127.0.0.1:5000\n"
              f"Artifacts: {PROJECT / 'artifacts'}   Flow log: {logs}/serve.log")
        return 0 if state == "COMPLETED" else 1
    finally:
        _stop(serve)
        _stop(server)


if __name__ == "__main__":
    raise SystemExit(main())
