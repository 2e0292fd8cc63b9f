"""HTTP teacher client: vLLM's ``/v1/completions`` prompt-logprob API (served by
`mopd serve-teacher` or `vllm serve`), round-robin over replicas with failover.

Failure semantics (MOPD 3.3 runs teachers as separate services, so they can die): a connection
error, timeout or 5xx answer moves the request to the next replica, up to ``max_attempts`` tries
(default: every replica once) within ``retry_deadline`` seconds; a 4xx answer is the request's
fault and raises at once. The retries are tenacity's: no pause before a replica this request has
not tried yet (failover), exponential backoff with jitter before going back to one that failed.
When no replica answers, :class:`TeacherError` names the domain and every endpoint with its
error. A response is checked (one choice per sequence, finite log-probs, the top-k present)
before use: never a silent zero advantage.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Sequence

import httpx
import tenacity
import torch

try:  # orjson (a prefect/dvc dependency) parses the per-position dicts faster, under the GIL
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import loads as _loads

from mopd.security import redact_text, redact_url
from mopd.teachers.base import SequenceScores, TeacherError, check_scores, unscaled_only, validate_request

log = logging.getLogger(__name__)


def parse_prompt_logprobs(positions: list, seq: list[int], start: int, topk: int | None, who: str):
    """One choice's ``prompt_logprobs`` -> :class:`SequenceScores` for tokens ``seq[start:]``.

    ``positions[t]`` maps str(token id) -> {"logprob", "rank", ...} for the token at t; the
    actual token is always present, the top-k are the k entries of lowest rank."""
    if not isinstance(positions, list) or len(positions) != len(seq):
        got = len(positions) if isinstance(positions, list) else type(positions).__name__
        raise TeacherError(f"{who}: prompt_logprobs has {got} positions for {len(seq)} tokens")
    lps: list[float] = []
    ids: list[list[int]] = []
    tops: list[list[float]] = []
    for t in range(start, len(seq)):  # plain lists, one tensor at the end: this runs under the GIL
        entry = positions[t]           # while the student samples in the main thread
        if not isinstance(entry, dict) or str(seq[t]) not in entry:
            raise TeacherError(f"{who}: position {t}: no log-prob for the prompt token {seq[t]}")
        lps.append(float(entry[str(seq[t])]["logprob"]))
        if topk:
            ranked = sorted(entry.items(), key=lambda kv: kv[1].get("rank") or 1 << 62)[:topk]
            if len(ranked) < topk:
                raise TeacherError(f"{who}: position {t}: {len(ranked)} top entries, expected {topk}")
            ids.append([int(k) for k, _ in ranked])
            tops.append([float(v["logprob"]) for _, v in ranked])
    n = len(lps)
    return SequenceScores(torch.tensor(lps, dtype=torch.float32),
                          torch.tensor(ids, dtype=torch.long).view(n, topk) if topk else None,
                          torch.tensor(tops, dtype=torch.float32).view(n, topk) if topk else None)


class _Unanswered(Exception):
    """One POST the replica did not answer (connection error, timeout or 5xx): worth a retry."""


class HTTPTeacher:
    """A domain's teacher behind one or more prefill endpoints (base URLs, e.g.
    ``http://127.0.0.1:8001``). Thread-safe; requests carry at most ``max_batch`` sequences.
    Credentials in an endpoint URL (``http://user:pass@host``) are used but never shown: names,
    logs and errors carry the URL redacted (:func:`mopd.security.redact_url`).

    Retries: at most ``max_attempts`` POSTs per request (default: one per endpoint), none started
    once ``retry_deadline`` seconds have passed (a started one may still take ``timeout``); the
    pause before going back to an endpoint is ``min(backoff * 2**(attempt - 1), backoff_max)``
    seconds plus up to ``backoff`` of jitter."""

    # why: 10 parameters, all but the endpoint set keyword-only with defaults: the HTTP client's
    # settings (model, token, timeout, batch) and the retry policy's (attempts, backoff, cap, deadline)
    def __init__(self, domain: str, endpoints: Sequence[str], *, model: str | None = None,
                 token: str | None = None, timeout: float = 120.0, max_attempts: int | None = None,
                 max_batch: int = 64, backoff: float = 0.5, backoff_max: float = 30.0,
                 retry_deadline: float = 600.0):
        if not endpoints:
            raise ValueError(f"teacher for domain {domain!r}: no endpoints given")
        self.domain = domain
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.shown = {e: redact_url(e) for e in self.endpoints}
        self.name = f"{domain}@{','.join(self.shown.values())}"
        self.model = model
        self.max_attempts = max_attempts or len(self.endpoints)
        self.max_batch = max_batch
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(headers=headers, timeout=timeout,
                                  limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        self._rr = itertools.count()
        self._lock = threading.Lock()
        # cumulative counters, read by the stage's cost ledger (mopd.teachers.ledger)
        self.requests = 0  # POSTs sent, failed ones included
        self.retries = 0  # POSTs that failed (connection error or 5xx)
        self.failovers = 0  # requests that had to move to another replica
        # tenacity keeps its per-call state thread-local, so one Retrying serves every thread
        self._retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Unanswered),
            stop=tenacity.stop_after_attempt(self.max_attempts) | tenacity.stop_before_delay(retry_deadline),
            wait=tenacity.wait_chain(*[tenacity.wait_none()] * (len(self.endpoints) - 1),
                                     tenacity.wait_exponential(multiplier=backoff, max=backoff_max)
                                     + tenacity.wait_random(0, backoff)),
            before_sleep=self._before_retry, reraise=True)

    def score(self, prompt_ids, completion_ids, *, topk: int | None = None,
              temperature: float = 1.0) -> list[SequenceScores]:
        unscaled_only(temperature, f"HTTP teacher {self.name!r}")
        validate_request(prompt_ids, completion_ids, topk)
        out: list[SequenceScores] = []
        for s in range(0, len(prompt_ids), self.max_batch):
            out += self._score_batch(prompt_ids[s:s + self.max_batch],
                                     completion_ids[s:s + self.max_batch], topk)
        return out

    def _score_batch(self, prompts, completions, topk) -> list[SequenceScores]:
        seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
        body = {"prompt": seqs, "max_tokens": 1, "prompt_logprobs": topk or 0}
        if self.model:
            body["model"] = self.model
        data, url = self._post(body)
        choices = sorted(data.get("choices") or [], key=lambda ch: ch.get("index", 0))
        who = f"teacher for domain {self.domain!r} at {url}"
        if len(choices) != len(seqs):
            raise TeacherError(f"{who}: {len(choices)} choices for {len(seqs)} prompts")
        scores = [parse_prompt_logprobs(ch.get("prompt_logprobs"), s, len(p), topk, who)
                  for ch, s, p in zip(choices, seqs, prompts)]
        check_scores(scores, completions, topk, who)
        return scores

    def generate(self, prompt_ids, *, max_new_tokens: int, temperature: float, seed: int) -> list[list[int]]:
        """One sampled continuation per prompt (TrOPD's teacher prefixes, ALGORITHMS §5) through
        ``/v1/completions`` with ``max_tokens``: the teacher's own policy at ``temperature``
        (top-k/top-p off), the request's ``seed``, the generated ids from ``return_token_ids``
        (the embedded server, or a vLLM that returns them)."""
        if max_new_tokens < 1 or temperature <= 0:
            raise ValueError(f"need max_new_tokens >= 1 and temperature > 0; got {max_new_tokens}, {temperature}")
        out: list[list[int]] = []
        for s in range(0, len(prompt_ids), self.max_batch):
            batch = [list(p) for p in prompt_ids[s:s + self.max_batch]]
            body = {"prompt": batch, "max_tokens": max_new_tokens, "temperature": temperature,
                    "top_p": 1.0, "top_k": -1, "seed": seed + s, "n": 1, "return_token_ids": True}
            if self.model:
                body["model"] = self.model
            data, url = self._post(body)
            who = f"teacher for domain {self.domain!r} at {url}"
            choices = sorted(data.get("choices") or [], key=lambda ch: ch.get("index", 0))
            if len(choices) != len(batch):
                raise TeacherError(f"{who}: {len(choices)} choices for {len(batch)} prompts")
            for ch in choices:
                ids = ch.get("token_ids")
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids) \
                        or len(ids) > max_new_tokens:
                    raise TeacherError(f"{who}: no valid `token_ids` in a generated choice (the "
                                       "server must honour return_token_ids)")
                out.append(ids)
        return out

    def _post(self, body: dict) -> tuple[dict, str]:
        with self._lock:
            first = next(self._rr)
        errors: list[str] = []  # one per failed attempt, in order

        def attempt() -> tuple[dict, str]:
            url = self.endpoints[(first + len(errors)) % len(self.endpoints)]
            with self._lock:
                self.requests += 1
            try:
                resp = self._http.post(f"{url}/v1/completions", json=body)
            except httpx.TransportError as exc:  # connection refused or lost, timeout
                errors.append(f"{self.shown[url]}: {type(exc).__name__}: {redact_text(str(exc))}")
            except httpx.HTTPError as exc:  # an answer we cannot read: no other replica will do better
                raise TeacherError(f"teacher for domain {self.domain!r} at {self.shown[url]}: "
                                   f"{type(exc).__name__}: {redact_text(str(exc))}") from exc
            else:
                if resp.status_code < 400:
                    if errors:
                        with self._lock:
                            self.failovers += 1
                    return _loads(resp.content), self.shown[url]
                msg = redact_text(_message(resp))
                if resp.status_code < 500:
                    raise TeacherError(f"teacher for domain {self.domain!r} at {self.shown[url]} "
                                       f"rejected the request ({resp.status_code}): {msg}")
                errors.append(f"{self.shown[url]}: HTTP {resp.status_code}: {msg}")
            with self._lock:
                self.retries += 1
            raise _Unanswered(errors[-1])

        try:
            return self._retrying(attempt)
        except _Unanswered:
            raise TeacherError(f"teacher for domain {self.domain!r}: no endpoint answered after "
                               f"{len(errors)} attempt(s): " + "; ".join(errors)) from None

    def _before_retry(self, state: tenacity.RetryCallState) -> None:
        log.warning("teacher %s: %s; attempt %d in %.3f s", self.domain, state.outcome.exception(),
                    state.attempt_number + 1, state.next_action.sleep)

    def health(self) -> dict[str, bool]:
        """Endpoint (credentials masked) -> whether ``GET /health`` answers 200."""
        ok = {}
        for url in self.endpoints:
            try:
                ok[self.shown[url]] = self._http.get(f"{url}/health", timeout=5.0).status_code == 200
            except httpx.HTTPError:
                ok[self.shown[url]] = False
        return ok

    def close(self) -> None:
        self._http.close()


def _message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:300]
    err = data.get("error", data) if isinstance(data, dict) else data
    return str(err.get("message", err) if isinstance(err, dict) else err)[:500]
