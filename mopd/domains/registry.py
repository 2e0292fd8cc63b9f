"""Domain registry: name -> verifier kind, prompt template, synthetic generator, real-data defaults.

A record (the unit every stage exchanges) is a dict with string values::

    {"id": "math-s0-000003", "domain": "math", "prompt": "[math] 17+5=",
     "completion": "\\boxed{22}", "reference": "22"}

``completion`` is a gold response that the domain's verifier scores 1.0; ``reference`` is what
the verifier needs (final answer, Python assert code, JSON constraint list, answer letter).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mopd.domains.synthetic import FLAWS, GENERATORS, Flaw, RawExample

VERIFIER_KINDS = ("math", "code", "if", "mc")


@dataclass(frozen=True)
class Domain:
    """One verifiable domain.

    ``prompt_template`` is a format string with a ``{question}`` field, applied to a raw question
    (synthetic or loaded). ``default_columns`` maps record fields to the column names of the
    reference public dataset of that kind (GSM8K, MBPP, IFEval, a generic MC layout), used by
    :func:`mopd.domains.loaders.load_records` when the caller gives no mapping.
    """

    name: str
    verifier: str
    prompt_template: str
    generator: Callable[[random.Random], RawExample] | None = None
    flaw: Flaw | None = None  # a plausible wrong demonstration of a generated question
    default_columns: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verifier not in VERIFIER_KINDS:
            raise ValueError(
                f"Domain {self.name!r}: verifier {self.verifier!r} is not one of {VERIFIER_KINDS}"
            )
        if "{question}" not in self.prompt_template:
            raise ValueError(
                f"Domain {self.name!r}: prompt_template {self.prompt_template!r} "
                "needs a '{question}' field"
            )

    def format_prompt(self, question: str) -> str:
        return self.prompt_template.format(question=question)


DOMAINS: Mapping[str, Domain] = MappingProxyType({
    "math": Domain("math", "math", "[math] {question}", GENERATORS["math"], FLAWS["math"],
                   {"prompt": "question", "reference": "answer"}),  # GSM8K layout
    "code": Domain("code", "code", "[code] {question}", GENERATORS["code"], FLAWS["code"],
                   {"prompt": "text", "reference": "test_list"}),  # MBPP layout
    "if": Domain("if", "if", "[if] {question}", GENERATORS["if"], FLAWS["if"],
                 {"prompt": "prompt", "reference": "instruction_id_list",
                  "kwargs": "kwargs"}),  # IFEval layout
    "mc": Domain("mc", "mc", "[mc] {question}", GENERATORS["mc"], FLAWS["mc"],
                 {"prompt": "question", "choices": "choices", "reference": "answer"}),
})


def get_domain(name: str) -> Domain:
    """Look a domain up by name; unknown names raise ValueError listing the known ones."""
    try:
        return DOMAINS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown domain {name!r}; known domains: {sorted(DOMAINS)}") from None


def generate(domain: str, n: int, seed: int, *,
             exclude_prompts: Collection[str] = (), flawed: float = 0.0) -> list[dict]:
    """``n`` synthetic records of ``domain``, a pure function of the arguments.

    Ids are ``"{domain}-s{seed}-{index:06d}"``: unique within a call, distinct across seeds,
    and the first ``k`` records do not depend on ``n``. Prompts may repeat, within a call and
    across seeds (easy items are few): pass the training prompts as ``exclude_prompts`` to draw
    an evaluation set that does not overlap them.

    ``flawed``: the probability that a record's ``completion`` (the demonstration SFT imitates)
    is replaced by the domain's plausible wrong answer (``Domain.flaw``; such records carry
    ``"flawed": True``). The prompt and ``reference`` stay gold, and the draw comes from its own
    random stream, so the prompts do not depend on ``flawed``.
    """
    spec = get_domain(domain)
    if spec.generator is None:
        raise ValueError(f"domain {domain!r} has no synthetic generator; use load_records")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not 0.0 <= flawed <= 1.0:
        raise ValueError(f"flawed must be a probability in [0, 1], got {flawed!r}")
    rng = random.Random(f"mopd-{domain}-{seed}")  # str seeds hash deterministically (sha512)
    flaw_rng = random.Random(f"mopd-{domain}-{seed}-flaw")
    excluded = frozenset(exclude_prompts)
    records: list[dict] = []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"generate({domain!r}): only {len(records)} of {n} prompts found "
                             f"outside exclude_prompts ({len(excluded)} excluded)")
        question, completion, reference = spec.generator(rng)
        if excluded and spec.format_prompt(question) in excluded:
            continue
        index = len(records)
        record = {
            "id": f"{domain}-s{seed}-{index:06d}",
            "domain": domain,
            "prompt": spec.format_prompt(question),
            "completion": completion,
            "reference": reference,
        }
        if flaw_rng.random() < flawed and spec.flaw is not None:
            wrong = spec.flaw(flaw_rng, question, completion, reference)
            if wrong is not None:
                record.update(completion=wrong, flawed=True)
        records.append(record)
    return records
