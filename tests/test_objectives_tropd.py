"""TrOPD (ALGORITHMS §5), its baselines, routing (§3) and CoPD (§6) vs naive float64 references."""

import math
import os

import pytest
import torch

from mopd.objectives import (
    combine_teacher_logprobs,
    copd_advantage,
    copd_exchange_pairs,
    cosine_prefix_length,
    entropy_top_mask,
    generalized_jsd_full,
    jsd_k1_advantage,
    jsd_topk_per_token,
    mask_outlier_advantage,
    prefix_guidance_loss,
    reopold_clip_advantage,
    routing_weights,
    teacher_weights,
    topk_fkl_per_token,
    tropd_loss,
    trust_mask,
)


def _topk_case(seed, B=2, T=3, V=9, K=4):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    t_lp = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    lq, ids = t_lp.topk(K, dim=-1)
    return s_logits, ids, lq, t_lp


def test_trust_mask_is_seeded_bernoulli():
    t = torch.zeros(4, 2000)
    s = torch.full((4, 2000), math.log(2.0))  # p = exp(-log 2) = 0.5
    s[0] = -1.0  # teacher more confident: accepted surely
    m1 = trust_mask(t, s, generator=torch.Generator().manual_seed(5))
    m2 = trust_mask(t, s, generator=torch.Generator().manual_seed(5))
    assert torch.equal(m1, m2) and m1.dtype == torch.bool
    assert m1[0].all()
    assert m1[1:].float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_topk_fkl_matches_naive_and_gradcheck():
    s_logits, ids, lq, _ = _topk_case(1)

    def impl(x):
        return topk_fkl_per_token(torch.log_softmax(x, -1).gather(-1, ids), lq).sum()

    def naive(x):
        lp = torch.log_softmax(x, -1)
        total = 0.0
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                for k in range(ids.shape[2]):
                    v = ids[b, t, k]
                    total = total + lq[b, t, k].exp() * (lq[b, t, k] - lp[b, t, v])
        return total

    assert impl(s_logits).item() == pytest.approx(naive(s_logits).item(), rel=1e-12)
    torch.autograd.gradcheck(impl, (s_logits,))
    g1 = torch.autograd.grad(impl(s_logits), s_logits)[0]
    g2 = torch.autograd.grad(naive(s_logits), s_logits)[0]
    torch.testing.assert_close(g1, g2)


def test_tropd_loss_selects_pg_or_fkl():
    pg = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    fkl = torch.tensor([[10.0, 20.0, 30.0]], requires_grad=True)
    trust = torch.tensor([[True, False, True]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = tropd_loss(pg, fkl, trust, mask)
    assert loss.item() == pytest.approx((1.0 + 20.0) / 2)
    loss.backward()
    assert pg.grad.tolist() == [[0.5, 0.0, 0.0]] and fkl.grad.tolist() == [[0.0, 0.5, 0.0]]


def test_prefix_guidance_and_cosine_schedule():
    lp = torch.tensor([[-1.0, -3.0], [-2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    pmask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = prefix_guidance_loss(lp, pmask, beta=0.001)
    assert loss.item() == pytest.approx(0.001 * (2.0 + 2.0) / 2)
    torch.autograd.gradcheck(lambda x: prefix_guidance_loss(x, pmask, beta=0.5), (lp,))
    assert prefix_guidance_loss(lp, torch.zeros(2, 2)).item() == 0.0
    assert cosine_prefix_length(0, 100, 4096) == 4096
    assert cosine_prefix_length(50, 100, 4096) == 2048
    assert cosine_prefix_length(100, 100, 4096) == 0
    assert cosine_prefix_length(150, 100, 4096) == 0
    assert cosine_prefix_length(25, 100, 1000) == math.floor(1000 * (1 + math.cos(math.pi / 4)) / 2)
    lengths = [cosine_prefix_length(s, 10, 100) for s in range(11)]
    assert lengths == sorted(lengths, reverse=True)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_prefix_length(0, 0, 10)


def test_clip_and_mask_outlier_baselines():
    t = torch.tensor([[-10.0, -1.0, 0.0]])
    s = torch.tensor([[-1.0, -1.0, -2.0]])
    assert reopold_clip_advantage(t, s, tau=-3.0).tolist() == [[-3.0, 0.0, 2.0]]
    assert mask_outlier_advantage(t, s, tau=-3.0).tolist() == [[0.0, 0.0, 2.0]]


def test_entropy_top_mask():
    ent = torch.tensor([[0.1, 0.9, 0.5, 5.0], [0.8, 0.2, 0.3, 0.4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    top = entropy_top_mask(ent, mask, frac=0.2)  # 7 tokens -> ceil(1.4) = 2: 0.9 and 0.8, not the padded 5.0
    assert top.tolist() == [[False, True, False, False], [True, False, False, False]]
    with pytest.raises(ValueError, match="frac"):
        entropy_top_mask(ent, mask, frac=0.0)


def test_jsd_topk_matches_naive_and_gradcheck():
    s_logits, ids, lq, _ = _topk_case(2)
    beta = 0.3

    def impl(x):
        return jsd_topk_per_token(torch.log_softmax(x, -1).gather(-1, ids), lq, beta=beta).sum()

    def naive(x):
        p = torch.softmax(x, -1).gather(-1, ids)
        q = lq.exp()
        m = beta * q + (1 - beta) * p
        return (beta * q * torch.log(q / m)).sum()

    assert impl(s_logits).item() == pytest.approx(naive(s_logits).item(), rel=1e-12)
    torch.autograd.gradcheck(impl, (s_logits,))
    torch.testing.assert_close(torch.autograd.grad(impl(s_logits), s_logits)[0],
                               torch.autograd.grad(naive(s_logits), s_logits)[0])
    # zero when the student equals the teacher on K (m = q)
    assert jsd_topk_per_token(lq, lq, beta=beta).abs().max().item() < 1e-12


def test_jsd_k1_advantage():
    u = torch.tensor([[-1.0, -3.0]], dtype=torch.float64)
    s = torch.tensor([[-2.0, -0.5]], dtype=torch.float64)
    beta = 0.25
    m = beta * u.exp() + (1 - beta) * s.exp()
    expected = -(1 - beta) * (s - m.log())
    torch.testing.assert_close(jsd_k1_advantage(u, s, beta=beta), expected)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_full_matches_trl(beta):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer  # trl 1.16 location

    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 17, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 17, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.where(mask.bool(), torch.zeros_like(mask), torch.full_like(mask, -100))
    ours = generalized_jsd_full(s, t, mask, beta=beta, temperature=0.7)
    ref = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=0.7)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(ref, s)[0])


def test_teacher_weights_and_combination():
    w = teacher_weights(["math", "code", "math"], {"math": {"tm": 0.75, "tc": 0.25}, "code": {"tc": 1.0}},
                        ["tm", "tc"])
    assert w.tolist() == [[0.75, 0.25], [0.0, 1.0], [0.75, 0.25]]
    onehot = teacher_weights(["code"], routing_weights({"code": "tc"}), ["tm", "tc"])
    assert onehot.tolist() == [[0.0, 1.0]]
    u = torch.tensor([[[-1.0, -2.0]], [[-3.0, float("nan")]]], dtype=torch.float64)  # (M=2, B=1, T=2)
    combined = combine_teacher_logprobs(u, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    assert combined.tolist() == [[-1.0, -2.0]]  # NaN of the unqueried teacher ignored
    mix = combine_teacher_logprobs(u[:, :, :1], torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    assert mix.item() == pytest.approx(0.25 * -1 + 0.75 * -3)
    with pytest.raises(ValueError, match="must sum to 1"):
        teacher_weights(["math"], {"math": {"tm": 0.5}}, ["tm"])
    with pytest.raises(ValueError, match="unknown teacher"):
        teacher_weights(["math"], {"math": {"tx": 1.0}}, ["tm"])
    with pytest.raises(ValueError, match="domain 'sci' has no teacher weights"):
        teacher_weights(["sci"], {"math": {"tm": 1.0}}, ["tm"])


def test_copd_advantage_and_pairs():
    a = copd_advantage(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]], requires_grad=True), beta=0.5)
    assert a.tolist() == [[0.25, -0.5]] and not a.requires_grad
    assert copd_exchange_pairs(["math", "code"]) == [("math", "code"), ("code", "math")]
    pairs = copd_exchange_pairs(["hub", "a", "b"], hub="hub")
    assert sorted(pairs) == sorted([("hub", "a"), ("hub", "b"), ("a", "hub"), ("b", "hub")])
    with pytest.raises(ValueError, match="hub"):
        copd_exchange_pairs(["x", "y", "z"])
