"""Crash-exact stages: SIGKILL a running `teacher` or `distill` stage, run it again, and it resumes
from its last in-stage checkpoint (log line + MLflow tag); distill ends with the same weights,
byte for byte, as an uninterrupted run (fixed thread count). A checkpoint made under another cache
key is refused. Data-parallel distill (two processes) follows the one-process run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mopd.checkpoint import STATE_FILE, checkpoint_dir
from tests.conftest import RESUME_EVERY, RESUME_STEPS, micro_params, write_params

# one xdist worker runs them all: they share the module's upstream project (built once)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("resume")]

EVERY, STEPS = RESUME_EVERY, RESUME_STEPS


def _stage(project: Path, name: str, env: dict | None = None, **kw) -> subprocess.Popen:
    env = {**(env or os.environ), "MOPD_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "mopd.cli", "stage", name, "--pipeline", "p"], cwd=project,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def upstream_done(resume_upstream):
    return resume_upstream


def test_killed_teacher_resumes_from_its_last_checkpoint(upstream_done):
    """TRL's own checkpoints (safetensors model, optimiser and RNG states read with
    weights_only=True) every EVERY steps under .mopd/checkpoints/teacher__if; the rerun resumes
    from the last one, so at most EVERY steps are computed twice."""
    ckpt = checkpoint_dir(upstream_done, "teacher:if")
    proc = _stage(upstream_done, "teacher:if")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (ckpt / f"checkpoint-{2 * EVERY}").is_dir():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (upstream_done / "artifacts/teachers/if/result.json").exists(), "finished before the kill"
    # complete checkpoints (a kill may leave the newest half-written, even its trainer_state.json
    # empty or cut short, as it once did in CI: it is not resumed from)
    steps = sorted(int(p.name.split("-")[1]) for p in ckpt.glob("checkpoint-*") if _readable_state(p))
    assert steps and steps[-1] >= EVERY and steps[-1] % EVERY == 0
    out = _stage(upstream_done, "teacher:if").communicate()[0]
    assert f"resumed from step {steps[-1]}" in out, out[-3000:]
    assert (upstream_done / "artifacts/teachers/if/result.json").exists() and not ckpt.exists()
    assert _tags(upstream_done, "teacher:if") == [str(steps[-1])]
    # the resumed run trained only the steps after the checkpoint: its curve (steps before it come
    # from the checkpoint's log) has each step once, not the early ones twice
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{upstream_done}/.mopd/mlflow.db")
    run, = [r for r in client.search_runs([client.get_experiment_by_name("mopd").experiment_id],
                                          "tags.stage = 'teacher:if'") if r.info.status == "FINISHED"]
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/reward"))
    assert logged == list(range(1, 41)), logged


def _readable_state(path: Path) -> bool:
    try:
        return json.loads((path / "trainer_state.json").read_text())["global_step"] == int(path.name.split("-")[1])
    except (OSError, ValueError, KeyError):
        return False


def _tags(project: Path, stage: str) -> list[str | None]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project}/.mopd/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mopd").experiment_id], f"tags.stage = '{stage}'")
    return [r.data.tags.get("resumed_from_step") for r in runs if r.info.status == "FINISHED"]


def test_killed_distill_resumes_from_its_checkpoint_byte_identical(upstream_done, tmp_path):
    if not (upstream_done / "artifacts/teachers/if/result.json").exists():
        _stage(upstream_done, "teacher:if").communicate()
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    shutil.copytree(upstream_done, straight)
    shutil.copytree(upstream_done, killed)
    out = _stage(straight, "distill").communicate()[0]
    assert "resumed" not in out
    want = _sha(straight / "artifacts/distill/mopd/model/model.safetensors")
    assert not checkpoint_dir(straight, "distill").exists()  # removed once the stage finished

    state = checkpoint_dir(killed, "distill") / STATE_FILE
    proc = _stage(killed, "distill")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 2 * EVERY:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (killed / "artifacts/distill/mopd/result.json").exists(), "the stage finished before the kill"
    step = json.loads(state.read_text())["step"]
    assert step % EVERY == 0 and 2 * EVERY <= step < STEPS

    # another configuration does not resume from it (and changes nothing) ...
    original = (killed / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["distill"]["learning_rate"] = 1e-3
    write_params(killed, params)
    out = _stage(killed, "distill").communicate()[0]
    assert "will not resume from it" in out and str(checkpoint_dir(killed, "distill")) in out, out[-3000:]
    assert not (killed / "artifacts/distill/mopd/result.json").exists() and state.is_file()
    # ... the same one does, and ends where the uninterrupted run ended
    (killed / "params.yaml").write_text(original)
    out = _stage(killed, "distill").communicate()[0]
    assert f"resumed from step {step}" in out, out[-3000:]
    assert _sha(killed / "artifacts/distill/mopd/model/model.safetensors") == want
    assert not checkpoint_dir(killed, "distill").exists()
    assert _tags(killed, "distill") == [str(step)]


def test_kill_between_final_weights_and_record_resumes_from_the_last_checkpoint(upstream_done, tmp_path):
    """A distill killed after writing its final weights but before its result.json (fault
    injection: MOPD_KILL_BEFORE_RECORD) keeps its in-stage checkpoint: the rerun resumes from the
    last one (step STEPS - EVERY), not from step 0, and ends with the same weights."""
    if not (upstream_done / "artifacts/teachers/if/result.json").exists():
        _stage(upstream_done, "teacher:if").communicate()
    project = tmp_path / "p"
    shutil.copytree(upstream_done, project)
    env = {**os.environ, "MOPD_KILL_BEFORE_RECORD": "distill"}
    proc = _stage(project, "distill", env=env)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode != 0, out[-2000:]
    # the final weights were written in the stage's scratch folder, never swapped in (mopd.outputs)
    built = project / "artifacts/distill/.mopd.building/model/model.safetensors"
    assert built.is_file() and not (project / "artifacts/distill/mopd").exists()
    killed = _sha(built)
    state = checkpoint_dir(project, "distill") / STATE_FILE
    assert json.loads(state.read_text())["step"] == STEPS - EVERY  # the last checkpoint is kept
    out = _stage(project, "distill").communicate(timeout=600)[0]
    assert f"resumed from step {STEPS - EVERY}" in out, out[-3000:]
    assert "artifacts/distill/.mopd.building: left by an earlier run" in out, out[-3000:]  # the debris, said
    weights = project / "artifacts/distill/mopd/model/model.safetensors"
    assert _sha(weights) == killed and (project / "artifacts/distill/mopd/result.json").is_file()
    assert not built.parent.parent.exists()
    assert not checkpoint_dir(project, "distill").exists()  # removed once the record was written


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stopping_mopd_stage_stops_its_stage(upstream_done, tmp_path, how):
    """SIGTERM to `mopd stage` reaches the stage's process group (SIGKILL after a grace period);
    SIGKILL of `mopd stage` (nothing can be forwarded) takes the stage process with it: either way
    no process of the stage is left 2 s later to go on writing its outputs."""
    if not (upstream_done / "artifacts/teachers/if/result.json").exists():
        _stage(upstream_done, "teacher:if").communicate()
    project = tmp_path / "p"
    shutil.copytree(upstream_done, project)
    proc = subprocess.Popen([sys.executable, "-m", "mopd.cli", "stage", "distill", "--pipeline", "p", "--no-track"],
                            cwd=project, env={**os.environ, "MOPD_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # not a group of its own: only it gets the signal
    state = checkpoint_dir(project, "distill") / STATE_FILE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not state.is_file():
        time.sleep(0.05)
    assert len(_processes_of(project)) >= 2, "the stage did not start"  # `mopd stage` and the stage
    proc.send_signal(getattr(signal, how))
    proc.communicate(timeout=60)
    time.sleep(2)
    assert _processes_of(project) == [], _processes_of(project)
    assert not (project / "artifacts/distill/mopd/result.json").exists()


def _history(project: Path, stage: str, key: str) -> tuple[dict, list[float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project}/.mopd/mlflow.db")
    run, = [r for r in client.search_runs([client.get_experiment_by_name("mopd").experiment_id],
                                          f"tags.stage = '{stage}'") if r.info.status == "FINISHED"]
    return run.data.tags, [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                   key=lambda m: m.step)]


# Two processes sum gradients in another order than one process does: the stated tolerances
# (measured: |d loss|, |d reverse KL| 7e-8, |d weight| 8e-6 after 4 steps; losses ~5e-4).
DP_LOSS_ATOL, DP_ATOL = 1e-6, 1e-4


def test_distill_in_two_processes_matches_one_process(upstream_done, tmp_path):
    """`runtime.processes: 2` runs the distill stage under `accelerate launch` (torchrun, gloo on
    CPU): each process samples half the rollout chunks with the seeds they have in one process and
    the loss is weighted by each one's share of the batch, so the two-process run follows the
    one-process run step for step: per-step loss and reverse KL within DP_LOSS_ATOL, final weights within DP_ATOL."""
    import torch
    from safetensors.torch import load_file

    if not (upstream_done / "artifacts/teachers/if/result.json").exists():
        _stage(upstream_done, "teacher:if").communicate()
    runs = {}
    for processes in (1, 2):
        project = tmp_path / f"p{processes}"
        shutil.copytree(upstream_done, project)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["distill"].update(max_steps=4, prompts_per_step=4, rollout_chunks=2, samples_per_prompt=2,
                                 checkpoint_every=None)
        params["runtime"]["processes"] = {"distill": processes}  # device, dtype: auto (CPU, float32 here)
        write_params(project, params)
        proc = _stage(project, "distill")
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]
        tags, loss = _history(project, "distill", "distill/loss")
        assert tags["runtime/processes"] == str(processes) and len(loss) == 4, (tags, loss)
        runs[processes] = (loss, _history(project, "distill", "distill/reverse_kl")[1],
                           _history(project, "distill", "distill/trained_tokens")[1],
                           load_file(project / "artifacts/distill/mopd/model/model.safetensors"))
    (l1, kl1, tok1, w1), (l2, kl2, tok2, w2) = runs[1], runs[2]
    assert tok1 == tok2  # the processes together trained on exactly the one-process batch
    dw = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"1 vs 2 processes: max |d loss| {max(abs(a - b) for a, b in zip(l1, l2)):.2e}, max |d reverse KL| "
          f"{max(abs(a - b) for a, b in zip(kl1, kl2)):.2e}, max |d weight| {dw:.2e}, losses {l1}")
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= DP_LOSS_ATOL, (l1, l2)
    assert max(abs(a - b) for a, b in zip(kl1, kl2)) <= DP_LOSS_ATOL, (kl1, kl2)
    assert dw <= DP_ATOL
    assert any(not torch.equal(w1[k], load_file(upstream_done / "artifacts/sft/model/model.safetensors")[k])
               for k in w1)  # it trained


def test_data_parallel_gathers_what_needs_the_whole_batch():
    from mopd.config import DistillParams
    from mopd.trainers.distill import build_shapers, check_data_parallel, gathers

    check_data_parallel(DistillParams(rollout_chunks=4), 2)
    with pytest.raises(ValueError, match=r"distill.rollout_chunks = 3 must be a multiple of runtime.processes = 2"):
        check_data_parallel(DistillParams(rollout_chunks=3), 2)
    for params, expected in ((DistillParams(), False), (DistillParams(minibatches=2), True),
                             (DistillParams(objective="entropy_opd"), True),
                             (DistillParams(objective="tropd", prefix_share=0.5), True),
                             (DistillParams(uniopd={"online_balance": True}), True)):
        assert gathers(params, build_shapers(params)) is expected, params


def _distill_run(upstream: Path, project: Path, processes: int, **distill) -> tuple:
    """A copy of ``upstream`` whose distill stage runs in ``processes`` processes with ``distill``
    settings: its per-step loss and reverse KL, trained tokens, and final weights."""
    from safetensors.torch import load_file

    shutil.copytree(upstream, project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distill"].update(distill)
    params.get("variants", {}).pop("distill", None)  # the variants would inherit these settings (unused here)
    params["runtime"]["processes"] = {"distill": processes}
    write_params(project, params)
    proc = _stage(project, "distill")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    tags, loss = _history(project, "distill", "distill/loss")
    assert tags["runtime/processes"] == str(processes), tags
    return (loss, _history(project, "distill", "distill/reverse_kl")[1],
            _history(project, "distill", "distill/trained_tokens")[1],
            load_file(project / "artifacts/distill/mopd/model/model.safetensors"))


# The gathered batch is the one-process batch, row for row; what differs is the order of the
# gradients' sums (the tolerances of the test above).
GATHERED = {
    # whole-batch shapers (Open-MOPD's gradient shares and conflict mask: every teacher scores every
    # row) and two minibatches: gathered, then each process trains on its half of each minibatch
    "split": {"minibatches": 2, "openmopd": {"gradient_shares": True, "conflict": "mask"}},
}
# a loss that selects over the whole batch (entropy-OPD's top-entropy tokens) after Uni-OPD's online
# balancing: gathered, and every process computes the whole batch's loss (identical gradients, so
# the one-process update by construction). The kill test below runs it (CI time: one run pair less).
REPLICATED = {"objective": "entropy_opd", "uniopd": {"online_balance": True}}


@pytest.mark.learning
@pytest.mark.parametrize("name", sorted(GATHERED))
def test_distill_gathered_in_two_processes_matches_one_process(upstream_done, tmp_path, name):
    """What used to be refused under data parallelism runs on the gathered batch and follows the
    one-process run step for step."""
    if not (upstream_done / "artifacts/teachers/if/result.json").exists():
        _stage(upstream_done, "teacher:if").communicate()
    shape = dict(max_steps=4, prompts_per_step=4, rollout_chunks=2, samples_per_prompt=2, checkpoint_every=None,
                 **GATHERED[name])
    (l1, kl1, tok1, w1), (l2, kl2, tok2, w2) = (_distill_run(upstream_done, tmp_path / f"p{n}", n, **shape)
                                                for n in (1, 2))
    dw = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"{name}: 1 vs 2 processes: max |d loss| {max(abs(a - b) for a, b in zip(l1, l2)):.2e}, max |d reverse "
          f"KL| {max(abs(a - b) for a, b in zip(kl1, kl2)):.2e}, max |d weight| {dw:.2e}, tokens {tok1} / {tok2}")
    assert tok1 == tok2  # the same rows trained, counted once
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= DP_LOSS_ATOL, (l1, l2)
    assert max(abs(a - b) for a, b in zip(kl1, kl2)) <= DP_LOSS_ATOL, (kl1, kl2)
    assert dw <= DP_ATOL


def _processes_of(project: Path) -> list[str]:
    """Command lines of the live processes that run in ``project`` (their working directory)."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "cwd") == str(project):
                out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:
            continue
    return out


@pytest.mark.learning
def test_distill_in_two_processes_resumes_after_sigkill(upstream_done, tmp_path):
    """Two processes under `accelerate launch` on the gathered, replicated path (REPLICATED), the
    whole process group SIGKILLed after a checkpoint: no process survives it, and the rerun
    resumes from the checkpoint and ends with the uninterrupted run's weights."""
    if not (upstream_done / "artifacts/teachers/if/result.json").exists():
        _stage(upstream_done, "teacher:if").communicate()
    shape = {"max_steps": 12, "prompts_per_step": 4, "rollout_chunks": 2, "samples_per_prompt": 2,
             "checkpoint_every": EVERY, **REPLICATED}
    want = _distill_run(upstream_done, tmp_path / "straight", 2, **shape)[3]
    killed = tmp_path / "killed"
    shutil.copytree(upstream_done, killed)
    params = yaml.safe_load((killed / "params.yaml").read_text())
    params["distill"].update(shape)
    params.get("variants", {}).pop("distill", None)
    params["runtime"]["processes"] = {"distill": 2}
    write_params(killed, params)
    state = checkpoint_dir(killed, "distill") / STATE_FILE
    record = killed / "artifacts/distill/mopd/result.json"  # (a copy may hold an earlier run's outputs)
    before = record.stat().st_mtime_ns if record.exists() else None
    proc = _stage(killed, "distill")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= EVERY:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    # torchrun starts its processes in their own sessions: they die with their launcher, not
    # orphaned (they would go on training, and race the rerun)
    deadline = time.monotonic() + 20
    while _processes_of(killed) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_of(killed), _processes_of(killed)
    assert (record.stat().st_mtime_ns if record.exists() else None) == before, "the stage finished before the kill"
    step = json.loads(state.read_text())["step"]
    out = _stage(killed, "distill").communicate(timeout=600)[0]
    assert f"resumed from step {step}" in out, out[-3000:]
    from safetensors.torch import load_file

    got = load_file(killed / "artifacts/distill/mopd/model/model.safetensors")
    dw = max(float((got[k] - want[k]).abs().max()) for k in want)
    print(f"2 processes, killed after step {step}, resumed: max |d weight| vs uninterrupted {dw:.2e}")
    assert dw == 0.0
