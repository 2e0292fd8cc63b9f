"""Math: ``math-verify`` extraction over the response (or its ``<answer>`` tag), then
``math-verify`` equivalence.

The answer is found by math-verify's own extraction (``\\boxed``, "the answer is", "final
answer", bold, ``####``, ``$...$`` LaTeX, bare expressions; thousands separators, ``\\dfrac``,
percentages...), not by hand-written patterns, and there is no "last number" fallback: a
response without an extractable answer scores 0.

reasoning-gym's prompts ask for ``<answer>...</answer>``. A response with a closed tag is judged
on the content of its *last* tag alone, the string ``reasoning_gym.utils.extract_answer`` takes
(:func:`answer_tag`): a right ``\\boxed`` before a wrong tag scores 0, and an empty tag scores 0
without a look at the rest. That content goes through the same extraction; LaTeX written in it
without ``$`` is read as in ``$...$``, and a leading ``+`` is dropped. On reasoning-gym's
arithmetic tasks whose scorer compares exactly, mopd and ``dataset.score_answer`` agree on every
response of ``tests/test_rg_answer_agreement.py``; that file lists the tasks where they cannot.

Before extraction the text is only *rewritten into notation math-verify reads*, never searched:
the Unicode minus (U+2212 and its look-alikes) becomes ``-``, a sign separated from its number
by spacing (``- 7``, ``\u2212\u200a7``, which math-verify reads as 7) is glued back to it, and
scientific notation ``2.5e3`` / ``1.2E-5`` becomes the exact decimal it denotes. Floats are
compared at the precision the reference is written with (at least math-verify's default 6
decimals), so ``6.32098837210`` does not pass for ``6.32098837209``.

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
# Horizontal spacing a model may put between a sign and its number: space, tab, no-break, the
# typographic spaces U+2000-U+200A (thin, hair...), zero-width ones. math-verify reads "- 7",
# "-\u200a7" as 7: the sign is glued back (for a binary minus, "5 -7" reads as "5 - 7" did).
_SPACING = "[ \t\u00a0\u1680\u2000-\u200d\u202f\u205f\u2060\u3000\ufeff]"
_MINUS_RE = re.compile(f"[\u2212\u2012\u2013\ufe63\uff0d](?=(?:\\s|{_SPACING})*[\\d.$\\\\(])")
_SPACED_SIGN_RE = re.compile(f"-{_SPACING}+(?=\\.?\\d)")
# reasoning-gym's answer format (reasoning_gym.utils.extract_answer reads the last one)
_OPEN_TAG, _CLOSE_TAG = "<answer>", "</answer>"
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


def answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>``, stripped, or None when no tag is closed.

    Reads what ``reasoning_gym.utils.extract_answer`` reads (its regex
    ``<answer>\\s?(.*?)\\s?</answer>``, last match, stripped), in one pass over the text: the
    regex would rescan to the end from every unclosed ``<answer>``."""
    content, pos = None, 0
    while (start := text.find(_OPEN_TAG, pos)) >= 0:
        end = text.find(_CLOSE_TAG, start + len(_OPEN_TAG))
        if end < 0:
            break
        content, pos = text[start + len(_OPEN_TAG):end], end + len(_CLOSE_TAG)
    return None if content is None else content.strip()


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
    """Notation math-verify misreads, rewritten: Unicode minus, a sign spaced from its number,
    scientific notation, a sign written before ``\\boxed{``, a full stop after a number, markdown
    bold around an answer (``**464/887**`` would be read as 464)."""
    text = _SPACED_SIGN_RE.sub("-", _MINUS_RE.sub("-", text))
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


def _parse_response(text: str, tagged: bool = False) -> list:
    """math-verify's extraction over ``text``. An ``<answer>`` tag's content is the bare answer,
    so LaTeX written without ``$`` (``\\dfrac{3}{4}``, which math-verify finds nothing in) is
    read as the reference is, in ``$...$``; prose stays prose (``$no idea$`` would be a product
    of symbols)."""
    from math_verify import parse

    timeout = 5 if _in_main_thread() else None
    pred = parse(normalize(text), parsing_timeout=timeout)
    if (not pred and tagged and "\\" in text and "$" not in text
            and len(text) <= _MAX_ANSWER_CHARS):
        pred = parse(f"${normalize(text)}$", parsing_timeout=timeout)
    return pred


def _fast_integer_verdict(text: str, reference: str) -> Verdict | None:
    """The tiny model's usual output (``\\boxed{22}`` or ``22``, nothing else) against an
    integer reference, decided without sympy: exactly what math-verify would decide."""
    match = _BOXED_INT_RE.fullmatch(text)
    if match is None or _INT_RE.fullmatch(reference.strip()) is None:
        return None
    answer = match.group(1) or match.group(2)
    if len(answer) > _MAX_ANSWER_CHARS:  # int() refuses 4,300+ digits
        return Verdict(0.0, "answer too long")
    ok = int(answer) == int(reference)
    return Verdict(float(ok), "correct" if ok else f"wrong answer {answer[:40]!r}")


def verify_math(response: object, reference: str) -> Verdict:
    """Reward 1.0 when the response's final answer equals ``reference``, else 0.0.

    With an ``<answer>`` tag, the final answer is the last tag's content and nothing else."""
    text, why = as_text(response)
    if text is None:
        return Verdict(0.0, why)
    reference = str(reference)
    tagged = answer_tag(text)
    if tagged is not None:  # "+5" in a tag: the sign of a positive answer (math-verify: none)
        text = tagged.removeprefix("+")
    no_answer = "no answer found" if tagged is None else "no answer in <answer> tag"
    fast = _fast_integer_verdict(text, reference)
    if fast is not None:
        return fast
    if _INT_RE.fullmatch(reference.strip()) and not any("0" <= ch <= "9" for ch in text):
        return Verdict(0.0, no_answer)  # no digit cannot equal an integer: skip sympy
    try:
        gold = _parse_gold(reference)
    except Exception as exc:
        logger.error("math verifier: cannot parse reference %r: %r", reference[:80], exc)
        return Verdict(0.0, f"bad reference ({type(exc).__name__})")
    if not gold:
        logger.error("math verifier: reference %r has no parseable answer", reference[:80])
        return Verdict(0.0, "bad reference: no parseable answer")
    try:
        pred = _parse_response(text, tagged=tagged is not None)
    except Exception as exc:  # math-verify on hostile input: never raise on model output
        logger.debug("math-verify parse failed on %r: %r", text[:80], exc)
        return Verdict(0.0, f"unparseable answer ({type(exc).__name__})")
    if not pred:
        return Verdict(0.0, no_answer)
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
