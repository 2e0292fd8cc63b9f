"""The embedded teacher prefill server (`mopd serve-teacher`): vLLM's OpenAI-compatible
``POST /v1/completions`` for scoring prompts, so one HTTP client (ours or the official ``openai``
one) works against it and against a real ``vllm serve`` teacher on a GPU host.

Request: the OpenAI / vLLM completions fields (see :mod:`mopd.teachers.protocol` for which are
honoured, which ignored); what scoring sends is ``{"model"?, "prompt": [ids] | [[ids], ...],
"max_tokens": 0|1, "prompt_logprobs": k}``: no token is generated (``text`` is empty, or the
prompt with ``echo``). A request with ``max_tokens`` to generate samples them as vLLM does
(:mod:`mopd.teachers.generation`; TrOPD's teacher prefixes): ``n`` choices per prompt, ``index``
= prompt * n + choice, ``finish_reason`` "stop" (EOS, a stop id or a stop string: ``stop_reason``
names which) or "length", the generated ids with ``return_token_ids``. Response, as vLLM's:
``choices[i].prompt_logprobs`` (only when the request asks for it) is a list over prompt
positions, None at position 0, else
``{str(token_id): {"logprob", "rank", "decoded_token"}}`` holding the actual prompt token (rank =
1 + number of vocabulary tokens strictly more likely) plus the top-k (ranks 1..k); log-probs
below -9999 are clamped to -9999 as vLLM does.

Bad input never does harm: auth and the ``Content-Length`` are checked before the body is read,
the body is read with a size cap and a deadline, parsing, the forward pass and the encoding of
the response run off the event loop (the response is streamed block by block), so ``/health``
keeps answering while the largest allowed request is served. Errors: 400 malformed / unknown
field / wrong type / unsupported value, 401 bad token, 404 unknown model, 408 body too slow,
413 body, tokens or sequences over the limit; the message names the field.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pydantic
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from mopd.teachers.generation import Generated, SamplingSpec, generate
from mopd.teachers.inprocess import Prefill, prefill
from mopd.teachers.protocol import CompletionRequest, generates, unsupported

try:  # orjson (a prefect/dvc dependency) encodes the per-position dicts several times faster
    from orjson import dumps as _dumps
except ImportError:  # pragma: no cover
    import json

    def _dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

log = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0  # vLLM clamps -inf to this so the JSON stays valid
BLOCK = 1024  # prompt positions encoded per chunk of the streamed response


class ServerLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_request_tokens: int = Field(65536, ge=1)  # summed over a request's prompts
    max_batch: int = Field(256, ge=1)  # prompts per request
    max_logprobs: int = Field(64, ge=0)  # largest prompt_logprobs / logprobs k
    max_generated_tokens: int = Field(65536, ge=1)  # n x prompts x max_tokens per request
    max_batch_tokens: int = Field(16384, ge=1)  # padded tokens per forward pass
    max_body_bytes: int = Field(8 << 20, ge=1024)  # request body, checked before parsing
    body_timeout: float = Field(30.0, gt=0)  # seconds to receive the whole body (else 408)
    header_timeout: float = Field(10.0, gt=0)  # seconds to receive a request's headers
    keep_alive_timeout: int = Field(5, ge=1)  # idle seconds before a connection is closed
    max_header_bytes: int = Field(16384, ge=1024)  # request line + headers
    max_connections: int = Field(128, ge=1)  # concurrent connections; beyond: 503


class _Reject(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


_KINDS = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          408: "RequestTimeout", 413: "RequestTooLarge", 500: "InternalServerError"}


def _error(status: int, message: str, close: bool = False) -> JSONResponse:
    """vLLM's error body. ``close``: the body may be unread, so the connection cannot be reused."""
    return JSONResponse({"error": {"message": message, "type": _KINDS.get(status, "Error"),
                                   "code": status}}, status_code=status,
                        headers={"connection": "close"} if close else None)


class _Guard:
    """Pure ASGI middleware, before routing and before any body byte is read: the bearer token
    (every path but ``/health``) and the declared ``Content-Length``."""

    def __init__(self, app, token: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if self.expected and scope["path"] != "/health" and not hmac.compare_digest(
                    headers.get(b"authorization", b""), self.expected):
                reply = _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                               close=True)
                return await reply(scope, receive, send)
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                reply = _error(413, f"request body: Content-Length {length[:20].decode(errors='replace')}"
                                    f" exceeds this server's limit of {self.max_body_bytes} bytes",
                               close=True)
                return await reply(scope, receive, send)
        await self.app(scope, receive, send)


async def _read_body(request: Request, limits: ServerLimits) -> bytes:
    """The body, counted while it streams in (chunked uploads have no Content-Length) and read
    within ``body_timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout
    body = bytearray()
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), deadline - loop.time())
        except TimeoutError:
            raise _Reject(408, f"request body: not received within {limits.body_timeout:g} s") from None
        if message["type"] == "http.disconnect":
            raise _Reject(400, "request body: the client disconnected")
        body += message.get("body", b"")
        if len(body) > limits.max_body_bytes:
            raise _Reject(413, f"request body: exceeds this server's limit of "
                               f"{limits.max_body_bytes} bytes")
        if not message.get("more_body", False):
            return bytes(body)


class _Batcher:
    """One worker thread: takes queued jobs, merges what is waiting into one prefill call."""

    def __init__(self, model, pad_id: int, max_batch_tokens: int):
        self.model, self.pad_id, self.max_batch_tokens = model, pad_id, max_batch_tokens
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="teacher-prefill").start()

    def submit(self, seqs: list[list[int]], k: int) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((seqs, k, fut))
        return fut

    def _loop(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            tokens = sum(map(len, jobs[0][0]))
            while tokens < self.max_batch_tokens:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                jobs.append(job)
                tokens += sum(map(len, job[0]))
            try:
                k = max(j[1] for j in jobs)
                out = prefill(self.model, [s for j in jobs for s in j[0]], topk=k, ranks=True,
                              pad_id=self.pad_id, max_batch_tokens=self.max_batch_tokens)
                out = [_finite(p) for p in out]
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                log.exception("prefill failed")
                for _, _, fut in jobs:
                    fut.set_exception(exc)
                continue
            for seqs, _, fut in jobs:
                fut.set_result(out[: len(seqs)])
                out = out[len(seqs):]


def _finite(p: Prefill) -> Prefill:
    """-inf clamped as vLLM does; NaN (a broken model) is an error, never a number."""
    if bool(torch.isnan(p.token_logprobs_N).any()):
        raise ValueError("the model produced NaN log-probs")
    top = p.topk_logprobs_NK
    return Prefill(p.token_logprobs_N.clamp_min(MIN_LOGPROB), p.ranks_N, p.topk_ids_NK,
                   None if top is None else top.clamp_min(MIN_LOGPROB))


@dataclass
class _Job:
    """A validated request: its sequences (token ids), their texts for ``echo``, and k values."""

    req: CompletionRequest
    seqs: list[list[int]]
    texts: list[str | None]
    k_prompt: int | None  # prompt_logprobs (None: not requested)
    k_echo: int | None  # logprobs over the prompt with echo (None: not requested)
    spec: SamplingSpec | None = None  # what to generate (None: nothing)
    n: int = 1
    stops: tuple[str, ...] = ()  # stop strings


class _Tokens:
    """Token id <-> text through the tokenizer (one caller at a time: fast tokenizers are not
    safe to mutate from several threads), decoded strings cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        self.cache: dict[int, str] = {}

    def piece(self, tid: int, as_id: bool = False) -> str | None:
        if as_id:
            return f"token_id:{tid}"
        if self.tokenizer is None:
            return None
        got = self.cache.get(tid)
        if got is None:
            with self.lock:
                got = self.cache[tid] = self.tokenizer.decode([tid])
        return got

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        with self.lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _parse(body: bytes, limits: ServerLimits, names: frozenset[str], tokens: _Tokens,
           vocab: int, max_len: int, eos_id: int | None = None) -> _Job:
    """Body -> validated job, or :class:`_Reject` naming the field. Runs in a worker thread."""
    try:
        req = CompletionRequest.model_validate_json(body)
    except pydantic.ValidationError as exc:
        raise _Reject(400, _describe(exc)) from None
    if req.model is not None and req.model not in names:
        raise _Reject(404, f"model: the model `{req.model[:200]}` does not exist; this server "
                           f"serves {sorted(names)}")
    why = unsupported(req)
    if why:
        raise _Reject(400, why)
    k_prompt, k_echo = req.prompt_logprobs, (req.logprobs if req.echo else None)
    for field, k in (("prompt_logprobs", k_prompt), ("logprobs", req.logprobs)):
        if k is not None and k > limits.max_logprobs:
            raise _Reject(400, f"{field}: {k} exceeds this server's maximum {limits.max_logprobs}")
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(
        req.prompt[0], int) else [req.prompt]
    if not prompts or not prompts[0]:
        raise _Reject(400, "prompt: is empty; send token ids, a list of them, or text")
    if len(prompts) > limits.max_batch:
        raise _Reject(413, f"prompt: {len(prompts)} sequences; this server accepts at most "
                           f"{limits.max_batch} per request")
    if (req.echo or any(isinstance(p, str) for p in prompts)) and tokens.tokenizer is None:
        raise _Reject(400, "prompt: text prompts and echo need the model's tokenizer, which this "
                           "server has not loaded; send token ids without echo")
    seqs: list[list[int]] = []
    texts: list[str | None] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if len(p) > 64 * limits.max_request_tokens:
                raise _Reject(413, f"prompt[{i}]: {len(p)} characters; far over this server's "
                                   f"{limits.max_request_tokens} tokens per request")
            ids = tokens.encode(p, req.add_special_tokens)
        else:
            ids = list(p)
        n_ids = len(ids)
        ids = _truncate(ids, req.truncate_prompt_tokens, req.truncation_side, max_len)
        if not ids:
            raise _Reject(400, f"prompt[{i}]: is empty")
        if len(ids) > max_len:
            raise _Reject(400, f"prompt[{i}]: {len(ids)} tokens exceed the model's context of {max_len}")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise _Reject(400, f"prompt[{i}]: token id {bad[0]} outside the vocabulary [0, {vocab})")
        if req.echo:  # the prompt as sent, unless truncation cut it
            texts.append(p if isinstance(p, str) and len(ids) == n_ids else tokens.decode(ids))
        else:
            texts.append(None)
        seqs.append(ids)
        total = sum(map(len, seqs))
        if total > limits.max_request_tokens:
            raise _Reject(413, f"prompt: at least {total} tokens; this server accepts at most "
                               f"{limits.max_request_tokens} per request")
    job = _Job(req, seqs, texts, k_prompt, k_echo)
    if generates(req):
        _sampling(job, limits, tokens, vocab, max_len, eos_id)
    return job


def _sampling(job: _Job, limits: ServerLimits, tokens: _Tokens, vocab: int, max_len: int,
              eos_id: int | None) -> None:
    """Checks a generating request against the context and the limits; sets its spec."""
    req, longest = job.req, max(map(len, job.seqs))
    max_tokens = req.max_tokens if req.max_tokens is not None else max_len - longest
    if longest + max_tokens > max_len:
        raise _Reject(400, f"max_tokens: {max_tokens} + the longest prompt's {longest} tokens exceed "
                           f"the model's context of {max_len}")
    if max_tokens < 1:
        raise _Reject(400, f"max_tokens: the prompt of {longest} tokens leaves no room in the "
                           f"model's context of {max_len}")
    n = req.n or 1
    total = n * len(job.seqs) * max_tokens
    if total > limits.max_generated_tokens:
        raise _Reject(413, f"max_tokens: n ({n}) x {len(job.seqs)} prompts x {max_tokens} tokens = "
                           f"{total}; this server generates at most {limits.max_generated_tokens} "
                           "per request")
    stop_ids = list(req.stop_token_ids or [])
    bad = [t for t in stop_ids if not 0 <= t < vocab]
    if bad:
        raise _Reject(400, f"stop_token_ids: token id {bad[0]} outside the vocabulary [0, {vocab})")
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if any(not s for s in stops):
        raise _Reject(400, "stop: an empty stop string would stop at once")
    if stops and tokens.tokenizer is None:
        raise _Reject(400, "stop: stop strings need the model's tokenizer, which this server has "
                           "not loaded; send stop_token_ids")
    top_k = req.top_k if req.top_k is not None else 0
    job.n, job.stops = n, stops
    job.spec = SamplingSpec(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=max(top_k, 0),
        min_tokens=req.min_tokens or 0, seed=req.seed, stop_token_ids=tuple(stop_ids),
        eos_id=None if req.ignore_eos else eos_id,
        logprobs=req.logprobs)


def _truncate(ids: list[int], keep: int | None, side: str | None, max_len: int) -> list[int]:
    """vLLM's ``truncate_prompt_tokens`` (-1: the model's context), keeping the last tokens
    unless ``truncation_side`` is "right"."""
    if keep is None:
        return ids
    keep = max_len if keep == -1 else keep
    if len(ids) <= keep:
        return ids
    return ids[:keep] if side == "right" else ids[len(ids) - keep:]


def _describe(exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        if err["type"] == "json_invalid":
            parts.append(f"body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
        elif err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown field (neither an OpenAI nor a vLLM completions "
                         "parameter)")
        elif err["type"] == "model_type":
            parts.append("body: expected a JSON object")
        else:
            parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)[:2000]


class _Blocks:
    """A JSON array encoded block by block (each block a list of plain JSON items) while the
    response streams, so neither memory nor one chunk's hold on the GIL grows with the request."""

    def __init__(self, blocks: Iterable[list]):
        self.blocks = blocks


def _encode(obj) -> Iterator[bytes]:
    """``obj`` as JSON, in chunks: dicts and lists of dicts are walked, :class:`_Blocks` encoded
    one block at a time, anything else in one piece."""
    if isinstance(obj, _Blocks):
        yield b"["
        first = True
        for block in obj.blocks:
            if block:
                inner = _dumps(block)[1:-1]
                yield inner if first else b"," + inner
                first = False
        yield b"]"
    elif isinstance(obj, dict):
        yield b"{"
        for j, (key, value) in enumerate(obj.items()):
            yield (b"," if j else b"") + _dumps(key) + b":"
            yield from _encode(value)
        yield b"}"
    elif isinstance(obj, list) and obj and isinstance(obj[0], dict):
        yield b"["
        for j, item in enumerate(obj):
            if j:
                yield b","
            yield from _encode(item)
        yield b"]"
    else:
        yield _dumps(obj)


def _prompt_logprobs(seq: list[int], pre: Prefill, k: int, tokens: _Tokens, as_id: bool,
                     keys: list[str]) -> Iterator[list]:
    """vLLM's ``prompt_logprobs`` of one sequence, :data:`BLOCK` positions at a time."""
    yield [None]
    n = len(seq) - 1
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        lps, ranks = pre.token_logprobs_N[a:b].tolist(), pre.ranks_N[a:b].tolist()
        ids = pre.topk_ids_NK[a:b, :k].tolist() if k else None
        tops = pre.topk_logprobs_NK[a:b, :k].tolist() if k else None
        out = []
        for t in range(b - a):
            tok = seq[a + 1 + t]
            entry = {keys[tok]: {"logprob": lps[t], "rank": ranks[t],
                                 "decoded_token": tokens.piece(tok, as_id)}}
            if k:
                for r, (tid, lp) in enumerate(zip(ids[t], tops[t]), start=1):
                    if keys[tid] not in entry:
                        entry[keys[tid]] = {"logprob": lp, "rank": r,
                                            "decoded_token": tokens.piece(tid, as_id)}
            out.append(entry)
        yield out


def _echo_logprobs(seq: list[int], pre: Prefill, k: int, tokens: _Tokens, as_id: bool) -> dict:
    """The legacy OpenAI ``logprobs`` object over the echoed prompt (first position None)."""
    pieces = [tokens.piece(t, as_id) or "" for t in seq]
    offsets = [0]
    for p in pieces[:-1]:
        offsets.append(offsets[-1] + len(p))

    def tops() -> Iterator[list]:
        yield [None]
        for a in range(0, len(seq) - 1, BLOCK):
            b = min(a + BLOCK, len(seq) - 1)
            lps = pre.token_logprobs_N[a:b].tolist()
            ids = pre.topk_ids_NK[a:b, :k].tolist() if k else [[]] * (b - a)
            top_lps = pre.topk_logprobs_NK[a:b, :k].tolist() if k else [[]] * (b - a)
            block = []
            for t in range(b - a):
                entry = {pieces[a + 1 + t]: lps[t]}
                for tid, lp in zip(ids[t], top_lps[t]):
                    entry.setdefault(tokens.piece(tid, as_id) or "", lp)
                block.append(entry)
            yield block

    return {"text_offset": offsets, "token_logprobs": [None, *pre.token_logprobs_N.tolist()],
            "tokens": pieces, "top_logprobs": _Blocks(tops())}


def _gen_logprobs(g: Generated, pieces: list[str], start: int, tokens: _Tokens, as_id: bool) -> dict:
    """The legacy OpenAI ``logprobs`` object of generated tokens (offsets from ``start``)."""
    offsets, at = [], start
    for p in pieces:
        offsets.append(at)
        at += len(p)
    tops = []
    for tok, piece, lp, ids, lps in zip(g.token_ids, pieces, g.logprobs, g.top_ids, g.top_logprobs):
        entry = {piece: lp}
        for tid, tlp in zip(ids, lps):
            entry.setdefault(tokens.piece(tid, as_id) or "", tlp)
        tops.append(entry)
    return {"text_offset": offsets, "token_logprobs": list(g.logprobs), "tokens": pieces,
            "top_logprobs": tops}


def _cut_at_stop(g: Generated, stops: tuple[str, ...], tokens: _Tokens, skip: bool,
                 include: bool) -> tuple[Generated, str]:
    """``g`` and its text, cut at the first stop string (vLLM's semantics: the tokens up to the
    one that completed the string; the text without it unless ``include``)."""
    text = tokens.decode(g.token_ids, skip) if tokens.tokenizer is not None else ""
    if not stops:
        return g, text
    hits = [(text.find(s), s) for s in stops if s in text]
    if not hits:
        return g, text
    at, stop = min(hits)
    for j in range(1, len(g.token_ids) + 1):  # the first token prefix whose text holds the stop
        if tokens.decode(g.token_ids[:j], skip).find(stop) == at:
            break
    cut = lambda xs: None if xs is None else xs[:j]  # noqa: E731
    return (Generated(g.token_ids[:j], "stop", stop, cut(g.logprobs), cut(g.top_ids),  # type: ignore[arg-type]
                      cut(g.top_logprobs)),
            text[: at + len(stop)] if include else text[:at])


def _payload(job: _Job, pres: list[Prefill] | None, gens: list[list[Generated]] | None,
             tokens: _Tokens, keys: list[str], name: str, seconds: float) -> dict:
    req, as_id = job.req, bool(job.req.return_tokens_as_token_ids)
    skip = req.skip_special_tokens is not False
    choices, generated = [], 0
    for i, seq in enumerate(job.seqs):
        prompt_lp = (None if job.k_prompt is None else _Blocks(
            _prompt_logprobs(seq, pres[i], job.k_prompt, tokens, as_id, keys)))
        for j in range(job.n):
            g, text = (None, "") if gens is None else _cut_at_stop(
                gens[i][j], job.stops, tokens, skip, bool(req.include_stop_str_in_output))
            prefix = job.texts[i] or ""  # the prompt, with echo
            choice = {"index": i * job.n + j, "text": prefix + text, "logprobs": None,
                      "finish_reason": g.finish_reason if g else "length",
                      "stop_reason": g.stop_reason if g else None}
            out = g.token_ids if g else []
            generated += len(out)
            pieces = [tokens.piece(t, as_id) or "" for t in out] if g and req.logprobs is not None else []
            if job.k_echo is not None:
                echo = _echo_logprobs(seq, pres[i], job.k_echo, tokens, as_id)
                if g:
                    more = _gen_logprobs(g, pieces, len(prefix), tokens, as_id)
                    for key in ("text_offset", "token_logprobs", "tokens"):
                        echo[key] = echo[key] + more[key]
                    echo["top_logprobs"] = _Blocks(itertools.chain(echo["top_logprobs"].blocks,
                                                                   [more["top_logprobs"]]))
                choice["logprobs"] = echo
            elif req.logprobs is not None:
                choice["logprobs"] = (_gen_logprobs(g, pieces, 0, tokens, as_id) if g else
                                      {"text_offset": [], "token_logprobs": [], "tokens": [],
                                       "top_logprobs": []})
            if req.return_token_ids:
                choice["prompt_token_ids"], choice["token_ids"] = seq, list(out)
            choice["prompt_logprobs"] = prompt_lp
            choices.append(choice)
    n = sum(map(len, job.seqs))
    return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
            "model": name, "choices": choices,
            "usage": {"prompt_tokens": n, "completion_tokens": generated, "total_tokens": n + generated},
            "mopd": {"prefill_seconds": seconds}}


def _eos_id(model, tokenizer) -> int | None:
    """The tokenizer's EOS id, else the model config's (the first one when it lists several)."""
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        eos_id = getattr(model.config, "eos_token_id", None)
    return eos_id[0] if isinstance(eos_id, list) else eos_id


def create_app(model, tokenizer=None, *, name: str = "teacher", aliases: Iterable[str] = (),
               token: str | None = None, limits: ServerLimits = ServerLimits()) -> FastAPI:
    """The FastAPI app serving ``model`` (a transformers causal LM, eval mode) as ``name``; a
    request's ``model`` must be ``name`` or one of ``aliases`` (e.g. the checkpoint path)."""
    model.eval()
    vocab = model.config.vocab_size
    max_len = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    eos_id = _eos_id(model, tokenizer)
    batcher = _Batcher(model, pad_id, limits.max_batch_tokens)
    # one generation at a time (each is a loop of forward passes over its own KV cache)
    sampler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="teacher-generate")
    tokens = _Tokens(tokenizer)
    keys = [str(i) for i in range(vocab)]
    names = frozenset([name, *aliases])

    # /docs and /redoc are off (they load scripts from a CDN); /openapi.json needs the token
    app = FastAPI(title="mopd teacher", docs_url=None, redoc_url=None)
    app.add_middleware(_Guard, token=token, max_body_bytes=limits.max_body_bytes)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "max_model_len": max_len}
                                           for n in [name, *sorted(names - {name})]]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await _read_body(request, limits)
            job = await run_in_threadpool(_parse, body, limits, names, tokens, vocab, max_len, eos_id)
        except _Reject as rej:
            return _error(rej.status, rej.message, close=rej.status in (408, 413))
        t0 = time.perf_counter()
        pres = None
        if job.k_prompt is not None or job.k_echo is not None:
            k = max(job.k_prompt or 0, job.k_echo or 0)
            try:
                pres = await asyncio.wrap_future(batcher.submit(job.seqs, k))
            except Exception as exc:  # noqa: BLE001 - the client sees why, the log has the trace
                return _error(500, f"prefill failed: {type(exc).__name__}: {str(exc)[:300]}")
        gens = None
        if job.spec is not None:
            try:
                gens = await asyncio.wrap_future(sampler.submit(
                    generate, model, job.seqs, job.n, job.spec, pad_id=pad_id))
            except Exception as exc:  # noqa: BLE001
                log.exception("generation failed")
                return _error(500, f"generation failed: {type(exc).__name__}: {str(exc)[:300]}")
        payload = await run_in_threadpool(_payload, job, pres, gens, tokens, keys, name,
                                          time.perf_counter() - t0)
        # a sync iterator: Starlette pulls each chunk in a worker thread, off the event loop
        return StreamingResponse(_encode(payload), media_type="application/json")

    return app
