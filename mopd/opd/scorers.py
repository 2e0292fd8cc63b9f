"""Scorers: rollouts → the teachers' log-probs of every response token (MOPD 3.3; ALGORITHMS §3).

:class:`RoutedScorer` sends each rollout to the teacher its domain routes to (MOPD: one-hot
routing); requests are submitted while later chunks are still sampling and collected before the
update. :class:`WeightedScorer` adds Uni-OPD eq. 4: a domain's rollouts scored by several
teachers, their log-probs combined by :func:`mopd.objectives.routing.combine_teacher_logprobs`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mopd.objectives.routing import combine_teacher_logprobs, teacher_weights
from mopd.opd.batch import RolloutBatch, StepTiming
from mopd.rollout import Sample
from mopd.teachers import InProcessTeacher, SequenceScores, TeacherClient, TeacherError


def _timed_score(client: TeacherClient, prompt_ids, completion_ids, topk, temperature: float = 1.0):
    t0 = time.perf_counter()
    return client.score(prompt_ids, completion_ids, topk=topk, temperature=temperature), time.perf_counter() - t0


def submit_scoring(pool: ThreadPoolExecutor, clients: dict[str, TeacherClient], samples: list[Sample],
                   rows: list[int], row_domain: list[str], topk: int | None,
                   temperature: float = 1.0) -> list[tuple]:
    """Send ``samples[rows]`` to their domains' teachers: one request per distinct client (domains
    routed to the same teacher share it: fewer, larger requests); returns the pending jobs
    ``(domains, rows, future)``. ``temperature``: the student's sampling temperature, at which
    the teacher's log-probs are taken (ALGORITHMS §1: the reward is the reverse KL at T)."""
    by_client: dict[int, tuple[list[str], list[int]]] = {}
    for b in rows:
        doms, rs = by_client.setdefault(id(clients[row_domain[b]]), ([], []))
        rs.append(b)
        if row_domain[b] not in doms:
            doms.append(row_domain[b])
    return [(doms, rs, pool.submit(_timed_score, clients[doms[0]], [samples[b].prompt_ids for b in rs],
                                   [samples[b].completion_ids for b in rs], topk, temperature))
            for doms, rs in by_client.values()]


def collect_scoring(jobs: list[tuple], n_rows: int, timing: StepTiming) -> list[SequenceScores]:
    """Wait for every job; the rows' scores in order. A failed teacher raises (TeacherError names
    the domain and endpoints): a step never continues with missing scores."""
    t0 = time.perf_counter()
    scores: list[SequenceScores | None] = [None] * n_rows
    try:
        for doms, rows, fut in jobs:
            got, seconds = fut.result()
            if len(got) != len(rows):
                raise TeacherError(f"teacher for domain(s) {doms}: {len(got)} scores for {len(rows)} rollouts")
            timing.teacher += seconds
            for b, sc in zip(rows, got):
                scores[b] = sc
    except TeacherError:
        raise
    except Exception as exc:
        raise TeacherError(f"teacher for domain(s) {doms} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        for _, _, fut in jobs:
            fut.cancel()
        timing.wait += time.perf_counter() - t0
    missing = [b for b, sc in enumerate(scores) if sc is None]
    if missing:
        raise TeacherError(f"rows {missing[:5]} got no teacher score")
    return scores  # type: ignore[return-value]


class RoutedScorer:
    """Each rollout scored by its own domain's teacher (``clients[domain]``), with the teacher's
    top-``topk`` per position when ``topk`` is set (§2), at the student's sampling ``temperature``."""

    def __init__(self, clients: dict[str, TeacherClient], pool: ThreadPoolExecutor, topk: int | None = None,
                 temperature: float = 1.0):
        self.clients, self.pool, self.topk, self.temperature = clients, pool, topk, temperature

    def submit(self, samples: list[Sample], rows: list[int], row_domain: list[str]) -> list[tuple]:
        return submit_scoring(self.pool, self.clients, samples, rows, row_domain, self.topk, self.temperature)

    def collect(self, jobs: list[tuple], n_rows: int, timing: StepTiming) -> list[SequenceScores]:
        return collect_scoring(jobs, n_rows, timing)

    def finish(self, batch: RolloutBatch) -> None:
        """After the routed scores are in: nothing more for one-hot routing."""


class WeightedScorer(RoutedScorer):
    """Uni-OPD eq. 4 (ALGORITHMS §3): the rollouts of a domain with a weight row are scored by
    every teacher of the row with a positive weight, combined as ``u = Σ_i w_i u_i`` (the K1
    reward of ``Σ_i w_i KL(πS ‖ πTi)`` is ``u - s``). The routed (own-domain) teacher's scores are
    reused for that teacher's share. Needs a K1-mixable method (checked by the configuration)."""

    def __init__(self, clients: dict[str, TeacherClient], pool: ThreadPoolExecutor,
                 weights: dict[str, dict[str, float]], topk: int | None = None, temperature: float = 1.0):
        super().__init__(clients, pool, topk, temperature)
        self.weights = weights

    def finish(self, batch: RolloutBatch) -> None:
        batch.scores = mix_teachers(self.pool, self.clients, batch.samples, batch.row_domains, batch.scores,
                                    self.weights, batch.timing, self.temperature)


class AllTeachersScorer(RoutedScorer):
    """Routed scoring (the update's target), and every other teacher's scores of every rollout in
    ``batch.all_scores`` (teacher -> one SequenceScores per row): what Open-MOPD's teacher-conflict
    policy compares. The routed teacher's scores are reused for its own rows."""

    def finish(self, batch: RolloutBatch) -> None:
        rows_all = list(range(len(batch.samples)))
        row_domain = batch.row_domains
        jobs = []
        for t in sorted(self.clients):
            rows = [b for b in rows_all if self.clients[row_domain[b]] is not self.clients[t]]
            if rows:
                jobs.append((t, t, rows, self.pool.submit(
                    _timed_score, self.clients[t], [batch.samples[b].prompt_ids for b in rows],
                    [batch.samples[b].completion_ids for b in rows], None, self.temperature)))
        extra = _collect_extra(jobs, batch.timing)
        out: dict[str, list[SequenceScores]] = {}
        for t, _, rows, _ in jobs:
            scores = list(batch.scores)  # routed scores where t is the row's own teacher
            for b, sc in zip(rows, extra[(t, t)]):
                scores[b] = sc
            out[t] = scores
        for t in self.clients:
            out.setdefault(t, list(batch.scores))
        out = dict(sorted(out.items()))
        batch.all_scores = out


def mix_teachers(pool: ThreadPoolExecutor, clients: dict[str, TeacherClient], samples: list[Sample],
                 row_domain: list[str], scores: list[SequenceScores],
                 weights: dict[str, dict[str, float]], timing: StepTiming,
                 temperature: float = 1.0) -> list[SequenceScores]:
    """:class:`WeightedScorer`'s step: ``scores`` hold the routed teacher's; returns the combined."""
    out = list(scores)
    mixed = {d: rows for d, row in weights.items() if row != {d: 1.0}
             if (rows := [b for b, rd in enumerate(row_domain) if rd == d])}
    jobs = []
    for d, rows in mixed.items():
        for t, w in weights[d].items():
            if w > 0 and t != d:
                jobs.append((d, t, rows, pool.submit(_timed_score, clients[t], [samples[b].prompt_ids for b in rows],
                                                     [samples[b].completion_ids for b in rows], None,
                                                     temperature)))
    extra = _collect_extra(jobs, timing)
    for d, rows in mixed.items():
        teachers = [t for t, w in weights[d].items() if w > 0]
        w_BM = teacher_weights([d] * len(rows), {d: {t: weights[d][t] for t in teachers}}, teachers)
        for j, b in enumerate(rows):
            lp_MC = torch.stack([(scores[b] if t == d else extra[(d, t)][j]).logprobs_C for t in teachers])
            out[b] = SequenceScores(combine_teacher_logprobs(lp_MC[:, None, :], w_BM[j:j + 1])[0])
    return out


def _collect_extra(jobs: list[tuple], timing: StepTiming) -> dict[tuple[str, str], list[SequenceScores]]:
    t0 = time.perf_counter()
    extra: dict[tuple[str, str], list[SequenceScores]] = {}
    try:
        for d, t, rows, fut in jobs:
            got, seconds = fut.result()
            if len(got) != len(rows):
                raise TeacherError(f"teacher {t!r} (weighted into domain {d!r}): {len(got)} scores for {len(rows)}")
            timing.teacher += seconds
            extra[(d, t)] = got
    except TeacherError:
        raise
    except Exception as exc:
        raise TeacherError(f"teacher weighted into domain {d!r} ({t!r}) failed: {type(exc).__name__}: {exc}") from exc
    finally:
        timing.wait += time.perf_counter() - t0
    return extra


def as_clients(teachers: dict[str, "TeacherClient | Path | str"]) -> dict[str, TeacherClient]:
    """Checkpoint paths become in-process teachers (one model per distinct path); clients pass."""
    loaded: dict[str, InProcessTeacher] = {}
    out = {}
    for d, t in teachers.items():
        if isinstance(t, (str, Path)):
            key = str(Path(t).resolve())
            if key not in loaded:
                loaded[key] = InProcessTeacher.from_pretrained(t, name=d)
            out[d] = loaded[key]
        else:
            out[d] = t
    return out
