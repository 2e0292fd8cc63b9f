"""Every benchmark of a domain is evaluated (issue 10): a domain lists its evaluation sets, the
data stage writes each one's eval split, the evaluate stage scores each, and the report pools a
domain's benchmarks for the teacher gain."""

from __future__ import annotations

import json

import pytest
import yaml

from mopd.config import ConfigError, load_config
from tests.conftest import ROOT, micro_params, write_params
from tests.test_models_data import SMALL


def _project(tmp_path, mutate):
    write_params(tmp_path, micro_params())
    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    mutate(pipes)
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(pipes))
    return tmp_path


def _two_math_benchmarks(pipes):
    pipes["domains"]["arith"] = {"verifier": "math", "data": {"source": "synthetic"}}
    pipes["domains"]["math"]["benchmarks"] = ["math", "arith"]
    pipes["pipelines"] = {"full": pipes["pipelines"]["full"]}  # the others share its stages
    pipes["pipelines"]["full"]["domains"] = ["math", "code"]


@pytest.mark.parametrize("benchmarks, message", [
    (["math", "chess"], "domains.math.benchmarks: 'chess' is neither 'math' nor a domain"),
    (["math", "code"], "'code' is checked by the 'code' verifier, 'math' by 'math'"),
    (["math", "math"], "domains.math.benchmarks: 'math' listed more than once"),
])
def test_bad_benchmarks_are_named(tmp_path, benchmarks, message):
    project = _project(tmp_path, lambda p: p["domains"]["math"].update(benchmarks=benchmarks))
    with pytest.raises(ConfigError) as err:
        load_config(project)
    assert "pipelines.yaml" in str(err.value) and message in str(err.value), str(err.value)


def test_every_benchmark_is_evaluated_and_pooled(tmp_path):
    from mopd.data import corpus
    from mopd.graph import build_graph, key_inputs
    from mopd.models import build_base
    from mopd.tracking import NullTracker
    from mopd.stage import StageContext
    from tasks import data, evaluate, report

    cfg = load_config(_project(tmp_path, _two_math_benchmarks))
    assert cfg.data_domains == ["math", "code", "arith"]
    graph = {s.name: s for s in build_graph(cfg)}
    assert "domains.arith.data" in json.dumps(key_inputs(cfg, graph["data"], {})["config"])

    art = tmp_path / "artifacts"
    data.run(StageContext("data", "", cfg, art / "data", {}, {}, NullTracker()))
    assert (art / "data" / "arith" / "eval.parquet").is_file()
    build_base(SMALL, corpus(art / "data", ["math", "code"]), art / "m" / "model", seed=0)
    models = {"sft": "model", "teacher:math": "model", "teacher:code": "model"}
    (art / "m" / "models.json").write_text(json.dumps(models))
    out = art / "evaluate" / "m"
    out.mkdir(parents=True)
    inputs = {"data": art / "data", "m": art / "m"}
    evaluate.run(StageContext("evaluate:m", "", cfg, out, inputs, {"data": art / "data", "model": art / "m"},
                              NullTracker(), {"model": "m"}))
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["sft"]) == {"math", "arith", "code"}
    n_eval = cfg.params.data.n_eval
    assert all(scores["sft"][b]["n_prompts"] == n_eval for b in ("math", "arith", "code"))

    rep = art / "report" / "full"
    rep.mkdir(parents=True)
    report.run(StageContext("report:full", "", cfg, rep, {"evaluate:m": out}, {"evaluations": {"evaluate:m": out}},
                            NullTracker(), {"pipeline": "full"}))
    table = json.loads((rep / "table.json").read_text())
    assert set(table["methods"]["sft"]["domains"]) == {"math", "arith", "code"}
    # The gain test pools math's two benchmarks prompt-wise: 2 x n_eval paired prompts.
    assert table["teacher_gain"]["math"]["n_prompts"] == 2 * n_eval
    assert table["teacher_gain"]["code"]["n_prompts"] == n_eval
