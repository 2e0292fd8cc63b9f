"""Settings set at trigger time (`--set key=value`, the deployments' `params`): validated exactly like
params.yaml, part of each stage's cache key, named as the reason a stage reruns, and carried to the
stage processes (issue #28 item 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mopd.config import ConfigError, load_config
from mopd.overrides import (
    OverrideError,
    apply,
    flatten,
    parse_set,
    parse_value,
    to_args,
)

ROOT = Path(__file__).resolve().parents[1]


def test_values_parse_as_json_then_yaml():
    assert parse_value("1e-4") == 1e-4  # YAML 1.1 would read a string
    assert parse_value("true") is True and parse_value("null") is None
    assert parse_value("[1, 2]") == [1, 2] and parse_value("{a: 1}") == {"a": 1}
    assert parse_value("cosine") == "cosine" and parse_value("a: b: c") == "a: b: c"
    assert parse_set(["distill.learning_rate=0.0001", "runtime.processes.distill=2"]) == {
        "distill.learning_rate": 1e-4, "runtime.processes.distill": 2}
    for bad in (["distill"], ["=1"], ["distill..x=1"], ["a=1", "a=2"]):
        with pytest.raises(OverrideError):
            parse_set(bad)
    # the command-line form a stage process receives reads back to the same values
    over = {"distill.learning_rate": 1e-20, "teacher.math.beta": 0.0, "runtime.device": "cpu"}
    args = to_args(over)
    assert parse_set(args[1::2]) == over


def test_nested_params_flatten_and_apply():
    assert flatten({"distill": {"learning_rate": 1e-4, "max_steps": 3}, "data": {"n_train": 4}}) == {
        "distill.learning_rate": 1e-4, "distill.max_steps": 3, "data.n_train": 4}
    raw = {"distill": {"learning_rate": 1.0}, "data": {"n_train": 1}}
    out = apply(raw, {"distill.learning_rate": 2.0, "runtime.processes.distill": 2}, "params.yaml")
    assert out["distill"]["learning_rate"] == 2.0 and out["runtime"] == {"processes": {"distill": 2}}
    assert raw["distill"]["learning_rate"] == 1.0  # the file's mapping is untouched
    with pytest.raises(OverrideError, match="distill.learning_rate is a float"):
        apply(raw, {"distill.learning_rate.x": 1}, "params.yaml")
    with pytest.raises(OverrideError):
        flatten(["distill"])
    deep: dict = {}
    node = deep
    for _ in range(40):
        node["a"] = {}
        node = node["a"]
    node["b"] = 1
    with pytest.raises(OverrideError, match="deeper"):
        flatten(deep)


def test_overrides_are_validated_like_the_file(micro_project):
    cfg = load_config(micro_project, overrides={"distill.learning_rate": 1e-4})
    assert cfg.params.distill.learning_rate == 1e-4 and cfg.overrides == {"distill.learning_rate": 1e-4}
    with pytest.raises(ConfigError, match=r"distill.no_such_key \(from --set distill.no_such_key\): unknown key"):
        load_config(micro_project, overrides={"distill.no_such_key": 1})
    with pytest.raises(ConfigError, match="distill.learning_rate"):
        load_config(micro_project, overrides={"distill.learning_rate": "fast"})
    with pytest.raises(ConfigError, match="distill.learning_rate is a float"):
        load_config(micro_project, overrides={"distill.learning_rate.x": 1})


def _mopd(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mopd.cli", *args], cwd=project, capture_output=True, text=True)


def test_plan_and_stage_take_set(micro_project):
    """`mopd stage data` built with the file's settings is cached; `plan --set` then names the
    override as the reason, `--set` of an unknown key fails naming it, and `mopd stage --set`
    runs the stage with the override in its recorded configuration and cache key."""
    out = _mopd(micro_project, "stage", "data", "--pipeline", "full", "--no-track")
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(_mopd(micro_project, "plan", "--json").stdout)
    assert {d["stage"]: d["action"] for d in plan}["data"] == "cached"
    out = _mopd(micro_project, "plan", "--json", "--set", "data.n_train=40")
    data = {d["stage"]: d for d in json.loads(out.stdout)}["data"]
    assert data["action"] == "run" and data["reasons"] == ["config --set data.n_train: 48 -> 40"], data
    out = _mopd(micro_project, "plan", "--set", "distill.no_such_key=1")
    assert out.returncode == 2 and "distill.no_such_key" in out.stderr and "unknown key" in out.stderr
    out = _mopd(micro_project, "stage", "data", "--no-track", "--set", "data.n_train=40")
    assert out.returncode == 0, out.stderr[-2000:]
    recorded = json.loads((micro_project / "artifacts/data/stage_config.json").read_text())
    assert recorded["data"]["n_train"] == 40
    assert {d["stage"]: d["action"] for d in json.loads(
        _mopd(micro_project, "plan", "--json", "--set", "data.n_train=40").stdout)}["data"] == "cached"
    again = {d["stage"]: d for d in json.loads(_mopd(micro_project, "plan", "--json").stdout)}["data"]
    assert again["reasons"] == ["config params.yaml: data.n_train: 40 -> 48"]
