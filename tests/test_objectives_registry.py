"""Objective registry: selection by name, field checks, and each entry vs a naive float64 reference."""

import math

import pytest
import torch

from mopd.objectives import OBJECTIVES, DistillBatch, get_objective, register_objective, required_fields
from mopd.opd.methods import unregister_method


def _batch(seed=0, B=3, T=5, V=13, K=4, prefix=False):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    t_lp = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2, -1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([T, 3, 1])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    s_lp_all = torch.log_softmax(s_logits, -1)
    lq, ids = t_lp.topk(K, -1)
    ent = -(s_lp_all.exp() * s_lp_all).sum(-1)
    kw = {}
    if prefix:
        kw = {"prefix_student_logprobs_BT": s_lp_all[..., 0], "prefix_mask_BT": mask}
    batch = DistillBatch(
        mask_BT=mask,
        student_logprobs_BT=s_lp_all.gather(-1, tokens[..., None])[..., 0],
        teacher_logprobs_BT=t_lp.gather(-1, tokens[..., None])[..., 0],
        teacher_topk_ids_BTK=ids,
        teacher_topk_logprobs_BTK=lq,
        student_topk_logprobs_BTK=s_lp_all.gather(-1, ids),
        student_entropy_BT=ent.detach(),
        **kw,
    )
    return batch, s_logits


def _seq_mean(per_tok, mask):
    vals = []
    for b in range(mask.shape[0]):
        toks = [per_tok[b][t] for t in range(mask.shape[1]) if mask[b, t]]
        if toks:
            vals.append(sum(toks) / len(toks))
    return sum(vals) / len(vals)


def _naive(name, batch, **p):
    """Per-token naive float64 formulas (on-policy: ratio 1, so PG_t = -A_t * s_t in value-with-grad form)."""
    s, u, m = batch.student_logprobs_BT, batch.teacher_logprobs_BT, batch.mask_BT
    B, T = m.shape
    per = [[None] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            ratio = torch.exp(s[b, t] - s[b, t].detach())  # = 1 with the score-function gradient
            a = float(u[b, t] - s.detach()[b, t])
            lp_k, lq_k = batch.student_topk_logprobs_BTK[b, t], batch.teacher_topk_logprobs_BTK[b, t]
            if name == "mopd_pg":
                per[b][t] = -max(-5.0, min(5.0, a)) * ratio
            elif name == "clip_outlier":
                per[b][t] = -max(a, p["tau"]) * ratio
            elif name == "mask_outlier":
                per[b][t] = -(a if a > p["tau"] else 0.0) * ratio
            elif name == "mopd_topk":
                per[b][t] = sum(lp_k[k].exp() * (lp_k[k] - lq_k[k]) - lp_k[k].exp() + lq_k[k].exp()
                                for k in range(len(lq_k)))
            elif name == "topk_fkl":
                per[b][t] = sum(lq_k[k].exp() * (lq_k[k] - lp_k[k]) for k in range(len(lq_k)))
            elif name == "jsd":
                beta = p["beta"]
                direct = sum(beta * lq_k[k].exp() * (lq_k[k] - torch.log(beta * lq_k[k].exp() + (1 - beta) * lp_k[k].exp()))
                             for k in range(len(lq_k)))
                mix = math.log(beta * math.exp(float(u[b, t])) + (1 - beta) * math.exp(float(s.detach()[b, t])))
                per[b][t] = direct + (1 - beta) * (float(s.detach()[b, t]) - mix) * ratio
    return _seq_mean(per, m)


@pytest.mark.parametrize("name,params", [
    ("mopd_pg", {}), ("clip_outlier", {"tau": -1.0}), ("mask_outlier", {"tau": -1.0}),
    ("mopd_topk", {}), ("topk_fkl", {}), ("jsd", {"beta": 0.3}),
])
def test_objective_matches_naive_value_and_gradient(name, params):
    batch, s_logits = _batch(1)
    loss, metrics = get_objective(name)(batch, **params)
    ref = _naive(name, batch, **params)
    assert loss.item() == pytest.approx(float(ref.detach()), rel=1e-10, abs=1e-12)
    assert metrics["loss"] == pytest.approx(loss.item())
    g_impl = torch.autograd.grad(loss, s_logits, retain_graph=True)[0]
    g_ref = torch.autograd.grad(ref, s_logits)[0]
    torch.testing.assert_close(g_impl, g_ref)


def test_tropd_objective_combines_trust_pg_fkl_and_prefix():
    batch, s_logits = _batch(2, prefix=True)
    gen = torch.Generator().manual_seed(9)
    loss, metrics = get_objective("tropd")(batch, generator=gen, prefix_beta=0.1)
    trust = torch.bernoulli(torch.exp((batch.teacher_logprobs_BT - batch.student_logprobs_BT).detach().clamp(max=0)),
                            generator=torch.Generator().manual_seed(9)).bool()
    s, u, m = batch.student_logprobs_BT, batch.teacher_logprobs_BT, batch.mask_BT
    per = [[None] * m.shape[1] for _ in range(m.shape[0])]
    for b in range(m.shape[0]):
        for t in range(m.shape[1]):
            if trust[b, t]:
                per[b][t] = -float(u[b, t] - s.detach()[b, t]) * torch.exp(s[b, t] - s[b, t].detach())
            else:
                lp_k, lq_k = batch.student_topk_logprobs_BTK[b, t], batch.teacher_topk_logprobs_BTK[b, t]
                per[b][t] = (lq_k.exp() * (lq_k - lp_k)).sum()
    guide = 0.1 * _seq_mean([[-x for x in row] for row in batch.prefix_student_logprobs_BT], m)
    ref = _seq_mean(per, m) + guide
    assert loss.item() == pytest.approx(float(ref.detach()), rel=1e-10)
    assert metrics["trust_fraction"] == pytest.approx(float(trust[m.bool()].double().mean()))
    assert metrics["prefix_loss"] == pytest.approx(float(guide.detach()))
    torch.testing.assert_close(torch.autograd.grad(loss, s_logits, retain_graph=True)[0],
                               torch.autograd.grad(ref, s_logits)[0])


def test_entropy_opd_uses_only_high_entropy_tokens():
    batch, s_logits = _batch(3)
    loss, _ = get_objective("entropy_opd")(batch, frac=0.2)
    m = batch.mask_BT.bool()
    n_keep = math.ceil(0.2 * int(m.sum()))
    ent = torch.where(m, batch.student_entropy_BT, torch.full_like(batch.student_entropy_BT, -1e9))
    sel = torch.zeros_like(m).flatten()
    sel[ent.flatten().topk(n_keep).indices] = True
    sel = sel.view_as(m)
    adv = (batch.teacher_logprobs_BT - batch.student_logprobs_BT).detach()
    per = [[-float(adv[b, t]) * torch.exp(batch.student_logprobs_BT[b, t] - batch.student_logprobs_BT[b, t].detach())
            for t in range(m.shape[1])] for b in range(m.shape[0])]
    ref = _seq_mean(per, sel)
    assert loss.item() == pytest.approx(float(ref.detach()), rel=1e-10)


def test_mopd_pg_uses_given_advantages():
    batch, _ = _batch(4)
    adv = torch.full_like(batch.mask_BT, 2.0)
    b2 = DistillBatch(mask_BT=batch.mask_BT, student_logprobs_BT=batch.student_logprobs_BT, advantages_BT=adv)
    loss, metrics = get_objective("mopd_pg")(b2, token_mean=True)
    assert loss.item() == pytest.approx(-2.0) and metrics["advantage_mean"] == pytest.approx(2.0)


def test_registry_errors_and_extension():
    with pytest.raises(ValueError, match=r"unknown objective 'nope'; valid names: \['clip_outlier', 'entropy_opd'"):
        get_objective("nope")
    batch, _ = _batch(5)
    bare = DistillBatch(mask_BT=batch.mask_BT, student_logprobs_BT=batch.student_logprobs_BT)
    with pytest.raises(ValueError, match=r"'tropd' needs DistillBatch field\(s\) \['teacher_logprobs_BT', "
                                         r"'student_topk_logprobs_BTK', 'teacher_topk_logprobs_BTK'\]"):
        get_objective("tropd")(bare)
    with pytest.raises(ValueError, match=r"'mopd_pg' needs DistillBatch field\(s\) \['teacher_logprobs_BT'\]"):
        get_objective("mopd_pg")(bare)
    assert required_fields("entropy_opd") == ("student_logprobs_BT", "teacher_logprobs_BT", "student_entropy_BT",
                                              "mask_BT")
    assert {"mopd_pg", "mopd_topk", "tropd", "clip_outlier", "mask_outlier", "entropy_opd", "jsd",
            "topk_fkl"} <= set(OBJECTIVES)
    with pytest.raises(ValueError, match="unknown DistillBatch field"):
        register_objective("bad", requires=("no_such_field",))

    @register_objective("test_only_sum", requires=("student_logprobs_BT",))
    def _sum(b, *, scale=1.0):
        loss = scale * b.student_logprobs_BT.sum()
        return loss, {"loss": float(loss.detach())}

    try:
        loss, _ = get_objective("test_only_sum")(batch, scale=2.0)
        assert loss.item() == pytest.approx(2.0 * batch.student_logprobs_BT.sum().item())
        with pytest.raises(ValueError, match="already registered"):
            register_objective("test_only_sum", requires=())(_sum)
    finally:
        unregister_method("test_only_sum")
    assert "test_only_sum" not in OBJECTIVES
