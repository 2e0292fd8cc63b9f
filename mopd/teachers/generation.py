"""Sampled generation for the embedded teacher server's ``/v1/completions`` with ``max_tokens``
tokens to generate (TrOPD's teacher prefixes over HTTP, ALGORITHMS §5), with vLLM's sampling
semantics for the fields it honours:

- ``temperature`` (0: greedy), ``top_p`` (1: off), ``top_k`` (0 or -1: off), ``seed`` (a request
  with a seed gives the same tokens every time, whatever else the server is doing: each request
  samples from its own ``torch.Generator``), ``n`` completions per prompt;
- stopping: the model's EOS (unless ``ignore_eos``), ``stop_token_ids`` (``stop_reason`` is the
  id), ``min_tokens`` (EOS and the stop ids are masked before that many tokens, as vLLM does);
  ``stop`` strings are applied by the server on the decoded text;
- ``logprobs`` of the generated tokens are the model's raw log-softmax (vLLM's default
  ``raw_logprobs``: before temperature and top-k/top-p), the sampled token's and the top-k.

A hand-written loop over the KV cache rather than ``model.generate``: the per-request generator
and the raw log-probs are then exact and no global RNG state is touched (the server runs several
requests in worker threads).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_tokens: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    eos_id: int | None = None  # None: never stops on EOS (ignore_eos)
    logprobs: int | None = None  # top-k of each generated position; None: none at all


@dataclass
class Generated:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop id) or "length"
    stop_reason: int | None  # the stop token id that ended it (None for EOS or length)
    logprobs: list[float] | None  # raw log-prob of each generated token
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None


def _filter(logits_BV: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """Temperature, then top-k, then top-p (vLLM's order); removed tokens get -inf."""
    x = logits_BV / spec.temperature
    V = x.shape[-1]
    if 0 < spec.top_k < V:
        kth = x.topk(spec.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if spec.top_p < 1.0:
        srt, idx = x.sort(dim=-1, descending=True)
        probs = srt.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token)
        drop = probs.cumsum(-1) - probs >= spec.top_p
        x = x.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    return x


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention mask)``, both ``(len(prompts), longest)`` int64, prompts left-padded."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        p = list(p)
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[r, width - len(p):] = 1
    return ids, attn


def _next_tokens(raw_BV: torch.Tensor, spec: SamplingSpec, mask_stops: bool, stop_t: torch.Tensor,
                 gen: torch.Generator) -> torch.Tensor:
    """One step's tokens ``(B,)`` from the raw logits: the stop ids masked while ``mask_stops``
    (before ``min_tokens``), then greedy at temperature 0, else one draw from ``gen``."""
    x = raw_BV.clone()
    if mask_stops and len(stop_t):
        x[:, stop_t] = float("-inf")
    if spec.temperature == 0:
        return x.argmax(-1)
    probs = _filter(x, spec).softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], n: int, spec: SamplingSpec, *,
             pad_id: int = 0, batch_size: int = 64) -> list[list[Generated]]:
    """``n`` completions of each prompt (``out[i][j]``: prompt i's j-th), at most
    ``spec.max_tokens`` tokens each. Rows are left-padded in micro-batches of ``batch_size``."""
    if spec.max_tokens < 1 or n < 1:
        raise ValueError(f"need max_tokens >= 1 and n >= 1, got {spec.max_tokens}, {n}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(spec.seed if spec.seed is not None else secrets.randbits(62))
    dev = next(model.parameters()).device
    rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
    out: list[list[Generated | None]] = [[None] * n for _ in prompts]
    stops = set(spec.stop_token_ids) | ({spec.eos_id} if spec.eos_id is not None else set())
    stop_t = torch.tensor(sorted(stops), dtype=torch.long)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        B = len(chunk)
        ids, attn = _left_pad([prompts[i] for i, _ in chunk], pad_id)
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        toks: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        tids: list[list[list[int]]] = [[] for _ in range(B)]
        tlps: list[list[list[float]]] = [[] for _ in range(B)]
        reason: list[tuple[str, int | None] | None] = [None] * B
        past, step_ids, step_pos = None, ids, pos
        for t in range(spec.max_tokens):
            o = model(input_ids=step_ids.to(dev), attention_mask=attn.to(dev),
                      position_ids=step_pos.to(dev), past_key_values=past, use_cache=True)
            past = o.past_key_values
            raw = o.logits[:, -1].float().cpu()
            logp = raw.log_softmax(-1)
            nxt = _next_tokens(raw, spec, t < spec.min_tokens, stop_t, gen)
            if spec.logprobs is not None:
                k = min(spec.logprobs, logp.shape[-1])
                top_lp, top_id = logp.topk(k, dim=-1) if k else (logp[:, :0], nxt[:, None][:, :0])
            chosen = logp.gather(-1, nxt[:, None]).squeeze(-1)
            for r in range(B):
                if reason[r] is not None:
                    continue
                tok = int(nxt[r])
                toks[r].append(tok)
                if spec.logprobs is not None:
                    lps[r].append(float(chosen[r]))
                    tids[r].append(top_id[r].tolist())
                    tlps[r].append(top_lp[r].tolist())
                if tok in stops:
                    reason[r] = ("stop", None if tok == spec.eos_id else tok)
            if all(why is not None for why in reason):
                break
            step_ids = torch.where(torch.tensor([reason[r] is None for r in range(B)]), nxt,
                                   torch.full_like(nxt, pad_id))[:, None]
            attn = torch.cat([attn, torch.ones((B, 1), dtype=torch.long)], dim=1)
            step_pos = step_pos[:, -1:] + 1
        for r, (i, j) in enumerate(chunk):
            fin, why = reason[r] or ("length", None)
            want = spec.logprobs is not None
            out[i][j] = Generated(toks[r], fin, why, lps[r] if want else None,
                                  tids[r] if want else None, tlps[r] if want else None)
    return out  # type: ignore[return-value]
