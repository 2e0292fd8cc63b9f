"""Teacher generation (TrOPD's teacher prefixes, ALGORITHMS §5): the embedded server's
``/v1/completions`` with ``max_tokens`` samples as vLLM does, checked through the official
``openai`` client against transformers' own greedy decoding and the model's softmax; the HTTP and
in-process teachers give the same prefixes for the same seed."""

from __future__ import annotations

import random

import openai
import pytest
import torch

from mopd.models import load_model, load_tokenizer
from mopd.teachers import HTTPTeacher, InProcessTeacher
from mopd.teachers.server import create_app
from mopd.trainers.distill import teacher_prefixes
from tests.test_teachers import reference, run_in_thread, tiny  # noqa: F401 - fixture

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # unequal lengths: left padding is exercised


@pytest.fixture(scope="module")
def gen_server(tiny):  # noqa: F811
    model, tok = load_model(tiny), load_tokenizer(tiny)
    url, server = run_in_thread(create_app(model, tok, name="tiny"))
    yield url, model, tok
    server.should_exit = True


@pytest.fixture(scope="module")
def client(gen_server):
    return openai.OpenAI(base_url=f"{gen_server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def test_greedy_equals_transformers_and_logprobs_are_the_models(gen_server, client):
    url, model, _ = gen_server
    r = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0,
                                  logprobs=3, extra_body={"return_token_ids": True, "ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 36 and r.usage.prompt_tokens == 10
    for p, ch in zip(PROMPTS, r.choices):
        hf = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
        assert ch.token_ids == hf[0, len(p):].tolist()
        assert ch.finish_reason == "length"
        # raw log-probs of the generated tokens = an unbatched forward pass over prompt + output
        (tok, ids, lps), = reference(model, [p + ch.token_ids], [len(p)], 3)
        assert torch.allclose(torch.tensor(ch.logprobs.token_logprobs).double(), tok, atol=1e-4)
        assert ch.logprobs.token_logprobs[0] == pytest.approx(float(lps[0, 0]), abs=1e-4)  # greedy: top-1


def test_sampling_follows_temperature_and_top_k(gen_server, client):
    """4,000 one-token samples at T = 0.02, top-k 4: frequencies match softmax(logits / T) over the
    top 4 within 0.035 (binomial sd ≤ 0.008), nothing outside the top 4. (The untrained model's
    logits differ by ~0.05, so a low temperature is what makes the distribution uneven.)"""
    _, model, _ = gen_server
    p = PROMPTS[0]
    r = client.completions.create(model="tiny", prompt=p, max_tokens=1, n=4000, temperature=0.02, seed=11,
                                  extra_body={"top_k": 4, "return_token_ids": True, "ignore_eos": True})
    got = torch.tensor([c.token_ids[0] for c in r.choices])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p])).logits[0, -1].double()
    top = logits.topk(4)
    want = torch.softmax(top.values / 0.02, -1)
    freq = torch.tensor([(got == t).double().mean() for t in top.indices])
    assert bool((got[:, None] == top.indices).any(-1).all())  # nothing outside the top 4
    assert (freq - want).abs().max() < 0.035, (freq, want)
    # a different temperature is a different distribution (the check above can tell them apart)
    assert (torch.softmax(top.values / 1.0, -1) - want).abs().max() > 0.07


def test_seed_is_reproducible_and_choices_differ(client):
    kw = dict(model="tiny", prompt=PROMPTS, max_tokens=10, n=3, temperature=1.0,
              extra_body={"return_token_ids": True, "ignore_eos": True})
    a = client.completions.create(seed=5, **kw)
    b = client.completions.create(seed=5, **kw)
    c = client.completions.create(seed=6, **kw)
    ids = lambda r: [ch.token_ids for ch in r.choices]  # noqa: E731
    assert [ch.index for ch in a.choices] == list(range(9))
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert len({tuple(t) for t in ids(a)[:3]}) == 3  # prompt 0's three choices are distinct samples


def test_stop_ids_strings_and_min_tokens(gen_server, client):
    _, _, tok = gen_server
    base = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                     extra_body={"return_token_ids": True, "ignore_eos": True})
    greedy = base.choices[0].token_ids
    # a stop id ends the choice at that token (kept in token_ids, as vLLM does)
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                  extra_body={"return_token_ids": True, "ignore_eos": True,
                                              "stop_token_ids": [greedy[3]]})
    ch = r.choices[0]
    cut = greedy.index(greedy[3]) + 1
    assert ch.token_ids == greedy[:cut] and ch.finish_reason == "stop" and ch.stop_reason == greedy[3]
    # min_tokens masks the stop ids for the first tokens: greedy then picks another first token
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                  extra_body={"return_token_ids": True, "ignore_eos": True,
                                              "stop_token_ids": [greedy[0]], "min_tokens": 1})
    assert r.choices[0].token_ids[0] != greedy[0]
    # a stop string: the text is cut before it, the tokens after the one that completed it
    text = tok.decode(greedy, skip_special_tokens=True)
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i)
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop],
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    ch = r.choices[0]
    assert ch.text == text[: text.index(stop)] and ch.finish_reason == "stop" and ch.stop_reason == stop
    assert ch.token_ids == greedy[: len(ch.token_ids)] and stop in tok.decode(ch.token_ids, skip_special_tokens=True)
    assert stop not in tok.decode(ch.token_ids[:-1], skip_special_tokens=True)
    with_stop = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                          stop=stop, extra_body={"include_stop_str_in_output": True,
                                                                 "ignore_eos": True})
    assert with_stop.choices[0].text == text[: text.index(stop) + len(stop)]


def test_echo_with_generation_concatenates_prompt_and_output(client):
    r = client.completions.create(model="tiny", prompt="[math] 3+4=", max_tokens=5, temperature=0,
                                  echo=True, logprobs=1, extra_body={"ignore_eos": True})
    ch = r.choices[0]
    assert ch.text.startswith("[math] 3+4=") and ch.logprobs.token_logprobs[0] is None
    # per-token pieces of byte-level tokens may be partial UTF-8, so compare the prompt part only
    assert "".join(ch.logprobs.tokens).startswith("[math] 3+4=") and r.usage.completion_tokens == 5
    assert len(ch.logprobs.tokens) == r.usage.prompt_tokens + 5
    assert ch.logprobs.text_offset == sorted(ch.logprobs.text_offset)
    assert len(ch.logprobs.top_logprobs) == len(ch.logprobs.tokens)


def test_http_and_inprocess_teachers_give_the_same_prefixes(gen_server):
    """TrOPD prefixes through the server equal the in-process teacher's for the same seed, and
    the trainer's `teacher_prefixes` works over HTTP."""
    url, model, _ = gen_server
    http, local = HTTPTeacher("math", [url]), InProcessTeacher(model)
    prompts = [[random.Random(i).randrange(1, 300) for _ in range(3 + i % 4)] for i in range(70)]
    a = http.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3)
    b = local.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3)
    assert a == b and all(1 <= len(x) <= 6 for x in a)
    assert http.generate(prompts[:5], max_new_tokens=6, temperature=1.0, seed=4) != a[:5]
    got = teacher_prefixes({"math": http}, prompts[:8], ["math"] * 8, share=1.0, l_max=4, temperature=1.0,
                           rng=random.Random(0), seed=9)
    assert all(1 <= len(p) <= 4 for p in got)
    http.close()


def test_every_request_field_is_classified_once():
    from mopd.teachers.protocol import HONOURED, IGNORED, NEUTRAL, UNSUPPORTED, CompletionRequest

    groups = [set(HONOURED), set(IGNORED), set(NEUTRAL), set(UNSUPPORTED)]
    assert sum(map(len, groups)) == len(set().union(*groups))  # disjoint
    assert set().union(*groups) == set(CompletionRequest.model_fields)
