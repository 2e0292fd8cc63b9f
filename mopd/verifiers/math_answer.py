"""Math: final-answer extraction and equivalence.

Extraction order: the last ``\\boxed{..}`` (or ``\\fbox``), else "answer is X" / "answer: X",
else the last number in the text. Equivalence: a fast exact path for plain numbers (integers,
decimals, ``a/b``, thousands separators) through ``fractions.Fraction``; everything else goes to
``math-verify`` (LaTeX, fractions written as ``\\frac``, simple expressions), whose parser is slow
(~ms per call), so it is only reached when the fast path cannot decide.
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction

from mopd.verifiers.verdict import Verdict, as_text

logger = logging.getLogger(__name__)

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_PLAIN_NUMBER_RE = re.compile(rf"^\s*(?:{_NUMBER})\s*$")
_ANSWER_IS_RE = re.compile(
    r"answer\s*(?:is|:|=)\s*:?\s*\$?([^\n$]+?)\$?\s*(?:\.\s*)?(?:\n|$)", re.I
)
_MAX_ANSWER_CHARS = 200  # longer "answers" are not sent to sympy
# Inputs that make sympy grind: nested powers (9^{9^{9}}, 2^3^4), 6+ digit exponents of
# numbers, 3+ digit exponents of symbols or brackets ((x+1)^{999} expands for seconds),
# factorials of 5+ digit numbers or of expressions. math-verify's own timeout works only in the
# main thread (signal.alarm) and verifiers also run in worker threads, so these are rejected up
# front, the same way in every thread.
_EXPLOSIVE_RE = re.compile(
    r"\^\s*\{[^{}]*(?:\^|\*\*)|\^\s*[\w.]+\s*(?:\^|\*\*)|\*\*[^*]*\*\*"
    r"|(?:\^|\*\*)\s*\{?\s*-?\d{6,}|[)}\]A-Za-z]\s*(?:\^|\*\*)\s*\{?\s*-?\d{3,}"
    r"|(?:\d{5,}|[)}\]])\s*!"
)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` with balanced braces, or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None


def extract_answer(response: str) -> str | None:
    """The final answer in ``response`` as a string, or None when there is none."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    matches = _ANSWER_IS_RE.findall(response)
    if matches:
        return matches[-1].strip()
    numbers = _NUMBER_RE.findall(response)
    return numbers[-1] if numbers else None


def _as_fraction(text: str) -> Fraction | None:
    """Exact value of a plain number (``1,234``, ``-0.5``, ``3/4``, ``$12$``) or None."""
    text = text.strip().strip("$").strip().rstrip(".")
    if not _PLAIN_NUMBER_RE.match(text):
        return None
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_equal(candidate: str, reference: str) -> bool:
    """``math-verify`` equivalence; its signal-based timeouts only work in the main thread."""
    from math_verify import parse, verify  # slow import, only when needed

    in_main = threading.current_thread() is threading.main_thread()
    timeout = 5 if in_main else None  # off the main thread we rely on the input length cap
    gold = parse(f"${reference}$", parsing_timeout=timeout)
    pred = parse(f"${candidate}$", parsing_timeout=timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


def verify_math(response: object, reference: str) -> Verdict:
    """Reward 1.0 when the response's final answer equals ``reference``, else 0.0."""
    text, why = as_text(response)
    if text is None:
        return Verdict(0.0, why)
    candidate = extract_answer(text)
    if candidate is None or not candidate:
        return Verdict(0.0, "no answer found")
    if len(candidate) > _MAX_ANSWER_CHARS:
        return Verdict(0.0, "answer too long")
    ref_value, cand_value = _as_fraction(reference), _as_fraction(candidate)
    if ref_value is not None and cand_value is not None:  # fast path: both plain numbers
        ok = ref_value == cand_value
        return Verdict(float(ok), "correct" if ok else f"wrong answer {candidate[:40]!r}")
    if ref_value is not None and not any(ch.isdigit() for ch in candidate):
        return Verdict(0.0, f"wrong answer {candidate[:40]!r}")  # no digit cannot equal a number
    if _EXPLOSIVE_RE.search(candidate):
        return Verdict(0.0, f"answer too large to evaluate {candidate[:40]!r}")
    try:
        ok = _math_verify_equal(candidate, str(reference))
    except Exception as exc:  # math-verify/sympy on hostile input: never raise on model output
        logger.debug("math-verify failed on %r: %r", candidate[:80], exc)
        return Verdict(0.0, f"unparseable answer ({type(exc).__name__})")
    return Verdict(float(ok), "correct" if ok else f"wrong answer {candidate[:40]!r}")
