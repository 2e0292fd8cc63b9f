"""Evaluation: avg@k and pass@k with sampling, per domain (ALGORITHMS §8).

avg@k = mean accuracy over sampled completions per problem (reward 1.0 = correct; partial IF
rewards count as their fraction); with n >= k samples the mean over all n is an unbiased estimate.
pass@k uses the unbiased estimator from n samples. Per-prompt values are kept so that the report
can put bootstrap intervals on every cell (:mod:`mopd.stats`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mopd.chat import PromptFormat
from mopd.metrics import avg_at_k, pass_at_k
from mopd.models import load_tokenizer
from mopd.rollout import open_policy, sample_policy

if TYPE_CHECKING:  # annotations only: difficulty samples through here without the evaluate section
    from mopd.settings.evaluate import EvaluateParams

log = logging.getLogger(__name__)


# why: 10 parameters: the model and tokenizer, the records and their verifier kind, the prompt
# format and the five sampling settings of the evaluate section, passed by keyword as
# `sample_policy` takes them.
def sampled_rewards(model, tok, records: list[dict], kind: str, *, fmt: PromptFormat, n: int, max_new_tokens: int,
                    temperature: float, seed: int, batch_size: int) -> list[list[float]]:
    """``rewards_PN``: the verifier's reward for each of ``n`` sampled completions per record
    (`sample` returns each prompt's samples contiguously)."""
    from mopd.verifiers import verify_batch

    samples = sample_policy(model, tok, [r["prompt"] for r in records], fmt=fmt, n=n, max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed, batch_size=batch_size)
    verdicts = verify_batch([kind] * len(samples), [s.text for s in samples],
                            [records[s.prompt_index]["reference"] for s in samples])
    rewards = [v.reward for v in verdicts]
    return [rewards[i * n:(i + 1) * n] for i in range(len(records))]


def evaluate_model(model_dir: Path, problems: dict[str, tuple[str, list[dict]]],
                   params: EvaluateParams, seed: int, fmt: PromptFormat) -> dict[str, dict]:
    """``problems``: benchmark -> (verifier kind, records). Returns benchmark -> a cell: ``avg@k`` and
    ``pass@k`` (means over prompts), ``n``, ``k``, ``n_prompts`` and the per-prompt values
    ``per_prompt_avg`` / ``per_prompt_pass`` (in record order) that intervals and paired tests
    are computed from (:mod:`mopd.stats`)."""
    tok = load_tokenizer(model_dir)
    model = open_policy(model_dir, tok, fmt)  # a module, or a vLLM engine (runtime.rollout)
    out = {}
    for domain, (kind, recs) in problems.items():
        rewards = sampled_rewards(model, tok, recs, kind, fmt=fmt, n=params.n, max_new_tokens=params.max_new_tokens,
                                  temperature=params.temperature, seed=seed, batch_size=params.batch_size)
        per_avg = [float(np.mean(row)) for row in rewards]
        per_pass = [pass_at_k(params.n, sum(1 for r in row if r >= 1.0), params.k) for row in rewards]
        out[domain] = {
            "avg@k": float(avg_at_k(rewards)),
            "pass@k": float(np.mean(per_pass)),
            "n": params.n, "k": params.k, "n_prompts": len(recs),
            "per_prompt_avg": per_avg, "per_prompt_pass": per_pass,
            "ids": [str(r.get("id", i)) for i, r in enumerate(recs)],
        }
        log.info("%s on %s: avg@%d=%.3f pass@%d=%.3f (n=%d, %d prompts)", model_dir, domain, params.k,
                 out[domain]["avg@k"], params.k, out[domain]["pass@k"], params.n, len(recs))
    return out
