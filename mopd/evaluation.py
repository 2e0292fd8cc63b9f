"""Evaluation: avg@k with sampling, per domain (ALGORITHMS §8), and the score table.

avg@k = mean accuracy over k sampled completions per problem (reward 1.0 = correct; partial IF
rewards count as their fraction). pass@k uses the unbiased estimator with n = k samples.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from mopd.config import EvaluateParams
from mopd.metrics import avg_at_k, normalized_score, pass_at_k
from mopd.models import load_model, load_tokenizer
from mopd.rollout import sample

log = logging.getLogger(__name__)


def evaluate_model(model_dir: Path, problems: dict[str, tuple[str, list[dict]]],
                   params: EvaluateParams, seed: int) -> dict[str, dict[str, float]]:
    """``problems``: domain -> (verifier kind, records). Returns domain -> {avg@k, pass@k, n}."""
    from mopd.verifiers import verify_batch

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    out = {}
    for domain, (kind, recs) in problems.items():
        samples = sample(model, tok, [r["prompt"] for r in recs], n=params.k,
                         max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                         seed=seed, batch_size=params.batch_size)
        verdicts = verify_batch([kind] * len(samples), [s.text for s in samples],
                                [recs[s.prompt_index]["reference"] for s in samples])
        rewards = [[0.0] * params.k for _ in recs]
        seen = [0] * len(recs)
        for s, v in zip(samples, verdicts):
            rewards[s.prompt_index][seen[s.prompt_index]] = v.reward
            seen[s.prompt_index] += 1
        correct = [sum(1 for r in row if r >= 1.0) for row in rewards]
        out[domain] = {
            "avg@k": float(avg_at_k(rewards)),
            "pass@k": sum(pass_at_k(params.k, c, params.k) for c in correct) / len(recs),
            "n": float(len(recs)),
        }
        log.info("%s on %s: avg@%d=%.3f", model_dir, domain, params.k, out[domain]["avg@k"])
    return out


def score_tables(scores: dict[str, dict[str, dict[str, float]]], benchmarks: dict[str, list[str]],
                 *, student: str, teachers: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(avg@k table: methods × benchmark columns, normalised table: methods × domains + score).

    ``scores``: method -> benchmark -> metrics. MOPD 4.1 normalisation against the SFT student
    and each domain's own teacher."""
    table = pd.DataFrame({m: {b: v["avg@k"] for b, v in s.items()} for m, s in scores.items()}).T
    norm = normalized_score(table, domains=benchmarks, student=student, teacher=teachers)
    return table, norm
