"""Configuration: every shipped YAML loads; every kind of mistake fails before any work with a
message naming the file, the key and the value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mopd.config import ConfigError, PretrainedProfile, load_config, load_params, load_pipelines
from tests.conftest import ROOT, micro_params, write_params


def test_shipped_files_load():
    cfg = load_config(ROOT)
    assert cfg.domains == ["math", "code", "if"]
    assert set(cfg.params.teacher) >= set(cfg.domains)
    assert isinstance(cfg.params.profiles["qwen3-0.6b"], PretrainedProfile)
    assert load_pipelines(ROOT / "pipelines.yaml").domains["gsm8k"].data.source == "hub"


def _project(tmp_path: Path, params: dict, pipelines: dict | None = None) -> Path:
    write_params(tmp_path, params)
    pipes = pipelines or yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(pipes))
    return tmp_path


@pytest.mark.parametrize("mutate, expected", [
    (lambda p: p["sft"].update(max_stepz=3), ["params.yaml", "sft.max_stepz", "unknown key"]),
    (lambda p: p["teacher"]["math"].update(learning_rate="fast"),
     ["params.yaml", "teacher.math.learning_rate", "'fast'"]),
    (lambda p: p["teacher"]["code"].update(max_steps=-1), ["teacher.code.max_steps", "-1", "greater than 0"]),
    (lambda p: p["teacher"]["if"].update(batch_size=6, num_generations=4),
     ["teacher.if", "batch_size (6) must be a multiple of num_generations (4)"]),
    (lambda p: p.update(profile="huge"), ["profile 'huge' is not defined"]),
    (lambda p: p["profiles"]["tiny"].update(hidden_size="big"), ["profiles.tiny.hidden_size", "'big'"]),
    (lambda p: p["distill"].update(objective="magic"), ["distill.objective", "'magic'"]),
    (lambda p: p["merge"].update(methods=["linear", "soup"]), ["merge.methods.1", "'soup'"]),
    (lambda p: p["teacher"].pop("code"), ["teacher.code", "missing recipe"]),
    (lambda p: p["distill"].update(domain_weights={"math": 0.5, "code": 0.2, "if": 0.2}),
     ["distill.domain_weights", "sum to 1"]),
    (lambda p: p.pop("variants") and p["distill"].update(teacher_weights={"math": {"math": 0.5, "chem": 0.5}}),
     ["params.yaml", "distill.teacher_weights.math", "'chem'", "not domain(s) of pipeline"]),
    (lambda p: p.pop("variants") and p["distill"].update(teacher_weights={"math": {"math": 0.5, "code": 0.4}}),
     ["distill", "teacher_weights.math", "sum to 1"]),
    (lambda p: p["distill"].update(uniopd={"calibration": "mean", "strategy": "nudge"}),
     ["distill.uniopd.strategy", "'nudge'"]),
    (lambda p: p["distill"].update(prefix_share=0.5),
     ["distill", "prefix_share 0.5", "objective: tropd"]),
    (lambda p: p["distill"].update(teacher_weights={"math": {"math": 0.5, "code": 0.5}}),  # tropd inherits it
     ["variants.distill.tropd", "teacher_weights.math mixes teachers", "inherits every key of `distill`"]),
])
def test_params_errors_name_file_key_value(tmp_path, mutate, expected):
    params = micro_params()
    mutate(params)
    project = _project(tmp_path, params)
    with pytest.raises(ConfigError) as err:
        load_config(project)
    for fragment in expected:
        assert fragment in str(err.value), str(err.value)


def test_pipelines_errors(tmp_path):
    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["domains"]["math"]["verifier"] = "abacus"
    pipes["pipelines"]["full"]["domains"].append("chemistry")
    project = _project(tmp_path, micro_params(), pipes)
    with pytest.raises(ConfigError) as err:
        load_config(project)
    msg = str(err.value)
    assert "pipelines.yaml" in msg and "domains.math.verifier = 'abacus'" in msg


def test_unknown_domain_and_pipeline(tmp_path):
    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["pipelines"]["full"]["domains"].append("chemistry")
    project = _project(tmp_path, micro_params(), pipes)
    with pytest.raises(ConfigError, match="unknown domain.*chemistry"):
        load_config(project)
    project = _project(tmp_path, micro_params())
    with pytest.raises(ConfigError, match="pipelines.nightly: no such pipeline"):
        load_config(project, pipeline="nightly")


def test_yaml_syntax_and_missing_file(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="nothere.yaml: file not found"):
        load_params(tmp_path / "nothere.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(tmp_path / "list.yaml")


def test_remote_teacher_domain_has_no_teacher_stage(tmp_path):
    from mopd.graph import build_graph

    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["domains"]["math"]["teacher"] = {"source": "remote", "endpoints": ["http://127.0.0.1:9/"],
                                          "token_env": "MATH_TOKEN"}
    params = micro_params()
    params["teacher"].pop("math")  # a remote teacher needs no GRPO recipe
    cfg = load_config(_project(tmp_path, params, pipes))
    graph = {s.name: s for s in build_graph(cfg)}
    assert "teacher:math" not in graph and "teacher:code" in graph
    assert "teacher:math" not in graph["distill"].upstream
    assert "domains.math.teacher" in graph["distill"].pipeline_keys
    pipes["domains"]["math"]["teacher"]["endpoints"] = ["ftp://x"]
    with pytest.raises(ConfigError, match=r"domains.math.teacher.endpoints.0 = 'ftp://x'"):
        load_config(_project(tmp_path, params, pipes))


def test_method_specs_match_their_losses():
    """Each method spec (mopd.opd.methods, torch-free, checked at load time) declares exactly the
    keyword arguments its loss takes: its own settings model's fields plus the distill settings it
    `takes`, with the loss's defaults; its `requires` are DistillBatch fields."""
    import dataclasses
    import inspect

    from mopd.config import DistillParams
    from mopd.objectives.registry import DistillBatch
    from mopd.opd.methods import BATCH_FIELDS, METHODS

    assert set(BATCH_FIELDS) == {f.name for f in dataclasses.fields(DistillBatch)}
    assert len(METHODS) >= 8
    for name, spec in METHODS.items():
        sig = inspect.signature(spec.loss_fn()).parameters
        taken = set(sig) - {"batch"}
        assert set(spec.params.model_fields) | set(spec.takes) == taken, name
        for field, info in spec.params.model_fields.items():
            assert info.default == sig[field].default, (name, field)
    assert DistillParams(objective="jsd", objective_params={"beta": 0.3}).objective_params == {"beta": 0.3}
    with pytest.raises(ValueError, match=r"objective_params.beta = 1.5: must be a number in \[0, 1\]"):
        DistillParams(objective="jsd", objective_params={"beta": 1.5})
    with pytest.raises(ValueError, match=r"objective_params.tau = True: must be a number <= 0"):
        DistillParams(objective="clip_outlier", objective_params={"tau": True})


def test_yaml_that_dvc_cannot_read_is_refused(tmp_path):
    """PyYAML reads `[data, distill:tropd]` as a list of two strings; DVC's reader (ruamel) finds
    an unexpected ':' — `dvc repro` and the lock sync would fail later, so loading refuses it."""
    pipes = (ROOT / "pipelines.yaml").read_text().replace('"distill:tropd"', "distill:tropd")
    assert pipes != (ROOT / "pipelines.yaml").read_text()
    write_params(tmp_path, micro_params())
    (tmp_path / "pipelines.yaml").write_text(pipes)
    with pytest.raises(ConfigError, match=r"pipelines.yaml: line \d+: DVC's YAML reader cannot read"):
        load_config(tmp_path)
