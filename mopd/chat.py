"""Prompts as the model is asked them: one function renders a record's prompt to token ids.

An instruct model is asked through its tokenizer's chat template (one user turn, an optional
system turn, ``add_generation_prompt=True``) and answers up to the template's end-of-turn token;
the tiny profile, whose byte-level tokenizer has no template, is asked the prompt text itself.
:func:`render_prompt` is the only place a prompt becomes ids: SFT examples, GRPO prompts, distill
rollouts (and so every teacher scoring request, which carries the rollout's ids), difficulty,
off-policy fine-tuning, CoPD and evaluation all go through it, so a student and its teachers are
scored on the very ids the student sampled from (the failure this prevents: a teacher scored on
another template gives a biased per-token signal, tinker-cookbook #796).

Torch-free: a :class:`PromptFormat` is part of a stage's settings (the profile), and the flow
imports the settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptFormat:
    """``template``: through ``tokenizer.apply_chat_template``; ``system``: a system turn first
    (None: the template's own default, e.g. SmolLM2's "You are a helpful AI assistant...")."""

    template: bool = False
    system: str | None = None

    def messages(self, prompt: str) -> list[dict[str, str]]:
        """The conversation a prompt is asked as (TRL's conversational prompt format)."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [{"role": "user", "content": prompt}]

    def check(self, tokenizer, who: str = "the tokenizer") -> None:
        if self.template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{who} has no chat template, but the profile asks for one "
                             "(chat_template: true); set chat_template: false for a base model")


PLAIN = PromptFormat()


def prompt_format(profile) -> PromptFormat:
    """The format a model profile asks for (settings.model): the tiny profile is plain text."""
    if not getattr(profile, "chat_template", False):
        return PLAIN
    return PromptFormat(template=True, system=profile.system_prompt)


def render_prompt(tokenizer, prompt: str, fmt: PromptFormat) -> list[int]:
    """Token ids of ``prompt`` as the model is asked it: the chat template's ids with the
    generation prompt, or the plain text's ids (no special tokens)."""
    if not fmt.template:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    fmt.check(tokenizer)
    got = tokenizer.apply_chat_template(fmt.messages(prompt), add_generation_prompt=True, tokenize=True)
    ids = got["input_ids"] if isinstance(got, Mapping) or hasattr(got, "keys") else got
    return [int(t) for t in ids]


def render_prompts(tokenizer, prompts: list[str], fmt: PromptFormat) -> list[list[int]]:
    return [render_prompt(tokenizer, p, fmt) for p in prompts]


def end_of_turn(tokenizer, fmt: PromptFormat) -> int:
    """The token an answer ends with: the template's end-of-turn token (found by rendering a
    one-turn conversation: the first token after the assistant's text), else the tokenizer's EOS."""
    if not fmt.template:
        return _eos(tokenizer)
    marker = "mopd-end-of-turn-probe"
    msgs = fmt.messages("q") + [{"role": "assistant", "content": marker}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    tail = text[text.rindex(marker) + len(marker):]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    for t in ids:
        if t in special:
            return int(t)
    return _eos(tokenizer)


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: answers could never end")
    return int(tokenizer.eos_token_id)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length when one is a prefix), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
