"""Uni-OPD in the distillation trainer (issue 11; ALGORITHMS §4): the step verifies every rollout,
balances each batch's correct share online, calibrates each prompt group's margin to γ and feeds
the calibrated token advantages to the policy-gradient loss."""

from __future__ import annotations

import pytest
import torch

from mopd.config import DistillParams, UniOPDParams
from mopd.objectives.calibration import margin
from mopd.tracking import NullTracker
from mopd.trainers.distill import train_mopd, uniopd_advantages, uniopd_balance
from tests.test_distill_learning import PROMPTS, student_and_teacher  # noqa: F401  (fixture)

# Two prompt groups of three responses, four response positions; rows 2 and 5 are shorter.
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0],
                     [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
R_TOK = torch.tensor([[-1.0, -1.0, -1.0, -1.0],    # R = -1.0, correct
                      [0.5, 0.5, 0.5, 0.5],        # R = 0.5, wrong
                      [-0.2, -0.4, 9.0, 9.0],      # R = -0.3, wrong (padding ignored)
                      [1.0, 1.0, 1.0, 1.0],        # R = 1.0, correct
                      [0.0, 0.0, 0.0, 0.0],        # R = 0.0, wrong
                      [-2.0, 7.0, 7.0, 7.0]])      # R = -2.0, correct
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])


def _returns(adv_BT):
    return (adv_BT * MASK).sum(1) / MASK.sum(1)


@pytest.mark.parametrize("mode", ["mean", "minmax"])
@pytest.mark.parametrize("strategy", ["lift", "suppress", "spread"])
def test_margin_after_calibration_is_gamma(mode, strategy):
    uni = UniOPDParams(calibration=mode, strategy=strategy, gamma=0.5)
    adv, metrics = uniopd_advantages(uni, R_TOK, MASK, REWARDS, GROUPS)
    R = _returns(adv)
    pos = REWARDS >= 1
    for g in (0, 1):
        idx = GROUPS == g
        before = margin(_returns(R_TOK)[idx], pos[idx], mode=mode)
        after = margin(R[idx], pos[idx], mode=mode)
        if before < 0.5:  # below γ: shifted exactly onto γ
            assert after == pytest.approx(0.5, abs=1e-6), (g, before, after)
        else:  # already above γ: untouched
            assert torch.allclose(adv[idx], (R_TOK * MASK)[idx])
    assert metrics["uniopd/margin_after"] >= 0.5 - 1e-6
    assert metrics["uniopd/margin_before"] < metrics["uniopd/margin_after"]
    # a response's shift is spread uniformly over its tokens: A_t - r_t is constant per row
    diff = (adv - R_TOK) * MASK
    for b in range(6):
        d = diff[b][MASK[b].bool()]
        assert torch.allclose(d, d[0].expand_as(d), atol=1e-6)
    assert (adv[MASK == 0] == 0).all()


def test_greedy_mask_gives_dropped_responses_zero_advantage():
    uni = UniOPDParams(calibration="mean", strategy="mask", gamma=0.5, min_keep=0.3)
    adv, metrics = uniopd_advantages(uni, R_TOK, MASK, REWARDS, GROUPS)
    dropped = (adv == 0).all(1) & ((R_TOK * MASK) != 0).any(1)
    assert dropped.any() and metrics["uniopd/kept_fraction"] < 1
    assert metrics["uniopd/kept_fraction"] == pytest.approx(1 - float(dropped.double().mean()))
    kept = ~dropped
    assert torch.allclose(adv[kept], (R_TOK * MASK)[kept])  # the mask does not shift the kept ones
    # group 0 (P = {-1.0}, N = {0.5, -0.3}): the only positive cannot go (the margin would be
    # undefined), so the best-scored wrong response (R = 0.5) is dropped first
    assert dropped[1] and not dropped[0]


def test_online_balance_pulls_the_correct_share_into_range():
    rewards = [1.0] * 7 + [0.0]  # 7/8 correct
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    uni = UniOPDParams(online_balance=True, target=0.5, tol=0.1)
    rows, metrics = uniopd_balance(uni, rewards, groups, torch.Generator().manual_seed(0))
    assert metrics["uniopd/correct_share"] == pytest.approx(7 / 8)
    kept = [rewards[b] for b in rows]
    assert 0.4 <= sum(kept) / len(kept) <= 0.6  # reachable: one correct of group 0 + the wrong one
    assert {groups[b] for b in rows} == {0, 1}
    assert rewards[7] == 0.0 and 7 in rows  # the under-represented side is never dropped
    off, _ = uniopd_balance(UniOPDParams(), rewards, groups, torch.Generator())
    assert off == list(range(8))


def test_config_rejects_calibration_without_the_pg_objective():
    with pytest.raises(ValueError, match="mopd_pg"):
        DistillParams(objective="mopd_topk", uniopd={"calibration": "mean"})
    with pytest.raises(ValueError, match="samples_per_prompt"):
        DistillParams(samples_per_prompt=1, uniopd={"online_balance": True})


def _even(domain, texts, refs):  # an arbitrary verifier with mixed outcomes on random rollouts
    return [float(len(t) % 2 == 0) for t in texts]


def test_trainer_calibrates_and_the_advantages_drive_the_loss(student_and_teacher, tmp_path):
    s_dir, t_dir = student_and_teacher
    prompts = {"math": [{"prompt": p, "reference": "0"} for p in PROMPTS]}
    # reward_every 5: plain MOPD verifies step 1 only; Uni-OPD's shapers get rewards every step
    base = dict(max_steps=2, learning_rate=1e-3, prompts_per_step=4, samples_per_prompt=4, max_new_tokens=6,
                reward_every=5)

    def run(name, **uni):
        return train_mopd(s_dir, {"math": t_dir}, prompts, tmp_path / name, DistillParams(**base, uniopd=uni),
                          seed=0, tracker=NullTracker(), score_fn=_even)

    plain = run("plain")
    lifted = run("lift", calibration="mean", strategy="lift", gamma=5.0)
    full = run("full", online_balance=True, calibration="mean", strategy="mask", gamma=5.0)
    assert "uniopd/margin_before" not in plain
    after = [v for _, v in lifted["uniopd/margin_after"]]
    assert after and all(a == pytest.approx(5.0, abs=1e-4) for a in after)
    # the same first rollout batch (same seed): lifting the positives by ~5 nats must show in the
    # advantages the objective used
    a_plain, a_lift = plain["distill/advantage_mean"][0][1], lifted["distill/advantage_mean"][0][1]
    assert a_lift > a_plain + 0.5, (a_plain, a_lift)
    for key in ("uniopd/correct_share", "uniopd/balance_kept_fraction", "uniopd/kept_fraction"):
        assert key in full, key
    assert [s for s, _ in plain["distill/reward_math"]] == [1]
    assert [s for s, _ in full["distill/reward_math"]] == [s for s, _ in full["uniopd/correct_share"]] == [1, 2]
    # the trainer refuses Uni-OPD without a verifier
    with pytest.raises(ValueError, match="score_fn"):
        train_mopd(s_dir, {"math": t_dir}, prompts, tmp_path / "x",
                   DistillParams(**base, uniopd={"calibration": "mean"}), seed=0, tracker=NullTracker())
