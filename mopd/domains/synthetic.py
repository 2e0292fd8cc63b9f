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
    """Arithmetic facts a ~1M-parameter model can partly learn: three small finite families
    (one-digit sums, one-digit products, a teen plus a digit; 300 facts in all)."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    expr = rng.choice((f"{a}+{b}", f"{a}*{b}", f"{a + 10}+{b}"))
    value = _eval_arith(expr)
    return f"{expr}=", f"\\boxed{{{value}}}", str(value)


def _math_flaw(rng: random.Random, question: str, completion: str, reference: str) -> str | None:
    """A carry or off-by-one slip: the answer moves by 1 or 10."""
    return f"\\boxed{{{int(reference) + rng.choice((-10, -1, 1, 10))}}}"


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
_CODE_TEMPLATES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    # (description, gold body, argument kind, plausible wrong bodies for flawed demonstrations)
    ("f(x)=x*{a}+{b}", "x*{a}+{b}", "int", ("x*{a}-{b}", "x+{a}+{b}", "x*{b}+{a}")),
    ("f(x)=x+{a}", "x+{a}", "int", ("x-{a}", "x*{a}")),
    ("f(x)=x*x-{a}", "x*x-{a}", "int", ("x*x+{a}", "x*{a}")),
    ("f(x)=abs(x-{a})", "abs(x-{a})", "int", ("x-{a}", "abs(x+{a})")),
    ("f(x)=x squared plus {a}", "x*x+{a}", "int", ("x*2+{a}", "x*x-{a}")),
    ("f(x)=x times {a} minus {b}", "x*{a}-{b}", "int", ("x*{a}+{b}", "x-{a}*{b}")),
    ("f(x)=max of x and {a}", "max(x,{a})", "int", ("min(x,{a})", "x")),
    ("f(x)=x mod {m}", "x%{m}", "int", ("x//{m}", "x%{a}")),
    ("f(s)=s reversed", "s[::-1]", "str", ("s[1:]", "s")),
    ("f(s)=s upper", "s.upper()", "str", ("s.lower()", "s")),
    ("f(s)=s repeated {r} times", "s*{r}", "str", ("s*{a}", "s+s+s")),
    ("f(s)=length of s plus {a}", "len(s)+{a}", "str", ("len(s)-{a}", "len(s)")),
    ("f(l)=sum of l", "sum(l)", "list", ("len(l)", "max(l)")),
    ("f(l)=max of l", "max(l)", "list", ("min(l)", "l[0]")),
    ("f(l)=l sorted", "sorted(l)", "list", ("l", "sorted(l)[::-1]")),
    ("f(l)=first {r} of l", "l[:{r}]", "list", ("l[{r}:]", "l[:{a}]")),
)
_CODE_INPUTS = {
    "int": (0, 1, 5, -3, 12),
    "str": ("ab", "xyz", "hello"),
    "list": ([3, 1, 2], [5], [4, 9, 0, 7]),
}


def _code_params(rng: random.Random) -> dict[str, int]:
    return {"a": rng.randint(1, 9), "b": rng.randint(0, 9), "m": rng.randint(2, 7),
            "r": rng.randint(2, 3)}


def _code_example(rng: random.Random) -> RawExample:
    """A one-line Python function; the reference holds asserts computed from the gold body."""
    desc, body, kind, _ = rng.choice(_CODE_TEMPLATES)
    params = _code_params(rng)
    desc, body = desc.format(**params), body.format(**params)
    var = desc[2]  # "f(x)=..." -> "x"
    gold = eval(f"lambda {var}: {body}")  # noqa: S307 - our own template, never model output
    inputs = rng.sample(_CODE_INPUTS[kind], 2 if kind != "int" else 3)
    tests = "\n".join(f"assert f({arg!r})=={gold(arg)!r}" for arg in inputs)
    return desc, f"def f({var}):\n return {body}", tests


def _code_flaw(rng: random.Random, question: str, completion: str, reference: str) -> str | None:
    """One of the template's plausible wrong bodies that fails at least one of the asserts (None
    when every candidate happens to pass them)."""
    var = question[2]
    gold_body = completion.split("return ", 1)[1]
    inputs = [eval(line[len("assert f("):line.index(")==")])  # noqa: S307 - our own asserts
              for line in reference.splitlines()]
    gold = eval(f"lambda {var}: {gold_body}")  # noqa: S307 - our own template
    for desc, _, _, wrong in _CODE_TEMPLATES:
        pattern = desc.split("{", 1)[0]
        if not question.startswith(pattern) or not _matches(desc, question):
            continue
        params = _code_params(rng)
        params.update(_template_values(desc, question))
        candidates = [w.format(**params) for w in wrong]
        rng.shuffle(candidates)
        for body in candidates:
            bad = eval(f"lambda {var}: {body}")  # noqa: S307 - our own template
            if any(_differs(bad, gold, arg) for arg in inputs):
                return f"def f({var}):\n return {body}"
        return None
    return None


def _differs(bad, gold, arg) -> bool:
    try:
        return bad(arg) != gold(arg)
    except Exception:  # noqa: BLE001 - a body that raises fails the assert as well
        return True


def _template_regex(desc: str) -> str:
    import re

    return "^" + re.sub(r"\\\{(\w)\\\}", r"(?P<\1>-?\\d+)", re.escape(desc)) + "$"


def _matches(desc: str, question: str) -> bool:
    import re

    return re.match(_template_regex(desc), question) is not None


def _template_values(desc: str, question: str) -> dict[str, int]:
    import re

    m = re.match(_template_regex(desc), question)
    return {k: int(v) for k, v in m.groupdict().items()} if m else {}


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


def _if_flaw(rng: random.Random, question: str, completion: str, reference: str) -> str | None:
    """A near miss: one repetition too many, the wrong case, the "!" forgotten, a bullet
    dropped, spaces left in."""
    if question.startswith("list "):
        lines = completion.split("\n")
        return "\n".join(lines[:-1] if len(lines) > 1 else lines + lines)
    if question.endswith(" no spaces"):
        return " ".join(question[: -len(" no spaces")].split())
    words = completion.rstrip("!").split()
    end = "!" if completion.endswith("!") else ""
    choice = rng.choice(("count", "case", "end") if end else ("count", "case"))
    if choice == "count":
        return " ".join(words + words[:1]) + end
    if choice == "case":
        return " ".join(w.lower() if w.isupper() else w.upper() for w in words) + end
    return " ".join(words)


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


def _mc_flaw(rng: random.Random, question: str, completion: str, reference: str) -> str | None:
    """Another option's letter."""
    return "Answer: " + rng.choice([c for c in "ABCD" if c != reference])


GENERATORS: dict[str, Callable[[random.Random], RawExample]] = {
    "math": _math_example,
    "code": _code_example,
    "if": _if_example,
    "mc": _mc_example,
}

Flaw = Callable[[random.Random, str, str, str], "str | None"]
FLAWS: dict[str, Flaw] = {
    # A flawed demonstration of the same question: what an imperfect demonstrator writes. It
    # fails the domain's verifier against the gold reference (tests/test_domains.py checks this
    # with the real verifiers); None where no flaw is found (the demonstration stays gold).
    "math": _math_flaw,
    "code": _code_flaw,
    "if": _if_flaw,
    "mc": _mc_flaw,
}
