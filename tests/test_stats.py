"""Score tables with statistics (mopd.stats, the report stage): bootstrap intervals over prompts,
the teacher-gain significance test, and a normalised cell that is missing — with its reason — when
the teacher did not measurably beat the student."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mopd.stats import bootstrap_indices, comparison, gain_test, mean_ci


def _cell(per_prompt):
    per = [float(x) for x in per_prompt]
    return {"per_prompt_avg": per, "per_prompt_pass": per, "avg@k": float(np.mean(per)),
            "pass@k": float(np.mean(per)), "n": 4, "k": 4, "n_prompts": len(per)}


def test_bootstrap_ci_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    x = rng.binomial(1, 0.3, size=400).astype(float)
    lo, hi = mean_ci(x, bootstrap_indices(400, n_boot=4000, seed=1))
    se = x.std(ddof=1) / np.sqrt(400)
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.006)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.006)
    lo2, hi2 = mean_ci(x, bootstrap_indices(400, n_boot=4000, seed=1))
    assert (lo, hi) == (lo2, hi2)  # seeded: a table is a function of its inputs


def test_gain_test_is_paired():
    rng = np.random.default_rng(0)
    student = rng.uniform(0, 1, size=100)
    idx = bootstrap_indices(100, seed=0)
    # a small but consistent gain on every prompt is significant when prompts are paired
    assert gain_test(student + 0.01, student, idx)["significant"]
    assert not gain_test(student, student, idx)["significant"]
    assert not gain_test(student - 0.05, student, idx)["significant"]


def _scores(teacher_gain_math: float):
    rng = np.random.default_rng(0)
    base = {d: rng.binomial(1, 0.3, size=200).astype(float) for d in ("math", "code")}
    up = {d: np.where(rng.uniform(size=200) < 0.4, 1.0, base[d]) for d in base}  # a clear gain
    math_teacher = np.clip(base["math"] + teacher_gain_math, 0, 1)
    return {
        "sft": {"math": _cell(base["math"]), "code": _cell(base["code"])},
        "teacher:math": {"math": _cell(math_teacher), "code": _cell(base["code"])},
        "teacher:code": {"math": _cell(base["math"]), "code": _cell(up["code"])},
        "mopd": {"math": _cell(base["math"]), "code": _cell((up["code"] + base["code"]) / 2)},
    }


def test_normalised_score_only_where_the_teacher_gain_is_significant():
    table = comparison(_scores(0.0), {"math": ["math"], "code": ["code"]}, student="sft",
                       teachers={"math": "teacher:math", "code": "teacher:code"}, n_boot=500)
    assert not table["teacher_gain"]["math"]["significant"]
    assert table["teacher_gain"]["code"]["significant"]
    mopd = table["methods"]["mopd"]
    assert mopd["normalized_domains"]["math"]["value"] is None
    assert "not significant" in mopd["normalized_domains"]["math"]["note"]
    assert mopd["normalized_domains"]["code"]["value"] == pytest.approx(0.5)
    lo, hi = mopd["normalized_domains"]["code"]["ci"]
    assert lo < 0.5 < hi
    assert mopd["normalized"] == pytest.approx(0.5)  # the mean over the valid domains only
    assert "['code'] only" in mopd["normalized_note"]
    cell = table["methods"]["teacher:code"]["domains"]["code"]
    assert cell["ci"][0] < cell["avg"] < cell["ci"][1]


def test_report_stage_marks_a_no_gain_teacher_missing(tmp_path):
    """The report stage fed evaluations in which teacher:math has no gain over SFT."""
    from tests.conftest import ROOT, micro_params, write_params

    import shutil
    import yaml

    from mopd.config import load_config
    from mopd.tracking import NullTracker
    from mopd.stage import StageContext
    from tasks.report import run

    write_params(tmp_path, micro_params())
    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["pipelines"] = {"full": pipes["pipelines"]["full"]}  # the others share its stages
    pipes["pipelines"]["full"]["domains"] = ["math", "code"]
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(pipes))
    cfg = load_config(tmp_path)
    inputs = {}
    for label, per in _scores(0.0).items():
        d = tmp_path / "artifacts" / "evaluate" / label.replace(":", "-")
        d.mkdir(parents=True)
        (d / "scores.json").write_text(json.dumps({label: per}))
        inputs[f"evaluate:{label}"] = d
    out = tmp_path / "artifacts" / "report" / "full"
    out.mkdir(parents=True)
    result = run(StageContext("report:full", "", cfg, out, inputs, {"evaluations": inputs}, NullTracker(),
                              {"pipeline": "full"}))
    norm = pd.read_csv(out / "normalized.csv", index_col=0)
    assert np.isnan(norm.loc["mopd", "math"])  # missing, not a ratio of noise
    assert "teacher:math's gain over sft on math" in norm.loc["mopd", "note"]
    assert "not significant" in norm.loc["mopd", "note"]
    assert norm.loc["mopd", "code"] == pytest.approx(0.5)
    saved = json.loads((out / "table.json").read_text())
    assert saved["methods"]["mopd"]["normalized_domains"]["math"]["value"] is None
    assert "normalized/mopd/math" not in result.metrics and "normalized/mopd/code" in result.metrics
    assert (out / "avg_at_k.png").is_file() and (out / "normalized.png").is_file()
    long = pd.read_csv(out / "table.csv")
    assert {"ci_lo", "ci_hi", "pass_at_k"} <= set(long.columns) and len(long) == 8
    shutil.rmtree(out)
