"""Uni-OPD A.1 offline difficulty (ALGORITHMS §4): the student samples N responses per prompt,
each is verified, the pass counts c ∈ {0..N} form a histogram h[c] whose shape (U / mirrored-J /
flat) picks the bins to upsample; the balanced prompt set repeats prompts, never drops them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mopd.chat import PromptFormat
from mopd.evaluation import sampled_rewards
from mopd.models import load_tokenizer
from mopd.objectives.balancing import UpsamplePlan, upsample_plan
from mopd.rollout import open_policy
from mopd.settings.difficulty import DifficultyParams

log = logging.getLogger(__name__)


def pass_counts(model_dir: Path, records: list[dict], kind: str, params: DifficultyParams,
                seed: int, fmt: PromptFormat) -> np.ndarray:
    """c_i = number of the student's N samples for prompt i that its verifier accepts, (P,)."""
    tok = load_tokenizer(model_dir)
    model = open_policy(model_dir, tok, fmt)  # a module, or a vLLM engine (runtime.rollout)
    rewards = sampled_rewards(model, tok, records, kind, fmt=fmt, n=params.n_samples,
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


def balance_all(records: list[dict], scored: list[int], counts: np.ndarray, params: DifficultyParams,
                seed: int) -> tuple[list[dict], UpsamplePlan, dict[str, int]]:
    """The balanced set over *every* training prompt when only ``scored`` (indices into
    ``records``) were sampled to estimate the histogram (Uni-OPD A.1, ALGORITHMS §4: upsample,
    never drop).

    Every record appears at least once. The plan is made on the scored prompts; each scored
    prompt's extra copies are scaled by ``len(records) / len(scored)`` (stochastic rounding,
    seeded) so that the selected bins grow in the whole set as the plan says they grow in the
    sample — the scored prompts stand in for the unscored ones of their bin. Unscored prompts
    carry ``pass_count = -1``. Returns (balanced records, plan on the sample, counts)."""
    if len(scored) != len(counts):
        raise ValueError(f"{len(scored)} scored prompts but {len(counts)} pass counts")
    plan = upsample_plan(counts, params.n_samples, bins=params.bins, cap=params.cap, seed=seed)
    scale = len(records) / max(1, len(scored))
    rng = np.random.default_rng(seed + 1)
    pass_count = np.full(len(records), -1, dtype=np.int64)
    copies = np.ones(len(records), dtype=np.int64)
    for j, i in enumerate(scored):
        pass_count[i] = int(counts[j])
        extra = (plan.repeats[j] - 1) * scale
        copies[i] += int(np.floor(extra)) + int(rng.random() < extra - np.floor(extra))
    balanced = [{**records[i], "pass_count": int(pass_count[i])}
                for i in np.repeat(np.arange(len(records)), copies)]
    stats = {"prompts": len(records), "scored_prompts": len(scored), "balanced_prompts": len(balanced),
             "extra_copies": int(copies.sum() - len(records))}
    log.info("difficulty: shape %s, bins %s, %d prompts (%d scored) -> %d", plan.shape, plan.bins,
             len(records), len(scored), len(balanced))
    return balanced, plan, stats
