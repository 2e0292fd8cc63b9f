"""Open the MLflow and Prefect UIs in headless Chromium and check that they show a finished pipeline.

MLflow: `mlflow ui` (what `make ui` runs) is started on a project's store (`.mopd/mlflow.db`) on a
free port, and three pages are loaded, each in a fresh browser profile (what a first visit sees):

1. ``/``: MLflow 3.17's Home page ("Welcome to MLflow", getting-started cards, "Recent
   Experiments"). It lists experiments, never runs: checked for the experiment's name.
2. ``#/experiments/<id>?workflowType=machine_learning``: the runs table. Checked that it is the
   runs table (page title "Runs - ...") and that it shows the newest pipeline run, ``mopd-<pipeline>``
   (stage runs are nested under it, collapsed).
3. ``#/compare-runs?runs=[...]``: MLflow's run comparison of that pipeline run and all its stage
   runs (``teacher:math``, ``evaluate:distill:mopd``, ...), checked for every one of their names.
   (The pipeline run's own page lists only its 10 newest child runs.)

Why ``?workflowType=machine_learning``: MLflow 3.17's UI chooses an experiment's first page from its
sidebar toggle (GenAI | Model training), which lives in the browser (localStorage
``mlflow.workflowType``, GenAI when unset) and which a ``workflowType`` URL parameter overrides; it
does not read the experiment's ``mlflow.experimentKind`` tag for this (mlflow/mlflow#24498). So a
fresh browser opening ``#/experiments/<id>`` (the link on the Home page) gets the GenAI Overview
(Traces 0, "No data available") whatever the tag says. The parameter is the UI's own (its toggle
writes it into the URL); no server option or environment variable sets the default. `make ui` prints
this URL (``--print-url``); clicking "Model training" once makes that browser remember it.

Prefect: the flow run's page with its Artifacts tab open, in Prefect's V2 UI
(``<ui>/v2/runs/flow-run/<id>?tab=Artifacts``; the prefix comes from the server's ``/ui-settings``),
checked for the flow run's name and the artifact's key (default ``score-table``). Why V2: the V1
page (``<ui>/runs/flow-run/<id>``) hides its Artifacts tab until the run has loaded and so drops
``?tab=Artifacts`` and opens on Logs. Before the page, the API is asked whether the flow run has
the artifact at all, so a missing artifact and a page that does not show it fail differently.

Screenshots (PNG, 1400x900) go to ``--out`` (default ``docs/images/``). Exit status: 0 passed, or
skipped because Chromium is not installed (the message says so); 1 a check failed (the message
names the page, the URL, what is missing and the screenshot).

Run: ``.venv/bin/python benchmarks/ui_check.py [--project-dir .] [--pipeline micro] [--out DIR]
[--prefect-url http://127.0.0.1:4200 [--flow-run ID] [--artifact-key score-table]]``;
``.venv/bin/python benchmarks/ui_check.py --print-url [--port 5000]`` prints the runs URL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = os.environ.get("MOPD_EXPERIMENT", "mopd")  # as flows/mopd_flow.py and tasks/runner.py
ML_RUNS = "workflowType=machine_learning"  # MLflow's "Model training" side of its sidebar toggle
BUDGET_MS = 15000  # Chromium's virtual time for a single-page app to fetch and render
WINDOW = (1400, 900)
MLFLOW_PAGES = ("home", "runs", "compare")


class UICheckFailed(AssertionError):
    """A page did not show what the store (or Prefect's API) holds; the message says which."""


# ----------------------------------------------------------------------------------------------
# the browser


def chromium_path() -> str | None:
    """$CHROMIUM, else Debian's `chromium` (or `chromium-browser`) on PATH; None when absent."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class _Text(HTMLParser):
    """The page's title and its visible text nodes (scripts, styles and SVG left out)."""

    SKIP = frozenset({"script", "style", "svg", "noscript"})

    def __init__(self) -> None:
        super().__init__()
        self.title, self.nodes, self._skip, self._in_title = "", [], 0, False

    def handle_starttag(self, tag, attrs) -> None:
        self._skip += tag in self.SKIP
        self._in_title = tag == "title"

    def handle_endtag(self, tag) -> None:
        if tag in self.SKIP and self._skip > 0:
            self._skip -= 1
        self._in_title = False

    def handle_data(self, data) -> None:
        if self._skip:  # an SVG's <title> is not the page's
            return
        if self._in_title:
            self.title += data
        elif data.strip():
            self.nodes.append(" ".join(data.split()))


@dataclass(frozen=True)
class Page:
    url: str
    title: str
    nodes: tuple[str, ...]  # visible text nodes, whitespace collapsed
    screenshot: Path | None

    def missing(self, names: Sequence[str]) -> list[str]:
        """The names that are not a whole text node of the page (a cell, a link: not a substring,
        so `distill:mopd` is not found inside `evaluate:distill:mopd`)."""
        have = set(self.nodes)
        return [n for n in names if n not in have]

    def excerpt(self, n: int = 400) -> str:
        text = " ".join(self.nodes)
        return text[:n] + ("..." if len(text) > n else "")


def render(url: str, screenshot: Path | None = None, chromium: str | None = None,
           window: tuple[int, int] = WINDOW, budget_ms: int = BUDGET_MS) -> Page:
    """Load ``url`` in headless Chromium with a fresh profile (no remembered UI state); return the
    DOM's text once ``budget_ms`` of virtual time has passed, saving a PNG to ``screenshot``."""
    exe = chromium or chromium_path()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="ui-check-profile-") as profile:
        # --no-sandbox: Chromium refuses to start as root (CI containers) without it; it only ever
        # loads the local servers this script started or was pointed at.
        cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
               f"--window-size={window[0]},{window[1]}", "--dump-dom", url]
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            cmd.insert(-2, f"--screenshot={screenshot.resolve()}")
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise UICheckFailed(f"chromium could not load {url} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    parser = _Text()
    parser.feed(proc.stdout)
    return Page(url, " ".join(parser.title.split()), tuple(parser.nodes), screenshot)


# ----------------------------------------------------------------------------------------------
# MLflow


@dataclass(frozen=True)
class PipelineRuns:
    """The newest pipeline run of an experiment and its stage runs, as the store holds them."""

    experiment: str
    experiment_id: str
    parent_id: str
    parent_name: str
    status: str
    stages: tuple[tuple[str, str], ...]  # (run id, run name), oldest first

    @property
    def stage_names(self) -> list[str]:
        return [name for _, name in self.stages]


def pipeline_runs(db: Path, experiment: str = EXPERIMENT, pipeline: str | None = None) -> PipelineRuns:
    """Read the newest run tagged ``kind=pipeline`` (and ``pipeline=<pipeline>`` when given) and its
    child runs from the SQLite store ``db``, through MLflow's client."""
    if not db.is_file():
        raise UICheckFailed(f"no MLflow store at {db}: run a pipeline first (make demo)")
    from mlflow.tracking import MlflowClient  # lazy: a second or two

    client = MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UICheckFailed(f"{db}: no experiment {experiment!r}; it holds "
                            f"{[e.name for e in client.search_experiments()]}")
    where = "tags.kind = 'pipeline'" + (f" and tags.pipeline = '{pipeline}'" if pipeline else "")
    found = client.search_runs([exp.experiment_id], where, order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise UICheckFailed(f"{db}: experiment {experiment!r} has no run where {where}")
    parent = found[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=1000)
    return PipelineRuns(experiment, exp.experiment_id, parent.info.run_id, parent.info.run_name,
                        parent.info.status, tuple((r.info.run_id, r.info.run_name) for r in children))


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table, on the "Model training" side whatever the browser remembers."""
    return f"{base}/#/experiments/{experiment_id}?{ML_RUNS}"


def compare_url(base: str, runs: PipelineRuns) -> str:
    ids = [runs.parent_id, *(run_id for run_id, _ in runs.stages)]
    q = urllib.parse.urlencode({"runs": json.dumps(ids, separators=(",", ":")),
                                "experiments": json.dumps([runs.experiment_id])})
    return f"{base}/#/compare-runs?{q}&{ML_RUNS}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UICheckFailed(f"the server exited ({proc.returncode}) before {url} answered:\n"
                                + log.read_text(errors="replace")[-2000:])
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise UICheckFailed(f"{url} did not answer within {timeout:.0f} s:\n" + log.read_text(errors="replace")[-2000:])


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its workers: its own process group (it was started in a new session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def mlflow_ui(db: Path, port: int | None = None, timeout: float = 180.0) -> Iterator[str]:
    """`mlflow ui` on the store ``db`` (`make ui`'s command, with one worker and no job runner) on
    ``port`` (default a free one); yields its base URL and stops it on exit."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db.resolve()}",
           "--default-artifact-root", str(db.resolve().parent / "mlartifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # no usage reports; no job runner (a second process importing MLflow, for GenAI judge jobs)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with tempfile.NamedTemporaryFile(prefix="mlflow-ui-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_http(f"{base}/health", proc, Path(log.name), timeout)
        yield base
    finally:
        _stop(proc)
        Path(log.name).unlink(missing_ok=True)


def mlflow_pages(base: str, runs: PipelineRuns) -> dict[str, tuple[str, str, list[str]]]:
    """Page name -> (URL, what its title starts with, the run or experiment names it must show)."""
    return {"home": (f"{base}/", "Home", [runs.experiment]),
            "runs": (runs_url(base, runs.experiment_id), "Runs", [runs.parent_name]),
            "compare": (compare_url(base, runs), "Compare Runs", [runs.parent_name, *runs.stage_names])}


def check_mlflow_pages(base: str, runs: PipelineRuns, out_dir: Path | None = None,
                       pages: Sequence[str] = MLFLOW_PAGES, chromium: str | None = None) -> list[Page]:
    """Load ``pages`` of the MLflow UI at ``base`` (screenshots ``<out_dir>/mlflow-<page>.png``) and
    check each shows what ``runs`` holds (:func:`verify_mlflow_pages`)."""
    # the comparison's run names and metrics sit below its (empty) plots: a taller window shows them
    windows = {"compare": (WINDOW[0], 1700)}
    want = mlflow_pages(base, runs)
    seen = {name: render(want[name][0], out_dir / f"mlflow-{name}.png" if out_dir else None, chromium,
                         windows.get(name, WINDOW)) for name in pages}
    verify_mlflow_pages(base, runs, seen)
    return list(seen.values())


def verify_mlflow_pages(base: str, runs: PipelineRuns, seen: dict[str, Page]) -> None:
    """Raise :class:`UICheckFailed` naming every rendered page (name -> Page) whose title or names
    are not what ``runs`` says they should be."""
    problems = []
    for name, page in seen.items():
        _, title, names = mlflow_pages(base, runs)[name]
        missing = page.missing(names)
        if not page.title.startswith(title) or missing:
            problems.append(f"MLflow {name} page {page.url}\n  title {page.title!r} (expected {title!r}...), "
                            f"missing {missing} of {len(names)} names\n  screenshot: {page.screenshot}\n"
                            f"  text: {page.excerpt()}")
    if problems:
        raise UICheckFailed("\n".join(problems))


def check_mlflow(project_dir: str | Path = ".", pipeline: str | None = None, experiment: str = EXPERIMENT,
                 out_dir: str | Path | None = ROOT / "docs" / "images", expect_stages: Sequence[str] = (),
                 chromium: str | None = None) -> list[Page]:
    """The whole MLflow check on ``<project_dir>/.mopd/mlflow.db``: read the newest pipeline run,
    start `mlflow ui`, check its pages. ``expect_stages`` (e.g. the pipeline's stage names from
    mopd.graph) must all be among that run's stage runs; every stage run must be on the page."""
    runs = pipeline_runs(Path(project_dir) / ".mopd" / "mlflow.db", experiment, pipeline)
    absent = [s for s in expect_stages if s not in runs.stage_names]
    if absent:
        raise UICheckFailed(f"{runs.parent_name} ({runs.parent_id}) has no stage run named {absent}; "
                            f"it has {runs.stage_names}")
    with mlflow_ui(Path(project_dir) / ".mopd" / "mlflow.db") as base:
        return check_mlflow_pages(base, runs, Path(out_dir) if out_dir else None, chromium=chromium)


# ----------------------------------------------------------------------------------------------
# Prefect


def _api(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UICheckFailed(f"Prefect: {url}: {e}") from e


def prefect_ui_settings(ui_url: str) -> tuple[str, str | None]:
    """(API URL, V2 UI path prefix or None) as the Prefect server tells its UI."""
    settings = _api(f"{ui_url.rstrip('/')}/ui-settings")
    v2 = settings.get("v2_base_url") if "v2" in settings.get("available_uis", []) else None
    return settings.get("api_url") or f"{ui_url.rstrip('/')}/api", v2


def latest_flow_run(api: str, flow_name: str = "mopd") -> dict:
    """The newest COMPLETED run of flow ``flow_name``."""
    runs = _api(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}},
                                            "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                                            "sort": "END_TIME_DESC", "limit": 1})
    if not runs:
        raise UICheckFailed(f"Prefect at {api} has no completed run of flow {flow_name!r}")
    return runs[0]


def check_prefect(ui_url: str, flow_run_id: str | None = None, artifact_key: str = "score-table",
                  out_dir: str | Path | None = ROOT / "docs" / "images", flow_name: str = "mopd",
                  chromium: str | None = None) -> Page:
    """Flow run ``flow_run_id`` (default: the newest completed run of ``flow_name``) has an artifact
    ``artifact_key``, and its page's Artifacts tab shows it. Screenshot ``prefect-flow-run.png``."""
    ui_url = ui_url.rstrip("/")
    api, v2 = prefect_ui_settings(ui_url)
    run = _api(f"{api}/flow_runs/{flow_run_id}") if flow_run_id else latest_flow_run(api, flow_name)
    keys = [a.get("key") for a in _api(f"{api}/artifacts/filter",
                                       {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})]
    if artifact_key not in keys:
        raise UICheckFailed(f"Prefect flow run {run['name']} ({run['id']}) has no artifact {artifact_key!r}; "
                            f"its artifacts: {keys}")
    url = f"{ui_url}{(v2 or '').rstrip('/')}/runs/flow-run/{run['id']}?tab=Artifacts"
    page = render(url, Path(out_dir) / "prefect-flow-run.png" if out_dir else None, chromium)
    missing = page.missing([run["name"], artifact_key])
    if missing:
        raise UICheckFailed(f"Prefect flow-run page {url}\n  title {page.title!r}, missing {missing}\n"
                            f"  screenshot: {page.screenshot}\n  text: {page.excerpt()}")
    return page


# ----------------------------------------------------------------------------------------------
# command line


def print_url(project_dir: Path, port: int, experiment: str = EXPERIMENT) -> str:
    """What `make ui` prints: the experiment's runs table, or the experiment list before its first run."""
    base, db = f"http://127.0.0.1:{port}", project_dir / ".mopd" / "mlflow.db"
    if db.is_file():  # a missing store is left for `mlflow ui` to create
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}").get_experiment_by_name(experiment)
        if exp is not None:
            return runs_url(base, exp.experiment_id)
    return f"{base}/#/experiments?{ML_RUNS}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project-dir", type=Path, default=Path("."))
    ap.add_argument("--pipeline", help="check this pipeline's newest run (default: the newest of any)")
    ap.add_argument("--experiment", default=EXPERIMENT)
    ap.add_argument("--stages", nargs="*", default=[], help="stage names the pipeline run must have")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where the screenshots go")
    ap.add_argument("--prefect-url", help="Prefect server's UI, e.g. http://127.0.0.1:4200 (default: no Prefect check)")
    ap.add_argument("--flow-run", help="flow run id (default: the newest completed run of --flow-name)")
    ap.add_argument("--flow-name", default="mopd")
    ap.add_argument("--artifact-key", default="score-table")
    ap.add_argument("--print-url", action="store_true", help="print the MLflow runs URL and exit")
    ap.add_argument("--port", type=int, default=5000, help="with --print-url: the port `make ui` serves on")
    args = ap.parse_args(argv)
    if args.print_url:
        print(f"MLflow: the runs of experiment {args.experiment!r}: {print_url(args.project_dir, args.port, args.experiment)}")
        return 0
    if chromium_path() is None:
        print("ui-check: skipped: chromium not installed (Debian: apt-get install chromium; or make ui-check)")
        return 0
    t0 = time.monotonic()
    try:
        pages = check_mlflow(args.project_dir, args.pipeline, args.experiment, args.out, args.stages)
        if args.prefect_url:
            pages.append(check_prefect(args.prefect_url, args.flow_run, args.artifact_key, args.out, args.flow_name))
    except UICheckFailed as e:
        print(f"ui-check: FAILED\n{e}", file=sys.stderr)
        return 1
    for page in pages:
        url = page.url if len(page.url) < 120 else page.url[:117] + "..."
        print(f"ui-check: ok: {page.title}: {url}" + (f" -> {page.screenshot}" if page.screenshot else ""))
    print(f"ui-check: passed in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
