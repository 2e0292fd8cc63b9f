"""Chunked log-prob / entropy / top-k loss path vs full-logits references (values and gradients)."""

import pytest
import torch

from mopd.logits import (
    chunked_gather_logprobs,
    chunked_token_logprobs,
    chunked_topk_distill_loss,
    chunked_topk_loss,
    token_weights,
)
from mopd.objectives import masked_average, topk_distill_loss, topk_fkl_per_token


def _inputs(seed=0, N=11, H=6, V=23, K=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=dtype, requires_grad=True)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    tlp = torch.log_softmax(torch.randn(N, V, generator=g, dtype=dtype), -1).gather(-1, ids)
    return h, w, ids, tlp


@pytest.mark.parametrize("chunk,temperature", [(3, 1.0), (4, 0.7), (100, 1.3)])
def test_token_logprobs_and_entropy_match_full(chunk, temperature):
    h, w, ids, _ = _inputs(1)
    target = ids[:, 0]
    lp, ent = chunked_token_logprobs(h, w, target, chunk=chunk, temperature=temperature)
    full = torch.log_softmax(h @ w.T / temperature, -1)
    lp_ref = full.gather(-1, target[:, None])[:, 0]
    ent_ref = -(full.exp() * full).sum(-1)
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(ent, ent_ref)
    c1, c2 = torch.randn(11, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    grads = torch.autograd.grad((c1 * lp).sum() + (c2 * ent).sum(), (h, w))
    grads_ref = torch.autograd.grad((c1 * lp_ref).sum() + (c2 * ent_ref).sum(), (h, w))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_gradcheck_chunked_functions():
    h, w, ids, tlp = _inputs(2, N=5, H=3, V=7, K=3)
    torch.autograd.gradcheck(lambda a, b: chunked_gather_logprobs(a, b, ids, chunk=2, temperature=0.9), (h, w))
    torch.autograd.gradcheck(lambda a, b: chunked_token_logprobs(a, b, ids[:, 0], chunk=2), (h, w))
    weights = torch.rand(5, dtype=torch.float64)
    torch.autograd.gradcheck(lambda a, b: chunked_topk_distill_loss(a, b, ids, tlp, weights, chunk=2), (h, w))


def test_gather_only_grad_of_logprobs_when_entropy_unused():
    h, w, ids, _ = _inputs(3)
    lp = chunked_gather_logprobs(h, w, ids, chunk=4)
    lp_ref = torch.log_softmax(h @ w.T, -1).gather(-1, ids)
    torch.testing.assert_close(lp, lp_ref)
    c = torch.randn_like(lp)
    for a, b in zip(torch.autograd.grad((c * lp).sum(), (h, w)), torch.autograd.grad((c * lp_ref).sum(), (h, w))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("token_mean", [False, True])
def test_chunked_topk_distill_loss_matches_topk_distill_loss(token_mean):
    g = torch.Generator().manual_seed(4)
    B, T, H, V, K = 3, 5, 6, 29, 4
    h_BTH = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    tlp_all = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    tlp, ids = tlp_all.topk(K, -1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    ref = topk_distill_loss(h_BTH @ w.T, ids, tlp, mask, token_mean=token_mean)
    sel = mask.bool()
    weights = token_weights(mask, token_mean=token_mean)[sel]
    loss = chunked_topk_distill_loss(h_BTH[sel], w, ids[sel], tlp[sel], weights, chunk=3)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    (2.5 * loss).backward()
    g_h, g_w = h_BTH.grad.clone(), w.grad.clone()
    h_BTH.grad, w.grad = None, None
    (2.5 * ref).backward()
    torch.testing.assert_close(g_h, h_BTH.grad)
    torch.testing.assert_close(g_w, w.grad)


def test_generic_fused_loss_with_fkl_and_float32():
    h, w, ids, tlp = _inputs(5, dtype=torch.float32)
    weights = torch.full((11,), 1 / 11)
    loss = chunked_topk_loss(h, w, ids, tlp, weights, topk_fkl_per_token, chunk=4)
    lp_ref = torch.log_softmax(h @ w.T, -1).gather(-1, ids)
    ref = (weights * topk_fkl_per_token(lp_ref, tlp)).sum()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    gl = torch.autograd.grad(loss, (h, w))
    gr = torch.autograd.grad(ref, (h, w))
    for a, b in zip(gl, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_weights_only_grad_and_no_grad_paths():
    h, w, ids, tlp = _inputs(6)
    h_const = h.detach()
    loss = chunked_topk_distill_loss(h_const, w, ids, tlp, torch.ones(11, dtype=torch.float64), chunk=5)
    (gw,) = torch.autograd.grad(loss, w)
    ref = topk_distill_loss((h_const @ w.T)[None], ids[None], tlp[None], torch.ones(1, 11), token_mean=True) * 11
    torch.testing.assert_close(gw, torch.autograd.grad(ref, w)[0])
    with torch.no_grad():
        val = chunked_topk_distill_loss(h, w, ids, tlp, torch.ones(11, dtype=torch.float64))
    assert val.item() == pytest.approx(ref.item(), rel=1e-12)


def test_token_weights_reproduce_masked_average():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    L = torch.randn(3, 3, dtype=torch.float64)
    for tm in (False, True):
        w = token_weights(mask, token_mean=tm)
        assert (w * L).sum().item() == pytest.approx(masked_average(L, mask, token_mean=tm).item(), rel=1e-12)


def test_chunked_errors():
    h, w, ids, tlp = _inputs(7)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 23\)"):
        chunked_gather_logprobs(h, w, ids + 23)
    with pytest.raises(ValueError, match="must share H"):
        chunked_gather_logprobs(h, w[:, :3], ids)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_gather_logprobs(h, w, ids, chunk=0)
    with pytest.raises(ValueError, match="target_N must be 1-D"):
        chunked_token_logprobs(h, w, ids)


def test_bfloat16_inputs_compute_in_float32():
    h, w, ids, tlp = _inputs(8, N=9, H=8, V=31, dtype=torch.float32)
    hb, wb = h.detach().bfloat16().requires_grad_(True), w.detach().bfloat16().requires_grad_(True)
    lp, ent = chunked_token_logprobs(hb, wb, ids[:, 0], chunk=4)
    assert lp.dtype == torch.float32
    full = torch.log_softmax(hb.float() @ wb.float().T, -1)
    torch.testing.assert_close(lp, full.gather(-1, ids[:, :1])[:, 0], rtol=1e-2, atol=1e-2)
    loss = chunked_topk_distill_loss(hb, wb, ids, tlp, torch.full((9,), 1 / 9), chunk=4)
    loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    h32, w32 = hb.detach().float().requires_grad_(True), wb.detach().float().requires_grad_(True)
    ref = chunked_topk_distill_loss(h32, w32, ids, tlp, torch.full((9,), 1 / 9), chunk=4)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    torch.testing.assert_close(hb.grad.float(), h32.grad, rtol=2e-2, atol=2e-3)
