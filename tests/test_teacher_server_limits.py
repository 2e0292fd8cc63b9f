"""Bad input never does harm to the teacher server (issue 14): oversize bodies are refused before
parsing, /health answers while the largest allowed request is served, slow clients time out, the
official `openai` client works with the standard fields, unknown models and fields are refused,
docs need the token, and a server bound beyond loopback without a token warns loudly."""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time

import httpx
import openai
import pytest
import torch

from mopd.models import build_base, load_model, load_tokenizer
from mopd.teachers.launch import bind_warning, serve
from mopd.teachers.protocol import IGNORED, CompletionRequest
from mopd.teachers.server import ServerLimits, create_app
from tests.test_teachers import SMALL, TEXTS, reference, run_in_thread

TOKEN = "s3cret"
SHORT = ServerLimits(header_timeout=0.5, body_timeout=0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "m"
    build_base(SMALL, TEXTS, path, seed=3)
    return path


@pytest.fixture(scope="module")
def open_server(tiny):
    """Default limits (what `mopd serve-teacher` runs with), no token."""
    model = load_model(tiny)
    url, server = run_in_thread(create_app(model, load_tokenizer(tiny), name="tiny",
                                           aliases=[str(tiny)]))
    yield url, model
    server.should_exit = True


@pytest.fixture(scope="module")
def token_server(tiny):
    """A bearer token and short header/body timeouts."""
    model = load_model(tiny)
    url, server = run_in_thread(create_app(model, load_tokenizer(tiny), name="tiny", token=TOKEN,
                                           limits=SHORT), SHORT)
    yield url, model
    server.should_exit = True


def post(url: str, body, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


# ------------------------------------------------------------------------------- size and time


def test_oversize_body_is_refused_before_parsing(open_server):
    url, _ = open_server
    limit = ServerLimits().max_body_bytes
    body = b" " * (50 << 20)  # 50 MB of whitespace: valid JSON padding, 6x the limit
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", content=body, timeout=30,
                   headers={"content-type": "application/json"})
    by_length = time.perf_counter() - t0
    assert r.status_code == 413
    assert r.json()["error"]["message"] == (f"request body: Content-Length 52428800 exceeds this "
                                            f"server's limit of {limit} bytes")

    def chunks():  # no Content-Length: counted while it streams in
        for _ in range(50):
            yield b" " * (1 << 20)

    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=30,
                   headers={"content-type": "application/json"})
    streamed = time.perf_counter() - t0
    assert r.status_code == 413
    assert r.json()["error"]["message"] == f"request body: exceeds this server's limit of {limit} bytes"
    print(f"\n413 for a 50 MB body: {by_length * 1000:.0f} ms by Content-Length, "
          f"{streamed * 1000:.0f} ms chunked")
    assert by_length < 0.5 and streamed < 0.5
    assert post(url, {"prompt": [1, 2]}).status_code == 200  # and the server keeps serving


def test_health_answers_while_the_largest_allowed_request_is_served(open_server):
    """256 prompts x 256 tokens (max_batch, the model's context, 65536 = max_request_tokens) with
    prompt_logprobs 64 (max_logprobs): a ~290 MB response, encoded off the event loop."""
    url, _ = open_server
    lim = ServerLimits()
    rng = random.Random(0)
    n_seq = lim.max_request_tokens // 256
    assert n_seq == lim.max_batch
    body = {"prompt": [[rng.randrange(300) for _ in range(256)] for _ in range(n_seq)],
            "max_tokens": 1, "prompt_logprobs": lim.max_logprobs}
    got: dict = {}

    def largest():
        t0 = time.perf_counter()
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
            got["status"], got["bytes"], tail = r.status_code, 0, b""
            for chunk in r.iter_raw():
                got["bytes"] += len(chunk)
                tail = (tail + chunk)[-200:]
        got["seconds"], got["tail"] = time.perf_counter() - t0, tail

    worker = threading.Thread(target=largest)
    worker.start()
    latencies = []
    with httpx.Client(timeout=10) as client:
        while worker.is_alive():
            t0 = time.perf_counter()
            assert client.get(f"{url}/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.05)
    worker.join()
    print(f"\nlargest request: {got['bytes'] / 1e6:.0f} MB in {got['seconds']:.1f} s; /health "
          f"max {max(latencies) * 1000:.0f} ms over {len(latencies)} probes")
    assert got["status"] == 200 and got["bytes"] > 200e6
    assert b'"usage":{"prompt_tokens":65536,' in got["tail"]
    assert len(latencies) >= 10  # the probes overlapped the request
    assert max(latencies) < 1.0


def test_header_and_body_timeouts(token_server):
    url, _ = token_server
    host, port = url.removeprefix("http://").split(":")
    # headers never completed (a slowloris trickles a byte at a time): closed after ~0.5 s
    with socket.create_connection((host, int(port)), timeout=5) as s:
        t0 = time.perf_counter()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        closed_after = None
        for _ in range(20):
            try:
                s.sendall(b"X")
            except OSError:
                break
            time.sleep(0.1)
            s.setblocking(False)
            try:
                if s.recv(1024) == b"":
                    closed_after = time.perf_counter() - t0
                    break
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
        assert closed_after is not None and 0.4 < closed_after < 1.5, closed_after
    # body announced but not sent: 408 after body_timeout
    with socket.create_connection((host, int(port)), timeout=5) as s:
        t0 = time.perf_counter()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        reply = b""
        while chunk := s.recv(4096):  # the server closes after its answer
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        assert b"request body: not received within 0.5 s" in reply
        assert 0.4 < time.perf_counter() - t0 < 2.0


# ----------------------------------------------------------------------------- compatibility


def test_official_openai_client_with_standard_fields(token_server):
    url, model = token_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=30)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    ref = reference(model, prompts, [1, 1], 3)
    for max_tokens in (0, 1):
        r = client.completions.create(
            model="tiny", prompt=prompts, max_tokens=max_tokens, temperature=0, top_p=1, n=1,
            seed=123, stop=["\n"], user="u1", presence_penalty=0.0, frequency_penalty=0.0,
            logit_bias={"5": 1}, best_of=1, stream=False,
            extra_body={"prompt_logprobs": 3, "top_k": -1, "repetition_penalty": 1.0,
                        "skip_special_tokens": True, "priority": 0})
        assert [c.index for c in r.choices] == [0, 1] and r.model == "tiny"
        assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 0
        for choice, seq, (tok, ids, lps) in zip(r.choices, prompts, ref):
            pl = choice.prompt_logprobs  # vLLM's extension field, kept by the client's models
            assert pl[0] is None and len(pl) == len(seq)
            got = torch.tensor([pl[t][str(seq[t])]["logprob"] for t in range(1, len(seq))])
            assert (got.double() - tok).abs().max() < 1e-4
            assert [int(k) for k, v in sorted(pl[1].items(), key=lambda kv: kv[1]["rank"])][:3] \
                == ids[0].tolist()
    # a text prompt with echo and legacy logprobs: the prompt's own log-probs, as lm-eval asks
    text = "[math] 3+4=\\boxed{7}"
    r = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=2,
                                  temperature=0.0)
    ch = r.choices[0]
    assert ch.text == text and ch.logprobs.token_logprobs[0] is None
    ids = server_token_ids(url, text)
    (tok, _, _), = reference(model, [ids], [1], 2)
    assert torch.allclose(torch.tensor(ch.logprobs.token_logprobs[1:]).double(), tok, atol=1e-4)
    assert "".join(ch.logprobs.tokens) == text and ch.logprobs.text_offset[0] == 0
    assert len(ch.logprobs.top_logprobs[1]) >= 2 and getattr(ch, "prompt_logprobs", None) is None
    # refusals come back as the client's typed errors
    with pytest.raises(openai.NotFoundError, match="the model `gpt-4` does not exist"):
        client.completions.create(model="gpt-4", prompt=[1, 2], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="n: 2 choices of a request that generates no token"):
        client.completions.create(model="tiny", prompt=[1, 2], max_tokens=0, n=2)
    with pytest.raises(openai.BadRequestError, match="stream: streaming is not supported"):
        client.completions.create(model="tiny", prompt=[1, 2], max_tokens=1, stream=True)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny", prompt=[1, 2], max_tokens=1)


def server_token_ids(url: str, text: str) -> list[int]:
    """The ids the server tokenized ``text`` into (``return_token_ids``)."""
    r = post(url, {"prompt": text, "max_tokens": 0, "return_token_ids": True},
             headers={"Authorization": f"Bearer {TOKEN}"})
    return r.json()["choices"][0]["prompt_token_ids"]


def test_model_names_fields_and_prompt_logprobs_only_when_asked(open_server, tiny):
    url, _ = open_server
    for name in ("tiny", str(tiny), None):  # served name, model path, or left out
        body = {"prompt": [1, 2, 3], "max_tokens": 1, **({"model": name} if name else {})}
        r = post(url, body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["prompt_logprobs"] is None  # not asked: not computed
    r = post(url, {"model": "tiny2", "prompt": [1, 2]})
    assert r.status_code == 404
    assert r.json()["error"] == {"message": "model: the model `tiny2` does not exist; this server "
                                            f"serves {sorted(['tiny', str(tiny)])}",
                                 "type": "NotFoundError", "code": 404}
    # every field of neither schema is named; ignored fields change no number
    for field in ("temprature", "logprob", "prompt_ids", "api_key"):
        r = post(url, {"prompt": [1, 2], field: 1})
        assert r.status_code == 400
        assert r.json()["error"]["message"].startswith(f"{field}: unknown field (neither an OpenAI "
                                                       "nor a vLLM completions parameter)")
    # a scoring request (prompt_logprobs, max_tokens 1) generates nothing: sampling fields change
    # no number, and neither do the ignored ones
    score = {"prompt": [4, 5, 6], "prompt_logprobs": 2, "max_tokens": 1}
    plain = post(url, score).json()["choices"][0]
    sampling = {"temperature": 0.0, "top_p": 0.5, "top_k": 3, "min_p": 0.1, "seed": 7,
                "presence_penalty": 2.0, "frequency_penalty": -1.0, "repetition_penalty": 1.3,
                "logit_bias": {"5": 100}, "stop": "x", "ignore_eos": True, "min_tokens": 0,
                "stop_token_ids": [1], "bad_words": ["a"]}
    ignored = {"user": "u", "request_id": "r1", "priority": 3, "spaces_between_special_tokens": False}
    assert set(ignored) <= set(IGNORED) <= set(CompletionRequest.model_fields)
    got = post(url, {**score, **sampling, **ignored}).json()
    assert got["choices"][0] == plain and got["usage"]["completion_tokens"] == 0
    zero = post(url, {"prompt": [4, 5, 6], "prompt_logprobs": 0, "max_tokens": 1}).json()["choices"][0]
    assert [list(p) for p in zero["prompt_logprobs"][1:]] == [["5"], ["6"]]  # the prompt token only
    as_ids = post(url, {"prompt": [4, 5, 6], "prompt_logprobs": 1, "return_tokens_as_token_ids": True,
                        "echo": True, "logprobs": 1, "max_tokens": 1}).json()["choices"][0]
    assert as_ids["prompt_logprobs"][1]["5"]["decoded_token"] == "token_id:5"
    assert as_ids["logprobs"]["tokens"] == ["token_id:4", "token_id:5", "token_id:6"]
    assert as_ids["logprobs"]["token_logprobs"][1:] == [as_ids["prompt_logprobs"][t][k]["logprob"]
                                                       for t, k in ((1, "5"), (2, "6"))]
    for value in ("Infinity", "NaN", "-1"):  # non-finite (not even JSON) or out of range
        r = httpx.post(f"{url}/v1/completions", content='{"prompt": [4], "temperature": %s}' % value,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and "temperature" in r.json()["error"]["message"], r.text


def test_docs_need_the_token(token_server):
    url, _ = token_server
    assert httpx.get(f"{url}/openapi.json").status_code == 401
    assert httpx.get(f"{url}/v1/models").status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{url}/openapi.json", headers=auth).json()["info"]["title"] == "mopd teacher"
    for path in ("/docs", "/redoc"):  # off: they load their scripts from a CDN
        assert httpx.get(f"{url}{path}").status_code == 401
        assert httpx.get(f"{url}{path}", headers=auth).status_code == 404
    assert httpx.get(f"{url}/health").status_code == 200  # open, as vLLM's


def test_bind_beyond_loopback_without_token_warns(tiny, monkeypatch, caplog):
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        assert bind_warning(host, None) is None
    for host in ("0.0.0.0", "::", "10.0.0.5", "teacher.example.org"):
        assert "WITHOUT a bearer token" in bind_warning(host, None)
        assert bind_warning(host, "tok") is None
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    with caplog.at_level(logging.WARNING, logger="mopd.teachers.launch"):
        serve(str(tiny), host="0.0.0.0", port=1)
    assert "teacher server bound to 0.0.0.0 WITHOUT a bearer token" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mopd.teachers.launch"):
        serve(str(tiny), host="127.0.0.1", port=1)
    assert "WITHOUT" not in caplog.text


def test_request_json_never_crashes_the_server(open_server):
    """Odd but well-formed bodies get a 4xx naming what is wrong."""
    url, _ = open_server
    cases = [
        ("[1, 2]", "body: expected a JSON object"),
        ('{"prompt": [1, 2], "prompt": [3]}', None),  # duplicate keys: JSON allows, last wins
        ('{"prompt": ' + "[" * 5000 + "]" * 5000 + "}", "recursion limit exceeded"),
        ('{"prompt": [1, -1]}', "prompt"),
        ('{"prompt": [1, 2], "echo": "yes"}', "echo"),
        ('{"prompt": [1, 2], "seed": 18446744073709551616}', "seed"),
        ('{"prompt": ""}', "prompt: is empty"),
        ('{"prompt": [1, 2], "logprobs": 65}', "logprobs: 65 exceeds this server's maximum 64"),
        ('{"prompt": [[1, 2]], "truncate_prompt_tokens": 1, "prompt_logprobs": 1}', None),
    ]
    for body, message in cases:
        r = httpx.post(f"{url}/v1/completions", content=body, timeout=30,
                       headers={"content-type": "application/json"})
        if message is None:
            assert r.status_code == 200, (body[:60], r.text)
        else:
            assert r.status_code == 400, (body[:60], r.status_code)
            assert message in r.json()["error"]["message"], (body[:60], r.json())
    r = post(url, {"prompt": [[1, 2, 3]], "truncate_prompt_tokens": 2, "prompt_logprobs": 0})
    assert json.loads(r.content)["usage"]["prompt_tokens"] == 2


def test_cli_refuses_invalid_limits(capsys, tmp_path):
    from mopd.cli import main

    assert main(["serve-teacher", "--model", str(tmp_path), "--max-body-bytes", "10"]) == 2
    assert "max_body_bytes" in capsys.readouterr().err
    assert main(["serve-teacher", "--model", str(tmp_path), "--header-timeout", "0"]) == 2
    assert "header_timeout" in capsys.readouterr().err
