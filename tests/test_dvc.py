"""DVC: dvc.yaml describes the same DAG as mopd.graph, and `dvc repro` reproduces it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mopd.config import load_config
from mopd.graph import build_graph
from tests.conftest import ROOT, _sh, dvc_env


def _expanded_dvc_stages() -> dict[str, dict]:
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in raw.items():
        if "foreach" in stage:
            for item in stage["foreach"]:
                text = yaml.safe_dump(stage["do"]).replace("${item}", item)
                out[f"{name}:{item}"] = yaml.safe_load(text)
        else:
            out[name] = stage
    return out


def _params_keys(params: list) -> tuple[set[str], set[str]]:
    own, other = set(), set()
    for p in params:
        if isinstance(p, str):
            own.add(p)
        else:
            for file, keys in p.items():
                assert file == "pipelines.yaml", file
                other |= set(keys)
    return own, other


def test_dvc_yaml_matches_graph():
    cfg = load_config(ROOT)
    stages = _expanded_dvc_stages()
    graph = {s.name: s for s in build_graph(cfg)}
    assert set(stages) == set(graph)
    outs = {s.name: s.out_dir for s in graph.values()}
    for name, spec in graph.items():
        stage = stages[name]
        assert stage["cmd"].split() == ["python", "-m", spec.module, *spec.argv], name
        assert stage["outs"] == [spec.out_dir], name
        own, other = _params_keys(stage["params"])
        assert own == set(spec.params_keys), name
        assert other == set(spec.pipeline_keys), name
        code = {spec.module.replace(".", "/") + ".py", "tasks/cli.py", "mopd"}
        assert set(stage["deps"]) == code | {outs[u] for u in spec.upstream}, name


@pytest.mark.slow
def test_dvc_repro_runs_then_does_nothing(dvc_project: Path):
    env = dvc_env()
    dvc = str(Path(env["PATH"].split(":")[0]) / "dvc")
    first = _sh([dvc, "repro"], dvc_project, env)
    for stage in ("data", "base", "sft", "teacher@math", "teacher@code", "teacher@if", "difficulty",
                  "distill", "merge", "evaluate"):
        assert f"Running stage '{stage}'" in first, first[-3000:]
    assert (dvc_project / "artifacts" / "evaluate" / "normalized.csv").is_file()
    assert (dvc_project / "dvc.lock").is_file()
    second = _sh([dvc, "repro"], dvc_project, env)
    assert "Running stage" not in second, second
    assert "up to date" in _sh([dvc, "status"], dvc_project, env)
    # The default remote is the local one in the project's state directory.
    _sh([dvc, "push"], dvc_project, env)
    assert any((dvc_project / ".mopd" / "dvc-remote").rglob("*"))
