"""Evaluation metrics (ALGORITHMS §8) vs exact values."""

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from mopd.metrics import avg_at_k, normalized_score, pass_at_k


def _exact_pass(n, c, k):
    # probability that a uniformly drawn k-subset contains at least one correct sample
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k)) if n - c >= k else Fraction(1)


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 5), (16, 0, 4), (16, 16, 4), (200, 7, 100), (5, 4, 2)])
def test_pass_at_k_exact(n, c, k):
    assert pass_at_k(n, c, k) == float(_exact_pass(n, c, k))


def test_pass_at_k_known_values_and_large_n():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)
    # large n where the naive float product would need care
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize(
    "args,msg",
    [((0, 0, 1), "n must be >= 1"), ((5, 6, 1), "c must satisfy"), ((5, -1, 1), "c must satisfy"),
     ((5, 2, 0), "k must satisfy"), ((5, 2, 6), "k must satisfy"), ((5.0, 2, 1), "n must be an integer")],
)
def test_pass_at_k_bad_input(args, msg):
    with pytest.raises(ValueError, match=msg):
        pass_at_k(*args)


def test_avg_at_k():
    assert avg_at_k([[1, 0, 1, 1], [0, 0, 0, 0]]) == pytest.approx(0.375)
    assert avg_at_k(np.array([[1.0, 0.5], [0.25, 0.25]])) == pytest.approx(0.5)
    assert avg_at_k([[1, 0], [1, 1, 1, 0]]) == pytest.approx((0.5 + 0.75) / 2)
    with pytest.raises(ValueError, match=r"correct_NK\[1\] must hold values in \[0, 1\]"):
        avg_at_k([[1, 0], [2, 0]])
    with pytest.raises(ValueError, match="non-empty"):
        avg_at_k([])


def _table():
    return pd.DataFrame(
        {"aime": [0.2, 0.6, 0.3, 0.5], "math500": [0.4, 0.8, 0.5, 0.7], "ifeval": [0.5, 0.6, 0.9, 0.8]},
        index=["sft", "t_math", "t_if", "mopd"],
    )


def test_normalized_score_per_domain_teachers():
    out = normalized_score(_table(), domains={"math": ["aime", "math500"], "if": ["ifeval"]},
                           student="sft", teacher={"math": "t_math", "if": "t_if"})
    assert list(out.columns) == ["math", "if", "score"]
    assert out.loc["sft"].tolist() == [0.0, 0.0, 0.0]
    assert out.loc["t_math", "math"] == pytest.approx(1.0)
    assert out.loc["t_if", "if"] == pytest.approx(1.0)
    # mopd: math acc 0.6 vs (0.3, 0.7) -> 0.75; if 0.8 vs (0.5, 0.9) -> 0.75
    assert out.loc["mopd", "math"] == pytest.approx(0.75)
    assert out.loc["mopd", "if"] == pytest.approx(0.75)
    assert out.loc["mopd", "score"] == pytest.approx(0.75)


def test_normalized_score_single_teacher_and_errors():
    out = normalized_score(_table(), domains={"math": ["aime"]}, student="sft", teacher="t_math")
    assert out.loc["t_math", "score"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"row\(s\) \['nobody'\]"):
        normalized_score(_table(), domains={"math": ["aime"]}, student="nobody", teacher="t_math")
    with pytest.raises(ValueError, match=r"column\(s\) \['gpqa'\] for domain 'sci'"):
        normalized_score(_table(), domains={"sci": ["gpqa"]}, student="sft", teacher="t_math")
    with pytest.raises(ValueError, match="no entry for domain 'if'"):
        normalized_score(_table(), domains={"if": ["ifeval"]}, student="sft", teacher={"math": "t_math"})


def test_normalized_score_degenerate_domain_is_nan_with_warning():
    table = _table()
    table.loc["t_if", "ifeval"] = 0.5  # teacher == student
    with pytest.warns(RuntimeWarning, match="domain 'if'"):
        out = normalized_score(table, domains={"math": ["aime"], "if": ["ifeval"]},
                               student="sft", teacher={"math": "t_math", "if": "t_if"})
    assert out["if"].isna().all()
    assert out.loc["t_math", "score"] == pytest.approx(1.0)
