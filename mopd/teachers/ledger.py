"""What each teacher costs a stage: requests, sequences, prefill tokens, generated tokens,
teacher-seconds, retries and failovers, per step and in total (issue #13 item 5).

:meth:`Ledger.wrap` puts a :class:`MeteredTeacher` in front of every distinct client (a client
shared by several domains is one teacher, named by its domains, e.g. ``code+if``); the wrapper
passes every call through unchanged and only counts. Retries and failovers are the HTTP client's
own cumulative counters (:class:`~mopd.teachers.http.HTTPTeacher`), read as differences, so they
are exact per step even though the scoring calls run on a thread pool.

``seconds`` are teacher-seconds: the wall time of each call, summed over concurrent calls — the
teacher time a step consumed, not the time the student waited for it (that is the distill
stage's ``teacher_wait_seconds``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, fields

FIELDS = ("requests", "sequences", "prefill_tokens", "generated_tokens", "seconds", "retries", "failovers")


@dataclass
class Cost:
    requests: float = 0.0  # HTTP requests sent (an in-process teacher: calls)
    sequences: float = 0.0  # sequences scored or prompts continued
    prefill_tokens: float = 0.0  # prompt + completion tokens the teacher ran a forward over
    generated_tokens: float = 0.0  # tokens the teacher sampled (TrOPD prefixes, off-policy FT)
    seconds: float = 0.0  # teacher-seconds (wall time of each call, summed)
    retries: float = 0.0  # failed attempts that were retried or gave up
    failovers: float = 0.0  # requests answered by another replica than the first one tried

    def add(self, other: "Cost") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class MeteredTeacher:
    """``inner`` with its calls counted into ``ledger`` under ``name``. Everything else (``name``
    of the client aside, ``health``, ``close``, whether it can ``generate``) is the inner client's."""

    def __init__(self, inner, name: str, ledger: "Ledger"):
        self._inner = inner
        self._teacher = name
        self._ledger = ledger
        self.name = inner.name

    def score(self, prompt_ids, completion_ids, *, topk: int | None = None, temperature: float = 1.0):
        t0 = time.perf_counter()
        try:
            return self._inner.score(prompt_ids, completion_ids, topk=topk, temperature=temperature)
        finally:
            self._ledger._charge(self._teacher, self._inner, t0, sequences=len(prompt_ids),
                                 prefill_tokens=sum(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)))

    def _generate(self, generate, prompt_ids, **kwargs):
        t0 = time.perf_counter()
        out = None
        try:
            out = generate(prompt_ids, **kwargs)
            return out
        finally:
            self._ledger._charge(self._teacher, self._inner, t0, sequences=len(prompt_ids),
                                 prefill_tokens=sum(len(p) for p in prompt_ids),
                                 generated_tokens=sum(len(o) for o in out) if out is not None else 0)

    def __getattr__(self, attr):  # only reached for attributes MeteredTeacher lacks
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(attr)
        value = getattr(inner, attr)  # AttributeError when the inner client lacks it (hasattr)
        if attr == "generate":
            return lambda prompt_ids, **kw: self._generate(value, prompt_ids, **kw)
        return value


class Ledger:
    """Per-teacher costs of one stage: :meth:`step` returns (and starts anew) the current step's,
    :meth:`totals` the stage's."""

    def __init__(self):
        self._lock = threading.Lock()
        self._step: dict[str, Cost] = {}
        self._total: dict[str, Cost] = {}
        self._seen: dict[int, tuple[float, float, float]] = {}  # id(inner) -> counters read so far
        self._inners: dict[str, list] = {}

    def wrap(self, clients: dict) -> dict:
        """Domain -> client, each distinct client behind one :class:`MeteredTeacher` named by the
        domains it serves."""
        by_id: dict[int, list[str]] = {}
        for d, c in clients.items():
            by_id.setdefault(id(c), []).append(d)
        out = {}
        for doms in by_id.values():
            inner = clients[doms[0]]
            name = "+".join(sorted(doms))
            metered = MeteredTeacher(inner, name, self)
            self._inners.setdefault(name, []).append(inner)
            self._seen[id(inner)] = _counters(inner)
            with self._lock:
                self._step.setdefault(name, Cost())
                self._total.setdefault(name, Cost())
            for d in doms:
                out[d] = metered
        return out

    def _charge(self, name: str, inner, t0: float, **counts: float) -> None:
        cost = Cost(seconds=time.perf_counter() - t0, **counts)
        with self._lock:
            now = _counters(inner)
            before = self._seen.get(id(inner), (0.0, 0.0, 0.0))
            self._seen[id(inner)] = now
            http_requests, cost.retries, cost.failovers = (a - b for a, b in zip(now, before))
            # a client that counts its HTTP requests reports them; otherwise one call = one request
            cost.requests = http_requests if hasattr(inner, "requests") else 1.0
            self._step[name].add(cost)
            self._total[name].add(cost)

    def step(self) -> dict[str, dict[str, float]]:
        """Teacher -> this step's cost (since the last call), then start the next step."""
        with self._lock:
            out = {name: asdict(c) for name, c in self._step.items()}
            self._step = {name: Cost() for name in self._step}
        return out

    def totals(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {name: asdict(c) for name, c in self._total.items()}


def _counters(inner) -> tuple[float, float, float]:
    return (float(getattr(inner, "requests", 0)), float(getattr(inner, "retries", 0)),
            float(getattr(inner, "failovers", 0)))


def step_metrics(costs: dict[str, dict[str, float]], prefix: str = "teacher") -> dict[str, float]:
    """``{teacher: cost}`` -> flat metric names ``<prefix>/<teacher>/<field>``."""
    return {f"{prefix}/{name}/{k}": v for name, c in costs.items() for k, v in c.items()}


def stage_totals(costs: dict[str, dict[str, float]], student_tokens: float) -> dict[str, float]:
    """The stage's result metrics: per-teacher totals, the sums over teachers, and teacher-seconds
    per trained student token (``student_tokens``: completion tokens the student trained on)."""
    out = step_metrics(costs, "teacher_cost")
    for k in FIELDS:
        out[f"teacher_cost/all/{k}"] = sum(c[k] for c in costs.values())
    out["teacher_cost/all/student_tokens"] = float(student_tokens)
    out["teacher_cost/all/seconds_per_student_token"] = (out["teacher_cost/all/seconds"] / student_tokens
                                                         if student_tokens else 0.0)
    return out


def history_totals(history: dict[str, list[tuple[int, float]]], student_tokens_key: str) -> dict[str, float]:
    """:func:`stage_totals` from a stage's metric history (the per-step ``teacher/<name>/<field>``
    metrics and ``student_tokens_key``): a resumed stage counts each step of its history once.
    Empty when the stage queried no teacher."""
    costs: dict[str, dict[str, float]] = {}
    for key, points in history.items():
        head, _, rest = key.partition("/")
        name, _, field = rest.rpartition("/")
        if head == "teacher" and name and field in FIELDS:
            costs.setdefault(name, dict.fromkeys(FIELDS, 0.0))[field] += sum(v for _, v in points)
    return stage_totals(costs, sum(v for _, v in history.get(student_tokens_key, []))) if costs else {}
