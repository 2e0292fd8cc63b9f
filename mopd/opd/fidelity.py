"""The teacher fidelity gate, run before any distillation step (issue 24; MOPD §3's signal is only
meaningful when teacher and student score the *same* token ids).

1. **Same rendering**: for every teacher whose tokenizer is at hand (a stage's checkpoint, a
   finished teacher's folder), the student's and the teacher's tokenizers must render each probe
   record to the same prompt ids (chat template and vocabulary compared through their effect), end
   an answer with the same token, and hold the same vocabulary. A mismatch is an error naming both
   and the first differing token: a teacher scored on another template gives a biased per-token
   signal (tinker-cookbook #796 measured +0.287 nats/token) without any error of its own.
2. **Self-scoring probe**: a probe batch of the student's rollouts scored by a teacher that *is*
   the student, through the same scoring path (in-process prefill, `lay_out`) and the same student
   log-probs (`student_quantities`) the trainer uses, must give K1 advantages (log π_T - log π_S)
   of 0 at every completion token (to rounding: ``SELF_K1_TOLERANCE`` per dtype). A misaligned position, a dropped special token or a
   temperature applied on one side only shows up here as a non-zero advantage.

Remote teachers (HTTP endpoints) keep their tokenizer on their server: they are counted as
unchecked, and the count is logged with the rest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mopd.chat import PromptFormat, end_of_turn, first_difference, render_prompt

log = logging.getLogger(__name__)

# The probe's tolerance for |log π_T - log π_S|: the same module and ids, but the teacher's prefill
# batches and pads the rows otherwise than the trainer's `pack`, and floating-point sums then round
# differently, more so the deeper the model and the narrower the dtype. Measured on CPU, float32:
# 9.5e-7 nats (2 layers), 1.3e-5 (SmolLM2-135M, 30 layers). A misaligned position or a template
# token scored on one side only moves some token's advantage by tenths of a nat or more.
SELF_K1_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


class FidelityError(ValueError):
    """A teacher that cannot give the student a meaningful per-token signal."""


def _token(tok, i: int | None) -> str:
    return "<end>" if i is None else repr(tok.convert_ids_to_tokens(int(i)))


def check_rendering(student_tok, teacher_tok, fmt: PromptFormat, prompts: list[str], *,
                    student: str, teacher: str) -> None:
    """Raise :class:`FidelityError` unless both tokenizers ask ``prompts`` with the same ids, end
    answers with the same token and hold the same vocabulary."""
    for p in prompts:
        a, b = render_prompt(student_tok, p, fmt), render_prompt(teacher_tok, p, fmt)
        i = first_difference(a, b)
        if i is not None:
            raise FidelityError(
                f"teacher {teacher} renders prompt {p[:60]!r} differently from the student {student}: first "
                f"difference at token {i}: student {_token(student_tok, a[i] if i < len(a) else None)} vs "
                f"teacher {_token(teacher_tok, b[i] if i < len(b) else None)} (chat template or tokenizer differ)")
    eos_s, eos_t = end_of_turn(student_tok, fmt), end_of_turn(teacher_tok, fmt)
    if eos_s != eos_t:
        raise FidelityError(f"teacher {teacher} ends a turn with {_token(teacher_tok, eos_t)} (id {eos_t}), "
                            f"the student {student} with {_token(student_tok, eos_s)} (id {eos_s})")
    vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
    if vs != vt:
        inv_s, inv_t = {i: t for t, i in vs.items()}, {i: t for t, i in vt.items()}
        i = next(i for i in range(max(len(inv_s), len(inv_t)) + 1) if inv_s.get(i) != inv_t.get(i))
        raise FidelityError(f"teacher {teacher} and the student {student} have different vocabularies "
                            f"({len(vt)} vs {len(vs)} tokens): first difference at id {i}: student "
                            f"{inv_s.get(i)!r} vs teacher {inv_t.get(i)!r}")


@torch.no_grad()
def self_k1(model, tokenizer, fmt: PromptFormat, prompts: list[str], *, max_new_tokens: int,
            temperature: float, seed: int) -> tuple[float, int]:
    """(max |log π_T - log π_S| over completion tokens, tokens) for a teacher that is the student."""
    from mopd.opd.update import student_quantities
    from mopd.rollout import pack, sample
    from mopd.teachers.base import lay_out
    from mopd.teachers.inprocess import InProcessTeacher

    was = model.training
    model.eval()
    samples = [s for s in sample(model, tokenizer, prompts, fmt=fmt, n=2, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed) if s.completion_ids]
    if not samples:
        model.train(was)
        return 0.0, 0
    teacher = InProcessTeacher(model, name="student-as-teacher", pad_id=tokenizer.pad_token_id)
    scores = teacher.score([s.prompt_ids for s in samples], [s.completion_ids for s in samples])
    ids_BT, attn_BT, mask_BT = pack(samples, tokenizer.pad_token_id, device=model.lm_head.weight.device)
    # both sides at T=1: the in-process teacher scores the plain distribution
    s_BT = student_quantities(model, ids_BT, attn_BT, temperature=1.0)[0]
    u_BT = lay_out(scores, [len(s.prompt_ids) for s in samples], ids_BT.shape[1], None)[0].to(s_BT.device)
    model.train(was)
    adv = (u_BT - s_BT) * mask_BT
    return float(adv.abs().max()), int(mask_BT.sum())


def fidelity_gate(student_dir: Path, teachers: dict[str, Path | str | None], fmt: PromptFormat,
                  prompts: list[str], tracker, *, max_new_tokens: int = 16, seed: int = 0) -> dict[str, float]:
    """Run both checks (module docstring) on the student at ``student_dir`` and every teacher's
    folder (None: remote); raise :class:`FidelityError` on a failure; log and return ``fidelity/*``."""
    from mopd.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(student_dir)
    checked = 0
    for d, path in sorted(teachers.items()):
        if path is None:
            continue
        check_rendering(tokenizer, load_tokenizer(path), fmt, prompts, student=str(student_dir),
                        teacher=f"{d!r} ({path})")
        checked += 1
    model = load_model(student_dir)
    worst, tokens = self_k1(model, tokenizer, fmt, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
                            seed=seed)
    tolerance = SELF_K1_TOLERANCE.get(str(next(model.parameters()).dtype).removeprefix("torch."), 5e-2)
    if worst > tolerance:
        raise FidelityError(f"the student scored by itself as a teacher gives K1 advantages up to {worst:.3g} "
                            f"(must be 0, to {tolerance:g} in this dtype) over {tokens} tokens: the scoring path misaligns teacher and student")
    metrics = {"fidelity/teachers_checked": float(checked),
               "fidelity/teachers_unchecked": float(sum(p is None for p in teachers.values())),
               "fidelity/self_k1_max_abs": worst, "fidelity/probe_tokens": float(tokens)}
    tracker.log_metrics(metrics)
    log.info("fidelity gate: %d teacher(s) render as the student (%d remote, unchecked); self-scoring K1 "
             "max |adv| = %g over %d tokens", checked, metrics["fidelity/teachers_unchecked"], worst, tokens)
    return metrics
