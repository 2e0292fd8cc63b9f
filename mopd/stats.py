"""Score tables a user can trust: bootstrap confidence intervals over prompts, and the MOPD
normalised score only where the teacher's gain over the student is significant (ALGORITHMS §8,
MOPD 4.1).

Every interval is a percentile bootstrap over the evaluation prompts, drawn by
``scipy.stats.bootstrap`` (``paired=True``: the arrays compared in one statistic are resampled on
the same prompts). All methods of one domain are resampled with the *same* prompt indices
(paired), so a teacher's gain over SFT and a method's normalised score are judged on matched
prompts: every call of one domain (or benchmark) takes the same :class:`Resamples`, whose seeded
generator makes scipy draw the same ``(n_boot, n_prompts)`` indices each time. The resampling is
seeded: a table is a deterministic function of the per-prompt scores.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
N_BOOT = 2000


@dataclass(frozen=True)
class Resamples:
    """A seeded bootstrap over ``n_prompts`` prompts: ``n_boot`` resamples drawn with replacement.
    Every statistic computed with one value of it sees the same resampled prompts."""

    n_prompts: int
    n_boot: int = N_BOOT
    seed: int = 0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def indices(self) -> np.ndarray:
        """The ``(n_boot, n_prompts)`` prompt indices scipy draws with :meth:`rng` (one
        ``integers`` call, as ``scipy.stats.bootstrap`` makes without ``batch``)."""
        return self.rng().integers(0, self.n_prompts, size=(self.n_boot, self.n_prompts))


def bootstrap_indices(n_prompts: int, *, n_boot: int = N_BOOT, seed: int = 0) -> Resamples:
    """The seeded resampling of ``n_prompts`` prompts that :func:`mean_ci`, :func:`gain_test` and
    :func:`normalized_cell` share (``.indices()``: its ``(n_boot, n_prompts)`` prompt indices)."""
    if n_prompts < 1:
        raise ValueError(f"need at least one prompt to bootstrap, got {n_prompts}")
    return Resamples(int(n_prompts), int(n_boot), int(seed))


def percentile_ci(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates, ignoring the non-finite ones (a normalised
    score's resamples without a positive gain)."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return (math.nan, math.nan)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(samples, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _bootstrap(data: Sequence[np.ndarray], statistic: Callable[..., np.ndarray], idx: Resamples,
               level: float) -> tuple[np.ndarray, tuple[float, float]]:
    """``scipy.stats.bootstrap`` of a vectorised ``statistic(*data, axis=-1)`` over the prompts,
    all arrays of ``data`` resampled on the same prompts: (the replicates ``(n_boot,)``, scipy's
    percentile interval)."""
    for x in data:
        if x.shape != (idx.n_prompts,):
            raise ValueError(f"per-prompt values of shape {x.shape} for a bootstrap over "
                             f"{idx.n_prompts} prompts")
    if idx.n_prompts == 1:  # scipy needs two prompts; each resample of one prompt is that prompt
        reps_B = statistic(*(np.broadcast_to(x, (idx.n_boot, 1)) for x in data), axis=-1)
        return reps_B, percentile_ci(reps_B, level)
    with warnings.catch_warnings():  # a NaN replicate (normalized_cell) makes scipy's interval
        warnings.simplefilter("ignore", sps.DegenerateDataWarning)  # NaN; its caller drops them
        res = sps.bootstrap(tuple(data), statistic, n_resamples=idx.n_boot, vectorized=True,
                            paired=True, axis=-1, confidence_level=level, method="percentile",
                            rng=idx.rng())
    ci = res.confidence_interval
    return res.bootstrap_distribution, (float(ci.low), float(ci.high))


def _mean(x, axis=-1):
    return x.mean(axis=axis)


def _gain(t, s, axis=-1):
    return t.mean(axis=axis) - s.mean(axis=axis)


def _ratio(m, t, s, axis=-1):
    # MOPD 4.1: (acc_m - acc_s) / (acc_t - acc_s), undefined (NaN) where the gain is not positive
    num, den = m.mean(axis=axis) - s.mean(axis=axis), t.mean(axis=axis) - s.mean(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def mean_ci(values_P: Sequence[float], idx: Resamples, level: float = LEVEL) -> tuple[float, float]:
    """Bootstrap CI of the mean of per-prompt values ``values_P`` over resamples ``idx``."""
    return _bootstrap([np.asarray(values_P, dtype=np.float64)], _mean, idx, level)[1]


def gain_test(teacher_P: Sequence[float], student_P: Sequence[float], idx: Resamples,
              level: float = LEVEL) -> dict:
    """Paired bootstrap of the teacher's gain over the student on the same prompts:
    ``{"gain", "ci": [lo, hi], "significant": lo > 0, "n_prompts"}`` (one-sided in effect: only a gain whose
    whole interval lies above zero can serve as a normalising denominator)."""
    t, s = np.asarray(teacher_P, dtype=np.float64), np.asarray(student_P, dtype=np.float64)
    if t.shape != s.shape:
        raise ValueError(f"teacher and student were scored on different prompt sets ({t.size} vs {s.size})")
    _, (lo, hi) = _bootstrap([t, s], _gain, idx, level)
    return {"gain": float((t - s).mean()), "ci": [lo, hi], "significant": bool(lo > 0),
            "n_prompts": int(t.size)}


def normalized_cell(method_P: Sequence[float], teacher_P: Sequence[float], student_P: Sequence[float],
                    idx: Resamples, level: float = LEVEL) -> tuple[dict, np.ndarray]:
    """MOPD 4.1 ``(acc_m - acc_s) / (acc_t - acc_s)`` on one domain with its paired bootstrap CI
    (and the bootstrap replicates, ``(n_boot,)``, NaN where a resample has no positive gain).
    Call only where :func:`gain_test` found the teacher's gain significant."""
    m, t, s = (np.asarray(x, dtype=np.float64) for x in (method_P, teacher_P, student_P))
    denom = t.mean() - s.mean()
    value = float((m.mean() - s.mean()) / denom)
    # scipy's own interval is NaN as soon as one resample has no positive gain; the interval is
    # over the resamples that have one, and the replicates go on to the cross-domain score
    ratio_B, _ = _bootstrap([m, t, s], _ratio, idx, level)
    lo, hi = percentile_ci(ratio_B, level)
    return {"value": value, "ci": [lo, hi], "note": None}, ratio_B


def comparison(scores: Mapping[str, Mapping[str, dict]], domains: Mapping[str, Sequence[str]], *,
               student: str, teachers: Mapping[str, str], level: float = LEVEL, n_boot: int = N_BOOT,
               seed: int = 0) -> dict:
    """The whole comparison table of one pipeline.

    ``scores``: method -> benchmark -> an evaluation cell with per-prompt lists ``per_prompt_avg``
    and ``per_prompt_pass`` (:func:`mopd.evaluation.evaluate_model`). ``domains``: domain -> its
    benchmark columns, for the domains that have a local teacher (the normalised score's domains).
    Returns ``{"level", "methods": {m: {"domains": {bench: {"avg", "ci", "pass", "pass_ci",
    "n_prompts"}}, "normalized": float | None, "normalized_ci", "normalized_domains": {d:
    {"value", "ci", "note"}}, "normalized_note"}}, "teacher_gain": {d: gain_test}}``."""
    benches = sorted({b for per in scores.values() for b in per})
    idx = {b: bootstrap_indices(_n_prompts(scores, b), n_boot=n_boot, seed=seed + i)
           for i, b in enumerate(benches)}
    out: dict = {"level": level, "n_boot": n_boot, "methods": {}, "teacher_gain": {}}
    for m, per in scores.items():
        cells = {b: _benchmark_cell(cell, idx[b], level) for b, cell in per.items()}
        out["methods"][m] = {"domains": cells, "normalized": None, "normalized_ci": None,
                             "normalized_domains": {}, "normalized_note": None}
    if student not in scores:
        for m in out["methods"].values():
            m["normalized_note"] = f"no {student!r} evaluation in this pipeline: nothing to normalise against"
        return out
    # Per domain: the domain's benchmarks pooled prompt-wise (each prompt of each benchmark).
    valid: dict[str, bool] = {}
    replicas: dict[tuple[str, str], np.ndarray] = {}
    for d, cols in domains.items():
        t_name = teachers[d]
        if t_name not in scores:
            valid[d] = False
            out["teacher_gain"][d] = {"gain": None, "ci": None, "significant": False,
                                      "note": f"{t_name} was not evaluated"}
            continue
        pool = {m: np.concatenate([scores[m][b]["per_prompt_avg"] for b in cols]) for m in scores
                if all(b in scores[m] for b in cols)}
        d_idx = bootstrap_indices(pool[student].size, n_boot=n_boot, seed=seed + 1000 + len(valid))
        test = gain_test(pool[t_name], pool[student], d_idx, level)
        out["teacher_gain"][d] = test
        valid[d] = test["significant"]
        for m, entry in out["methods"].items():
            if m not in pool:
                entry["normalized_domains"][d] = {"value": None, "ci": None,
                                                  "note": f"{m} was not evaluated on {cols}"}
            elif not test["significant"]:
                lo, hi = test["ci"]
                entry["normalized_domains"][d] = {
                    "value": None, "ci": None,
                    "note": (f"{t_name}'s gain over {student} on {d} is {test['gain']:+.3f} "
                             f"({level:.0%} CI {lo:+.3f} to {hi:+.3f}): not significant, so no "
                             f"normalised score")}
            else:
                entry["normalized_domains"][d], replicas[m, d] = normalized_cell(
                    pool[m], pool[t_name], pool[student], d_idx, level)
    for m, entry in out["methods"].items():
        _summarise_normalized(entry, domains, valid, {d: r for (n, d), r in replicas.items() if n == m}, level)
    return out


def _benchmark_cell(cell: dict, idx: Resamples, level: float) -> dict:
    """One method's scores on one benchmark with their bootstrap CIs over resamples ``idx``."""
    return {"avg": float(np.mean(cell["per_prompt_avg"])),
            "ci": list(mean_ci(cell["per_prompt_avg"], idx, level)),
            "pass": float(np.mean(cell["per_prompt_pass"])),
            "pass_ci": list(mean_ci(cell["per_prompt_pass"], idx, level)),
            "n_prompts": len(cell["per_prompt_avg"])}


def _summarise_normalized(entry: dict, domains: Mapping[str, Sequence[str]], valid: Mapping[str, bool],
                          replicas: Mapping[str, np.ndarray], level: float) -> None:
    """Fill one method's ``normalized``, ``normalized_ci`` and ``normalized_note`` from its
    per-domain cells (``entry["normalized_domains"]``) and bootstrap replicates (domain -> array)."""
    good = [d for d in domains if valid.get(d) and entry["normalized_domains"][d]["value"] is not None]
    missing = [d for d in domains if d not in good]
    if good:
        entry["normalized"] = float(np.mean([entry["normalized_domains"][d]["value"] for d in good]))
        # domains hold different prompts, resampled independently: the score's replicate b is
        # the mean over domains of their replicate b. scipy.stats.bootstrap cannot draw this
        # itself (prompts paired within a domain, independent across domains, of different
        # sizes), so the interval comes from the per-domain replicates scipy returned
        score_B = np.mean(np.stack([replicas[d] for d in good]), axis=0)
        entry["normalized_ci"] = list(percentile_ci(score_B, level))
    if missing:
        entry["normalized_note"] = (f"mean over {good} only; no normalised score on {missing} "
                                    "(see normalized_domains)" if good else
                                    f"no domain has a significant teacher gain ({missing})")


def _n_prompts(scores: Mapping[str, Mapping[str, dict]], bench: str) -> int:
    sizes = {len(per[bench]["per_prompt_avg"]) for per in scores.values() if bench in per}
    if len(sizes) != 1:
        raise ValueError(f"benchmark {bench!r} was scored on different numbers of prompts {sorted(sizes)}")
    return sizes.pop()
