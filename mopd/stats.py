"""Score tables a user can trust: bootstrap confidence intervals over prompts, and the MOPD
normalised score only where the teacher's gain over the student is significant (ALGORITHMS §8,
MOPD 4.1).

Every interval is a percentile bootstrap over the evaluation prompts. All methods of one domain
are resampled with the *same* prompt indices (paired), so a teacher's gain over SFT and a
method's normalised score are judged on matched prompts. The resampling is seeded: a table is a
deterministic function of the per-prompt scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

LEVEL = 0.95
N_BOOT = 2000


def bootstrap_indices(n_prompts: int, *, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``(n_boot, n_prompts)`` prompt indices drawn with replacement."""
    if n_prompts < 1:
        raise ValueError(f"need at least one prompt to bootstrap, got {n_prompts}")
    return np.random.default_rng(seed).integers(0, n_prompts, size=(n_boot, n_prompts))


def percentile_ci(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return (math.nan, math.nan)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(samples, [alpha, 1 - alpha])
    return float(lo), float(hi)


def mean_ci(values_P: Sequence[float], idx: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Bootstrap CI of the mean of per-prompt values ``values_P`` over resamples ``idx``."""
    v = np.asarray(values_P, dtype=np.float64)
    return percentile_ci(v[idx].mean(axis=1), level)


def gain_test(teacher_P: Sequence[float], student_P: Sequence[float], idx: np.ndarray,
              level: float = LEVEL) -> dict:
    """Paired bootstrap of the teacher's gain over the student on the same prompts:
    ``{"gain", "ci": [lo, hi], "significant": lo > 0, "n_prompts"}`` (one-sided in effect: only a gain whose
    whole interval lies above zero can serve as a normalising denominator)."""
    t, s = np.asarray(teacher_P, dtype=np.float64), np.asarray(student_P, dtype=np.float64)
    if t.shape != s.shape:
        raise ValueError(f"teacher and student were scored on different prompt sets ({t.size} vs {s.size})")
    lo, hi = percentile_ci((t - s)[idx].mean(axis=1), level)
    return {"gain": float((t - s).mean()), "ci": [lo, hi], "significant": bool(lo > 0),
            "n_prompts": int(t.size)}


def normalized_cell(method_P: Sequence[float], teacher_P: Sequence[float], student_P: Sequence[float],
                    idx: np.ndarray, level: float = LEVEL) -> tuple[dict, np.ndarray]:
    """MOPD 4.1 ``(acc_m - acc_s) / (acc_t - acc_s)`` on one domain with its paired bootstrap CI
    (and the bootstrap replicates, ``(n_boot,)``, NaN where a resample has no positive gain).
    Call only where :func:`gain_test` found the teacher's gain significant."""
    m, t, s = (np.asarray(x, dtype=np.float64) for x in (method_P, teacher_P, student_P))
    denom = t.mean() - s.mean()
    value = float((m.mean() - s.mean()) / denom)
    num_B = m[idx].mean(axis=1) - s[idx].mean(axis=1)
    den_B = t[idx].mean(axis=1) - s[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_B = np.where(den_B > 0, num_B / den_B, np.nan)
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


def _benchmark_cell(cell: dict, idx: np.ndarray, level: float) -> dict:
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
        # the mean over domains of their replicate b
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
