"""Synthetic verifiable domains sized for a tiny byte-level model.

Every generator maps ``random.Random`` -> one raw example ``(question, completion, reference)``.
Constraints the tiny pipeline relies on (checked by tests/test_domains.py):
- prompt (``"[tag] " + question``) is at most ~48 characters, the gold completion at most 32;
- the answer is a deterministic function of the prompt, so a ~2M-parameter model can learn part
  of it;
- each domain mixes levels of difficulty (copy-like items up to multi-step ones), so SFT gets some
  right and RL still has room to improve.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

RawExample = tuple[str, str, str]  # (question, gold completion, verifier reference)

# ----------------------------------------------------------------------------------------- math


def _math_example(rng: random.Random) -> RawExample:
    """Arithmetic, four levels: 1-digit sums, 2-digit +/-, products, three operands."""
    level = rng.choice((1, 2, 3, 4))
    if level == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        expr = f"{a}+{b}"
    elif level == 2:
        a, b, op = rng.randint(0, 30), rng.randint(0, 30), rng.choice("+-")
        expr = f"{a}{op}{b}"
    elif level == 3:
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        expr = f"{a}*{b}"
    else:
        a, b, c = rng.randint(0, 20), rng.randint(0, 12), rng.randint(0, 9)
        op1, op2 = rng.choice("+-"), rng.choice("+-*")
        expr = f"{a}{op1}{b}{op2}{c}"
    value = _eval_arith(expr)
    return f"{expr}=", f"\\boxed{{{value}}}", str(value)


def _eval_arith(expr: str) -> int:
    """Evaluate ``a op b [op c]`` with + - * and usual precedence, without eval()."""
    terms: list[int] = []  # additive terms after folding products
    sign, num, product = 1, "", None
    for ch in expr + "+":
        if ch.isdigit():
            num += ch
            continue
        value = int(num) if product is None else product * int(num)
        num = ""
        if ch == "*":
            product = value
            continue
        terms.append(sign * value)
        product, sign = None, (1 if ch == "+" else -1)
    return sum(terms)


# ----------------------------------------------------------------------------------------- code

# (description template, body template, argument kind). Descriptions are short; the body is what
# the model must write after "def f(x):\n return ". Early entries copy the prompt, later ones
# translate words into code.
_CODE_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("f(x)=x*{a}+{b}", "x*{a}+{b}", "int"),
    ("f(x)=x+{a}", "x+{a}", "int"),
    ("f(x)=x*x-{a}", "x*x-{a}", "int"),
    ("f(x)=abs(x-{a})", "abs(x-{a})", "int"),
    ("f(x)=x squared plus {a}", "x*x+{a}", "int"),
    ("f(x)=x times {a} minus {b}", "x*{a}-{b}", "int"),
    ("f(x)=max of x and {a}", "max(x,{a})", "int"),
    ("f(x)=x mod {m}", "x%{m}", "int"),
    ("f(s)=s reversed", "s[::-1]", "str"),
    ("f(s)=s upper", "s.upper()", "str"),
    ("f(s)=s repeated {r} times", "s*{r}", "str"),
    ("f(s)=length of s plus {a}", "len(s)+{a}", "str"),
    ("f(l)=sum of l", "sum(l)", "list"),
    ("f(l)=max of l", "max(l)", "list"),
    ("f(l)=l sorted", "sorted(l)", "list"),
    ("f(l)=first {r} of l", "l[:{r}]", "list"),
)
_CODE_INPUTS = {
    "int": (0, 1, 5, -3, 12),
    "str": ("ab", "xyz", "hello"),
    "list": ([3, 1, 2], [5], [4, 9, 0, 7]),
}


def _code_example(rng: random.Random) -> RawExample:
    """A one-line Python function; the reference holds asserts computed from the gold body."""
    desc, body, kind = rng.choice(_CODE_TEMPLATES)
    params = {"a": rng.randint(1, 9), "b": rng.randint(0, 9), "m": rng.randint(2, 7),
              "r": rng.randint(2, 3)}
    desc, body = desc.format(**params), body.format(**params)
    var = desc[2]  # "f(x)=..." -> "x"
    gold = eval(f"lambda {var}: {body}")  # noqa: S307 - our own template, never model output
    inputs = rng.sample(_CODE_INPUTS[kind], 2 if kind != "int" else 3)
    tests = "\n".join(f"assert f({arg!r})=={gold(arg)!r}" for arg in inputs)
    return desc, f"def f({var}):\n return {body}", tests


# ------------------------------------------------------------------------------------------- if

_IF_WORDS = ("cat", "dog", "sun", "red", "blue", "tree", "fish", "bird", "moon", "star")


def _ifeval(*instructions: tuple[str, dict]) -> str:
    """The reference: IFEval instruction ids + kwargs, the layout of a real IFEval row (the
    `if` verifier runs Google's official checkers on it)."""
    return json.dumps({"instruction_id_list": [i for i, _ in instructions],
                       "kwargs": [k for _, k in instructions]})


def _if_example(rng: random.Random) -> RawExample:
    """Simple format constraints a tiny model can learn, as IFEval instructions."""
    style = rng.choice(("repeat", "repeat", "end", "bullets", "join"))
    word = rng.choice(_IF_WORDS)
    if style == "bullets":
        words = rng.sample(_IF_WORDS, rng.randint(2, 4))
        question = "list " + ",".join(words)
        completion = "\n".join(f"- {w}" for w in words)
        return question, completion, _ifeval(
            ("detectable_format:number_bullet_lists", {"num_bullets": len(words)}),
            ("keywords:existence", {"keywords": words}))
    if style == "join":
        words = rng.sample(_IF_WORDS, 3)
        question = " ".join(words) + " no spaces"
        return question, "".join(words), _ifeval(
            ("length_constraints:number_words", {"num_words": 2, "relation": "less than"}),
            ("keywords:frequency", {"keyword": "".join(words), "frequency": 1,
                                    "relation": "at least"}))
    n = rng.randint(1, 6)
    case = rng.choice(("upper", "lower"))
    text = " ".join([word.upper() if case == "upper" else word] * n)
    # upper: at least n all-capital words; lower: no all-capital word at all
    capitals = ({"capital_frequency": n, "capital_relation": "at least"} if case == "upper"
                else {"capital_frequency": 1, "capital_relation": "less than"})
    cons = [("change_case:capital_word_frequency", capitals),
            ("length_constraints:number_words", {"num_words": n + 1, "relation": "less than"}),
            ("keywords:frequency", {"keyword": word, "frequency": n, "relation": "at least"})]
    if style == "end":
        cons.append(("startend:end_checker", {"end_phrase": "!"}))
        return f"{word} x{n} {case} end !", text + "!", _ifeval(*cons)
    return f"{word} x{n} {case}", text, _ifeval(*cons)


# ------------------------------------------------------------------------------------------- mc


def _mc_example(rng: random.Random) -> RawExample:
    """Four-way multiple choice over small numbers; the answer is a letter."""
    kind = rng.choice(("sum", "sum", "max", "min", "even"))
    if kind == "sum":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        question, answer = f"{a}+{b}?", a + b
        options = {answer}
        while len(options) < 4:
            options.add(max(0, answer + rng.randint(-3, 3)))
        choices = sorted(options)
    elif kind in ("max", "min"):
        choices = rng.sample(range(0, 50), 4)
        question = "largest?" if kind == "max" else "smallest?"
        answer = max(choices) if kind == "max" else min(choices)
    else:
        answer = 2 * rng.randint(0, 24)
        choices = rng.sample(range(1, 50, 2), 3) + [answer]
        rng.shuffle(choices)
        question = "even?"
    letter = "ABCD"[choices.index(answer)]
    shown = " ".join(f"{'ABCD'[i]}){c}" for i, c in enumerate(choices))
    return f"{question} {shown}", f"Answer: {letter}", letter


GENERATORS: dict[str, Callable[[random.Random], RawExample]] = {
    "math": _math_example,
    "code": _code_example,
    "if": _if_example,
    "mc": _mc_example,
}
