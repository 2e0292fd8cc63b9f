"""Fault injection on real stage runs (issue 29): for `distill` (our checkpoints) and a TRL teacher
(transformers' checkpoints), each kind of damage a power cut or a full disk leaves in an in-stage
checkpoint. The next `mopd stage` run completes, its log names the folder it set aside (or the
debris it removed), and its final weights equal an uninterrupted run's (fixed threads): from the
previous checkpoint when it was intact, from step 0 otherwise.

The uninterrupted run is the first run itself: it is killed after its final weights and before its
record (MOPD_KILL_BEFORE_RECORD), which leaves both the weights it ended with (in the stage's
scratch folder) and its in-stage checkpoints. Every case starts from a copy of that project.
`make test-faults` runs them (14 cases, 266 s on 2 cores)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mopd.checkpoint import MANIFEST_FILE, STATE_FILE, checkpoint_dir

# `make test-faults` (about 4.5 minutes; not in `make test`, whose 20 minutes it does not fit: there,
# tests/test_checkpoint_damage.py checks every damage kind on the checkpoint code itself); on the
# resume tests' xdist worker when run with them: they share its upstream project (built once)
pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.xdist_group("resume")]

DISTILL_STEPS, DISTILL_EVERY = 8, 4  # one checkpoint (step 4) when the final weights are written
TEACHER_STEPS, TEACHER_EVERY = 12, 4  # transformers' checkpoint-4 and checkpoint-8
KINDS = ["torn_json", "truncated_model", "truncated_optimizer", "garbage_rng", "older_format", "another_shape",
         "killed_write"]
SETS = ["--set", f"distill.max_steps={DISTILL_STEPS}", "--set", f"distill.checkpoint_every={DISTILL_EVERY}",
        "--set", f"teacher.if.max_steps={TEACHER_STEPS}", "--set", f"teacher.if.checkpoint_every={TEACHER_EVERY}"]


def _env(**extra) -> dict:
    env = {**os.environ, "MOPD_THREADS": "1", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _stage(project: Path, name: str, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mopd.cli", "stage", name, "--pipeline", "p", "--no-track", *SETS],
                          cwd=project, env=_env(**extra), capture_output=True, text=True, timeout=900, check=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _out(stage: str) -> str:
    return {"distill": "artifacts/distill/mopd", "teacher:if": "artifacts/teachers/if"}[stage]


@pytest.fixture(scope="module")
def killed(resume_upstream, tmp_path_factory):
    """{stage: (project, reference sha)}: copies of the resume tests' upstream project, each with its
    stage killed before its record (the step counts set with --set: the upstream stays cached)."""
    project = tmp_path_factory.mktemp("faults") / "project"
    shutil.copytree(resume_upstream, project, symlinks=True)
    shutil.rmtree(project / ".mopd" / "checkpoints", ignore_errors=True)  # (the resume tests' own)
    teacher = project.parent / "teacher"
    shutil.copytree(project, teacher, symlinks=True)
    out = _stage(teacher, "teacher:if", MOPD_KILL_BEFORE_RECORD="teacher:if")
    assert out.returncode != 0 and _built(teacher, "teacher:if").is_file(), out.stdout[-2000:]  # (not swapped in)
    out = _stage(project, "teacher:if")  # (distill's upstream: a complete teacher; cached if built)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    out = _stage(project, "distill", MOPD_KILL_BEFORE_RECORD="distill")
    assert out.returncode != 0 and _built(project, "distill").is_file(), out.stdout[-2000:]
    return {stage: (where, _sha(_built(where, stage))) for stage, where in
            (("distill", project), ("teacher:if", teacher))}


def _built(project: Path, stage: str) -> Path:
    out = Path(_out(stage))
    return project / out.parent / f".{out.name}.building" / "model" / "model.safetensors"


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _damage_distill(ckpt: Path, kind: str) -> str:
    """Damage distill's one checkpoint; returns what the log must name."""
    from mopd.checkpoint import _write_manifest

    if kind == "killed_write":  # a kill while the next save was written: the checkpoint itself is fine
        partial = ckpt.parent / f".{ckpt.name}.partial-99999"
        shutil.copytree(ckpt, partial)
        _cut(partial / "optimizer.safetensors")
        return f"removing {partial}: an interrupted checkpoint write"
    if kind == "torn_json":
        _cut(ckpt / STATE_FILE)
    elif kind == "truncated_model":
        _cut(ckpt / "model" / "model.safetensors")
    elif kind == "truncated_optimizer":
        _cut(ckpt / "optimizer.safetensors")
    elif kind == "garbage_rng":
        (ckpt / "rng.safetensors").write_bytes(os.urandom(256))
    elif kind == "older_format":  # a checkpoint of the format before the manifest and Python RNG state
        state = json.loads((ckpt / STATE_FILE).read_text())
        del state["python_random"]
        (ckpt / STATE_FILE).write_text(json.dumps(state))
        (ckpt / MANIFEST_FILE).unlink()
    elif kind == "another_shape":  # a consistent checkpoint (its manifest matches) of another model
        from safetensors.torch import load_file, save_file

        w = load_file(str(ckpt / "model" / "model.safetensors"))
        name = next(k for k, v in w.items() if v.dim() == 2)
        w[name] = w[name][:, :-1].contiguous()
        save_file(w, str(ckpt / "model" / "model.safetensors"), metadata={"format": "pt"})
        _write_manifest(ckpt)
    return f"checkpoint {ckpt} is damaged"


def _damage_trainer(root: Path, kind: str) -> str:
    """Damage transformers' newest checkpoint (checkpoint-8; checkpoint-4 stays intact)."""
    ckpt = root / f"checkpoint-{2 * TEACHER_EVERY}"
    if kind == "killed_write":  # the kill came while checkpoint-12 was written: no trainer_state.json yet
        half = root / f"checkpoint-{3 * TEACHER_EVERY}"
        shutil.copytree(ckpt, half)
        (half / "trainer_state.json").unlink()
        _cut(half / "model.safetensors")
        return "resumed from step 8"
    if kind == "torn_json":
        _cut(ckpt / "trainer_state.json")
    elif kind == "truncated_model":
        _cut(ckpt / "model.safetensors", 0.9)
    elif kind == "truncated_optimizer":
        _cut(ckpt / "optimizer.pt")
    elif kind == "garbage_rng":
        for f in ckpt.glob("rng_state*.pth"):
            f.write_bytes(os.urandom(256))
    elif kind == "older_format":  # a trainer state without the fields this transformers writes
        (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    elif kind == "another_shape":
        from safetensors.torch import load_file, save_file

        w = load_file(str(ckpt / "model.safetensors"))
        name = next(k for k, v in w.items() if v.dim() == 2)
        w[name] = w[name][:, :-1].contiguous()
        save_file(w, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    return f"checkpoint {ckpt} is damaged"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stage", ["distill", "teacher:if"])
def test_damaged_checkpoint_costs_no_more_than_itself(killed, tmp_path, stage, kind):
    source, want = killed[stage]
    project = tmp_path / "project"
    shutil.copytree(source, project, symlinks=True)
    root = checkpoint_dir(project, stage)
    named = _damage_distill(root, kind) if stage == "distill" else _damage_trainer(root, kind)
    out = _stage(project, stage)
    said = out.stdout + out.stderr
    assert out.returncode == 0, said[-4000:]
    assert named in said, said[-4000:]
    if "is damaged" in named:  # set aside whole, never deleted
        aside = root.parent / f"{root.name}.damaged"
        assert "set aside as " + str(aside) in said and any(aside.iterdir()), said[-4000:]
    if stage == "teacher:if" and kind != "killed_write":  # the previous checkpoint was intact
        assert f"resumed from step {TEACHER_EVERY}" in said, said[-4000:]
    elif stage == "distill" and kind == "killed_write":
        assert f"resumed from step {DISTILL_EVERY}" in said, said[-4000:]
    weights = project / _out(stage) / "model" / "model.safetensors"
    assert _sha(weights) == want  # what the uninterrupted run ended with
    assert not root.exists()  # removed once the record was written
