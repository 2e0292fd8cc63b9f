"""Memory-lean log-prob, entropy and top-k computations from hidden states (the chunked path).

Computing ``logits = hidden @ weight.T`` for N tokens over a vocabulary V materialises an N×V
float32 tensor (4096 × 151,936 × 4 B = 2.5 GB) and autograd keeps several of them. Here tokens are
processed ``chunk`` at a time and each chunk's logits are recomputed rather than stored (the idea
of fused linear cross-entropy, as in Liger-Kernel), so only about two chunk×V blocks live at a time.
Everything is differentiable in ``hidden_NH`` and ``weight_VH`` (first order only; no double backward).

Two mechanisms:
* ``chunked_gather_logprobs`` / ``chunked_token_logprobs`` return per-token tensors; their backward
  loops over the chunks again (one extra matmul for the recompute).
* ``chunked_topk_loss`` returns a scalar ``Σ_n w_n · loss_fn(logprobs_nK, extra_nK)``; as in fused
  linear cross-entropy it computes the input gradients during the forward pass (the scalar's
  upstream gradient only scales them), so it costs the same three matmuls as the naive path.
Logits are computed in float32 at least (float64 inputs stay float64, e.g. for gradcheck).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mopd.objectives.opd import topk_distill_per_token

__all__ = [
    "chunked_gather_logprobs",
    "chunked_token_logprobs",
    "chunked_topk_loss",
    "chunked_topk_distill_loss",
    "token_weights",
]


def _check(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, ids_NK: torch.Tensor, chunk: int,
           temperature: float) -> None:
    if hidden_NH.dim() != 2 or weight_VH.dim() != 2 or hidden_NH.shape[1] != weight_VH.shape[1]:
        raise ValueError(f"hidden_NH (N, H) and weight_VH (V, H) must share H, got {tuple(hidden_NH.shape)} "
                         f"and {tuple(weight_VH.shape)}")
    if ids_NK.dim() != 2 or ids_NK.shape[0] != hidden_NH.shape[0]:
        raise ValueError(f"ids must be (N, K) with N = {hidden_NH.shape[0]}, got {tuple(ids_NK.shape)}")
    if ids_NK.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token ids must be int64 or int32, got {ids_NK.dtype}")
    V = weight_VH.shape[0]
    if ids_NK.numel() and (int(ids_NK.min()) < 0 or int(ids_NK.max()) >= V):
        raise ValueError(f"token ids must lie in [0, {V}), got range [{int(ids_NK.min())}, {int(ids_NK.max())}]")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _new_buffer(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, chunk: int) -> torch.Tensor:
    """One reusable (chunk, V) block: fresh allocations per chunk cost page faults on CPU."""
    return hidden_NH.new_empty(min(chunk, hidden_NH.shape[0]), weight_VH.shape[0], dtype=_compute_dtype(hidden_NH))


def _shifted_logits(h_cH: torch.Tensor, weight_VH: torch.Tensor, temperature: float,
                    buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z - max z (c, V) written into ``buf``, row max (c,)) for ``z = h Wᵀ / τ``."""
    c = h_cH.shape[0]
    if h_cH.dtype == buf.dtype and weight_VH.dtype == buf.dtype:
        z_cV = torch.mm(h_cH, weight_VH.T, out=buf[:c])
    else:  # e.g. bf16 weights: float32 logits need a cast, hence a temporary
        z_cV = buf[:c].copy_(h_cH @ weight_VH.T)
    if temperature != 1.0:
        z_cV.div_(temperature)
    mx_c = z_cV.amax(dim=-1)
    return z_cV.sub_(mx_c[:, None]), mx_c


def _rowdot(a_cV: torch.Tensor, b_cV: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product without a (c, V) temporary."""
    return (a_cV[:, None, :] @ b_cV[:, :, None])[:, 0, 0]


def _backprop_chunk(grad_z_cV: torch.Tensor, h_cH: torch.Tensor, weight_VH: torch.Tensor, temperature: float,
                    grad_h_NH: torch.Tensor | None, grad_w_VH: torch.Tensor | None, sl: slice) -> None:
    """Chain rule through ``z = h Wᵀ / τ`` for one chunk: dh = dz W / τ, dW += dzᵀ h / τ."""
    if temperature != 1.0:
        grad_z_cV.div_(temperature)
    g_cV = grad_z_cV.to(weight_VH.dtype)
    if grad_h_NH is not None:
        if grad_h_NH.dtype == g_cV.dtype:
            torch.mm(g_cV, weight_VH, out=grad_h_NH[sl])
        else:
            grad_h_NH[sl].copy_(g_cV @ weight_VH)
    if grad_w_VH is not None:
        grad_w_VH.addmm_(g_cV.T, h_cH.to(weight_VH.dtype))


def _grad_buffers(ctx, hidden_NH, weight_VH):
    gh = torch.zeros_like(hidden_NH) if ctx.needs_input_grad[0] else None
    gw = torch.zeros_like(weight_VH) if ctx.needs_input_grad[1] else None
    return gh, gw


class _ChunkedLogprobs(torch.autograd.Function):
    """(hidden, weight, ids) -> (log p at ids (N, K), entropy (N,)); backward recomputes per chunk."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, ids_NK, chunk, temperature):
        N, K = ids_NK.shape
        cdt = _compute_dtype(hidden_NH)
        logp_NK = hidden_NH.new_empty(N, K, dtype=cdt)
        ent_N = hidden_NH.new_empty(N, dtype=cdt)
        logs_N = hidden_NH.new_empty(N, dtype=cdt)  # log Σ exp(z - max): the shifted log-normaliser
        zbuf, ebuf = _new_buffer(hidden_NH, weight_VH, chunk), _new_buffer(hidden_NH, weight_VH, chunk)
        for start in range(0, N, chunk):
            sl = slice(start, start + chunk)
            zs_cV, _ = _shifted_logits(hidden_NH[sl], weight_VH, temperature, zbuf)
            e_cV = torch.exp(zs_cV, out=ebuf[: zs_cV.shape[0]])
            s_c = e_cV.sum(-1)
            logs_N[sl] = s_c.log()
            logp_NK[sl] = zs_cV.gather(-1, ids_NK[sl]) - logs_N[sl, None]
            ent_N[sl] = logs_N[sl] - _rowdot(e_cV, zs_cV) / s_c  # H = log s - Σ p (z - max)
        ctx.save_for_backward(hidden_NH, weight_VH, ids_NK, logs_N, ent_N)
        ctx.chunk, ctx.temperature = chunk, temperature
        return logp_NK, ent_N

    @staticmethod
    def backward(ctx, grad_logp_NK, grad_ent_N):
        hidden_NH, weight_VH, ids_NK, logs_N, ent_N = ctx.saved_tensors
        grad_h_NH, grad_w_VH = _grad_buffers(ctx, hidden_NH, weight_VH)
        if grad_logp_NK is None:
            grad_logp_NK = torch.zeros_like(ids_NK, dtype=logs_N.dtype)
        gsum_N = grad_logp_NK.sum(-1)
        zbuf, pbuf = _new_buffer(hidden_NH, weight_VH, ctx.chunk), _new_buffer(hidden_NH, weight_VH, ctx.chunk)
        for start in range(0, hidden_NH.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            h_cH = hidden_NH[sl]
            zs_cV, _ = _shifted_logits(h_cH, weight_VH, ctx.temperature, zbuf)
            logp_cV = zs_cV.sub_(logs_N[sl, None])
            p_cV = torch.exp(logp_cV, out=pbuf[: logp_cV.shape[0]])
            # d log p_k / dz = onehot_k - p ;  dH/dz = -p (log p + H); coef = gsum + g_ent (log p + H)
            if grad_ent_N is not None:
                coef_cV = logp_cV.add_(ent_N[sl, None]).mul_(grad_ent_N[sl, None]).add_(gsum_N[sl, None])
            else:
                coef_cV = logp_cV.zero_().add_(gsum_N[sl, None])
            grad_z_cV = coef_cV.mul_(p_cV).neg_()
            grad_z_cV.scatter_add_(-1, ids_NK[sl], grad_logp_NK[sl].to(grad_z_cV.dtype))
            _backprop_chunk(grad_z_cV, h_cH, weight_VH, ctx.temperature, grad_h_NH, grad_w_VH, sl)
        return grad_h_NH, grad_w_VH, None, None, None


def chunked_gather_logprobs(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, ids_NK: torch.Tensor, *,
                            chunk: int = 1024, temperature: float = 1.0) -> torch.Tensor:
    """Student log-probs ``log softmax(h Wᵀ / τ)`` at the given ids, chunked over tokens.

    Args:
        hidden_NH: final hidden states of N tokens (N, H), with grad.
        weight_VH: LM-head weight (V, H).
        ids_NK: token ids per position, e.g. the teacher's top-k (N, K), int64.
    Returns:
        logprobs_NK (float32, or float64 for float64 inputs).
    """
    _check(hidden_NH, weight_VH, ids_NK, chunk, temperature)
    logp_NK, _ = _ChunkedLogprobs.apply(hidden_NH, weight_VH, ids_NK.long(), int(chunk), float(temperature))
    return logp_NK


def chunked_token_logprobs(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, target_N: torch.Tensor, *,
                           chunk: int = 1024, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) (N,), entropy (N,)) of the student at each token, chunked; both differentiable."""
    if target_N.dim() != 1:
        raise ValueError(f"target_N must be 1-D (N,), got shape {tuple(target_N.shape)}")
    _check(hidden_NH, weight_VH, target_N[:, None], chunk, temperature)
    logp_N1, ent_N = _ChunkedLogprobs.apply(hidden_NH, weight_VH, target_N.long()[:, None], int(chunk),
                                            float(temperature))
    return logp_N1[:, 0], ent_N


class _ChunkedTopkLoss(torch.autograd.Function):
    """Scalar ``Σ_n w_n loss_fn(logp_nK, extra_nK)``; gradients computed eagerly in forward."""

    # why: 9 parameters: an autograd.Function's forward takes ctx plus exactly the inputs
    # chunked_topk_loss passes to .apply() (backward returns one gradient slot per input).
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, ids_NK, extra_NK, weights_N, loss_fn, chunk, temperature):
        grad_h_NH, grad_w_VH = _grad_buffers(ctx, hidden_NH, weight_VH)
        total = torch.zeros((), dtype=_compute_dtype(hidden_NH), device=hidden_NH.device)
        zbuf = _new_buffer(hidden_NH, weight_VH, chunk)  # the only (chunk, V) block
        for start in range(0, hidden_NH.shape[0], chunk):
            sl = slice(start, start + chunk)
            h_cH = hidden_NH[sl]
            zs_cV, _ = _shifted_logits(h_cH, weight_VH, temperature, zbuf)
            zs_cK = zs_cV.gather(-1, ids_NK[sl])  # before exp: keeps tiny log-probs finite
            p_cV = zs_cV.exp_()
            s_c = p_cV.sum(-1)
            leaf_cK = (zs_cK - s_c.log()[:, None]).requires_grad_(True)
            with torch.enable_grad():
                part = (weights_N[sl].to(leaf_cK.dtype) * loss_fn(leaf_cK, extra_NK[sl])).sum()
                (g_cK,) = torch.autograd.grad(part, leaf_cK)
            total += part.detach()
            if grad_h_NH is None and grad_w_VH is None:
                continue
            # d/dz Σ_k g_k log p_k = onehot-weighted g - p Σ_k g_k
            grad_z_cV = p_cV.mul_((-g_cK.sum(-1) / s_c)[:, None])
            grad_z_cV.scatter_add_(-1, ids_NK[sl], g_cK)
            _backprop_chunk(grad_z_cV, h_cH, weight_VH, temperature, grad_h_NH, grad_w_VH, sl)
        ctx.save_for_backward(*(g for g in (grad_h_NH, grad_w_VH) if g is not None))
        ctx.has = (grad_h_NH is not None, grad_w_VH is not None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        gh = saved.pop(0) * grad_out if ctx.has[0] else None
        gw = saved.pop(0) * grad_out if ctx.has[1] else None
        return gh, gw, None, None, None, None, None, None


def chunked_topk_loss(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    ids_NK: torch.Tensor,
    extra_NK: torch.Tensor,
    weights_N: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    chunk: int = 1024,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Fused scalar loss ``Σ_n w_n · loss_fn(log p_S(ids_n), extra_n)`` from hidden states.

    ``loss_fn(student_logprobs_cK, extra_cK) -> per_token_c`` is any differentiable function of the
    student's log-probs at ``ids`` (e.g. ``topk_distill_per_token`` with the teacher's log-probs as
    ``extra``); ``extra_NK`` and ``weights_N`` are constants (no gradient).
    """
    _check(hidden_NH, weight_VH, ids_NK, chunk, temperature)
    if extra_NK.shape[0] != ids_NK.shape[0] or weights_N.shape != (ids_NK.shape[0],):
        raise ValueError(f"extra_NK leading dim and weights_N must match N = {ids_NK.shape[0]}, got "
                         f"{tuple(extra_NK.shape)} and {tuple(weights_N.shape)}")
    return _ChunkedTopkLoss.apply(hidden_NH, weight_VH, ids_NK.long(), extra_NK.detach(), weights_N.detach(),
                                  loss_fn, int(chunk), float(temperature))


def chunked_topk_distill_loss(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, teacher_ids_NK: torch.Tensor,
                              teacher_logprobs_NK: torch.Tensor, weights_N: torch.Tensor, *, chunk: int = 1024,
                              temperature: float = 1.0) -> torch.Tensor:
    """§2 top-k distillation loss (MOPD 3.2.2) from hidden states, never materialising N×V logits.

    Equals ``topk_distill_loss`` on ``hidden @ weight.T`` when ``weights_N = token_weights(mask_BT)``
    restricted to the same tokens.
    """
    return chunked_topk_loss(hidden_NH, weight_VH, teacher_ids_NK, teacher_logprobs_NK, weights_N,
                             topk_distill_per_token, chunk=chunk, temperature=temperature)


def token_weights(mask_BT: torch.Tensor, *, token_mean: bool = False) -> torch.Tensor:
    """Per-token weights (B, T) with ``Σ w·L == masked_average(L, mask, token_mean=...)`` for any L.

    Select the response tokens with ``hidden_BTH[mask_BT.bool()]`` and ``weights[mask_BT.bool()]``.
    """
    if mask_BT.dim() != 2:
        raise ValueError(f"mask_BT must be (B, T), got {tuple(mask_BT.shape)}")
    m = mask_BT.to(torch.float64)
    if token_mean:
        return m / m.sum().clamp(min=1.0)
    count_B = m.sum(-1, keepdim=True)
    n_valid = (count_B > 0).sum().clamp(min=1)
    return m / count_B.clamp(min=1.0) / n_valid
