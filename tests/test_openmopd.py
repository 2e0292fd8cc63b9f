"""Issue 25: Open-MOPD's balancing as shapers (target gradient shares, reward-scale normalisation,
teacher-conflict policy, advantage refresh), each against a hand-computed case; the per-step
domain draw rotating its remainder; the learning-rate schedule; the whole set in one run."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from mopd.opd.batch import PackedBatch
from mopd.opd.sampler import draw_domains
from mopd.opd.shapers import conflict_policy, loss_units, reward_scale_factors, share_weights
from mopd.opd.update import Update
from mopd.trainers.distill import lr_factor


def test_gradient_shares_land_on_target_and_keep_the_total():
    # three long `a` rollouts (10 tokens) and one short `b` (2): token shares 30/32 and 2/32
    rows = ["a", "a", "a", "b"]
    units = torch.tensor([10.0, 10.0, 10.0, 2.0])
    w_B, w = share_weights(rows, units, None)  # equal targets
    assert w["a"] == pytest.approx(0.5 / (30 / 32)) and w["b"] == pytest.approx(0.5 / (2 / 32))  # 0.533, 8
    share_b = float((w_B * units)[3] / (w_B * units).sum())
    assert share_b == pytest.approx(0.5)
    assert float((w_B * units).sum()) == pytest.approx(32.0)  # total preserved
    # an explicit target: b gets 20% of the gradient
    w_B, _ = share_weights(rows, units, {"a": 0.8, "b": 0.2})
    assert float((w_B * units)[3] / (w_B * units).sum()) == pytest.approx(0.2)
    assert float((w_B * units).sum()) == pytest.approx(32.0)
    # per-sequence mean (the default): one unit per rollout, b's share 1/4 -> 1/2
    seq = loss_units(torch.tensor([[1.0] * 10, [1.0] * 10, [1.0] * 10, [1.0] * 2 + [0.0] * 8]), token_mean=False)
    w_B, w = share_weights(rows, seq, None)
    assert w == pytest.approx({"a": 2 / 3, "b": 2.0}) and float((w_B * seq).sum()) == pytest.approx(4.0)


def test_reward_scale_multiply_follows_the_remaining_gap():
    # both domains start with gap 1; a's closed to 0.25, b's still 1: a gets less of the gradient
    f = reward_scale_factors({"a": 0.25, "b": 1.0}, {"a": 1.0, "b": 1.0}, "multiply", alpha=1.0)
    assert f == pytest.approx({"a": 0.25, "b": 1.0})
    rows, units = ["a", "b"], torch.tensor([1.0, 1.0])
    w_B, _ = share_weights(rows, units, None, f)
    assert float(w_B[0]) == pytest.approx(2 * 0.25 / 1.25) and float(w_B[1]) == pytest.approx(2 / 1.25)
    assert float(w_B.sum()) == pytest.approx(2.0)  # total preserved
    # clipped to [0.05, 20]; alpha 0 is M1 alone; divide inverts the direction
    assert reward_scale_factors({"a": 1e-4}, {"a": 1.0}, "multiply", 1.0) == {"a": 0.05}
    assert reward_scale_factors({"a": 0.25}, {"a": 1.0}, "multiply", 0.0) == {"a": 1.0}
    assert reward_scale_factors({"a": 0.25, "b": 1.0}, {}, "divide", 1.0) == pytest.approx({"a": 4.0, "b": 1.0})


def test_conflict_policy_mask_and_consensus():
    # 2 teachers x 1 row x 4 positions; position 0 is the prompt; spreads 0.5, 2.0, 0.0 nats
    u_MBT = torch.tensor([[[0.0, -1.0, -1.0, -2.0]], [[0.0, -1.5, -3.0, -2.0]]])
    routed = u_MBT[0]
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    w, target, spread, thresh = conflict_policy(u_MBT, routed, mask, "mask", nats=1.0, quantile=None)
    assert spread.tolist() == [[0.0, 0.5, 2.0, 0.0]] and thresh == 1.0
    assert w[0].tolist() == pytest.approx([0.0, 1.5, 0.0, 1.5])  # contested dropped, 3 valid / 2 kept
    assert float(w.sum()) == pytest.approx(float(mask.sum()))
    torch.testing.assert_close(target, routed)
    w, target, _, _ = conflict_policy(u_MBT, routed, mask, "consensus", nats=1.0, quantile=None)
    torch.testing.assert_close(w, mask)
    assert target.tolist() == [[0.0, -1.25, -1.0, -2.0]]  # mean where they agree, routed where contested
    _, _, _, thresh = conflict_policy(u_MBT, routed, mask, "mask", nats=1.0, quantile=0.5)
    assert thresh == pytest.approx(0.5)  # the median spread over response tokens


def test_advantage_refresh_uses_the_student_at_each_pass():
    u = torch.tensor([[0.0, -1.0, -2.0]])
    old = torch.tensor([[0.0, -3.0, -3.0]])
    now = torch.tensor([[0.0, -1.5, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    packed = PackedBatch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), mask, u, None, None, None, None,
                         [0], old_logprobs_BT=old, weight_BT=torch.tensor([[0.0, 2.0, 2.0]]))
    upd = Update(lambda b: None, frozenset(), 1.0, False, clip=5.0)
    assert upd._advantages(packed, [0], now, u).tolist() == [[0.0, 4.0, 2.0]]  # w * (u - s_old)
    packed.refresh = True
    assert upd._advantages(packed, [0], now, u).tolist() == [[0.0, 1.0, -2.0]]  # w * (u - s_now)


def test_domain_draw_rotates_the_remainder():
    rng = random.Random(0)
    per_step = [Counter(draw_domains(["code", "if", "math"], None, 16, rng, step)) for step in range(1, 7)]
    assert all(sorted(c.values()) == [5, 5, 6] for c in per_step)
    total = sum(per_step, Counter())
    assert total == Counter({"code": 32, "if": 32, "math": 32})  # 6 steps x 16 = 96, a third each


def test_learning_rate_schedule():
    assert [lr_factor(s, 10, 0.0, "constant") for s in (1, 5, 10)] == [1.0, 1.0, 1.0]
    assert [lr_factor(s, 10, 0.2, "constant") for s in (1, 2, 3)] == [0.5, 1.0, 1.0]
    assert lr_factor(3, 10, 0.2, "cosine") == pytest.approx(1.0 - 0.9 * 0.5 * (1 - math_cos(1 / 8)))
    assert lr_factor(10, 10, 0.2, "cosine") == pytest.approx(0.1)


def math_cos(x: float) -> float:
    import math

    return math.cos(math.pi * x)


def test_openmopd_run_logs_each_mechanism_and_snapshots(tmp_path):
    """Every mechanism on at once (two domains, two teachers, two passes per batch): the run
    finishes, logs the per-domain diagnostics, keeps the loss total, and saves its snapshots."""
    from mopd.config import DistillParams
    from mopd.opd.shapers import DomainBalance
    from mopd.tracking import NullTracker
    from mopd.trainers.distill import build_shapers, train_mopd
    from tests.test_distill_learning import PROMPTS, make_student_and_teacher

    s_dir, t_dir = make_student_and_teacher(tmp_path / "m", steps=20)
    params = DistillParams(max_steps=4, learning_rate=1e-3, prompts_per_step=4, samples_per_prompt=2,
                           max_new_tokens=5, overlap=False, epochs=1, minibatches=2, snapshot_every=2,
                           openmopd={"gradient_shares": True, "reward_scale": "multiply", "conflict": "mask",
                                     "conflict_quantile": 0.9, "refresh_advantage": True})
    assert [type(s).__name__ for s in build_shapers(params)] == ["TeacherConflict", "DomainBalance",
                                                                  "AdvantageRefresh"]
    prompts = {"math": [{"prompt": p, "reference": "0"} for p in PROMPTS],
               "code": [{"prompt": p.replace("math", "code"), "reference": "0"} for p in PROMPTS]}
    history = train_mopd(s_dir, {"math": t_dir, "code": s_dir}, prompts, tmp_path / "out", params, seed=0,
                         tracker=NullTracker())
    for d in ("math", "code"):
        for what in ("prompt_share", "token_share", "reward_magnitude", "loss_weight", "spread",
                     "contested_fraction"):
            assert len(history[f"openmopd/{d}/{what}"]) == 4, (d, what)
        assert {v for _, v in history[f"openmopd/{d}/prompt_share"]} == {0.5}
    # the code teacher is the student itself: its rollouts start with no gap at all
    assert history["openmopd/code/reward_anchor"][0][1] < history["openmopd/math/reward_anchor"][0][1]
    assert sorted(p.name for p in (tmp_path / "out" / "snapshots").iterdir()) == ["step-000002"]
    assert (tmp_path / "out" / "snapshots" / "step-000002" / "model.safetensors").is_file()
    # a resumed run takes the anchors back from the history it continues
    bal = DomainBalance(True, None, "multiply", 1.0, 5.0, False)
    bal.restore({k: v for k, v in history.items() if k.endswith("reward_anchor")})
    assert bal.anchor == {d: history[f"openmopd/{d}/reward_anchor"][-1][1] for d in ("math", "code")}


def test_openmopd_settings_are_checked():
    from mopd.config import DistillParams

    with pytest.raises(ValueError, match="refresh_advantage.*epochs x minibatches > 1"):
        DistillParams(openmopd={"refresh_advantage": True})
    with pytest.raises(ValueError, match="openmopd weights the K1 advantage.*mopd_topk"):
        DistillParams(objective="mopd_topk", openmopd={"gradient_shares": True})
    with pytest.raises(ValueError, match="alpha"):
        DistillParams(openmopd={"reward_scale": "multiply", "alpha": 3})
