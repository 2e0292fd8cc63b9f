"""Multiple choice: extract the answer letter from a response and compare it with the reference.

Patterns, strongest first: "answer: B" / "answer is (B)" (the last one wins), a parenthesised
"(B)", a whole response that is a lone letter ("B", "B.", "B)"). A response naming several
different letters with none of these markers is not guessed at.
"""

from __future__ import annotations

import re

from mopd.verifiers.verdict import Verdict, as_text

_LETTERS = "A-J"
# "answer" in any case; the letter upper case, or any case inside parentheses ("answer is a
# number" must not read as A).
_ANSWER_RE = re.compile(
    rf"(?i:answer)\s*(?i:is|:|=)?\s*:?\s*"
    rf"(?:\(([{_LETTERS}{_LETTERS.lower()}])\)|\**([{_LETTERS}])\b)"
)
_PAREN_RE = re.compile(rf"\(([{_LETTERS}])\)")
_LONE_RE = re.compile(rf"^\s*\(?([{_LETTERS}])\)?[.)]?\s*$", re.I)


def extract_choice(response: str) -> str | None:
    """The chosen letter (upper case) or None."""
    found = _ANSWER_RE.findall(response)
    if found:
        return "".join(found[-1]).upper()
    lone = _LONE_RE.match(response)
    if lone:
        return lone.group(1).upper()
    parens = set(_PAREN_RE.findall(response))
    if len(parens) == 1:
        return parens.pop()
    return None


def verify_mc(response: object, reference: str) -> Verdict:
    """Reward 1.0 when the extracted letter equals ``reference`` (case-insensitive)."""
    text, why = as_text(response)
    if text is None:
        return Verdict(0.0, why)
    gold = str(reference).strip().upper()
    if len(gold) != 1 or not "A" <= gold <= "J":
        return Verdict(0.0, f"bad reference {str(reference)[:20]!r}: expected a letter A-J")
    letter = extract_choice(text)
    if letter is None:
        return Verdict(0.0, "no choice found")
    return Verdict(float(letter == gold), "correct" if letter == gold else f"chose {letter}")
