"""The math verifier against reasoning-gym's own scorer, on reasoning-gym's ``<answer>`` format.

reasoning-gym's prompts ask for ``<answer>...</answer>`` and its reward is
``dataset.score_answer(answer=extract_answer(response), entry=entry)``. For 8 arithmetic tasks,
responses are built from each item's own answer: right (the answer string; the notations that
task's ``score_answer`` accepts; after reasoning that quotes the question's numbers, inside
``<think>``, with extra whitespace, after an earlier wrong draft tag, after a wrong ``\\boxed``)
and wrong (off by one in the last digit, sign flipped, another item's answer, a fraction's
numerator or denominator changed, a right draft followed by a wrong final tag, a right
``\\boxed`` followed by a wrong or wordy tag). On every response mopd's ``verify("math", ...)``
gives 1.0 exactly when reasoning-gym gives 1.0, and both match the construction.

Tasks kept: basic_arithmetic, chain_sum, products, decimal_chain_sum, fraction_simplification,
gcd, lcm, dice. Excluded from the arithmetic group, because agreement is not meaningful there
(``test_known_disagreements`` pins the cases down):

- decimal_arithmetic: reasoning-gym accepts any value within 10^-3 of the 12-digit answer
  (``max_num_decimal_places``), so a rounded or off-by-0.001 value scores 1.0; mopd compares at
  the precision the reference is written with.
- power_function: reasoning-gym compares 3 significant figures.
- number_format: reasoning-gym accepts a value within 0.01.
- prime_factorization: the answer is a list of factors ``3 × 3 × 71``; reasoning-gym gives 0.5
  to their product 639, which math-verify reads as equal.
- time_intervals, calendar_arithmetic: durations, clock times, weekdays and yes/no are not
  answers math-verify reads: mopd scores the exact ``01:45:29.840`` or ``Monday`` 0.
- bitwise_arithmetic: math-verify does not read hexadecimal: mopd scores a *wrong* ``0x1d6b1``
  1.0 against ``0x1d6b0``. Never train on this task with the math verifier.
- gsm_symbolic: word problems, scored by the first number found in the tag.
- count_bits, leg_counting: would fit, but are scored like gcd/lcm (a plain number compared as
  a string) and add nothing to the set.

Within the kept tasks the scorers accept different *notations*: basic_arithmetic, gcd, lcm and
dice compare strings, so ``1,000``, ``+5``, ``5.0``, ``$5$``, ``\u22125`` or ``- 5`` get less
than 1.0 there, where math-verify's equivalence gives 1.0. Such renderings are generated only
for the tasks whose scorer accepts them (chain_sum and products: ``Decimal`` after dropping
commas; decimal_chain_sum: ``Decimal``; fraction_simplification: ``a/b`` or ``\\frac{a}{b}``).
Prose inside the tag (``<answer>x = 5</answer>``) is read by math-verify and is not generated;
nor are leading zeros with thousands separators (math-verify reads ``01,234`` as 1.234).
"""

import random
import time
from decimal import Decimal
from fractions import Fraction

import pytest

from mopd.verifiers import verify
from mopd.verifiers.math_answer import answer_tag

reasoning_gym = pytest.importorskip("reasoning_gym")
from reasoning_gym.utils import extract_answer

TASKS = ["basic_arithmetic", "chain_sum", "products", "decimal_chain_sum",
         "fraction_simplification", "gcd", "lcm", "dice"]
ITEMS = 8  # per task
SEED = 24


def _value(task: str, entry: dict) -> Fraction:
    """The item's answer as an exact number."""
    if task == "fraction_simplification":
        meta = entry["metadata"]
        return Fraction(meta["simplified_numerator"], meta["simplified_denominator"])
    answer = entry["answer"]
    return Fraction(answer) if "/" in answer else Fraction(Decimal(answer))


def _plain(task: str, value: Fraction, like: str) -> str:
    """``value`` written the way the task's answers are (``like``: a reference answer)."""
    if task in ("fraction_simplification", "dice"):
        return f"{value.numerator}/{value.denominator}"
    if "." in like:
        places = len(like.split(".")[1])
        return f"{Decimal(value.numerator) / Decimal(value.denominator):.{places}f}"
    return str(value.numerator)


def _thousands(text: str) -> str:
    sign, body = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, dot, frac = body.partition(".")
    return f"{sign}{int(whole):,}{dot}{frac}"


def _notations(task: str, answer: str) -> list[str]:
    """Other ways of writing ``answer`` that the task's own scorer accepts (score 1.0)."""
    if task in ("chain_sum", "products"):  # Decimal after dropping commas
        out = [f"{answer}.0", f"{answer}.00", _thousands(answer) + ".00"]
        if abs(int(answer)) >= 1000:
            out.append(_thousands(answer))
        if not answer.startswith("-"):
            out += [f"+{answer}", f"+{_thousands(answer)}", f"00{answer}"]
        return out
    if task == "decimal_chain_sum":  # Decimal
        out = [answer + "0", answer.rstrip("0").rstrip(".")] if "." in answer else [f"{answer}.0"]
        if not answer.startswith("-"):
            out.append(f"+{answer}")
        if answer.lstrip("-").startswith("0."):
            out.append(answer.replace("0.", ".", 1))
        return out
    if task == "fraction_simplification":  # a/b, $a/b$ or \frac / \dfrac
        num, den = answer.split("/")
        return [answer, f"${answer}$", f" {num} / {den} ", f"\\frac{{{num}}}{{{den}}}",
                f"\\dfrac{{{num}}}{{{den}}}", f"$\\dfrac{{{num}}}{{{den}}}$",
                f"$\\frac{{{num}}}{{{den}}}$", f"+{answer}"]
    return []  # basic_arithmetic, gcd, lcm, dice compare the string itself


def _wrong_values(task: str, value: Fraction, like: str, other: Fraction) -> list[str]:
    """Values reasoning-gym and a human grader mark wrong: each differs from ``value``."""
    if task in ("fraction_simplification", "dice"):
        num, den = value.numerator, value.denominator
        candidates = [Fraction(num + 1, den), Fraction(num, den + 1), -value, other]
        if num:
            candidates.append(Fraction(den, num))
    else:
        step = Fraction(1, 10 ** len(like.split(".")[1])) if "." in like else Fraction(1)
        candidates = [value + step, value - step, -value, other]
    return sorted({_plain(task, c, like) for c in candidates if c != value})


def _reasoning(entry: dict) -> str:
    return (f"We need to solve: {entry['question']}\nWorking through it term by term and "
            f"checking each step against an estimate, the result is below.\n")


def _rows():
    """(task, entry, response, right?) for every response; the construction is the grade."""
    rng = random.Random(SEED)
    rows = []
    for task in TASKS:
        entries = list(reasoning_gym.create_dataset(task, size=ITEMS, seed=SEED))
        values = [_value(task, e) for e in entries]
        for i, entry in enumerate(entries):
            value = values[i]
            other = next((v for v in values[i + 1:] + values[:i] if v != value), value + 3)
            right = entry["answer"]
            plain = _plain(task, value, right)
            wrongs = _wrong_values(task, value, right, other)
            slip = rng.choice(wrongs)
            why = _reasoning(entry)
            for text in (f"<answer>{right}</answer>",
                         f"<answer> {right} </answer>",
                         f"<answer>\n{right}\n\n</answer>\n",
                         f"{why}<answer>{right}</answer>",
                         f"<think>\n{why}</think>\n<answer>{right}</answer>",
                         (f"{why}First try: <answer>{slip}</answer>\nA slip; redoing it.\n"
                          f"<answer>{right}</answer>"),
                         (f"{why}I first got \\boxed{{{slip}}}, but rechecked.\n"
                          f"<answer>{right}</answer>")):
                rows.append((task, entry, text, True))
            for form in _notations(task, plain):
                rows.append((task, entry, f"<answer>{form}</answer>", True))
                rows.append((task, entry, f"{why}<answer>\t{form}\n</answer>", True))
            for wrong in wrongs:
                rows.append((task, entry, f"<answer>{wrong}</answer>", False))
                rows.append((task, entry, f"{why}<answer> {wrong} </answer>", False))
                rows.append((task, entry, f"<think>{why}</think><answer>{wrong}</answer>", False))
            rows.append((task, entry, (f"{why}<answer>{right}</answer>\nOn reflection, no:\n"
                                       f"<answer>{slip}</answer>"), False))
            rows.append((task, entry, f"{why}So \\boxed{{{plain}}}.\n<answer>{slip}</answer>",
                         False))
            rows.append((task, entry, f"{why}So \\boxed{{{plain}}}.\n<answer>unsure</answer>",
                         False))
    return rows


@pytest.fixture(scope="module")
def scored():
    rows = _rows()
    datasets = {task: reasoning_gym.create_dataset(task, size=ITEMS, seed=SEED) for task in TASKS}
    start = time.perf_counter()
    out = [(task, text, right,
            datasets[task].score_answer(answer=extract_answer(text), entry=entry),
            verify("math", text, entry["answer"]).reward)
           for task, entry, text, right in rows]
    print(f"\nscored {len(out)} responses in {time.perf_counter() - start:.2f} s")
    return out


def test_rg_scores_the_construction_as_built(scored):
    """The grade of the construction is reasoning-gym's: right ones 1.0, wrong ones below."""
    bad = [(task, text, rg) for task, text, right, rg, _ in scored if (rg == 1.0) != right]
    assert not bad, bad[:10]


def test_math_verifier_agrees_with_reasoning_gym_on_every_response(scored):
    per_task = {task: [0, 0, 0] for task in TASKS}  # responses, right ones, agreements
    for task, _, right, rg, ours in scored:
        per_task[task][0] += 1
        per_task[task][1] += right
        per_task[task][2] += (rg == 1.0) == (ours == 1.0)
    for task, (n, n_right, agree) in per_task.items():
        print(f"{task}: {agree}/{n} agree ({n_right} right, {n - n_right} wrong)")
    n_right = sum(r[2] for r in scored)
    assert len(scored) >= 1000 and n_right >= 400 and len(scored) - n_right >= 400
    assert all(n >= 60 for n, _, _ in per_task.values()), per_task
    missed = [(task, text) for task, text, _, rg, ours in scored if rg == 1.0 and ours != 1.0]
    passed = [(task, text) for task, text, _, rg, ours in scored if rg != 1.0 and ours == 1.0]
    assert not passed, passed[:10]  # a wrong answer that mopd rewards
    assert not missed, missed[:10]  # a right answer that mopd refuses


def test_answer_tag_reads_what_reasoning_gym_reads():
    """Fuzz: ``answer_tag`` equals ``extract_answer`` on texts built from tag fragments."""
    rng = random.Random(7)
    parts = ["<answer>", "</answer>", "<answer", "answer>", " ", "\n", "\t", "7", "-3", "x",
             "\\boxed{2}"]
    texts = ["".join(rng.choice(parts) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    texts += ["<answer>a<answer>b</answer>", "<answer>1</answer><answer>2</answer>",
              "<answer>1</answer><answer>2", "<answer> </answer>"]
    differ = [t for t in texts if answer_tag(t) != extract_answer(t)]
    assert not differ, differ[:5]
    assert answer_tag("<answer>1</answer> then <answer> 2\n</answer>") == "2"


SPACES = [" ", "\u200a", "\u2009", "\u00a0", "\u202f", "\u2002", "\t", "\u200b", "  "]


@pytest.mark.parametrize("sign", ["-", "\u2212"])
@pytest.mark.parametrize("space", SPACES, ids=[f"U+{ord(s[0]):04X}x{len(s)}" for s in SPACES])
def test_a_sign_spaced_from_its_number_keeps_it(sign, space):
    for shape in ("The answer is {}.", "\\boxed{{{}}}", "<answer>{}</answer>", "#### {}",
                  "So the result is **{}**.", "$x = {}$"):
        text = shape.format(f"{sign}{space}7")
        assert verify("math", text, "-7").reward == 1.0, text
        assert verify("math", text, "7").reward == 0.0, text  # not the unsigned 7
    assert verify("math", f"<answer>{sign}{space}7.25</answer>", "-7.25").reward == 1.0
    assert verify("math", f"<answer>{sign}{space}3/4</answer>", "-3/4").reward == 1.0
    assert verify("math", f"<answer>{sign}{space}3/4</answer>", "3/4").reward == 0.0


def test_a_binary_minus_still_subtracts():
    assert verify("math", "\\boxed{10 - 3}", "7").reward == 1.0
    assert verify("math", "The answer is 10 -\u200a3.", "7").reward == 1.0
    assert verify("math", "<answer>10 \u2212 3</answer>", "7").reward == 1.0


@pytest.mark.parametrize("text", ["I could not work this out.", "", "<answer>", "</answer>",
                                  "<answer>seven", "The sum is large; I give up.",
                                  "<answer></answer>", "<answer>no idea</answer>"])
def test_no_tag_and_no_extractable_answer_scores_zero(text):
    for reference in ("7", "-61", "$\\dfrac{242}{311}$", "5.2320"):
        verdict = verify("math", text, reference)
        assert verdict.reward == 0.0, (text, verdict)
        assert verdict.reason in ("no answer found", "no answer in <answer> tag"), (text, verdict)


def test_the_tag_is_the_answer_even_when_the_rest_is_right():
    """With a tag, nothing outside it counts (reasoning-gym reads the tag alone)."""
    assert verify("math", "\\boxed{7}\n<answer>8</answer>", "7").reward == 0.0
    assert verify("math", "\\boxed{7}\n<answer>seven</answer>", "7").reward == 0.0
    assert verify("math", "\\boxed{0.75}\n<answer>three quarters</answer>", "3/4").reward == 0.0
    assert verify("math", "\\boxed{7}\n<answer></answer>", "7").reason == \
        "no answer in <answer> tag"
    assert verify("math", "\\boxed{7}", "7").reward == 1.0  # no tag: math-verify's extraction
    assert verify("math", "\\boxed{8}\n<answer>7</answer>", "7").reward == 1.0
    assert verify("math", "<answer>" + "9^{9^{9}}" + "</answer>", "7").reward == 0.0  # guard
    assert verify("math", "<answer>" + "1+" * 150 + "1</answer>", "7").reason == \
        "answer too long"
    assert verify("math", "<answer>" + "9" * 5000 + "</answer>", "7").reason == "answer too long"
    assert verify("math", "<answer>" * 12000, "7").reason == "no answer found"  # linear scan


def _first(task: str, keep=lambda answer: True) -> tuple:
    dataset = reasoning_gym.create_dataset(task, size=50, seed=5)
    return dataset, next(e for e in dataset if keep(e["answer"]))


def _rg_and_ours(dataset, entry: dict, answer: str) -> tuple[float, float]:
    text = f"<answer>{answer}</answer>"
    return (dataset.score_answer(answer=extract_answer(text), entry=entry),
            verify("math", text, entry["answer"]).reward)


def test_known_disagreements():
    """The reasons for the exclusions above, as numbers: (reasoning-gym, mopd) on one item."""
    ds, e = _first("decimal_arithmetic", lambda a: len(a.split(".")[1]) > 4)
    assert _rg_and_ours(ds, e, f"{float(e['answer']):.3f}") == (1.0, 0.0)  # within 10^-3
    ds, e = _first("power_function", lambda a: "e" not in a and len(a) > 8)
    assert _rg_and_ours(ds, e, f"{Decimal(e['answer']):.3g}") == (1.0, 0.0)  # 3 sig. figures
    ds, e = _first("prime_factorization")
    product = 1
    for factor in e["answer"].split("×"):
        product *= int(factor)
    assert _rg_and_ours(ds, e, str(product)) == (0.5, 1.0)  # factors vs their product
    ds, e = _first("number_format")
    assert _rg_and_ours(ds, e, f"{float(e['answer']):.2f}") == (1.0, 0.0)  # within 0.01
    ds, e = _first("time_intervals", lambda a: ":" in a)
    assert _rg_and_ours(ds, e, e["answer"]) == (1.0, 0.0)  # not a math answer
    ds, e = _first("calendar_arithmetic", lambda a: a.endswith("day"))
    assert _rg_and_ours(ds, e, e["answer"]) == (1.0, 0.0)
    ds, e = _first("bitwise_arithmetic", lambda a: a.startswith("0x"))
    assert _rg_and_ours(ds, e, hex(int(e["answer"], 16) + 1)) == (0.0, 1.0)  # a wrong one passes
    # notation: the string-comparing tasks refuse what math-verify reads as equal
    ds, e = _first("basic_arithmetic", lambda a: a.startswith("-"))
    for form in (f"{e['answer']}.0", f"\u2212{e['answer'][1:]}", f"- {e['answer'][1:]}",
                 f"${e['answer']}$"):
        rg, ours = _rg_and_ours(ds, e, form)
        assert rg < 1.0 and ours == 1.0, form
    ds, e = _first("chain_sum", lambda a: int(a) >= 1000)
    # math-verify reads "01,234" with a decimal comma (1.234); update the docstring if this changes
    assert _rg_and_ours(ds, e, f"0{_thousands(e['answer'])}") == (1.0, 0.0)


def test_a_misscored_task_is_refused_at_load():
    """The tasks pinned above cannot be a domain's data: their rewards would be wrong."""
    from mopd.settings.data import RG_MISSCORED, ReasoningGymSource

    with pytest.raises(ValueError, match="'bitwise_arithmetic' is not scored alike .* a wrong hexadecimal"):
        ReasoningGymSource(source="reasoning_gym", task="bitwise_arithmetic")
    assert {"decimal_arithmetic", "power_function", "number_format", "prime_factorization", "time_intervals",
            "calendar_arithmetic", "bitwise_arithmetic"} == set(RG_MISSCORED)
    ReasoningGymSource(source="reasoning_gym", task="basic_arithmetic", answer_format="answer_tag")


def test_answer_tag_records_carry_reasoning_gyms_instruction_and_verify():
    """`answer_format: answer_tag` (the real pipeline's arithmetic): reasoning-gym's own `direct`
    instruction in the prompt, and a gold completion the math verifier and reasoning-gym both pass."""
    import reasoning_gym
    from reasoning_gym.utils import SYSTEM_PROMPTS

    from mopd.domains.sources import reasoning_gym_records
    from mopd.verifiers import verify_batch

    config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
    recs = reasoning_gym_records("math", "basic_arithmetic", 50, 0, config, "train", "answer_tag")
    entries = list(reasoning_gym.create_dataset("basic_arithmetic", size=50, seed=0, **config))
    assert all(r["prompt"].endswith(SYSTEM_PROMPTS["direct"]) for r in recs)
    assert [v.reward for v in verify_batch(["math"] * 50, [r["completion"] for r in recs],
                                           [r["reference"] for r in recs])] == [1.0] * 50
    ds = reasoning_gym.create_dataset("basic_arithmetic", size=50, seed=0, **config)
    assert all(ds.score_answer(answer=extract_answer(r["completion"]), entry=e) == 1.0 for r, e in zip(recs, entries))
