"""Math verifier against a human grader on reasoning-gym arithmetic.

reasoning-gym generates the problems and reference answers; each answer is rendered the ways a
model writes it (boxed, "The answer is X.", bold, ``#### X``, LaTeX with ``\\dfrac``, thousands
separators, Unicode minus, text after the answer, scientific notation, "Final answer:"), and
then made wrong (off by one in the last digit, sign flipped, digit dropped, decimal point
moved, wrong denominator) in the same renderings. The human grader is the construction itself:
a rendering of the right value is correct, of a changed value is wrong.
"""

import random
import re
from fractions import Fraction

import pytest

from mopd.verifiers import verify

reasoning_gym = pytest.importorskip("reasoning_gym")

TASKS = {  # task -> items drawn
    "basic_arithmetic": 40,
    "chain_sum": 25,
    "products": 25,
    "decimal_arithmetic": 25,
    "decimal_chain_sum": 25,
    "fraction_simplification": 25,
    "gcd": 10,
    "lcm": 10,
}


def _thousands(text: str) -> str:
    sign, body = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, dot, frac = body.partition(".")
    return sign + f"{int(whole):,}" + dot + frac


def _renderings(value: str, rng: random.Random) -> list[str]:
    """The ways a model writes the final answer ``value`` (a number or a/b fraction)."""
    out = [f"Let me compute step by step.\nSo the result is \\boxed{{{value}}}.",
           f"The answer is {value}.",
           f"After simplifying, the answer is **{value}**.",
           f"Work: ...\n#### {value}",
           f"The answer is {value}, which I double-checked by estimating.",
           f"Final answer: {value}\n\nLet me know if you need more detail!"]
    if "/" in value:
        num, den = value.split("/")
        sign = "-" if num.startswith("-") else ""
        out.append(f"The simplified fraction is $\\dfrac{{{num}}}{{{den}}}$.")
        out.append(f"Answer: $\\frac{{{num}}}{{{den}}}$ (already in lowest terms)")
        out.append(f"The answer is {sign}\\boxed{{\\dfrac{{{num.lstrip('-')}}}{{{den}}}}}."
                   if sign else f"Thus \\boxed{{\\dfrac{{{num}}}{{{den}}}}}.")
    else:
        out.append(f"The answer is ${value}$.")
        if abs(float(value)) >= 1000:
            out.append(f"The answer is **{_thousands(value)}**.")
            out.append(f"#### {_thousands(value)}")
        if "." not in value and abs(int(value)) >= 10 and int(value) % 10 == 0:
            digits = value.lstrip("-").rstrip("0")
            exp = len(value.lstrip("-")) - 1
            mant = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
            sign = "-" if value.startswith("-") else ""
            out.append(f"The answer is {sign}{mant}e{exp}.")
            out.append(f"The answer is ${sign}{mant} \\times 10^{{{exp}}}$.")
        elif "." not in value and abs(int(value)) >= 100000:
            digits = value.lstrip("-")
            sign = "-" if value.startswith("-") else ""
            out.append(f"The product is {sign}{digits[0]}.{digits[1:]}e{len(digits) - 1}.")
            out.append(f"The answer is {sign}{digits[0]}.{digits[1:]} \u00d7 10^{len(digits) - 1}.")
    if value.startswith("-"):
        out.append(f"The answer is \u2212{value[1:]}.")
        out.append(f"So the answer is **\u2212{value[1:]}**.")
    return out


def _wrong_values(value: str, rng: random.Random) -> list[str]:
    """Values a human grader marks wrong: each differs from ``value``."""
    wrong = set()
    if "/" in value:
        num, den = (int(x) for x in value.split("/"))
        wrong |= {f"{num}/{den + 1}", f"{num + 1}/{den}", f"{den}/{num}" if num else "1/2",
                  f"{-num}/{den}"}
    elif "." in value:
        digits = len(value.split(".")[1])
        step = Fraction(1, 10 ** digits)
        exact = Fraction(value)
        for delta in (step, -step, 1, Fraction(1, 10)):
            wrong.add(_as_decimal(exact + delta, digits))
        wrong.add(_as_decimal(-exact, digits))
        wrong.add(_as_decimal(exact * 10, digits))
    else:
        n = int(value)
        wrong |= {str(n + 1), str(n - 1), str(-n) if n else "7", str(n * 10)}
        if abs(n) >= 10:
            wrong.add(value[:-1])  # last digit dropped
    wrong.discard(value)
    return sorted(w for w in wrong if Fraction(w) != Fraction(value))


def _as_decimal(x: Fraction, digits: int) -> str:
    sign = "-" if x < 0 else ""
    x = abs(x)
    whole = int(x)
    frac = round((x - whole) * 10 ** digits)
    if frac == 10 ** digits:
        whole, frac = whole + 1, 0
    return f"{sign}{whole}.{frac:0{digits}d}" if digits else f"{sign}{whole}"


def _plain_value(reference: str) -> str:
    """reasoning-gym writes some fractions as ``$a/b$`` or ``\\dfrac{a}{b}``: as ``a/b``."""
    text = reference.strip("$ ")
    match = re.fullmatch(r"(-?)\\d?frac\{(-?\d+)\}\{(\d+)\}", text)
    return f"{match.group(1)}{match.group(2)}/{match.group(3)}" if match else text


def _dataset():
    rng = random.Random(0)
    rows = []  # (task, response, reference, human grade)
    for task, size in TASKS.items():
        for entry in reasoning_gym.create_dataset(task, size=size, seed=11):
            reference = entry["answer"]
            value = _plain_value(reference)
            for text in _renderings(value, rng):
                rows.append((task, text, reference, 1.0))
            for wrong in _wrong_values(value, rng):
                for text in rng.sample(_renderings(wrong, rng), 3):
                    rows.append((task, text, reference, 0.0))
    return rows


def test_math_agrees_with_the_human_grader_and_never_passes_a_wrong_answer():
    rows = _dataset()
    formats = {r[1].split(" ")[0] for r in rows}
    assert len(rows) > 1500 and len(formats) >= 8
    verdicts = [verify("math", text, ref).reward for _, text, ref, _ in rows]
    agree = sum(v == grade for v, (*_, grade) in zip(verdicts, rows)) / len(rows)
    false_pass = [(task, text, ref) for v, (task, text, ref, grade) in zip(verdicts, rows)
                  if grade == 0.0 and v == 1.0]
    missed = [(task, text, ref) for v, (task, text, ref, grade) in zip(verdicts, rows)
              if grade == 1.0 and v == 0.0]
    print(f"math agreement {agree:.2%} on {len(rows)} responses; {len(missed)} missed")
    for row in missed:
        print("missed", row)
    assert not false_pass, false_pass[:10]
    assert agree >= 0.98, missed[:20]
