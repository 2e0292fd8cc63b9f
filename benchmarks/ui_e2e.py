"""`make ui-check`: a finished micro pipeline, run by the real Prefect engine on a real Prefect server
(SQLite, its UI enabled), then its MLflow and Prefect pages opened in headless Chromium
(benchmarks/ui_check.py): the MLflow runs table and run comparison name the pipeline run and every
stage run; the Prefect flow-run page shows the score-table artifact. Screenshots go to ``--out``
(default docs/images/). About 5 minutes on 2 cores; exit 0 passed (or skipped: no Chromium), 1 failed.

Self-contained: a temporary project (the shipped YAML, every stage cut to a few steps) and a
temporary Prefect home; nothing of the current project is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import ui_check  # noqa: E402
from tests.conftest import micro_params  # noqa: E402  (the suite's micro settings: one definition)

PIPELINE = "micro"
STAGES = ["data", "base", "sft", "teacher", "distill", "evaluate"]


def micro_project(where: Path) -> Path:
    """A project whose pipeline `micro` runs SFT, three teachers, MOPD and their evaluations."""
    project = where / "project"
    project.mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump(micro_params(), sort_keys=False))
    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["pipelines"] = {PIPELINE: {"domains": ["math", "code", "if"], "stages": STAGES}}
    (project / "pipelines.yaml").write_text(yaml.safe_dump(pipes, sort_keys=False))
    return project


@contextlib.contextmanager
def prefect_server(home: Path, log: Path) -> Iterator[str]:
    """`prefect server start` (SQLite under ``home``, UI enabled) on a free port; yields its URL."""
    port = ui_check.free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true",
           "PREFECT_API_URL": f"{url}/api"}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                 "127.0.0.1", "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ui_check._wait_http(f"{url}/api/health", proc, log, timeout=180)
        yield url
    finally:
        ui_check._stop(proc)


def run_flow(project: Path, api: str, home: Path) -> None:
    """The flow `mopd` on pipeline `micro`, in its own process, against the server ``api``."""
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(home), "MOPD_THREADS": "1",
           "MOPD_PROJECT_ROOTS": str(project.parent), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("MLFLOW_TRACKING_URI", None)
    code = (f"from flows.mopd_flow import mopd; "
            f"mopd(pipeline={PIPELINE!r}, project_dir={str(project)!r})")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        raise ui_check.UICheckFailed(f"the micro pipeline failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                     f"{proc.stderr[-3000:]}")
    print(f"ui-check: pipeline {PIPELINE} finished in {time.monotonic() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where the screenshots go")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project (its path is printed)")
    args = ap.parse_args(argv)
    if ui_check.chromium_path() is None:
        print("ui-check: skipped: chromium not installed (Debian: apt-get install chromium)")
        return 0
    t0 = time.monotonic()
    where = Path(tempfile.mkdtemp(prefix="mopd-ui-check-"))
    try:
        project, home = micro_project(where), where / "prefect"
        home.mkdir()
        with prefect_server(home, where / "prefect-server.log") as url:
            run_flow(project, f"{url}/api", home)
            from mopd.config import load_config
            from mopd.graph import build_graph

            stages = [s.name for s in build_graph(load_config(project, pipeline=PIPELINE))]
            pages = ui_check.check_mlflow(project, PIPELINE, out_dir=args.out, expect_stages=stages)
            pages.append(ui_check.check_prefect(url, artifact_key=f"{PIPELINE}-score-table", out_dir=args.out))
    except ui_check.UICheckFailed as e:
        print(f"ui-check: FAILED\n{e}\n(project: {where})", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)
    for page in pages:
        url = page.url if len(page.url) < 120 else page.url[:117] + "..."
        print(f"ui-check: ok: {page.title}: {url}" + (f" -> {page.screenshot}" if page.screenshot else ""))
    print(f"ui-check: passed in {time.monotonic() - t0:.0f} s" + (f" (project kept: {where})" if args.keep else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
