"""Uni-OPD A.1 offline difficulty (ALGORITHMS §4): the student samples N responses per prompt,
each is verified, the pass counts c ∈ {0..N} form a histogram h[c] whose shape (U / mirrored-J /
flat) picks the bins to upsample; the balanced prompt set repeats prompts, never drops them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mopd.config import DifficultyParams
from mopd.evaluation import sampled_rewards
from mopd.models import load_model, load_tokenizer
from mopd.objectives.balancing import UpsamplePlan, upsample_plan

log = logging.getLogger(__name__)


def pass_counts(model_dir: Path, records: list[dict], kind: str, params: DifficultyParams,
                seed: int) -> np.ndarray:
    """c_i = number of the student's N samples for prompt i that its verifier accepts, (P,)."""
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    rewards = sampled_rewards(model, tok, records, kind, n=params.n_samples,
                              max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                              seed=seed, batch_size=params.batch_size)
    return np.array([sum(r >= params.success_threshold for r in row) for row in rewards], dtype=np.int64)


def balance(records: list[dict], counts: np.ndarray, params: DifficultyParams, seed: int
            ) -> tuple[list[dict], UpsamplePlan]:
    """The upsampled prompt set (each record carries its `pass_count`) and the plan behind it."""
    plan = upsample_plan(counts, params.n_samples, bins=params.bins, cap=params.cap, seed=seed)
    balanced = [{**records[i], "pass_count": int(counts[i])} for i in plan.indices()]
    log.info("difficulty: shape %s, bins %s, %d -> %d prompts", plan.shape, plan.bins,
             len(records), len(balanced))
    return balanced, plan
