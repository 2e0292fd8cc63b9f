"""DVC: dvc.yaml is generated from the stage table (committed, never stale), and `dvc repro`
reproduces pipelines from it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mopd import dvcgen
from mopd.codedeps import import_closure
from mopd.config import load_config
from mopd.graph import all_stages, build_graph
from tests.conftest import ROOT, _sh, dvc_env


def test_committed_dvc_yaml_is_generated_from_the_table():
    cfg = load_config(ROOT)
    assert dvcgen.is_current(cfg), "dvc.yaml is stale: run `make dvc-yaml` (mopd dvc-yaml)"
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    table = all_stages(cfg)
    assert set(stages) == {dvcgen.dvc_name(n) for n in table}
    for name, (pipeline, spec) in table.items():
        stage = stages[dvcgen.dvc_name(name)]
        launcher = ["mopd.launch"] if spec.data_parallel else []  # reads runtime.processes when it runs
        assert stage["cmd"].split() == ["python", "-m", *launcher, spec.module, *spec.argv, "--pipeline", pipeline]
        assert stage["outs"] == [spec.out_dir]
        code = {p.relative_to(ROOT).as_posix() for p in import_closure(spec.module, ROOT)}
        assert set(stage["deps"]) == code | {table[u][1].out_dir for u in spec.upstream}, name
    # Per-stage code: SFT and the teachers do not depend on the distillation objectives.
    assert not any("objectives" in d for d in stages["sft"]["deps"] + stages["teacher-math"]["deps"])
    assert "mopd/objectives/opd.py" in stages["distill"]["deps"]
    assert {"seed", "teacher.math"} <= set(stages["teacher-math"]["params"][:2])


def test_stale_dvc_yaml_is_detected(tmp_path):
    import shutil

    for name in ("params.yaml", "pipelines.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    cfg = load_config(tmp_path)
    assert dvcgen.is_current(cfg)
    pipes = yaml.safe_load((tmp_path / "pipelines.yaml").read_text())
    pipes["pipelines"]["full"]["stages"].remove("weight_shift")  # a stage only `full` runs
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(pipes))
    cfg = load_config(tmp_path)
    assert not dvcgen.is_current(cfg)
    dvcgen.write(cfg)
    assert dvcgen.is_current(cfg)
    assert "weight_shift" not in yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]


@pytest.mark.slow
def test_dvc_repro_runs_then_does_nothing(dvc_project: Path):
    """`dvc repro` of the multi-round pipeline's round-2 student and the weight-shift analysis (the
    chain data -> SFT -> teachers -> difficulty -> MOPD -> round-2 teachers -> round-2 MOPD, the
    data-parallel stages through `mopd.launch`) runs each of their stages once, then nothing. The
    evaluations, the report and the other kinds' dvc.yaml entries come from the same generator
    (checked against the table above); they run through Prefect in the flow test, which keeps
    this test inside the suite's time budget."""
    env = dvc_env()
    dvc = str(Path(env["PATH"].split(":")[0]) / "dvc")
    targets = ["multiround-2", "weight_shift"]
    first = _sh([dvc, "repro", *targets], dvc_project, env)
    cfg = load_config(dvc_project)
    graph = {s.name: s for s in build_graph(cfg.for_pipeline("multiround"))}
    need, todo = set(), ["multiround:2"]
    while todo:  # the round-2 student and everything upstream of it
        name = todo.pop()
        if name not in need:
            need.add(name)
            todo += list(graph[name].upstream)
    wanted = {dvcgen.dvc_name(n) for n in need} | {"weight_shift"}
    ran = {line.split("'")[1] for line in first.splitlines() if line.startswith("Running stage '")}
    assert ran == wanted, (sorted(wanted - ran), sorted(ran - wanted))
    assert {"teacher-math", "round_teacher-2-math", "weight_shift", "multiround-2"} <= ran, sorted(ran)
    assert (dvc_project / "artifacts" / "rounds" / "2" / "distill" / "model" / "model.safetensors").is_file()
    from mopd.artifacts import load_result  # round 2's teachers start from round 1's student

    r2 = load_result(dvc_project / "artifacts/rounds/2/teachers/math")
    assert r2.inputs["upstream"]["distill"] == load_result(dvc_project / "artifacts/distill/mopd").content_hash
    assert (dvc_project / "dvc.lock").is_file()
    second = _sh([dvc, "repro", *targets], dvc_project, env)
    assert "Running stage" not in second, second
    assert "up to date" in _sh([dvc, "status", *targets], dvc_project, env)
    # The default remote is the local one in the project's state directory.
    _sh([dvc, "push", "--with-deps", *targets], dvc_project, env)
    assert any((dvc_project / ".mopd" / "dvc-remote").rglob("*"))

    # every stage's headline metrics (dvc.yaml's top-level `metrics`): what `dvc metrics show`,
    # `dvc metrics diff` and the columns of `dvc exp show` read
    shown = _metrics(_sh([dvc, "metrics", "show", "--json"], dvc_project, env))
    assert "reverse_kl_last_quarter" in shown["artifacts/distill/mopd/metrics.json"], shown
    assert not any("stage_seconds" in m for m in shown.values())  # run-varying: not in what DVC hashes
    # A copy of the finished project elsewhere (another node's mount, a CI checkout) is finished
    # too: nothing recorded names the folder it was made in (issue 29)
    moved = dvc_project.parent / "moved" / "project"
    moved.parent.mkdir()
    shutil.copytree(dvc_project, moved, symlinks=True)
    plan = subprocess.run([sys.executable, "-m", "mopd.cli", "plan", "--json", "--pipeline", "multiround"], cwd=moved,
                          capture_output=True, text=True, check=True).stdout
    assert {d["stage"]: d["action"] for d in json.loads(plan) if d["stage"] in need} == dict.fromkeys(need, "cached")
    assert "up to date" in _sh([dvc, "status", *targets], moved, env)
    shutil.rmtree(moved.parent)
    # `dvc exp run -S`: a changed distillation setting reruns the stage that reads it (here the
    # first-round student only, to keep the suite short), with the value DVC wrote (the
    # data-parallel launcher reads params.yaml when it runs)
    _sh(["git", "add", "-A"], dvc_project)
    _sh(["git", "commit", "-qm", "baseline"], dvc_project)
    exp = _sh([dvc, "exp", "run", "-n", "lr", "-S", "distill.learning_rate=0.0001", "distill"], dvc_project, env)
    ran = {line.split("'")[1] for line in exp.splitlines() if line.startswith("Running stage '")}
    assert ran == {"distill"}, sorted(ran)
    assert load_config(dvc_project).params.distill.learning_rate == 1e-4
    # `dvc exp show`: the experiment beside its baseline, with the setting and the metrics as columns
    import csv

    table = subprocess.run([dvc, "exp", "show", "--no-pager", "--csv"], cwd=dvc_project, env=env, check=True,
                           capture_output=True, text=True).stdout
    rows = {r["Experiment"] or r["rev"]: r for r in csv.DictReader(table.splitlines())}
    kl = "artifacts/distill/mopd/metrics.json:reverse_kl_last_quarter"
    base = next(r for r in rows.values() if r["typ"] == "baseline" and r["rev"] != "workspace")  # the commit
    assert rows["lr"]["distill.learning_rate"] == "0.0001", rows.keys()
    assert base["distill.learning_rate"] != "0.0001" and base[kl] not in ("", "-")
    assert rows["lr"][kl] != base[kl]  # the experiment's own distillation


def _metrics(text: str) -> dict[str, dict]:
    """`dvc metrics show --json` -> {file: {metric: value}} of the workspace."""
    import json

    data, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])  # DVC's warnings may follow
    (rev,) = data.values()
    return {path: entry.get("data", {}) for path, entry in rev.get("data", {}).items()}
