"""How close two policies are along one of them's own rollouts (ALGORITHMS §6, §8): CoPD's
between-branch monitor and the per-method distance to each domain's teacher.

``policy`` samples completions of the prompts; along those completions (the states ``policy``
visits) both models' full next-token distributions give, per completion token,
- the exact reverse KL ``KL(π_policy ‖ π_other)`` (what on-policy distillation minimises),
- the symmetric KL ``KL(a ‖ b) + KL(b ‖ a)`` (CoPD Figure 4b),
- the top-k overlap ``|TopK(a) ∩ TopK(b)| / k`` (CoPD Figure 4a, k = 10),
averaged over completion tokens. Full logits are taken ``batch`` sequences at a time.
"""

from __future__ import annotations

import torch

from mopd.chat import PromptFormat
from mopd.rollout import encode_prompts, pack, sample_ids


# why: 11 parameters: the two models, tokenizer, prompts and their format, then keyword-only knobs:
# sample_ids's sampling (n, max_new_tokens, temperature, seed) and the measurement's (k, batch);
# tasks/teacher_fit.py and tasks/copd_monitor.py call it with these names.
@torch.no_grad()
def divergence_along_rollouts(policy, other, tokenizer, prompts: list[str], *, fmt: PromptFormat, n: int = 1,
                              max_new_tokens: int,
                              temperature: float = 1.0, seed: int = 0, k: int = 10, batch: int = 16
                              ) -> dict[str, float]:
    """{"reverse_kl", "symmetric_kl", "topk_overlap", "tokens"} of ``other`` against ``policy``
    along ``n`` samples of ``policy`` per prompt (at ``temperature``, whose distributions are
    the ones compared)."""
    if not prompts:
        raise ValueError("divergence_along_rollouts needs at least one prompt")
    if policy.config.vocab_size != other.config.vocab_size:
        raise ValueError(f"the two models have different vocabularies ({policy.config.vocab_size} vs "
                         f"{other.config.vocab_size})")
    samples = sample_ids(policy, tokenizer, encode_prompts(tokenizer, prompts, fmt), n=n, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed)
    samples = [s for s in samples if s.completion_ids]
    sums = {"reverse_kl": 0.0, "symmetric_kl": 0.0, "topk_overlap": 0.0}
    tokens = 0
    was = policy.training, other.training
    policy.eval()
    other.eval()
    for lo in range(0, len(samples), batch):
        ids_BT, attn_BT, mask_BT = pack(samples[lo:lo + batch], tokenizer.pad_token_id, device=policy.device)
        # position t-1's distribution predicts token t: shift the mask left by one
        m = mask_BT[:, 1:].bool()
        la = torch.log_softmax(policy(input_ids=ids_BT, attention_mask=attn_BT).logits[:, :-1][m].double()
                               / temperature, -1)
        lb = torch.log_softmax(other(input_ids=ids_BT, attention_mask=attn_BT).logits[:, :-1][m].double()
                               / temperature, -1)
        pa, pb = la.exp(), lb.exp()
        sums["reverse_kl"] += float((pa * (la - lb)).sum())
        sums["symmetric_kl"] += float(((pa - pb) * (la - lb)).sum())
        ka, kb = la.topk(k, -1).indices, lb.topk(k, -1).indices
        sums["topk_overlap"] += float((ka[:, :, None] == kb[:, None, :]).any(-1).sum(-1).double().sum() / k)
        tokens += int(m.sum())
    policy.train(was[0])
    other.train(was[1])
    if tokens == 0:
        raise ValueError("the policy's rollouts have no completion token (every sample ended at once)")
    return {key: v / tokens for key, v in sums.items()} | {"tokens": float(tokens)}
