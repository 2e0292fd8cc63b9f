"""The teacher client interface (MOPD 3.3: each domain teacher is a prefill service).

A teacher scores finished student rollouts: given the token ids of prompt + completion, it returns
the log-prob it assigns to every completion token and, on request, its own top-k (ids, log-probs)
at each completion position. Backends: :class:`~mopd.teachers.inprocess.InProcessTeacher`
(a transformers model in this process), :class:`~mopd.teachers.http.HTTPTeacher` (the
`/v1/completions` prefill API of `mopd serve-teacher` or `vllm serve`) and, on GPU hosts,
:class:`~mopd.teachers.vllm_backend.VLLMTeacher`.

All backends share the tokenizer of the student (the teachers are RL fine-tunes of the same base).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch


class TeacherError(RuntimeError):
    """A teacher could not score a request; the message names the domain and the endpoint(s)."""


@dataclass(frozen=True)
class SequenceScores:
    """One rollout's teacher scores over its C completion tokens.

    logprobs_C: log q(y_t | x, y_<t) of each completion token, shape (C,).
    topk_ids_CK / topk_logprobs_CK: the teacher's k most likely tokens at each completion position
    (descending), shape (C, K); None when top-k was not requested."""

    logprobs_C: torch.Tensor
    topk_ids_CK: torch.Tensor | None = None
    topk_logprobs_CK: torch.Tensor | None = None


@runtime_checkable
class TeacherClient(Protocol):
    """Anything that scores rollouts. ``name`` identifies it in errors and logs."""

    name: str

    def score(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *,
              topk: int | None = None, temperature: float = 1.0) -> list[SequenceScores]:
        """Scores of each (prompt, completion) pair, in order, under the teacher's distribution at
        ``temperature`` (softmax(logits / T): the distribution the student samples from, so that
        the K1 reward ``u - s`` is the reverse KL at that temperature, ALGORITHMS §1). Raises
        TeacherError on failure; a backend that cannot scale (prompt log-probs of a served
        ``/v1/completions`` are the unscaled distribution's) raises ValueError for T != 1."""
        ...

    def close(self) -> None: ...


def unscaled_only(temperature: float, who: str) -> None:
    """A backend whose log-probs are the unscaled distribution's refuses any other temperature."""
    if temperature != 1.0:
        raise ValueError(f"{who} returns log-probs at temperature 1 only (prompt log-probs of /v1/completions "
                         f"are not scaled); asked for temperature {temperature}: use temperature 1 or the "
                         "in-process transport (distill.teacher_transport: inprocess, a local teacher)")


def validate_request(prompt_ids, completion_ids, topk: int | None) -> None:
    """Shared argument checks: equal counts, non-empty prompts, k >= 1 when given."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"prompt_ids ({len(prompt_ids)}) and completion_ids ({len(completion_ids)}) "
                         "must have the same length")
    empty = [i for i, p in enumerate(prompt_ids) if len(p) == 0]
    if empty:
        raise ValueError(f"prompt_ids[{empty[0]}] is empty: a rollout needs at least one prompt token")
    if topk is not None and topk < 1:
        raise ValueError(f"topk must be >= 1 or None, got {topk}")


def check_scores(scores: list[SequenceScores], completion_ids, topk: int | None, who: str) -> None:
    """Guard against silently wrong scores: lengths must match and every value must be finite
    (a zero-filled or truncated answer would become a silent zero advantage)."""
    if len(scores) != len(completion_ids):
        raise TeacherError(f"{who}: returned {len(scores)} results for {len(completion_ids)} sequences")
    for i, (s, comp) in enumerate(zip(scores, completion_ids)):
        if s.logprobs_C.shape != (len(comp),):
            raise TeacherError(f"{who}: sequence {i}: {tuple(s.logprobs_C.shape)} log-probs for "
                               f"{len(comp)} completion tokens")
        if len(comp) and not bool(torch.isfinite(s.logprobs_C).all()):
            raise TeacherError(f"{who}: sequence {i}: non-finite teacher log-prob")
        if topk and (s.topk_ids_CK is None or s.topk_ids_CK.shape != (len(comp), topk)):
            raise TeacherError(f"{who}: sequence {i}: top-{topk} missing or mis-shaped")


def lay_out(scores: list[SequenceScores], prompt_lens: list[int], T: int, topk: int | None):
    """Right-padded ``u_BT`` (teacher log-prob of the token at t, at completion positions; 0
    elsewhere) and, for top-k, ``ids_BTK`` / ``logprobs_BTK`` at those positions (position t holds
    the teacher distribution that predicts token t, aligned with `mopd.rollout.pack`)."""
    B = len(scores)
    u_BT = torch.zeros((B, T))
    ids_BTK = torch.zeros((B, T, topk), dtype=torch.long) if topk else None
    lp_BTK = torch.zeros((B, T, topk)) if topk else None
    for b, (s, P) in enumerate(zip(scores, prompt_lens)):
        C = s.logprobs_C.shape[0]
        u_BT[b, P:P + C] = s.logprobs_C
        if topk and C:
            if s.topk_ids_CK is None or s.topk_logprobs_CK is None:
                raise TeacherError(f"row {b}: top-{topk} requested but the teacher returned none")
            ids_BTK[b, P:P + C] = s.topk_ids_CK
            lp_BTK[b, P:P + C] = s.topk_logprobs_CK
    return u_BT, ids_BTK, lp_BTK


