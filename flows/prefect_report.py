"""What a flow run shows in Prefect beyond its task states: a stage task waiting for a slot or
devices as Prefect's own `AwaitingConcurrencySlot` state (`WaitState`), each running stage's
step/total as a progress artifact of its task run (`StageProgress`), and the pipeline's score
table and teacher-cost ledger as artifacts of the flow run (`comparison_artifacts`).
Advisory: what is shown never fails the stage or the run. Torch-free."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from mopd.publish import cost_markdown, score_markdown, score_rows

PROGRESS_EVERY = 10.0  # seconds between progress-artifact updates and between forwarded progress-bar lines


class WaitState:
    """A stage task that waits for a slot or devices shows it in Prefect: the task run goes to
    Prefect's own `AwaitingConcurrencySlot` state (what a tag-limited task shows) while it waits,
    and back to Running when it has them, not Running all along. Prefect 3 runs tasks with
    client-side orchestration: its engine records a task's states as events, so this records its
    two states the same way (the engine's `set_state`). Advisory: a failure is logged, never raised."""

    def __init__(self, logger):
        self.logger = logger
        self.waiting = False

    def _set(self, state) -> None:
        from prefect.context import TaskRunContext
        from prefect.utilities.engine import emit_task_run_state_change_event

        ctx = TaskRunContext.get()
        if ctx is None or ctx.task_run is None:
            return
        run, last = ctx.task_run, ctx.task_run.state
        state.state_details.task_run_id, state.state_details.flow_run_id = run.id, run.flow_run_id
        run.state, run.state_id, run.state_type, run.state_name = state, state.id, state.type, state.name
        emit_task_run_state_change_event(task_run=run, initial_state=last, validated_state=state)

    def wait(self) -> None:
        from prefect.states import AwaitingConcurrencySlot

        try:
            self._set(AwaitingConcurrencySlot(message="waiting for a stage slot or devices"))
            self.waiting = True
        except Exception as exc:  # noqa: BLE001  (advisory: the stage runs whatever the UI shows)
            self.logger.warning("could not show the wait in Prefect: %s", exc)

    def resume(self) -> None:
        if not self.waiting:
            return
        from prefect.states import Running

        try:
            self._set(Running(message="got its slot"))
        except Exception as exc:  # noqa: BLE001
            self.logger.warning("could not show the end of the wait in Prefect: %s", exc)
        self.waiting = False


class StageProgress:
    """The stage's progress (the step/total its process writes to its progress file,
    mopd.progress) as a Prefect progress artifact of its task run, updated every PROGRESS_EVERY
    seconds by a thread while the stage runs, 100 when it ends well. Advisory: a failure to
    update is logged once, never raised."""

    def __init__(self, name: str, progress_file: Path | None, logger):
        self.name, self.file, self.logger = name, progress_file, logger
        self.id = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self):
        if self.file is None:
            return self
        try:
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(0.0, description=f"{self.name}: starting")
        except Exception as exc:  # noqa: BLE001  (advisory)
            self.logger.warning("%s: no Prefect progress artifact: %s", self.name, exc)
            return self
        self.thread = threading.Thread(target=self._poll, name=f"progress-{self.name}", daemon=True)
        self.thread.start()
        return self

    def _read(self) -> tuple[float, str] | None:
        try:
            d = json.loads(self.file.read_text())
            step, total = int(d["step"]), int(d["total"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if total <= 0:
            return None
        return 100.0 * min(step, total) / total, f"{self.name}: {step}/{total} {d.get('what', 'steps')}"

    def _update(self, progress: float, text: str) -> bool:
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(self.id, progress, description=text)
            return True
        except Exception as exc:  # noqa: BLE001
            self.logger.warning("%s: progress artifact not updated: %s", self.name, exc)
            return False

    def _poll(self) -> None:
        last = None
        while not self.stop.wait(PROGRESS_EVERY):
            now = self._read()
            if now is not None and now != last:
                if not self._update(*now):
                    return
                last = now

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.id is not None and exc_type is None:
            self._update(100.0, f"{self.name}: done")


def comparison_artifacts(table_file: Path, pipeline: str) -> None:
    """The score table (rows and markdown) and the teacher-cost ledger as artifacts of this
    flow run: what a Prefect user opens (the flow run's Artifacts tab, or the Artifacts page by
    key, which keeps each run's version)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    table = json.loads(table_file.read_text())
    key = re.sub(r"[^a-z0-9-]+", "-", pipeline.lower())
    create_table_artifact(score_rows(table), key=f"{key}-score-table",
                          description=f"Pipeline {pipeline}: every method's avg@k / pass@k per benchmark "
                                      f"with bootstrap CIs, and its normalised score (MOPD 4.1)")
    create_markdown_artifact(score_markdown(table, pipeline), key=f"{key}-scores",
                             description=f"Pipeline {pipeline}: the comparison table")
    create_markdown_artifact(cost_markdown(table, pipeline), key=f"{key}-teacher-cost",
                             description=f"Pipeline {pipeline}: teacher cost and rollout budget per method")
