"""Uni-OPD A.1 offline difficulty: pass counts from real student samples and the balanced set."""

from __future__ import annotations

import numpy as np

from mopd.chat import PLAIN
from mopd.config import DifficultyParams, TinyProfile
from mopd.difficulty import balance, balance_all, pass_counts
from mopd.models import build_base

SMALL = TinyProfile(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8)


def test_balance_upsamples_middle_bins_of_a_u_shape():
    records = [{"id": str(i), "prompt": f"p{i}"} for i in range(14)]
    counts = np.array([0] * 6 + [4] * 5 + [1, 2, 3])  # U: both ends above the middle mean
    balanced, plan = balance(records, counts, DifficultyParams(n_samples=4, cap=4.0), seed=0)
    assert plan.shape == "U" and plan.bins == (1, 2, 3)
    assert plan.hist_before.tolist() == [6, 1, 1, 1, 5]
    assert plan.hist_after.tolist() == [6, 4, 4, 4, 5]  # each middle bin grows to cap x 1 = 4
    assert {r["id"] for r in balanced} == {r["id"] for r in records}  # never drops
    assert sum(r["pass_count"] == 2 for r in balanced) == 4


def test_pass_counts_verify_real_samples(tmp_path):
    texts = [f"[math] {a}+{b}=\\boxed{{{a + b}}}" for a in range(10) for b in range(10)]
    build_base(SMALL, texts, tmp_path / "m", seed=0)
    records = [{"prompt": "[math] 1+1=", "reference": "2"}, {"prompt": "[math] 2+3=", "reference": "5"}]
    params = DifficultyParams(n_samples=3, max_new_tokens=4)
    counts = pass_counts(tmp_path / "m", records, "math", params, seed=0, fmt=PLAIN)
    assert counts.shape == (2,) and counts.dtype == np.int64
    assert ((0 <= counts) & (counts <= 3)).all()
    # a random-init model essentially never writes \boxed{2}: the verifier, not a stub, decides
    assert counts.sum() == 0
    params_lenient = DifficultyParams(n_samples=3, max_new_tokens=4, success_threshold=0.0)
    assert pass_counts(tmp_path / "m", records, "math", params_lenient, seed=0, fmt=PLAIN).tolist() == [3, 3]


def test_balance_all_keeps_every_prompt_and_scales_the_scored_bins():
    records = [{"id": str(i), "prompt": f"p{i}"} for i in range(140)]
    scored = list(range(0, 140, 10))  # 14 of 140 scored: a tenth
    counts = np.array([0] * 6 + [4] * 5 + [1, 2, 3])  # U-shaped sample: bins 1..3 upsampled
    balanced, plan, stats = balance_all(records, scored, counts, DifficultyParams(n_samples=4, cap=4.0), seed=0)
    ids = [r["id"] for r in balanced]
    assert set(ids) == {r["id"] for r in records}  # every training prompt, scored or not
    assert plan.hist_after.tolist() == [6, 4, 4, 4, 5]
    # each of the 3 upsampled scored prompts gains (4 - 1) x 10 copies, the others none
    for i, c in zip(scored, counts):
        assert ids.count(str(i)) == (31 if c in (1, 2, 3) else 1)
    assert stats == {"prompts": 140, "scored_prompts": 14, "balanced_prompts": 140 + 90, "extra_copies": 90}
    unscored = {r["pass_count"] for r in balanced if int(r["id"]) % 10}
    assert unscored == {-1}
