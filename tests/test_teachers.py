"""Teacher prefill server and clients: logprobs equal an in-process forward pass, bad requests
get a 4xx with a message while the server keeps serving, bearer tokens, and a load run."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from mopd.config import TinyProfile
from mopd.models import build_base, load_model, load_tokenizer
from mopd.teachers import HTTPTeacher, InProcessTeacher, TeacherError, lay_out
from mopd.teachers.launch import free_port, uvicorn_config, wait_healthy
from mopd.teachers.server import ServerLimits, create_app

TEXTS = [f"[math] {a}+{b}=\\boxed{{{a + b}}}" for a in range(15) for b in range(15)]
SMALL = TinyProfile(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8)
LIMITS = ServerLimits(max_request_tokens=400, max_batch=8, max_logprobs=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "m"
    build_base(SMALL, TEXTS, path, seed=3)
    return path


def run_in_thread(app, limits: ServerLimits = ServerLimits()) -> tuple[str, object]:
    """A real uvicorn server (as `mopd serve-teacher` configures it) on an ephemeral 127.0.0.1
    port, in a daemon thread."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, limits))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout=30)
    return url, server


@pytest.fixture(scope="module")
def served(tiny):
    model, tok = load_model(tiny), load_tokenizer(tiny)
    url, server = run_in_thread(create_app(model, tok, name="tiny", limits=LIMITS), LIMITS)
    yield url, model
    server.should_exit = True


def reference(model, seqs, starts, k):
    """Naive float64 log-softmax of one sequence at a time (no padding, no batching)."""
    out = []
    for s, p in zip(seqs, starts):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([s])).logits[0, :-1].double()
        logp_NV = torch.log_softmax(logits, -1)[p - 1:]
        tok = logp_NV.gather(-1, torch.tensor(s[p:])[:, None]).squeeze(-1)
        top_lp, top_ids = logp_NV.topk(k, -1)
        out.append((tok, top_ids, top_lp))
    return out


def random_rollouts(n, rng, vocab=300):
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    comps = [[rng.randrange(vocab) for _ in range(rng.randint(1, 15))] for _ in range(n)]
    return prompts, comps


@pytest.mark.parametrize("backend", ["http", "inprocess"])
def test_scores_equal_an_inprocess_forward_pass(served, backend):
    url, model = served
    client = HTTPTeacher("math", [url]) if backend == "http" else InProcessTeacher(model)
    prompts, comps = random_rollouts(7, random.Random(0))
    seqs = [p + c for p, c in zip(prompts, comps)]
    ref = reference(model, seqs, [len(p) for p in prompts], 5)
    for topk in (None, 5):
        got = client.score(prompts, comps, topk=topk)
        for g, (tok, ids, lp) in zip(got, ref):
            assert (g.logprobs_C.double() - tok).abs().max() <= 1e-4
            if topk:
                assert (g.topk_logprobs_CK.double() - lp).abs().max() <= 1e-4
                assert torch.equal(g.topk_ids_CK, ids)
            else:
                assert g.topk_ids_CK is None
    # laid out as the trainer's B×T tensors: completion positions only
    u_BT, ids_BTK, _ = lay_out(got, [len(p) for p in prompts], max(map(len, seqs)), 5)
    assert torch.allclose(u_BT[0, len(prompts[0]):len(seqs[0])], got[0].logprobs_C)
    assert float(u_BT[0, : len(prompts[0])].abs().sum()) == 0.0
    client.close()


def test_response_has_vllm_prompt_logprobs_format(served):
    url, _ = served
    r = httpx.post(f"{url}/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 1, "prompt_logprobs": 2})
    assert r.status_code == 200
    pl = r.json()["choices"][0]["prompt_logprobs"]
    assert pl[0] is None and len(pl) == 3
    assert "6" in pl[1] and {"logprob", "rank", "decoded_token"} <= set(pl[1]["6"])
    assert sorted(v["rank"] for v in pl[2].values())[:2] == [1, 2]
    assert pl[2]["7"]["rank"] >= 1 and pl[2]["7"]["logprob"] <= max(v["logprob"] for v in pl[2].values())
    assert len(pl[2]) in (2, 3)  # the prompt token plus the top-2 (merged when it is one of them)


BAD = [
    ("{not json", "not valid JSON"),
    (json.dumps({"prompt": [1, 2], "max_tokens": 1, "temprature": 0.5}), "temprature: unknown field"),
    (json.dumps({"prompt": {"ids": [1]}, "max_tokens": 1}), "prompt"),
    (json.dumps({"prompt": [1, 2.5], "max_tokens": 1}), "prompt"),
    (json.dumps({"prompt": [1, 2], "max_tokens": 255}), "max_tokens: 255 + the longest prompt's 2 tokens "
                                                          "exceed the model's context of 256"),
    (json.dumps({"prompt": [1, 2], "max_tokens": 5, "frequency_penalty": 0.5}),
     "frequency_penalty: 0.5 is not supported when generating"),
    (json.dumps({"prompt": [1, 2], "max_tokens": 1, "prompt_logprobs": 1, "n": 2}), "n: 2 choices"),
    (json.dumps({"prompt": [[1, 2]] * 8, "max_tokens": 200, "n": 50}), "generates at most 65536"),
    (json.dumps({"prompt": [1, 2], "max_tokens": 3, "stop_token_ids": [300]}),
     "stop_token_ids: token id 300 outside"),
    (json.dumps({"prompt": [1, 2], "max_tokens": 3, "stop": ["a", ""]}), "stop: an empty stop string"),
    (json.dumps({"prompt": [1, 2], "max_tokens": 3, "best_of": 3}), "best_of: 3 differs from n = 1"),
    (json.dumps({"prompt": [1, 2], "max_tokens": 3, "top_k": -2}), "top_k: -2"),
    (json.dumps({"prompt": [1, 2], "prompt_logprobs": "3"}), "prompt_logprobs"),
    (json.dumps({"prompt": [1, 2], "prompt_logprobs": 11}), "prompt_logprobs: 11 exceeds"),
    (json.dumps({"prompt": []}), "prompt: is empty"),
    (json.dumps({"prompt": [[1, 2], []]}), "prompt[1]: is empty"),
    (json.dumps({"prompt": [1, 300]}), "token id 300 outside the vocabulary [0, 300)"),
    (json.dumps({"prompt": [[1] * 100] * 5}), "tokens; this server accepts at most 400"),
    (json.dumps({"prompt": [[1, 2]] * 9}), "9 sequences; this server accepts at most 8"),
    (json.dumps({"prompt": [1] * 300}), "exceed the model's context of 256"),
]


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(served):
    url, _ = served
    for body, message in BAD:
        r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (body, r.status_code)
        assert message in r.json()["error"]["message"], (body, r.json())
    assert httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2]}).status_code == 200
    with pytest.raises(TeacherError, match=r"teacher for domain 'math' at .* rejected the request \(400\)"):
        HTTPTeacher("math", [url]).score([[1]], [[400]])


def test_bearer_token_is_required_when_set(tiny):
    url, server = run_in_thread(create_app(load_model(tiny), name="t", token="s3cret"))
    try:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2]})
        assert r.status_code == 401 and "bearer token" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200  # health stays open (as vLLM's)
        with pytest.raises(TeacherError, match=r"\(401\)"):
            HTTPTeacher("code", [url], token="wrong").score([[1]], [[2]])
        got = HTTPTeacher("code", [url], token="s3cret").score([[1]], [[2, 3]])
        assert got[0].logprobs_C.shape == (2,) and bool((got[0].logprobs_C < 0).all())
    finally:
        server.should_exit = True


def test_load_1000_requests_at_concurrency_32(served):
    url, _ = served
    client = HTTPTeacher("math", [url])
    rng = random.Random(1)
    work = [random_rollouts(1, rng) for _ in range(1000)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda pc: client.score(*pc, topk=4), work))
    seconds = time.perf_counter() - t0
    assert len(results) == 1000
    assert all(r[0].logprobs_C.shape == (len(pc[1][0]),) for r, pc in zip(results, work))
    print(f"\nload: 1000 requests, concurrency 32, {seconds:.1f}s, {1000 / seconds:.0f} req/s")
    assert 1000 / seconds > 20
