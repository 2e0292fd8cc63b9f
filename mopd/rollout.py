"""Student rollouts and per-token scoring with a transformers model (the default backend).

Sampling is plain ancestral sampling at a temperature (top-k and top-p disabled: transformers
defaults to top_k=50, which would make the sampled policy differ from the model whose log-probs
we compute). `pack` lays prompt + completion out right-padded for scoring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sample:
    prompt_index: int  # which prompt (of the batch given to `sample`) this completes
    prompt_ids: list[int]
    completion_ids: list[int]  # generated tokens, up to and including EOS when one was produced
    text: str  # decoded completion, without special tokens


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, n: int, max_new_tokens: int,
           temperature: float, seed: int, batch_size: int = 64) -> list[Sample]:
    """``n`` sampled completions per prompt (grouped: prompt i's samples are contiguous)."""
    if n < 1 or max_new_tokens < 1 or temperature <= 0:
        raise ValueError(f"need n>=1, max_new_tokens>=1, temperature>0; got {n}, {max_new_tokens}, {temperature}")
    expanded = [i for i in range(len(prompts)) for _ in range(n)]
    out: list[Sample] = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(expanded), batch_size):
            idx = expanded[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=False).to(model.device)
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0,
                                 top_p=1.0, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            width = enc["input_ids"].shape[1]
            for row, i in enumerate(idx):
                prompt = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
                comp = _trim(gen[row, width:].tolist(), tokenizer.eos_token_id, tokenizer.pad_token_id)
                out.append(Sample(i, prompt, comp, tokenizer.decode(comp, skip_special_tokens=True)))
    model.train(was_training)
    return out


def _trim(ids: list[int], eos: int, pad: int) -> list[int]:
    """Cut after the first EOS (kept: the model is trained to stop); drop trailing padding."""
    for j, t in enumerate(ids):
        if t == eos:
            return ids[: j + 1]
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    return ids


def pack(samples: list[Sample], pad_id: int, device=None):
    """Right-padded ``input_ids_BT``, ``attention_mask_BT`` and ``completion_mask_BT`` (1 where
    the token at t is a completion token; its log-prob comes from position t-1)."""
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    T = max(lengths)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), T), dtype=torch.long)
    comp = torch.zeros((len(samples), T), dtype=torch.float32)
    for b, s in enumerate(samples):
        seq = s.prompt_ids + s.completion_ids
        ids[b, : len(seq)] = torch.tensor(seq)
        attn[b, : len(seq)] = 1
        comp[b, len(s.prompt_ids): len(seq)] = 1.0
    return ids.to(device), attn.to(device), comp.to(device)
