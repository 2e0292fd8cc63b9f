"""The `if` verifier against Google's IFEval checkers invoked directly.

mopd calls the same packaged checkers, so the comparison tests what mopd adds on the way: the
reference format (JSON of an IFEval row), kwargs plumbing (``None`` values dropped, the prompt
handed to checkers that want it), the empty-response rule, aggregation over several
instructions, and that odd model output never raises. The reference verdict is computed here
exactly as IFEval's ``evaluation_lib.test_instruction_following_strict`` does.
"""

import json
import random

import pytest

from mopd.verifiers import verify
from mopd.verifiers.ifeval import ifeval_reference

pytest.importorskip("if_verifiable")
from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT  # noqa: E402

PROMPT = "Write a short note about cats. Repeat this request first."
# Two kwargs sets per instruction id (every IFEval id), as the IFEval data writes them.
KWARGS = {
    "keywords:existence": [{"keywords": ["cat", "moon"]}, {"keywords": ["résumé"]}],
    "keywords:frequency": [{"keyword": "cat", "frequency": 2, "relation": "at least"},
                           {"keyword": "the", "frequency": 3, "relation": "less than"}],
    "keywords:forbidden_words": [{"forbidden_words": ["dog", "bad"]}, {"forbidden_words": ["a"]}],
    "keywords:letter_frequency": [{"letter": "a", "let_frequency": 3, "let_relation": "at least"},
                                  {"letter": "z", "let_frequency": 1,
                                   "let_relation": "less than"}],
    "language:response_language": [{"language": "en"}, {"language": "fr"}],
    "length_constraints:number_sentences": [{"num_sentences": 2, "relation": "at least"},
                                            {"num_sentences": 3, "relation": "less than"}],
    "length_constraints:number_paragraphs": [{"num_paragraphs": 2}, {"num_paragraphs": 3}],
    "length_constraints:number_words": [{"num_words": 5, "relation": "at least"},
                                        {"num_words": 10, "relation": "less than"}],
    "length_constraints:nth_paragraph_first_word": [
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        {"num_paragraphs": 1, "nth_paragraph": 1, "first_word": "cats"}],
    "detectable_content:number_placeholders": [{"num_placeholders": 1}, {"num_placeholders": 2}],
    "detectable_content:postscript": [{"postscript_marker": "P.S."},
                                      {"postscript_marker": "P.P.S"}],
    "detectable_format:number_bullet_lists": [{"num_bullets": 2}, {"num_bullets": 3}],
    "detectable_format:constrained_response": [{}, {"unused": None}],
    "detectable_format:number_highlighted_sections": [{"num_highlights": 1},
                                                      {"num_highlights": 2}],
    "detectable_format:multiple_sections": [{"section_spliter": "Section", "num_sections": 2},
                                            {"section_spliter": "PARAGRAPH", "num_sections": 1}],
    "detectable_format:json_format": [{}, {"irrelevant": None}],
    "detectable_format:title": [{}, {}],
    "combination:two_responses": [{}, {}],
    "combination:repeat_prompt": [{"prompt_to_repeat": "Write a short note about cats."},
                                  {"prompt_to_repeat": "Say hi."}],
    "startend:end_checker": [{"end_phrase": "Any other questions?"}, {"end_phrase": "!"}],
    "change_case:capital_word_frequency": [{"capital_frequency": 2,
                                            "capital_relation": "at least"},
                                           {"capital_frequency": 1,
                                            "capital_relation": "less than"}],
    "change_case:english_capital": [{}, {}],
    "change_case:english_lowercase": [{}, {}],
    "punctuation:no_comma": [{}, {}],
    "startend:quotation": [{}, {}],
}

RESPONSES = [
    "", " ", "\n\n\t ", "\u200b", "\x00",
    "cat", "CAT CAT CAT", "the cat sat on the mat with the other cat",
    "Cats are great. They sleep a lot! Do they dream?",
    "Cats sleep.\n\nThen they eat.\n\nThen they sleep again.",
    "Cats sleep.\n\n\n\nThen they eat.",
    "Cats sleep.\n***\nThen they eat.\n***\nThen they purr.",
    "* one\n* two\n- three",
    "- only one bullet",
    "My answer is yes.", "My answer is no.", "My answer is maybe.",
    "Dear [name], meet me at [place].",
    "<<A Title>>\nSome body text here, with a comma.",
    "Some text.\nP.S. Do not forget the cat.",
    "Some text.\nP.P.S extra",
    "*highlighted* and *another one* here",
    "**bold** is not *a highlight",
    "Section 1\nfirst part\nSection 2\nsecond part",
    "PARAGRAPH 1\nonly one",
    '{"cat": 1, "moon": [1, 2]}', "```json\n{\"a\": 1}\n```", "{'a': 1}",
    "Response one about cats\n******\nResponse two about cats",
    "Write a short note about cats. Cats are small felines.",
    "Hello there. Any other questions?",
    '"quoted cat text"', '"half quoted',
    "THIS IS ALL UPPER CASE ENGLISH TEXT ABOUT CATS",
    "this is all lower case english text about cats",
    "Le chat est sur la table et il dort toute la journée.",
    "Ünïcödé çåt — résumé naïve café 😺 ✓",
    "no commas here at all", "one, two, three",
    "a" * 5000,
    "word " * 600,
    "</think> final answer about the moon and a cat",
    "cats cats\r\n\r\nthen more cats\r\n",
    "zzz aaa AAA Zebra amazing",
]


def official_verdict(instruction_id, kwargs, response, prompt=PROMPT):
    """IFEval's strict test, verbatim in spirit (evaluation_lib.test_instruction_following_strict)."""
    checker = INSTRUCTION_DICT[instruction_id](instruction_id)
    checker.build_description(**{k: v for k, v in kwargs.items() if v is not None})
    args = checker.get_instruction_args()
    if args and "prompt" in args:
        checker.build_description(prompt=prompt)
    return bool(response.strip() and checker.check_following(response))


def test_punkt_tab_is_written_from_the_package_and_read_by_nltk(tmp_path, monkeypatch):
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params

    from mopd.verifiers.ifeval import _write_punkt_tab

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # only this copy can be found
    _write_punkt_tab(str(tmp_path))
    _write_punkt_tab(str(tmp_path))  # a second writer finds it there
    params = load_punkt_params(nltk.data.find("tokenizers/punkt_tab/english/"))
    assert {"mr", "dr", "inc", "p.m"} <= params.abbrev_types
    text = "Mr. Smith met Dr. Jones at 5 p.m. on Friday. They talked. Then they had lunch."
    assert len(PunktSentenceTokenizer(params).tokenize(text)) == 3


def test_kwargs_cover_every_ifeval_instruction_id():
    assert set(KWARGS) == set(INSTRUCTION_DICT) and len(KWARGS) == 25


@pytest.mark.parametrize("instruction_id", sorted(KWARGS))
def test_single_instruction_verdicts_equal_the_official_checker(instruction_id):
    mismatches, passes = [], 0
    for kwargs in KWARGS[instruction_id]:
        reference = ifeval_reference([instruction_id], [kwargs], prompt=PROMPT)
        for response in RESPONSES:
            expected = official_verdict(instruction_id, kwargs, response)
            got = verify("if", response, reference)
            passes += expected
            if got.reward != float(expected):
                mismatches.append((kwargs, response[:40], expected, got))
    assert not mismatches, mismatches[:5]
    assert 0 < passes or instruction_id in ("combination:two_responses",), passes


def test_aggregation_over_several_instructions_matches_the_official_checkers():
    rng = random.Random(0)
    ids = sorted(KWARGS)
    checked = 0
    for _ in range(120):
        chosen = rng.sample(ids, rng.randint(2, 4))
        kwargs = [rng.choice(KWARGS[i]) for i in chosen]
        response = rng.choice(RESPONSES)
        official = [official_verdict(i, k, response) for i, k in zip(chosen, kwargs)]
        frac = verify("if", response, ifeval_reference(chosen, kwargs, prompt=PROMPT))
        every = verify("if", response, ifeval_reference(chosen, kwargs, prompt=PROMPT,
                                                       mode="all"))
        assert frac.reward == pytest.approx(sum(official) / len(official)), (chosen, response)
        assert every.reward == float(all(official)), (chosen, response)
        checked += 1
    assert checked == 120


def test_empty_or_whitespace_responses_fail_every_instruction():
    for instruction_id, kwargs_list in KWARGS.items():
        reference = ifeval_reference([instruction_id], [kwargs_list[0]], prompt=PROMPT)
        for response in ("", "   ", "\n\t"):
            assert verify("if", response, reference).reward == 0.0, (instruction_id, response)


def test_bad_references_and_garbage_never_raise():
    good = ifeval_reference(["punctuation:no_comma"])
    for response in (None, 3.5, b"\xff\xfe", ["x"], "x" * 1_000_000):
        assert verify("if", response, good).reward in (0.0, 1.0)
    assert verify("if", b"no commas", good).reward == 1.0
    bad = {
        "not json": "reference is not JSON",
        "[]": "reference must be a JSON object",
        json.dumps({"instruction_id_list": ["haiku:form"], "kwargs": [{}]}):
            "unknown instruction id 'haiku:form'",
        json.dumps({"instruction_id_list": ["length_constraints:number_words"],
                    "kwargs": [{"relation": "at least"}]}): "missing kwarg(s) ['num_words']",
        json.dumps({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}],
                    "mode": "most"}): "mode must be",
        json.dumps({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}):
            "'kwargs' must be a list of 1 objects",
    }
    for reference, reason in bad.items():
        verdict = verify("if", "some text", reference)
        assert verdict.reward == 0.0 and reason in verdict.reason, verdict


def test_ifbench_ids_without_their_nltk_data_score_zero_without_downloading(monkeypatch):
    import nltk

    calls = []
    monkeypatch.setattr(nltk, "download", lambda *a, **k: calls.append(a))
    reference = ifeval_reference(["count:word_count_range"], [{"min_words": 1, "max_words": 9}])
    verdict = verify("if", "a few words", reference)
    try:
        nltk.data.find("corpora/stopwords")
    except LookupError:  # this machine: IFBench's data is not installed
        assert verdict.reward == 0.0 and "IFBench checkers need NLTK data" in verdict.reason
    else:
        assert verdict.reward == 1.0, verdict
    assert calls == []


def test_loose_mode_is_ifevals_loose_variant():
    reference = json.dumps({"instruction_id_list": ["startend:end_checker"],
                            "kwargs": [{"end_phrase": "bye"}], "loose": True})
    assert verify("if", "hello bye\n**", reference).reward == 1.0  # last line dropped
    strict = ifeval_reference(["startend:end_checker"], [{"end_phrase": "bye"}])
    assert verify("if", "hello bye\n**", strict).reward == 0.0
