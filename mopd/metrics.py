"""Evaluation metrics (ALGORITHMS §8; MOPD 4.1): avg@k, unbiased pass@k, normalised score."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from fractions import Fraction

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = ["pass_at_k", "avg_at_k", "normalized_score"]


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator ``1 - C(n-c, k) / C(n, k)`` (ALGORITHMS §8, Chen et al. 2021).

    Computed exactly with integer binomials (no floating-point product), then converted to float.

    Args:
        n: samples drawn per problem (n >= 1).
        c: correct samples among them (0 <= c <= n).
        k: the k of pass@k (1 <= k <= n).
    """
    n, c, k = _check_count("n", n), _check_count("c", c), _check_count("k", k)
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must satisfy 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def avg_at_k(correct_NK: object) -> float:
    """avg@k: mean accuracy over the k samples of each problem, then over problems (§8).

    Args:
        correct_NK: array-like (N problems × k samples) of 0/1 or scores in [0, 1]. A list of lists
            may be ragged (each problem averaged over its own samples).
    """
    rows = correct_NK.tolist() if hasattr(correct_NK, "tolist") else correct_NK
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)) or len(rows) == 0:
        raise ValueError(f"correct_NK must be a non-empty 2-D array or list of lists, got {correct_NK!r:.80}")
    per_problem = []
    for i, row in enumerate(rows):
        if not isinstance(row, Sequence) or isinstance(row, (str, bytes)) or len(row) == 0:
            raise ValueError(f"correct_NK[{i}] must be a non-empty list of sample scores, got {row!r:.80}")
        arr = np.asarray(row, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError(f"correct_NK[{i}] must be 1-D, got shape {arr.shape}")
        if np.isnan(arr).any() or (arr < 0).any() or (arr > 1).any():
            raise ValueError(f"correct_NK[{i}] must hold values in [0, 1], got {row!r:.80}")
        per_problem.append(arr.mean())
    return float(np.mean(per_problem))


def _teacher_for(teacher: str | Mapping[str, str], domain: str) -> str:
    if isinstance(teacher, str):
        return teacher
    if domain not in teacher:
        raise ValueError(f"teacher mapping has no entry for domain {domain!r}; domains in mapping: {sorted(teacher)}")
    return teacher[domain]


def normalized_score(
    table: pd.DataFrame,
    *,
    domains: Mapping[str, Sequence[str]],
    student: str,
    teacher: str | Mapping[str, str],
) -> pd.DataFrame:
    """MOPD 4.1 normalised score (ALGORITHMS §8).

    Domain accuracy = mean of the domain's benchmark columns; per domain
    ``(acc - acc_student) / (acc_teacher - acc_student)``; ``score`` = uniform mean over domains.

    Args:
        table: one row per method (index = method label), one column per benchmark accuracy.
        domains: domain -> list of benchmark columns.
        student: row label of the Stage-1 SFT student (scores 0 everywhere).
        teacher: row label of the teacher, or a mapping domain -> that domain's teacher row.
    Returns:
        DataFrame indexed like ``table`` with one column per domain plus ``score``. A domain whose
        teacher and student accuracies are equal gives NaN (with a warning); ``score`` is then the
        mean over the remaining domains.
    """
    if not domains:
        raise ValueError("domains must map at least one domain to a list of benchmark columns")
    rows = {student} | ({teacher} if isinstance(teacher, str) else set())
    for dom in domains:
        rows.add(_teacher_for(teacher, dom))
    missing_rows = sorted(r for r in rows if r not in table.index)
    if missing_rows:
        raise ValueError(f"normalized_score: row(s) {missing_rows} not in table index {list(table.index)}")
    out = {}
    for dom, cols in domains.items():
        cols = list(cols)
        if not cols:
            raise ValueError(f"normalized_score: domain {dom!r} has no benchmark columns")
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise ValueError(f"normalized_score: column(s) {missing} for domain {dom!r} not in table columns "
                             f"{list(table.columns)}")
        acc = table[cols].astype(float).mean(axis=1)
        lo, hi = acc[student], acc[_teacher_for(teacher, dom)]
        if not np.isfinite(hi - lo) or hi == lo:
            msg = (f"normalized_score: domain {dom!r} has teacher accuracy {hi} == student accuracy {lo}; "
                   "its normalised score is NaN")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            logger.warning(msg)
            out[dom] = pd.Series(np.nan, index=table.index)
        else:
            out[dom] = (acc - lo) / (hi - lo)
    result = pd.DataFrame(out, index=table.index)
    result["score"] = result[list(domains)].mean(axis=1, skipna=True)
    return result
