"""Uni-OPD margin calibration and data balancing (ALGORITHMS §4) vs naive references and paper properties."""

import itertools

import numpy as np
import pytest
import torch

from mopd.objectives import (
    calibrated_token_advantages,
    detect_shape,
    difficulty_histogram,
    distillation_return,
    margin,
    margin_calibrate,
    margin_calibrate_groups,
    online_balance,
    upsample_plan,
)


def _naive_margin(r, pos, mode):
    P = [x for x, p in zip(r, pos) if p]
    N = [x for x, p in zip(r, pos) if not p]
    if mode == "minmax":
        return min(P) - max(N)
    return sum(P) / len(P) - sum(N) / len(N)


@pytest.mark.parametrize("mode,strategy", list(itertools.product(["mean", "minmax"], ["lift", "suppress", "spread"])))
def test_shift_reaches_gamma_and_keeps_order(mode, strategy):
    g = torch.Generator().manual_seed(7)
    for trial in range(20):
        r = torch.randn(8, generator=g, dtype=torch.float64)
        correct = torch.rand(8, generator=g) < 0.5
        correct[0], correct[1] = True, False
        gamma = 0.3
        m0 = _naive_margin(r.tolist(), correct.tolist(), mode)
        out, keep = margin_calibrate(r, correct, gamma=gamma, mode=mode, strategy=strategy)
        assert keep.all()
        m1 = _naive_margin(out.tolist(), correct.tolist(), mode)
        if m0 < gamma:
            assert m1 == pytest.approx(gamma, abs=1e-12)
            delta = gamma - m0
            shift = (out - r)
            exp_pos = {"lift": delta, "suppress": 0.0, "spread": delta / 2}[strategy]
            torch.testing.assert_close(shift[correct], torch.full_like(shift[correct], exp_pos))
            torch.testing.assert_close(shift[~correct], torch.full_like(shift[~correct], exp_pos - delta))
        else:
            torch.testing.assert_close(out, r)
        for grp in (correct, ~correct):  # order inside P and inside N unchanged
            assert torch.equal(torch.argsort(out[grp]), torch.argsort(r[grp]))


def test_no_calibration_when_group_one_sided_or_margin_ok():
    r = torch.tensor([0.1, -0.5, 0.3])
    out, keep = margin_calibrate(r, torch.tensor([True, True, True]), gamma=1.0, strategy="spread")
    torch.testing.assert_close(out, r)
    assert keep.all() and margin(r, torch.tensor([True, True, True])) is None
    out, _ = margin_calibrate(r, torch.tensor([1.0, 0.0, 1.0]), gamma=-10.0)  # float rewards, threshold 1
    torch.testing.assert_close(out, r)


def _naive_greedy(r, pos, gamma, mode, min_keep):
    P = sorted([i for i in range(len(r)) if pos[i]], key=lambda i: r[i])
    N = sorted([i for i in range(len(r)) if not pos[i]], key=lambda i: -r[i])
    G = len(r)
    dropped = []
    while True:
        m = _naive_margin([r[i] for i in P + N], [True] * len(P) + [False] * len(N), mode)
        if m >= gamma or (G - len(dropped) - 1) / G < min_keep:
            break
        gains = []
        if len(P) > 1:
            gains.append((_naive_margin([r[i] for i in P[1:] + N], [True] * (len(P) - 1) + [False] * len(N), mode) - m, 0))
        if len(N) > 1:
            gains.append((_naive_margin([r[i] for i in P + N[1:]], [True] * len(P) + [False] * (len(N) - 1), mode) - m, 1))
        if not gains:
            break
        best = max(gains, key=lambda x: x[0])
        if best[0] <= 0:
            break
        dropped.append((P if best[1] == 0 else N).pop(0))
    return [i not in dropped for i in range(G)]


@pytest.mark.parametrize("mode", ["mean", "minmax"])
def test_greedy_mask_matches_naive(mode):
    g = torch.Generator().manual_seed(11)
    for _ in range(30):
        r = torch.randn(10, generator=g, dtype=torch.float64)
        correct = torch.rand(10, generator=g) < 0.5
        correct[0], correct[1] = True, False
        out, keep = margin_calibrate(r, correct, gamma=0.5, mode=mode, strategy="mask", min_keep=0.3)
        expected = _naive_greedy(r.tolist(), correct.tolist(), 0.5, mode, 0.3)
        assert keep.tolist() == expected
        torch.testing.assert_close(out, torch.where(keep, r, torch.zeros_like(r)))


def test_greedy_mask_stopping_rules():
    # (i) stops at gamma: dropping the single adversarial negative (0.9) restores the minmax margin.
    r = torch.tensor([1.0, 0.8, 0.9, -1.0, -1.2])
    c = torch.tensor([True, True, False, False, False])
    out, keep = margin_calibrate(r, c, gamma=0.0, mode="minmax", strategy="mask", min_keep=0.0)
    assert keep.tolist() == [True, True, False, True, True]
    assert out.tolist() == pytest.approx([1.0, 0.8, 0.0, -1.0, -1.2])
    # (ii) no beneficial removal: one positive, one negative, margin < gamma -> nothing dropped
    r2 = torch.tensor([0.0, 1.0])
    out2, keep2 = margin_calibrate(r2, torch.tensor([True, False]), gamma=0.0, strategy="mask", min_keep=0.0)
    assert keep2.all() and out2.tolist() == [0.0, 1.0]
    # (iii) min_keep: 4 responses, min_keep 0.75 -> at most one dropped even though margin still < gamma
    r3 = torch.tensor([-3.0, -2.0, 3.0, 2.0])
    c3 = torch.tensor([True, True, False, False])
    _, keep3 = margin_calibrate(r3, c3, gamma=0.0, mode="minmax", strategy="mask", min_keep=0.75)
    assert int(keep3.sum()) == 3
    assert margin(r3[keep3], c3[keep3], mode="minmax") < 0.0


def test_calibrate_errors_and_groups():
    r = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="strategy must be one of"):
        margin_calibrate(r, torch.tensor([True, False]), strategy="bogus")
    with pytest.raises(ValueError, match="mode must be one of"):
        margin_calibrate(r, torch.tensor([True, False]), mode="median")
    with pytest.raises(ValueError, match="equal length"):
        margin_calibrate(r, torch.tensor([True]))
    rB = torch.tensor([0.0, 1.0, 5.0, 2.0])
    cB = torch.tensor([True, False, True, False])
    gid = torch.tensor([0, 0, 1, 1])
    out, keep = margin_calibrate_groups(rB, cB, gid, gamma=0.0, strategy="lift")
    assert out.tolist() == pytest.approx([1.0, 1.0, 5.0, 2.0]) and keep.all()


def test_token_advantages_after_calibration():
    t = torch.tensor([[0.0, -1.0, 5.0], [-2.0, -2.0, 0.0]])
    s = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    R = distillation_return(t, s, mask)
    assert R.tolist() == pytest.approx([0.5, -1.0])
    R2 = R + torch.tensor([1.0, 0.0])
    adv = calibrated_token_advantages(t - s, R, R2, torch.tensor([True, False]))
    torch.testing.assert_close(adv, torch.tensor([[2.0, 1.0, 6.0], [0.0, 0.0, 0.0]]))


def test_histogram_and_shape_detection():
    assert difficulty_histogram([0, 0, 8, 3], 8).tolist() == [2, 0, 0, 1, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError, match=r"pass_counts must lie in \[0, 8\]"):
        difficulty_histogram([9], 8)
    assert detect_shape([10, 2, 1, 2, 12]) == "U"
    assert detect_shape([1, 2, 3, 5, 12]) == "J"
    assert detect_shape([3, 3, 3, 3, 3]) == "flat"
    assert detect_shape([12, 5, 3, 2, 1]) == "flat"  # mass falls toward c=N: neither shape


def test_upsample_plan_u_shape():
    counts = np.array([0] * 10 + [1] * 2 + [2] * 3 + [3] * 1 + [4] * 8)
    plan = upsample_plan(counts, 4, cap=4.0, seed=0)
    assert plan.shape == "U" and plan.bins == (1, 2, 3)
    assert plan.target == 10  # max over unselected bins {0, 4}
    assert plan.hist_before.tolist() == [10, 2, 3, 1, 8]
    # each middle bin reaches min(target, cap*h): 2->8, 3->10, 1->4
    assert plan.hist_after.tolist() == [10, 8, 10, 4, 8]
    assert (plan.repeats >= 1).all() and plan.repeats[counts == 0].tolist() == [1] * 10
    assert len(plan.indices()) == plan.hist_after.sum()
    # the 3 prompts of bin 2 split 10 copies as 4/3/3
    assert sorted(plan.repeats[counts == 2].tolist()) == [3, 3, 4]


def test_upsample_plan_j_shape_and_overrides():
    counts = np.array([0] * 1 + [1] * 2 + [2] * 3 + [3] * 4 + [4] * 20)
    plan = upsample_plan(counts, 4)
    assert plan.shape == "J" and plan.bins == (0, 1, 2, 3) and plan.target == 20
    assert plan.hist_after.tolist() == [4, 8, 12, 16, 20]
    custom = upsample_plan(counts, 4, bins=[2], cap=10.0, shape_rule=lambda h: "flat")
    assert custom.shape == "flat" and custom.hist_after.tolist() == [1, 2, 20, 4, 20]
    with pytest.raises(ValueError, match="cap must be >= 1"):
        upsample_plan(counts, 4, cap=0.5)


def test_online_balance():
    gen = torch.Generator().manual_seed(0)
    correct = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    gid = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    keep = online_balance(correct, gid, target=0.5, tol=0.1, generator=gen)
    share = correct[keep].float().mean().item()
    # only correct responses removed; every group keeps >= 1 response
    assert not keep[~correct].logical_not().any()
    for gi in range(3):
        assert keep[gid == gi].any()
    # reaching 0.6 needs 8 removals but the group floor allows 7: one response per group is left
    assert int(keep.sum()) == 3 and share == pytest.approx(2 / 3)
    assert keep[7]  # the only incorrect response survives
    balanced = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    assert online_balance(balanced, torch.tensor([0, 0, 1, 1])).all()


def test_online_balance_reaches_bound_exactly():
    gen = torch.Generator().manual_seed(3)
    correct = torch.tensor([0] * 8 + [1] * 2, dtype=torch.bool)  # share 0.2, too many incorrect
    gid = torch.arange(10) // 5  # two groups of 5
    keep = online_balance(correct, gid, target=0.5, tol=0.1, generator=gen)
    assert correct[keep].float().mean().item() == pytest.approx(0.4)
    assert int(keep.sum()) == 5 and keep[correct].all()
