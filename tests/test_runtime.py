"""One device / dtype setting (`runtime` in params.yaml) reaches every stage that runs a model.

On this CPU host the device can only be `cpu`, so the test also sets the compute dtype to
bfloat16, which a stage that ignored the setting would not use: every model-running stage of a
micro pipeline (one of each kind) must place all its models on the CPU, frozen ones in bfloat16
and trained ones in float32 with bfloat16 autocast."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import yaml

from mopd import runtime
from mopd.config import load_config
from mopd.graph import KINDS, build_graph
from tests.conftest import micro_params, write_params

pytestmark = pytest.mark.slow

# kinds whose stages train a model (float32 weights + autocast); the others only run them
TRAINED = {"sft", "teacher", "round_teacher", "distill", "multiround", "mix_rl", "cascade_rl", "offpolicy_ft",
           "copd"}


def test_every_model_running_stage_gets_the_configured_device_and_dtype(tmp_path: Path, monkeypatch):
    from tasks.runner import execute

    project = tmp_path / "project"
    project.mkdir()
    params = micro_params()
    params["runtime"] = {"device": "cpu", "dtype": "bfloat16"}
    params["copd"].update(branches=["math", "code"], cycles=1, rl_steps=1, opd_steps=1)
    params["multiround"].update(rounds=2, domains=["math"])
    params["mix_rl"].update(max_steps=1)
    params["distill"].update(max_steps=2, snapshot_every=1)  # the budget curve evaluates a snapshot
    write_params(project, params)
    pipes = yaml.safe_load((Path(__file__).parents[1] / "pipelines.yaml").read_text())
    pipes["pipelines"] = {"p": {"domains": ["math", "code"], "stages": [
        "data", "base", "sft", "teacher", "difficulty", "distill", "multiround", "mix_rl", "cascade_rl",
        "offpolicy_ft", "copd", "teacher_fit", "evaluate", "budget_curve"]}}
    (project / "pipelines.yaml").write_text(yaml.safe_dump(pipes))
    monkeypatch.setenv("MOPD_THREADS", "1")
    monkeypatch.delenv(runtime.DEVICE_ENV, raising=False)
    monkeypatch.delenv(runtime.DTYPE_ENV, raising=False)
    cfg = load_config(project, pipeline="p")
    specs = build_graph(cfg)
    gpu_kinds = {k for k, row in KINDS.items() if "gpu" in row.tags}
    assert gpu_kinds <= {s.kind for s in specs}, "the micro pipeline must hold one stage of every model-running kind"

    placed: dict[str, list[str]] = {}
    for spec in specs:
        if spec.kind == "report":
            continue
        execute(cfg, spec.name, importlib.import_module(spec.module).run, track=False)
        placed[spec.name] = runtime.placements()
        assert os.environ[runtime.DEVICE_ENV] == "cpu" and os.environ[runtime.DTYPE_ENV] == "bfloat16"

    for spec in specs:
        if "gpu" not in spec.tags:
            continue
        got = placed[spec.name]
        assert got, f"{spec.name} runs a model but placed none through mopd.models.load_model"
        want = "cpu/float32+amp:bfloat16" if spec.kind in TRAINED else "cpu/bfloat16"
        frozen = {"cpu/bfloat16"}  # a trained stage may also hold frozen models (teachers, partners)
        assert want in got and set(got) <= {want} | frozen, f"{spec.name}: models placed as {got}, wanted {want}"


def test_runtime_resolution_and_its_errors(monkeypatch):
    assert runtime.resolve("auto", "auto", "bfloat16") == runtime.Runtime("cpu", "float32")  # no CUDA here
    assert runtime.resolve("cpu", "bfloat16") == runtime.Runtime("cpu", "bfloat16")
    with pytest.raises(ValueError, match=r"runtime.device = 'cuda'.*no CUDA device"):
        runtime.resolve("cuda", "auto")
    assert runtime.Runtime("cpu", "bfloat16").trainer_args() == {"use_cpu": True, "bf16": True, "fp16": False}
    assert runtime.Runtime("cuda", "float32").trainer_args() == {"use_cpu": False, "bf16": False, "fp16": False}
    with pytest.raises(ValueError, match=r"runtime.rollout = 'vllm' needs vLLM \(the `gpu` extra\) and a CUDA device"):
        runtime.resolve("cpu", "auto", rollout="vllm")
    monkeypatch.setenv(runtime.DTYPE_ENV, "float64")
    with pytest.raises(ValueError, match="MOPD_DTYPE"):
        runtime.current()


def test_a_device_the_host_lacks_fails_before_the_stage_touches_its_output(micro_project: Path, capsys):
    from tasks.runner import main
    from tasks.data import run

    params = yaml.safe_load((micro_project / "params.yaml").read_text())
    params["runtime"] = {"device": "cuda:0"}
    write_params(micro_project, params)
    out = micro_project / "artifacts" / "data"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("earlier output")
    assert main("data", run, ["--project-dir", str(micro_project), "--no-track"]) == 2
    assert "runtime.device = 'cuda:0'" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "earlier output"
