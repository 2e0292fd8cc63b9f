"""Tables for the math, if and mc verifiers, and the verify/verify_batch entry points."""

import json
import logging
import shutil

import pytest
from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT as IFEVAL_IDS

from mopd.verifiers import Verdict, verify, verify_batch
from mopd.verifiers.choice import extract_choice
from mopd.verifiers.ifeval import ifeval_reference
from mopd.verifiers.math_answer import last_boxed, normalize

# (response, reference, expected reward)
MATH_TABLE = [
    ("\\boxed{22}", "22", 1.0),
    ("The answer is 22.", "22", 1.0),
    ("so x = 5 and then 7", "7", 1.0),  # last number
    ("answer: 1,200", "1200", 1.0),
    ("\\boxed{22.0}", "22", 1.0),
    ("\\boxed{-0.50}", "-1/2", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "\\frac12", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{\\sqrt{4}}", "2", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{x+1}", "1+x", 1.0),
    ("\\boxed{3}", "\\frac{6}{2}", 1.0),
    ("\\boxed{(1,2)}", "(1,2)", 1.0),
    ("\\boxed{\\pi}", "\\pi", 1.0),
    ("\\boxed{\\frac{1}{2}} then \\boxed{3}", "3", 0.0),  # several boxes: a set, no hedging
    ("\\boxed{9999999999999999999999}", "9999999999999999999999", 1.0),
    ("The answer is **42**.", "42", 1.0),  # markdown bold
    ("The answer is 42, as computed above.", "42", 1.0),  # text after the answer
    ("The answer is \u22125.", "-5", 1.0),  # Unicode minus
    ("The answer is $\\dfrac{3}{4}$.", "3/4", 1.0),
    ("#### 1,234", "1234", 1.0),
    ("The answer is 2.5e3.", "2500", 1.0),
    # the old last-number fallback passed these wrong answers
    ("The answer is \u22125.", "5", 0.0),  # minus dropped
    ("The answer is $\\dfrac{3}{4}$.", "4", 0.0),  # denominator
    ("The answer is 2.5e3.", "3", 0.0),  # exponent
    ("The answer is 2.5e3.", "2.5", 0.0),  # mantissa
    ("**41** is close, but the answer is 42", "41", 0.0),
    # false positives that must be rejected
    ("\\boxed{-3}", "3", 0.0),
    ("\\boxed{22}", "23", 0.0),
    ("22 then 23", "22", 0.0),
    ("\\boxed{x+2}", "x+1", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.33", 0.0),
    ("\\boxed{2}", "\\sqrt{8}", 0.0),
    ("\\boxed{22} is wrong, the answer is 23", "22", 1.0),  # a box beats prose
    ("\\boxed{23}, not 22", "22", 0.0),
    ("\\boxed{220}", "22", 0.0),
    ("\\boxed{2.2}", "22", 0.0),
    ("\\boxed{x}", "y", 0.0),
    ("", "5", 0.0),
    ("no numbers here", "5", 0.0),
    ("\\boxed{}", "5", 0.0),
]


@pytest.mark.parametrize("response,reference,expected", MATH_TABLE)
def test_math_table(response, reference, expected):
    verdict = verify("math", response, reference)
    assert verdict.reward == expected, verdict


def test_math_extraction_and_reasons():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert normalize("\u2212 5 is \u22125, 2.5e3 or 2.5 \\times 10^{3}.") == "-5 is -5, 2500 or 2500"
    assert normalize("**42** and 2**3**4 and -\\boxed{3}") == "42 and 2**3**4 and \\boxed{-3}"
    assert verify("math", "", "5").reason == "no answer found"
    assert verify("math", "\\boxed{4}", "5").reason == "wrong answer '4'"
    assert verify("math", "\\boxed{" + "1+" * 500 + "1}", "5").reason == "answer too long"


def test_math_explosive_answers_are_rejected_fast_in_any_thread():
    """math-verify's timeout needs the main thread; these would hang sympy in a worker."""
    import threading
    import time

    bombs = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{2^3^4^5}", "\\boxed{2**3**4**5}",
             "\\boxed{2^{123456789}}", "\\boxed{(10^{100})!}", "\\boxed{99999!}",
             "\\boxed{(x+1)^{999}}"]
    out: list = []

    def worker():
        start = time.monotonic()
        out.extend(verify("math", b, "5") for b in bombs)
        out.append(time.monotonic() - start)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive() and out[-1] < 1.0
    assert all(v.reason.startswith("answer too large") for v in out[:-1])
    assert verify("math", "\\boxed{2^{10}}", "1024").reward == 1.0  # ordinary powers still work
    assert verify("math", "\\boxed{5!}", "120").reward == 1.0
    assert verify("math", "\\boxed{10^{100}}", "10^{100}").reward == 1.0


GARBAGE = [b"\xff\xfe\x00\x80", b"", "", None, 3.5, ["list"], "\x00" * 10, "}" * 10_000,
           "\\boxed{" * 5_000, "x" * 1_000_000, "\\boxed{\\frac{1}{0}}", "\\boxed{\\left(}"]


@pytest.mark.parametrize("kind,reference", [("math", "5"),
                                            ("if", ifeval_reference(["startend:quotation"])),
                                            ("mc", "B")])
def test_garbage_never_raises(kind, reference):
    for response in GARBAGE:
        verdict = verify(kind, response, reference)
        assert isinstance(verdict, Verdict) and verdict.reward == 0.0 and verdict.reason


def test_bytes_are_decoded():
    assert verify("math", b"\\boxed{5}", "5").reward == 1.0
    assert verify("mc", b"Answer: B", "B").reward == 1.0


# (response, IFEval instruction id, kwargs, followed?) -- the cases the old hand-written
# checkers got wrong, now decided by the official IFEval checkers
IF_TABLE = [
    ("", "punctuation:no_comma", {}, False),  # empty responses fail every instruction
    ("   ", "keywords:forbidden_words", {"forbidden_words": ["bad"]}, False),
    ("\n", "length_constraints:number_words", {"num_words": 5, "relation": "less than"}, False),
    ("no commas here", "punctuation:no_comma", {}, True),
    ("p1\n***\np2\n***\np3", "length_constraints:number_paragraphs", {"num_paragraphs": 3},
     True),  # IFEval's paragraph separator is ***
    ("p1\n\np2\n\np3", "length_constraints:number_paragraphs", {"num_paragraphs": 3}, False),
    ("My answer is yes.", "detectable_format:constrained_response", {}, True),
    ("<<Title>>\nbody", "detectable_format:title", {}, True),
    ("a *b* and *c*", "detectable_format:number_highlighted_sections", {"num_highlights": 2},
     True),
    ("one\n******\ntwo", "combination:two_responses", {}, True),
]


@pytest.mark.parametrize("response,instruction_id,kwargs,ok", IF_TABLE)
def test_if_table(response, instruction_id, kwargs, ok):
    verdict = verify("if", response, ifeval_reference([instruction_id], [kwargs]))
    assert verdict.reward == float(ok), verdict


def test_if_fraction_and_all_modes():
    ids = ["punctuation:no_comma", "length_constraints:number_words", "keywords:existence",
           "startend:end_checker"]
    kwargs = [{}, {"num_words": 3, "relation": "less than"}, {"keywords": ["cat"]},
              {"end_phrase": "!"}]
    v = verify("if", "cat, cat!", ifeval_reference(ids, kwargs))
    assert v.reward == 0.75 and v.reason == "failed: punctuation:no_comma"
    assert verify("if", "cat, cat!", ifeval_reference(ids, kwargs, mode="all")).reward == 0.0
    v = verify("if", "cat cat!", ifeval_reference(ids, kwargs, mode="all"))
    assert (v.reward, v.reason) == (1.0, "all instructions followed")


def test_if_bad_references_score_zero_and_log(caplog, monkeypatch):
    import mopd.verifiers.ifeval as ifeval_module

    monkeypatch.setattr(ifeval_module, "_warned", set())  # each bad reference warns once
    with caplog.at_level(logging.WARNING, logger="mopd.verifiers.ifeval"):
        v = verify("if", "x", ifeval_reference(["haiku:form"]))
    assert v.reward == 0.0 and v.reason.startswith("bad reference: unknown instruction id")
    assert "haiku:form" in caplog.text
    assert verify("if", "x", "not json").reason.startswith("bad reference: reference is not JSON")
    assert verify("if", "x", '{"instruction_id_list": []}').reason.startswith("bad reference")


def test_synthetic_if_references_are_ifeval_rows():
    from mopd.domains import generate

    for record in generate("if", 50, seed=0):
        spec = json.loads(record["reference"])
        assert set(spec) == {"instruction_id_list", "kwargs"}
        assert all(i in IFEVAL_IDS for i in spec["instruction_id_list"])


MC_TABLE = [
    ("Answer: B", "B", 1.0),
    ("answer is (b)", "B", 1.0),
    ("I think (C) is right", "C", 1.0),
    ("D", "D", 1.0),
    (" d. ", "D", 1.0),
    ("A) no... final answer: C", "C", 1.0),
    ("Answer: A", "B", 0.0),
    ("(A) or (B)", "B", 0.0),  # ambiguous: not guessed
    ("Because of this", "B", 0.0),  # a capital letter inside words is not a choice
    ("", "A", 0.0),
    ("The answer is a number", "A", 0.0),
    ("Answer: (a)", "A", 1.0),
    ("The answer is A? no, Answer: B", "A", 0.0),  # the last explicit answer counts
]


@pytest.mark.parametrize("response,reference,expected", MC_TABLE)
def test_mc_table(response, reference, expected):
    assert verify("mc", response, reference).reward == expected


def test_mc_extraction_and_bad_reference():
    assert extract_choice("Answer: **B**") == "B"
    assert verify("mc", "Answer: B", "BB").reason.startswith("bad reference")


@pytest.mark.skipif(shutil.which("bwrap") is None,
                    reason="code verification needs bubblewrap (apt-get install bubblewrap)")
def test_verify_batch_order_and_errors():
    kinds = ["math", "mc", "if", "math", "code"]
    responses = ["\\boxed{3}", "Answer: C", "HI", "7", "def f():\n    return 1"]
    references = ["3", "B", ifeval_reference(["change_case:capital_word_frequency"], [
        {"capital_frequency": 1, "capital_relation": "at least"}]), "8", "assert f() == 1"]
    rewards = [v.reward for v in verify_batch(kinds, responses, references, workers=2)]
    assert rewards == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert verify_batch([], [], []) == []
    with pytest.raises(ValueError, match="lengths differ"):
        verify_batch(["math"], [], ["1"])
    with pytest.raises(ValueError, match="unknown verifier kind 'chess'"):
        verify_batch(["chess"], ["x"], ["1"])
    with pytest.raises(ValueError, match="workers must be >= 1"):
        verify_batch(["math"], ["1"], ["1"], workers=0)
    with pytest.raises(ValueError, match="unknown verifier kind 'poetry'"):
        verify("poetry", "x", "y")
    with pytest.raises(ValueError, match=r"reward must lie in \[0, 1\]"):
        Verdict(1.5, "x")


@pytest.mark.skipif(shutil.which("bwrap") is None,
                    reason="code verification needs bubblewrap (apt-get install bubblewrap)")
def test_verify_batch_runs_each_distinct_program_once():
    """Repeats of one (program, tests) pair share one sandbox run and get the verdict each would
    get alone; the same program against other tests, or another program, runs again."""
    from mopd.verifiers import Sandbox

    class Counting(Sandbox):
        def __init__(self):
            super().__init__()
            self.runs: list[tuple[str, str]] = []

        def run(self, code, tests):
            self.runs.append((code, tests))
            return super().run(code, tests)

    good, bad = "def f():\n    return 1", "def f():\n    return 2"
    fenced = f"Here:\n```python\n{good}```"  # extracts to the same program as `good`
    responses = [good, good, bad, fenced, good, "", bad]
    tests = ["assert f() == 1"] * 4 + ["assert f() == 2", "assert f() == 1", "assert f() == 1"]
    box = Counting()
    got = verify_batch(["code"] * len(responses), responses, tests, workers=2, sandbox=box)
    alone = [verify("code", r, t) for r, t in zip(responses, tests)]
    assert [v.reward for v in got] == [v.reward for v in alone] == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert [v.reason for v in got] == [v.reason for v in alone]
    assert sorted(box.runs) == sorted({(good, tests[0]), (bad, tests[0]), (good, tests[4])})
