"""The embedded teacher prefill server (`mopd serve-teacher`): the subset of vLLM's
OpenAI-compatible ``POST /v1/completions`` that teacher scoring needs, so one HTTP client works
against it and against a real ``vllm serve`` teacher on a GPU host.

Request: ``{"model": str?, "prompt": [ids] | [[ids], ...], "max_tokens": 0|1, "prompt_logprobs": k}``.
No token is generated (``max_tokens`` 1 is accepted because vLLM rejects 0; the choice's text is
empty). Response, as vLLM's: ``choices[i].prompt_logprobs`` is a list over prompt positions, None at
position 0, else ``{str(token_id): {"logprob", "rank", "decoded_token"}}`` holding the actual prompt
token (rank = 1 + number of vocabulary tokens strictly more likely) plus the top-k (ranks 1..k).

Concurrent requests are merged into one forward pass by a single worker thread (dynamic
batching up to ``max_batch_tokens``), which also keeps torch's thread pool uncontended.
Errors: 400 malformed / unknown field / wrong type / empty prompt / bad token id, 401 bad token,
413 too many tokens or sequences; the message names the field. ``GET /health`` answers 200.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import queue
import threading
import time
from typing import Annotated

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from mopd.teachers.inprocess import prefill

try:  # orjson (a prefect/dvc dependency) encodes the per-position dicts several times faster
    from orjson import dumps as _dumps
except ImportError:  # pragma: no cover
    import json

    def _dumps(obj) -> bytes:
        return json.dumps(obj).encode()

log = logging.getLogger(__name__)

TokenIds = list[StrictInt]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: TokenIds | list[TokenIds]
    max_tokens: Annotated[StrictInt, Field(ge=0, le=1)] = 1
    prompt_logprobs: Annotated[StrictInt, Field(ge=0)] | None = None


class ServerLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_request_tokens: int = 65536  # summed over a request's prompts
    max_batch: int = 256  # prompts per request
    max_logprobs: int = 64  # largest prompt_logprobs k
    max_batch_tokens: int = 16384  # padded tokens per forward pass


class _Reject(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _error(status: int, message: str) -> JSONResponse:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 413: "RequestTooLarge"}.get(status, "Error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


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
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                log.exception("prefill failed")
                for _, _, fut in jobs:
                    fut.set_exception(exc)
                continue
            for seqs, _, fut in jobs:
                fut.set_result(out[: len(seqs)])
                out = out[len(seqs):]


def _check(req: CompletionRequest, limits: ServerLimits, vocab: int, max_len: int) -> list[list[int]]:
    seqs = [req.prompt] if not req.prompt or isinstance(req.prompt[0], int) else req.prompt
    if not seqs or not seqs[0]:
        raise _Reject(400, "prompt: is empty; send a list of token ids (or a list of such lists)")
    if len(seqs) > limits.max_batch:
        raise _Reject(413, f"prompt: {len(seqs)} sequences; this server accepts at most "
                           f"{limits.max_batch} per request")
    total = sum(map(len, seqs))
    if total > limits.max_request_tokens:
        raise _Reject(413, f"prompt: {total} tokens; this server accepts at most "
                           f"{limits.max_request_tokens} per request")
    for i, s in enumerate(seqs):
        if not s:
            raise _Reject(400, f"prompt[{i}]: is empty")
        if len(s) > max_len:
            raise _Reject(400, f"prompt[{i}]: {len(s)} tokens exceed the model's context of {max_len}")
        bad = [t for t in s if not 0 <= t < vocab]
        if bad:
            raise _Reject(400, f"prompt[{i}]: token id {bad[0]} outside the vocabulary [0, {vocab})")
    k = req.prompt_logprobs or 0
    if k > limits.max_logprobs:
        raise _Reject(400, f"prompt_logprobs: {k} exceeds this server's maximum {limits.max_logprobs}")
    return seqs


def _choice(i: int, seq: list[int], pre, k: int, decode) -> dict:
    positions: list[dict | None] = [None]
    for t in range(len(seq) - 1):
        tok = seq[t + 1]
        entry = {str(tok): {"logprob": float(pre.token_logprobs_N[t]), "rank": int(pre.ranks_N[t]),
                            "decoded_token": decode(tok)}}
        if k:
            for r, (tid, lp) in enumerate(zip(pre.topk_ids_NK[t, :k].tolist(),
                                              pre.topk_logprobs_NK[t, :k].tolist()), start=1):
                if str(tid) not in entry:
                    entry[str(tid)] = {"logprob": lp, "rank": r, "decoded_token": decode(tid)}
        positions.append(entry)
    return {"index": i, "text": "", "logprobs": None, "finish_reason": "length",
            "stop_reason": None, "prompt_logprobs": positions}


def create_app(model, tokenizer=None, *, name: str = "teacher", token: str | None = None,
               limits: ServerLimits = ServerLimits()) -> FastAPI:
    """The FastAPI app serving ``model`` (a transformers causal LM, eval mode)."""
    model.eval()
    vocab = model.config.vocab_size
    max_len = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    batcher = _Batcher(model, pad_id, limits.max_batch_tokens)
    cache: dict[int, str] = {}

    def decode(tid: int) -> str | None:
        if tokenizer is None:
            return None
        if tid not in cache:
            cache[tid] = tokenizer.decode([tid])
        return cache[tid]

    app = FastAPI(title="mopd teacher", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            if err["type"] == "json_invalid":
                parts.append(f"body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
            elif err["type"] == "extra_forbidden":
                parts.append(f"{loc}: unknown field")
            else:
                parts.append(f"{loc}: {err['msg']}")
        return _error(400, "; ".join(parts))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if token and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "max_model_len": max_len}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        try:
            seqs = _check(req, limits, vocab, max_len)
        except _Reject as rej:
            return _error(rej.status, rej.message)
        k = req.prompt_logprobs or 0
        t0 = time.perf_counter()
        pres = await asyncio.wrap_future(batcher.submit(seqs, k))
        choices = [_choice(i, s, p, k, decode) for i, (s, p) in enumerate(zip(seqs, pres))]
        n = sum(map(len, seqs))
        # encoded here: FastAPI's jsonable_encoder walk over every position would cost more
        # than the prefill itself for a small model
        payload = {"id": f"cmpl-{time.time_ns()}", "object": "text_completion",
                   "created": int(time.time()), "model": req.model or name, "choices": choices,
                   "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n},
                   "mopd": {"prefill_seconds": time.perf_counter() - t0}}
        return Response(_dumps(payload), media_type="application/json")

    return app
