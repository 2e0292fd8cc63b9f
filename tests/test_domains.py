"""Synthetic domains, the registry and the real-data loader (local files only, never the hub)."""

import json
import shutil

import pytest


def _needs_bwrap(domain: str) -> None:
    if domain == "code" and shutil.which("bwrap") is None:
        pytest.skip("code verification needs bubblewrap (apt-get install bubblewrap)")


from mopd.domains import DOMAINS, DataSource, Domain, generate, get_domain, load_records
from mopd.verifiers import verify, verify_batch

KINDS = ["math", "code", "if", "mc"]


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    """Keep the `datasets` Arrow cache out of ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.mark.parametrize("domain", KINDS)
def test_generate_is_deterministic_and_well_formed(domain):
    recs = generate(domain, 300, seed=7)
    assert recs == generate(domain, 300, seed=7)
    assert recs[:50] == generate(domain, 50, seed=7)  # prefix-stable in n
    assert recs != generate(domain, 300, seed=8)
    assert len({r["id"] for r in recs}) == 300
    tag = f"[{domain}] "
    for r in recs:
        assert set(r) == {"id", "domain", "prompt", "completion", "reference"}
        assert all(isinstance(v, str) for v in r.values())
        assert r["domain"] == domain and r["prompt"].startswith(tag)
        assert len(r["prompt"]) <= 48, r["prompt"]
        assert len(r["completion"]) <= 32, r["completion"]


@pytest.mark.parametrize("domain", KINDS)
def test_gold_completions_score_one_and_prompt_determines_answer(domain):
    _needs_bwrap(domain)
    recs = generate(domain, 200, seed=1)
    kind = get_domain(domain).verifier
    verdicts = verify_batch([kind] * len(recs), [r["completion"] for r in recs],
                            [r["reference"] for r in recs])
    assert [v.reward for v in verdicts] == [1.0] * len(recs), [v for v in verdicts if v.reward < 1]
    by_prompt: dict[str, set[str]] = {}
    for r in recs:
        by_prompt.setdefault(r["prompt"], set()).add(r["completion"])
    assert all(len(c) == 1 for c in by_prompt.values())  # deterministic prompt -> answer


@pytest.mark.parametrize("domain", KINDS)
def test_other_records_gold_mostly_fails(domain):
    """Answers are not constant: a record's gold scored against the next record's reference."""
    _needs_bwrap(domain)
    recs = generate(domain, 60, seed=3)
    kind = get_domain(domain).verifier
    rewards = [verify(kind, a["completion"], b["reference"]).reward
               for a, b in zip(recs, recs[1:])]
    assert sum(rewards) / len(rewards) < 0.7


def test_exclude_prompts_gives_disjoint_eval_sets():
    train = generate("math", 500, seed=0)
    seen = {r["prompt"] for r in train}
    evals = generate("math", 200, seed=1, exclude_prompts=seen)
    assert len(evals) == 200 and not seen & {r["prompt"] for r in evals}
    assert evals == generate("math", 200, seed=1, exclude_prompts=seen)



def test_exclude_prompts_that_cannot_be_met_raises(monkeypatch):
    from mopd.domains import registry

    one = Domain("one", "math", "[one] {question}", lambda rng: ("1+1=", "\\boxed{2}", "2"))
    monkeypatch.setattr(registry, "DOMAINS", {"one": one})
    assert len(generate("one", 3, seed=0)) == 3
    with pytest.raises(ValueError, match=r"only 0 of 5 prompts found outside exclude_prompts"):
        generate("one", 5, seed=0, exclude_prompts={"[one] 1+1="})


def test_math_families_are_small_and_finite():
    prompts = {r["prompt"] for r in generate("math", 3000, seed=0)}
    assert any("*" in p for p in prompts) and any(p.startswith("[math] 1") and len(p) == 12
                                                  for p in prompts)
    assert 250 <= len(prompts) <= 300  # 3 families of 100 facts: learnable by the tiny model


@pytest.mark.parametrize("domain", ["math", "code", "if", "mc"])
def test_flawed_demonstrations_fail_the_real_verifier(domain):
    """A flawed demonstration is wrong by the domain's own verifier (code through the sandbox,
    if through Google's IFEval checkers) while the prompt and reference stay gold."""
    from mopd.verifiers import verify_batch

    gold = generate(domain, 300, seed=5)
    noisy = generate(domain, 300, seed=5, flawed=0.5)
    assert [r["prompt"] for r in noisy] == [r["prompt"] for r in gold]  # own random stream
    assert [r["reference"] for r in noisy] == [r["reference"] for r in gold]
    flawed = [r for r in noisy if r.get("flawed")]
    assert 0.35 * 300 < len(flawed) < 0.6 * 300, len(flawed)
    assert all(r["completion"] != g["completion"] for r, g in zip(noisy, gold) if r.get("flawed"))
    assert all(r["completion"] == g["completion"] for r, g in zip(noisy, gold) if not r.get("flawed"))
    verdicts = verify_batch([domain] * len(flawed), [r["completion"] for r in flawed],
                            [r["reference"] for r in flawed])
    assert all(v.reward < 1.0 for v in verdicts), [
        (r["prompt"], r["completion"], v.reward) for r, v in zip(flawed, verdicts) if v.reward >= 1.0]
    assert generate(domain, 50, seed=5, flawed=0.0) == gold[:50]
    with pytest.raises(ValueError, match="flawed must be a probability"):
        generate(domain, 5, seed=5, flawed=1.5)


def test_registry_and_errors():
    assert sorted(DOMAINS) == sorted(KINDS)
    assert get_domain("math").format_prompt("1+1=") == "[math] 1+1="
    with pytest.raises(ValueError, match="unknown domain 'chess'"):
        get_domain("chess")
    with pytest.raises(ValueError, match="unknown domain 'chess'"):
        generate("chess", 3, 0)
    with pytest.raises(ValueError, match="n must be"):
        generate("math", -1, 0)
    with pytest.raises(ValueError, match="verifier 'poetry'"):
        Domain("x", "poetry", "{question}")
    with pytest.raises(ValueError, match="question"):
        Domain("x", "math", "no field")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_gsm8k_and_math_style(tmp_path):
    src = _write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": "Tom has 3 apples and buys 4.", "answer": "3+4=7\n#### 7"},
        {"question": "Big", "answer": "so #### 1,200"},
    ])
    recs = load_records("math", src)
    assert [r["reference"] for r in recs] == ["7", "1200"]
    assert recs[0]["prompt"] == "[math] Tom has 3 apples and buys 4."
    assert recs[0]["id"] == "math-gsm_jsonl-train-000000"
    assert verify("math", recs[1]["completion"], recs[1]["reference"]).reward == 1.0
    import pandas as pd

    pq = tmp_path / "math.parquet"
    solution = "It is $\\boxed{\\frac{1}{2}}$."
    pd.DataFrame({"problem": ["Half?"], "solution": [solution]}).to_parquet(pq)
    recs = load_records("math", {"path": str(pq), "cache_dir": str(tmp_path / "c2"),
                                 "columns": {"prompt": "problem", "reference": "solution"}})
    assert not (tmp_path / "c2").exists()  # local files are read directly: no Arrow cache
    assert recs[0]["reference"] == "\\frac{1}{2}"
    assert verify("math", "the answer is 0.5", recs[0]["reference"]).reward == 1.0


def test_load_mbpp_and_humaneval_style(tmp_path):
    _needs_bwrap("code")
    src = _write_jsonl(tmp_path / "mbpp.jsonl", [
        {"text": "Add one.", "code": "def inc(x):\n    return x + 1",
         "test_list": ["assert inc(1) == 2", "assert inc(-1) == 0"]},
    ])
    recs = load_records("code", DataSource(src, columns={"prompt": "text", "reference": "test_list",
                                                         "completion": "code"}))
    assert recs[0]["reference"] == "assert inc(1) == 2\nassert inc(-1) == 0"
    assert verify("code", recs[0]["completion"], recs[0]["reference"]).reward == 1.0
    csv = tmp_path / "he.csv"
    import pandas as pd

    pd.DataFrame({"prompt": ["def add(a, b):\n"],
                  "test": ["def check(c):\n    assert c(1, 2) == 3"],
                  "entry_point": ["add"]}).to_csv(csv, index=False)
    recs = load_records("code", {"path": str(csv), "columns": {
        "prompt": "prompt", "reference": "test", "entry_point": "entry_point"}})
    assert recs[0]["reference"].endswith("check(add)")
    assert verify("code", "def add(a, b):\n    return a + b", recs[0]["reference"]).reward == 1.0
    assert verify("code", "def add(a, b):\n    return a - b", recs[0]["reference"]).reward == 0.0


def test_load_ifeval_style(tmp_path):
    src = _write_jsonl(tmp_path / "ifeval.json", [
        {"key": 1, "prompt": "Write about cats.",
         "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words",
                                 "change_case:english_capital"],
         "kwargs": [{}, {"relation": "at least", "num_words": 3}, {}]},
    ])
    recs = load_records("if", src)
    assert json.loads(recs[0]["reference"]) == {
        "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words",
                                "change_case:english_capital"],
        "kwargs": [{}, {"relation": "at least", "num_words": 3}, {}]}
    assert verify("if", "CATS ARE GREAT AND THEY SLEEP ALL DAY", recs[0]["reference"]
                  ).reward == 1.0
    assert verify("if", "cats, are great", recs[0]["reference"]).reward == pytest.approx(1 / 3)
    # the HF IFEval layout stores every kwarg key, None where unused: dropped
    hf = _write_jsonl(tmp_path / "hf.json", [
        {"prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{"num_words": None, "relation": None}]}])
    ref = load_records("if", hf)[0]["reference"]
    assert json.loads(ref)["kwargs"] == [{}] and verify("if", "ok", ref).reward == 1.0


def test_load_mc_with_choice_list(tmp_path):
    src = _write_jsonl(tmp_path / "mc.jsonl", [  # one type per reference column (issue 14)
        {"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1}])
    text = _write_jsonl(tmp_path / "mc_text.jsonl", [
        {"question": "Sky?", "choices": ["blue", "red"], "answer": "blue"},
        {"question": "Q?", "choices": ["x", "y"], "answer": "b"},
    ])
    recs = load_records("mc", src)
    assert [r["reference"] for r in recs + load_records("mc", text)] == ["B", "A", "B"]
    arc = _write_jsonl(tmp_path / "arc.jsonl", [
        {"question": "Hot?", "choices": {"text": ["ice", "fire"], "label": ["A", "B"]},
         "answerKey": "B"}])
    recs_arc = load_records("mc", {"path": arc, "columns": {
        "prompt": "question", "choices": "choices", "reference": "answerKey"}})
    assert recs_arc[0]["prompt"] == "[mc] Hot? A)ice B)fire" and recs_arc[0]["reference"] == "B"
    assert recs[0]["prompt"] == "[mc] 2+2? A)3 B)4 C)5"
    assert verify("mc", recs[0]["completion"], "B").reward == 1.0


def test_loader_errors_name_the_problem(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": "1"}])
    missing = r"missing column\(s\) \['answer', 'question'\]; available: \['a', 'q'\]"
    with pytest.raises(ValueError, match=missing):
        load_records("math", src)
    with pytest.raises(ValueError, match="unknown domain 'bio'"):
        load_records("bio", src)
    with pytest.raises(ValueError, match="required field 'reference'"):
        load_records("math", {"path": src, "columns": {"prompt": "q"}})
    with pytest.raises(ValueError, match=r"unknown record field\(s\) \['answer'\]"):
        load_records("math", {"path": src, "columns": {"prompt": "q", "reference": "a",
                                                       "answer": "a"}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colums'\]"):
        load_records("math", {"path": src, "colums": {}})
    bad_mc = _write_jsonl(tmp_path / "m.jsonl",
                          [{"question": "?", "choices": ["a"], "answer": "zz"}])
    with pytest.raises(ValueError, match="mc answer 'zz'"):
        load_records("mc", bad_mc)
    empty = _write_jsonl(tmp_path / "e.jsonl", [{"question": "x", "answer": "1"},
                                                {"question": "y", "answer": None}])
    with pytest.raises(ValueError, match="e.jsonl: row 1, column 'answer': empty reference"):
        load_records("math", empty)
    recs = load_records("math", {"path": src, "columns": {"prompt": "q", "reference": "a",
                                                          "id": "q"}, "limit": 1})
    assert recs[0]["id"] == "x"
