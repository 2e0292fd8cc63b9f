"""Shared fixtures: a micro project (the shipped YAML with every stage cut to a few steps)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def micro_params() -> dict:
    """The shipped params.yaml, scaled down so the whole DAG runs in about a minute on 2 cores."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"] = {"n_train": 48, "n_eval": 6}
    p["profiles"]["tiny"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=8,
                                 vocab_size=320)
    p["sft"].update(max_steps=3, batch_size=8)
    for recipe in p["teacher"].values():
        recipe.update(max_steps=2, batch_size=4, num_generations=2, max_completion_length=6)
    p["difficulty"].update(n_samples=2, max_prompts=4, max_new_tokens=6)
    p["distill"].update(max_steps=2, prompts_per_step=3, samples_per_prompt=2, max_new_tokens=6, snapshot_every=1)
    p["evaluate"].update(n=2, k=2, max_new_tokens=6, bootstrap=200)
    p["mix_rl"].update(max_steps=2, batch_size=6, num_generations=2, max_completion_length=6, snapshot_every=1)
    p["offpolicy_ft"].update(samples_per_prompt=2, max_prompts=3, max_new_tokens=6, correct_only=False)
    p["offpolicy_ft"]["sft"].update(max_steps=2, batch_size=4)
    p["teacher_fit"].update(prompts=2, max_new_tokens=6)
    p["copd"].update(rl_steps=2, opd_steps=2, monitor_prompts=2)
    p["copd"]["opd"].update(native_prompts=2, group_size=2, cross_prompts=2, cross_samples=1, max_new_tokens=6)
    return p


def write_params(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def micro_project(tmp_path: Path) -> Path:
    """A project directory holding micro params.yaml and the shipped pipelines.yaml."""
    project = tmp_path / "project"
    project.mkdir()
    write_params(project, micro_params())
    shutil.copy(ROOT / "pipelines.yaml", project / "pipelines.yaml")
    return project


def _sh(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def dvc_env() -> dict:
    """PATH with this interpreter's bin first: dvc.yaml's `python -m tasks.*` is the project env."""
    import os
    import sys

    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}


@pytest.fixture
def dvc_project(micro_project: Path) -> Path:
    """The micro project as a git + DVC repository with the code dvc.yaml depends on."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("mopd", "tasks"):
        shutil.copytree(ROOT / pkg, micro_project / pkg, ignore=ignore)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, micro_project / name)
    env = dvc_env()
    dvc = str(Path(env["PATH"].split(":")[0]) / "dvc")
    _sh(["git", "init", "-q"], micro_project)
    _sh(["git", "config", "user.email", "ci@mopd.invalid"], micro_project)
    _sh(["git", "config", "user.name", "ci"], micro_project)
    (micro_project / ".gitignore").write_text(".mopd/\n__pycache__/\n")
    _sh([dvc, "init", "-q"], micro_project, env)
    _sh([dvc, "config", "core.analytics", "false"], micro_project, env)
    _sh([dvc, "remote", "add", "-d", "local", ".mopd/dvc-remote"], micro_project, env)
    _sh(["git", "add", "-A"], micro_project)
    _sh(["git", "commit", "-qm", "micro project"], micro_project)
    return micro_project


RESUME_EVERY, RESUME_STEPS = 4, 48  # distill's and teacher:if's checkpoints in resume_upstream


@pytest.fixture(scope="session")
def resume_upstream(tmp_path_factory):
    """A micro project (pipeline `p`) whose data, base, SFT and math and code teachers are built:
    distill's upstream but teacher:if, for the resume and fault-injection tests (one xdist group,
    `resume`, so built once). Distill and teacher:if checkpoint every RESUME_EVERY steps."""
    import os
    import subprocess
    import sys

    project = tmp_path_factory.mktemp("resume") / "project"
    project.mkdir()
    params = micro_params()
    params["distill"].update(max_steps=RESUME_STEPS, checkpoint_every=RESUME_EVERY)
    params["teacher"]["if"].update(max_steps=40, checkpoint_every=RESUME_EVERY)
    write_params(project, params)
    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["pipelines"] = {"p": {"domains": ["math", "code", "if"],
                                "stages": ["data", "base", "sft", "teacher", "distill"]}}
    (project / "pipelines.yaml").write_text(yaml.safe_dump(pipes))
    env = {**os.environ, "MOPD_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for name in ("data", "base", "sft", "teacher:math", "teacher:code"):
        subprocess.run([sys.executable, "-m", "mopd.cli", "stage", name, "--pipeline", "p", "--no-track"],
                       cwd=project, env=env, check=True, capture_output=True)
    return project


@pytest.fixture(scope="session")
def pipeline_models(tmp_path_factory):
    """SFT and teacher:math built by the pipeline's own stages (shorter runs than the shipped), for
    the `learning` tests (tests/test_distill_hard.py, tests/test_trl_parallel.py)."""
    from mopd.config import load_config
    from mopd.local_run import run_pipeline

    project = tmp_path_factory.mktemp("hard")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sft"].update(max_steps=400, checkpoint_every=None)
    params["teacher"]["math"].update(max_steps=150, checkpoint_every=None)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["pipelines"] = {"hard": {"domains": ["math"], "stages": ["data", "base", "sft", "teacher"]}}
    (project / "pipelines.yaml").write_text(yaml.safe_dump(pipes, sort_keys=False))
    cfg = load_config(project, pipeline="hard")
    run_pipeline(cfg, quiet=True, track=False)
    art = project / "artifacts"
    return cfg, art / "sft" / "model", art / "teachers" / "math" / "model", art / "data"


# The longest tests (minutes each), started first: `make test` runs the suite on two pytest-xdist
# workers, and one long test started last would leave the other worker idle at the end.
LONGEST_FIRST = ("test_flow_caches_reruns_and_recovers", "test_dvc_repro_runs_then_does_nothing",
                 "test_copd_killed_during_cycle_2_resumes_from_cycle_2")


def pytest_collection_modifyitems(config, items):
    """The longest tests first (LONGEST_FIRST); `gpu` tests run only where torch sees a CUDA device
    (never in CI: it has none)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.originalname, len(rank)))  # stable: the rest keep their order
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (the `gpu` marker)")
        for item in gpu:
            item.add_marker(skip)
