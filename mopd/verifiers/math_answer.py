"""Math: ``math-verify`` extraction over the whole response, then ``math-verify`` equivalence.

The answer is found by math-verify's own extraction (``\\boxed``, "the answer is", "final
answer", bold, ``####``, ``$...$`` LaTeX, bare expressions; thousands separators, ``\\dfrac``,
percentages...), not by hand-written patterns, and there is no "last number" fallback: a
response without an extractable answer scores 0.

Before extraction the text is only *rewritten into notation math-verify reads*, never searched:
the Unicode minus (U+2212 and its look-alikes) becomes ``-`` and scientific notation ``2.5e3`` /
``1.2E-5`` becomes the exact decimal it denotes. Floats are compared at the precision the
reference is written with (at least math-verify's default 6 decimals), so ``6.32098837210`` does
not pass for ``6.32098837209``.

Guard against inputs that make sympy grind: parsing is unevaluated and fast; before the
equivalence check, the *extracted* answer (not the whole response, so ordinary markdown such as
``**bold**`` or an ``x^{100}`` in the reasoning is fine) is rejected when longer than 200
characters or shaped like a tower of powers, a huge exponent or a huge factorial.
math-verify's own timeouts use ``signal.alarm`` and so work only in the main thread; the shape
guard makes every thread safe alike.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from decimal import Context, Decimal, InvalidOperation

from mopd.verifiers.verdict import Verdict, as_text

logger = logging.getLogger(__name__)

_MAX_ANSWER_CHARS = 200  # longer extracted "answers" are not sent to sympy
_MAX_SCI_EXPONENT = 60  # 1e999 is not expanded into a 1000-digit decimal
_EXACT = Context(prec=1000)
# Shapes that make sympy grind when evaluated: nested powers (9^{9^{9}}, 2^3^4, 2**3**4), 6+
# digit exponents of numbers, 3+ digit exponents of symbols or brackets ((x+1)^{999} expands
# for seconds), factorials of 5+ digit numbers or of expressions.
_EXPLOSIVE_RE = re.compile(
    r"\^\s*\{[^{}]*(?:\^|\*\*)|\^\s*[\w.]+\s*(?:\^|\*\*)|\*\*\s*[\w.({]+\s*\*\*"
    r"|(?:\^|\*\*)\s*\{?\s*-?\d{6,}|[)}\]A-Za-z]\s*(?:\^|\*\*)\s*\{?\s*-?\d{3,}"
    r"|(?:\d{5,}|[)}\]])\s*!"
)
_MINUS_RE = re.compile("[\u2212\u2012\u2013\ufe63\uff0d](?=\\s*[\\d.$\\\\(])")
_SCI_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?|\.\d+)[eE]([+-]?\d{1,4})(?!\w|\.\d)")
# a x 10^{b} in LaTeX or Unicode: sympy would multiply in binary floating point (2.3*10**2 is
# 229.99999999999997), so it is rewritten as the exact decimal too
_SCI_TIMES_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?|\.\d+)\s*(?:\\times|\\cdot|\u00d7)\s*"
                           r"10\s*\^\s*(?:\{\s*([+-]?\d{1,4})\s*\}|([+-]?\d{1,4}))(?!\w|\.\d)")
# a full stop after a number is punctuation: "464/887." would read as 464/887.0, a float
_END_DOT_RE = re.compile(r"(?<=\d)\.(?![\d.])")
_SIGN_BEFORE_BOX_RE = re.compile(r"(?<![\w)}\]])-\\boxed\{")  # "-\boxed{3}", not "5 - \boxed{3}"
# **x** that is emphasis, not Python's power operator (2**3**4 stays as it is)
_BOLD_RE = re.compile(r"(?<![\w)\]}*])\*\*([^*\n]{1,100}?)\*\*(?![\w(*])")
_INT_RE = re.compile(r"-?\d+")
_BOXED_INT_RE = re.compile(r"\s*(?:\\boxed\{\s*(-?\d+)\s*\}|(-?\d+))\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` with balanced braces, or None.

    For *references* (a MATH solution's final answer); responses go through math-verify."""
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


def _plain_decimal(match: re.Match) -> str:
    mantissa, exponent = match.group(1), int(match.group(2) or match.group(3))
    if abs(exponent) > _MAX_SCI_EXPONENT:
        return match.group(0)
    try:
        # an explicit context: libraries (reasoning-gym) change the global one's precision
        value = Decimal(mantissa).scaleb(exponent, context=_EXACT)
    except InvalidOperation:
        return match.group(0)
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def normalize(text: str) -> str:
    """Notation math-verify misreads, rewritten: Unicode minus, scientific notation, a sign
    written before ``\\boxed{``, a full stop after a number, markdown bold around an answer (``**464/887**`` would be
    read as 464)."""
    text = _MINUS_RE.sub("-", text)
    text = _SCI_RE.sub(_plain_decimal, _SCI_TIMES_RE.sub(_plain_decimal, text))
    text = _BOLD_RE.sub(r"\1", text)
    text = _SIGN_BEFORE_BOX_RE.sub(r"\\boxed{-", text)
    return _END_DOT_RE.sub("", text)


def _decimals(reference: str) -> int:
    """Decimal places the reference is written with (its float comparison precision)."""
    match = re.search(r"\d\.(\d+)(?!.*\d\.\d)", reference)
    return len(match.group(1)) if match else 0


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@functools.lru_cache(maxsize=4096)
def _parse_gold(reference: str) -> tuple:
    from math_verify import parse  # slow import, only when needed

    text = normalize(reference.strip())
    if not (text.startswith("$") or "\\boxed" in text):
        text = f"${text}$"
    return tuple(parse(text, parsing_timeout=5 if _in_main_thread() else None))


def _parse_response(text: str) -> list:
    from math_verify import parse

    return parse(normalize(text), parsing_timeout=5 if _in_main_thread() else None)


def _fast_integer_verdict(text: str, reference: str) -> Verdict | None:
    """The tiny model's usual output (``\\boxed{22}`` or ``22``, nothing else) against an
    integer reference, decided without sympy: exactly what math-verify would decide."""
    match = _BOXED_INT_RE.fullmatch(text)
    if match is None or _INT_RE.fullmatch(reference.strip()) is None:
        return None
    answer = match.group(1) or match.group(2)
    ok = int(answer) == int(reference)
    return Verdict(float(ok), "correct" if ok else f"wrong answer {answer[:40]!r}")


def verify_math(response: object, reference: str) -> Verdict:
    """Reward 1.0 when the response's final answer equals ``reference``, else 0.0."""
    text, why = as_text(response)
    if text is None:
        return Verdict(0.0, why)
    reference = str(reference)
    fast = _fast_integer_verdict(text, reference)
    if fast is not None:
        return fast
    if _INT_RE.fullmatch(reference.strip()) and not any("0" <= ch <= "9" for ch in text):
        return Verdict(0.0, "no answer found")  # no digit cannot equal an integer: skip sympy
    try:
        gold = _parse_gold(reference)
    except Exception as exc:
        logger.error("math verifier: cannot parse reference %r: %r", reference[:80], exc)
        return Verdict(0.0, f"bad reference ({type(exc).__name__})")
    if not gold:
        logger.error("math verifier: reference %r has no parseable answer", reference[:80])
        return Verdict(0.0, "bad reference: no parseable answer")
    try:
        pred = _parse_response(text)
    except Exception as exc:  # math-verify on hostile input: never raise on model output
        logger.debug("math-verify parse failed on %r: %r", text[:80], exc)
        return Verdict(0.0, f"unparseable answer ({type(exc).__name__})")
    if not pred:
        return Verdict(0.0, "no answer found")
    answer = next((p for p in reversed(pred) if isinstance(p, str)), str(pred[-1]))
    if len(answer) > _MAX_ANSWER_CHARS:
        return Verdict(0.0, "answer too long")
    if _EXPLOSIVE_RE.search(answer):
        return Verdict(0.0, f"answer too large to evaluate {answer[:40]!r}")
    from math_verify import verify

    try:
        ok = verify(list(gold), pred, float_rounding=max(6, _decimals(reference)),
                    timeout_seconds=5 if _in_main_thread() else None)
    except Exception as exc:
        logger.debug("math-verify failed on %r: %r", answer[:80], exc)
        return Verdict(0.0, f"unparseable answer ({type(exc).__name__})")
    return Verdict(float(ok), "correct" if ok else f"wrong answer {answer[:40]!r}")
