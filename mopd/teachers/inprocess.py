"""Teacher scoring with a transformers model in this process: the prefill pass both the
in-process backend and the embedded server (`mopd serve-teacher`) run."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from mopd.teachers.generation import SamplingSpec, generate
from mopd.teachers.base import SequenceScores, check_scores, validate_request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prefill:
    """One sequence of length L: for positions 1..L-1, the log-prob of the token there
    (``token_logprobs_N``, N = L-1), its 1-based rank in the vocabulary (``ranks_N``, when asked)
    and the top-k (``topk_ids_NK``, ``topk_logprobs_NK``, when k > 0)."""

    token_logprobs_N: torch.Tensor
    ranks_N: torch.Tensor | None
    topk_ids_NK: torch.Tensor | None
    topk_logprobs_NK: torch.Tensor | None


@torch.no_grad()
def prefill(model, seqs: Sequence[Sequence[int]], *, topk: int = 0, ranks: bool = False,
            pad_id: int = 0, max_batch_tokens: int = 16384, temperature: float = 1.0) -> list[Prefill]:
    """One teacher forward pass per micro-batch of right-padded sequences (each >= 1 token).

    Log-softmax in float32 of the logits at positions 0..L-2 (they predict tokens 1..L-1), as the
    trainer did before the client interface existed; micro-batches bound the B×T×V buffer.
    ``temperature``: log-softmax(logits / T), the distribution a sampler at T draws from."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out: list[Prefill | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths pad less
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(seqs[order[end]]) <= max_batch_tokens:
            end += 1
        idx = order[start:end]
        T = len(seqs[idx[-1]])
        ids_BT = torch.full((len(idx), T), pad_id, dtype=torch.long)
        attn_BT = torch.zeros((len(idx), T), dtype=torch.long)
        for b, i in enumerate(idx):
            ids_BT[b, : len(seqs[i])] = torch.as_tensor(list(seqs[i]), dtype=torch.long)
            attn_BT[b, : len(seqs[i])] = 1
        dev = next(model.parameters()).device
        logits = model(input_ids=ids_BT.to(dev), attention_mask=attn_BT.to(dev)).logits
        logits = logits[:, :-1].float()
        logp_BTV = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1).cpu()
        tok_BT = logp_BTV.gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
        rank_BT = (logp_BTV > tok_BT[..., None]).sum(-1) + 1 if ranks else None
        if topk:
            top_lp_BTK, top_ids_BTK = logp_BTV.topk(min(topk, logp_BTV.shape[-1]), dim=-1)
        for b, i in enumerate(idx):
            n = len(seqs[i]) - 1
            out[i] = Prefill(tok_BT[b, :n].clone(), rank_BT[b, :n].clone() if ranks else None,
                             top_ids_BTK[b, :n].clone() if topk else None,
                             top_lp_BTK[b, :n].clone() if topk else None)
        start = end
    return out  # type: ignore[return-value]


class InProcessTeacher:
    """A transformers causal LM held by the trainer. Thread-safe: one forward at a time (the
    trainer calls it from its scoring thread pool while the student samples)."""

    def __init__(self, model, *, name: str = "inprocess", pad_id: int = 0,
                 max_batch_tokens: int = 16384, eos_id: int | None = None):
        self.model = model.eval()
        self.name = name
        self.pad_id = pad_id
        self.eos_id = model.config.eos_token_id if eos_id is None else eos_id
        self.max_batch_tokens = max_batch_tokens
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, name: str | None = None, dtype: str | None = None,
                        **kwargs) -> "InProcessTeacher":
        from mopd.models import load_model

        return cls(load_model(path, dtype=dtype), name=name or str(path), **kwargs)

    def score(self, prompt_ids, completion_ids, *, topk: int | None = None,
              temperature: float = 1.0) -> list[SequenceScores]:
        validate_request(prompt_ids, completion_ids, topk)
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        with self._lock:
            pre = prefill(self.model, seqs, topk=topk or 0, pad_id=self.pad_id,
                          max_batch_tokens=self.max_batch_tokens, temperature=temperature)
        scores = []
        for p, c, r in zip(prompt_ids, completion_ids, pre):
            sl = slice(len(p) - 1, len(p) - 1 + len(c))  # entry j predicts token j+1
            scores.append(SequenceScores(r.token_logprobs_N[sl],
                                         r.topk_ids_NK[sl] if topk else None,
                                         r.topk_logprobs_NK[sl] if topk else None))
        check_scores(scores, completion_ids, topk, f"teacher {self.name!r}")
        return scores

    def generate(self, prompt_ids, *, max_new_tokens: int, temperature: float, seed: int,
                 max_batch: int = 64) -> list[list[int]]:
        """One sampled continuation per prompt (TrOPD's off-policy prefixes, ALGORITHMS §5): the
        teacher's own policy at ``temperature`` (top-k/top-p off), at most ``max_new_tokens``.
        The same sampler, chunks and seeds as the embedded server behind
        :meth:`HTTPTeacher.generate <mopd.teachers.http.HTTPTeacher.generate>`, so both
        transports give the same prefixes."""
        if max_new_tokens < 1 or temperature <= 0:
            raise ValueError(f"need max_new_tokens >= 1 and temperature > 0; got {max_new_tokens}, {temperature}")
        out: list[list[int]] = []
        for s in range(0, len(prompt_ids), max_batch):
            spec = SamplingSpec(max_tokens=max_new_tokens, temperature=temperature, seed=seed + s,
                                eos_id=self.eos_id)
            with self._lock:
                got = generate(self.model, [list(p) for p in prompt_ids[s:s + max_batch]], 1, spec,
                               pad_id=self.pad_id)
            out += [row[0].token_ids for row in got]
        return out

    def close(self) -> None:
        pass
