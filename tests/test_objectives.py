"""MOPD §1/§2 objectives vs naive float64 references and the paper properties."""

import math

import pytest
import torch

from mopd.objectives import (
    distillation_return,
    opd_advantage,
    pg_loss,
    topk_distill_loss,
    topk_distill_loss_from_logprobs,
    trust_probability,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _mask(B, T, g):
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return (torch.arange(T)[None, :] < lengths[:, None]).double()


def _naive_average(values, mask, token_mean):
    B, T = values.shape
    if token_mean:
        num = sum(values[b, t] for b in range(B) for t in range(T) if mask[b, t])
        return num / mask.sum()
    per_seq = []
    for b in range(B):
        toks = [values[b, t] for t in range(T) if mask[b, t]]
        if toks:
            per_seq.append(sum(toks) / len(toks))
    return sum(per_seq) / len(per_seq)


def test_opd_advantage_value_detach_and_clip():
    g = _gen(1)
    t = torch.randn(3, 5, generator=g, dtype=torch.float64) * 4
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    adv = opd_advantage(t, s)
    assert not adv.requires_grad
    torch.testing.assert_close(adv, (t - s).detach())
    clipped = opd_advantage(t, s, clip=1.5)
    torch.testing.assert_close(clipped, (t - s).detach().clamp(-1.5, 1.5))
    assert clipped.max() <= 1.5 and clipped.min() >= -1.5
    assert (clipped.abs() == 1.5).any()
    with pytest.raises(ValueError, match="clip"):
        opd_advantage(t, s, clip=-1.0)
    with pytest.raises(ValueError, match="student_logprobs_BT"):
        opd_advantage(t, s[:, :4])


@pytest.mark.parametrize("token_mean", [False, True])
def test_pg_loss_matches_naive_ppo(token_mean):
    g = _gen(2)
    B, T = 4, 6
    s = torch.randn(B, T, generator=g, dtype=torch.float64, requires_grad=True)
    old = (s.detach() + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64))
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = _mask(B, T, g)
    loss = pg_loss(s, old, adv, mask, eps_low=0.1, eps_high=0.3, token_mean=token_mean)

    def per_tok(b, t):
        r = math.exp(float(s.detach()[b, t]) - float(old[b, t]))
        a = float(adv[b, t])
        return -min(r * a, min(max(r, 0.9), 1.3) * a)

    vals = torch.tensor([[per_tok(b, t) for t in range(T)] for b in range(B)], dtype=torch.float64)
    expected = _naive_average(vals, mask, token_mean)
    assert loss.item() == pytest.approx(float(expected), rel=1e-12)
    torch.autograd.gradcheck(
        lambda x: pg_loss(x, old, adv, mask, eps_low=0.1, eps_high=0.3, token_mean=token_mean), (s,)
    )


def test_pg_loss_on_policy_gradient_is_minus_advantage():
    g = _gen(3)
    s = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(2, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.float64)
    pg_loss(s, s.detach(), adv, mask, token_mean=True).backward()
    torch.testing.assert_close(s.grad, -adv / 10)


def test_pg_loss_ignores_padding_garbage_and_empty_rows():
    s = torch.tensor([[0.1, float("-inf")], [float("nan"), float("nan")]], requires_grad=True)
    old = torch.zeros(2, 2)
    adv = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    loss = pg_loss(s, old, adv, mask)
    assert loss.item() == pytest.approx(-min(math.exp(0.1), 1.2) * 2.0)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def _naive_topk(logits, ids, tlp, mask, token_mean):
    logp = torch.log_softmax(logits.double(), dim=-1)
    B, T, K = ids.shape
    vals = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            acc = 0.0
            for k in range(K):
                lp = logp[b, t, ids[b, t, k]]
                p, q = lp.exp(), tlp[b, t, k].double().exp()
                acc = acc + p * (lp - tlp[b, t, k]) - p + q
            vals[b, t] = acc
    return _naive_average(vals, mask, token_mean)


def _topk_inputs(seed, B=2, T=4, V=11, K=3):
    g = _gen(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    tlogits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tlp_all = torch.log_softmax(tlogits, -1)
    tlp, ids = tlp_all.topk(K, dim=-1)
    return logits, ids, tlp, _mask(B, T, g)


@pytest.mark.parametrize("token_mean", [False, True])
def test_topk_distill_loss_matches_naive_and_gradcheck(token_mean):
    logits, ids, tlp, mask = _topk_inputs(4)
    loss = topk_distill_loss(logits, ids, tlp, mask, token_mean=token_mean)
    expected = _naive_topk(logits.detach(), ids, tlp, mask, token_mean)
    assert loss.item() == pytest.approx(float(expected), rel=1e-12)
    assert loss.item() > 0
    torch.autograd.gradcheck(lambda x: topk_distill_loss(x, ids, tlp, mask, token_mean=token_mean), (logits,))
    # gradient equals autograd of the naive reference
    (g_impl,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(_naive_topk(logits, ids, tlp, mask, token_mean), logits)
    torch.testing.assert_close(g_impl, g_ref)


def test_topk_loss_zero_and_stationary_when_student_matches_teacher_on_topk():
    # Student equals teacher on K_t but has a different distribution of the remaining mass.
    g = _gen(5)
    V, K = 12, 4
    teacher = torch.log_softmax(torch.randn(1, 3, V, generator=g, dtype=torch.float64), -1)
    tlp, ids = teacher.topk(K, dim=-1)
    rest = torch.rand(1, 3, V, generator=g, dtype=torch.float64)
    rest.scatter_(-1, ids, 0.0)
    rest = rest / rest.sum(-1, keepdim=True) * (1 - tlp.exp().sum(-1, keepdim=True))
    probs = rest.scatter(-1, ids, tlp.exp())
    logits = probs.log().clone().requires_grad_(True)
    assert not torch.allclose(probs, teacher.exp())
    loss = topk_distill_loss(logits, ids, tlp, torch.ones(1, 3))
    loss.backward()
    assert abs(loss.item()) < 1e-12
    assert logits.grad.abs().max().item() < 1e-12


def test_topk_loss_nonnegative_and_truncated_rkl_would_differ():
    for seed in range(5):
        logits, ids, tlp, mask = _topk_inputs(10 + seed)
        assert topk_distill_loss(logits, ids, tlp, mask).item() >= 0.0
    # per-token summand with p = q/e is >0 for the corrected loss (plain truncated RKL has its minimum there)
    lq = torch.tensor([[[-1.0, -2.0]]], dtype=torch.float64)
    val = topk_distill_loss_from_logprobs(lq - 1.0, lq, torch.ones(1, 1))
    assert val.item() == pytest.approx(float((lq.exp() * (1 - 2 / math.e)).sum()), rel=1e-12)


def test_topk_loss_errors():
    logits, ids, tlp, mask = _topk_inputs(6)
    with pytest.raises(ValueError, match="teacher_ids_BTK must lie in"):
        topk_distill_loss(logits, ids + 100, tlp, mask)
    with pytest.raises(ValueError, match="mask_BT"):
        topk_distill_loss(logits, ids, tlp, mask[:, :2])
    with pytest.raises(ValueError, match="student_logits_BTV must be 3-D"):
        topk_distill_loss(logits[0], ids, tlp, mask)


def test_trust_probability_and_distillation_return():
    t = torch.tensor([[0.0, -3.0, -1.0]], dtype=torch.float64)
    s = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(trust_probability(t, s), torch.tensor([[1.0, math.exp(-2.0), 1.0]], dtype=torch.float64))
    big = trust_probability(torch.tensor([[1000.0]]), torch.tensor([[-1000.0]]))
    assert big.item() == 1.0
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert distillation_return(t, s, mask).item() == pytest.approx((1.0 - 2.0) / 2)
