"""The sampler: prompts → the student's rollouts, scored as they come (MOPD 3.2-3.3).

A step's prompts are sampled in ``chunks`` micro-batches; with ``overlap`` each chunk's scoring
requests go to the scorer as soon as it is sampled, so teacher prefill runs while the next chunks
sample, and the trainer waits only before the update. A prompt may carry a prefix (TrOPD §4.3:
teacher tokens the student continues from, set by a shaper before sampling): the prefix moves
from the prompt into the completion. Under data parallelism each process samples its share of
the chunks, each with the seed it has in one process.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Callable

from mopd.opd.batch import RolloutBatch, StepTiming
from mopd.opd.scorers import RoutedScorer, collect_scoring, submit_scoring
from mopd.rollout import RolloutBackend, Sample


def draw_domains(domains: list[str], weights: dict[str, float] | None, n: int,
                 rng: random.Random, step: int = 0) -> list[str]:
    """Per-batch domain shares (MOPD: fixed ratios per batch): largest-remainder allocation of
    ``n`` prompts to domains by weight (uniform when None), so every batch has the same mix. Ties
    between equal remainders rotate with ``step`` (16 prompts over 3 domains: 6/5/5, then 5/6/5,
    then 5/5/6), so over steps each domain gets its share, not the first domain every leftover."""
    w = weights or {d: 1.0 / len(domains) for d in domains}
    exact = {d: n * w[d] for d in domains}
    counts = {d: int(exact[d]) for d in domains}
    pos = {d: (i - step) % len(domains) for i, d in enumerate(domains)}
    order = sorted(domains, key=lambda d: (-round(exact[d] - counts[d], 9), pos[d]))
    for d in order[: n - sum(counts.values())]:
        counts[d] += 1
    out = [d for d in domains for _ in range(counts[d])]
    rng.shuffle(out)
    return out


def chunk_bounds(n: int, chunks: int) -> list[int]:
    """Boundaries of ``chunks`` contiguous micro-batches of ``n`` prompts, the last one half-size:
    the trainer waits only for the last chunk's scoring, so a smaller tail hides more of the
    teacher (the same split is used with and without overlap, so both sample identically)."""
    c = max(1, min(chunks, n))
    weights = [1.0] * (c - 1) + [0.5]
    cum = [sum(weights[:i]) for i in range(c + 1)]
    bounds = sorted({round(n * w / cum[-1]) for w in cum})
    return bounds


@dataclass(frozen=True)
class Sampler:
    """How the student samples a step: ``n`` completions per prompt of at most ``max_new_tokens``
    at ``temperature``, in ``chunks`` micro-batches, scored with ``overlap``. ``decode`` and
    ``eos_id`` re-render a completion that starts with a prefix; ``part = (rank, world)``."""

    rollout: RolloutBackend
    n: int
    max_new_tokens: int
    temperature: float
    chunks: int = 1
    overlap: bool = False
    decode: Callable[[list[int]], str] | None = None
    eos_id: int | None = None
    part: tuple[int, int] = (0, 1)

    def __call__(self, batch: RolloutBatch, scorer: RoutedScorer) -> None:
        """Fill ``batch.samples``, ``scores``, ``prefix_lens`` and ``timing`` (seed ``batch.seed``)."""
        prompt_ids, timing = batch.prompt_ids, batch.timing
        bounds = chunk_bounds(len(prompt_ids), self.chunks)
        rank, world = self.part
        if len(bounds) - 1 < world:
            raise ValueError(f"{len(prompt_ids)} prompts in {len(bounds) - 1} rollout chunk(s) cannot feed {world} "
                             f"data-parallel processes: raise distill.prompts_per_step / distill.rollout_chunks")
        pre = batch.prefixes or [[] for _ in prompt_ids]
        samples, prefix_lens, row_domain, jobs = batch.samples, batch.prefix_lens, [], []
        for c, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            if c % world != rank:
                continue
            t0 = time.perf_counter()
            got = self.rollout.sample_ids([list(p) + pre[i] for i, p in enumerate(prompt_ids[lo:hi], lo)], n=self.n,
                                          max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                          seed=batch.seed + 7919 * c)
            timing.sample += time.perf_counter() - t0
            first = len(samples)
            for s in got:
                i = s.prompt_index + lo
                samples.append(self._with_prefix(s, i, prompt_ids[i], pre[i]))
                prefix_lens.append(len(pre[i]))
                row_domain.append(batch.domains[i])
            if self.overlap:
                jobs += scorer.submit(samples, list(range(first, len(samples))), row_domain)
        if not self.overlap:
            jobs = scorer.submit(samples, list(range(len(samples))), row_domain)
        batch.scores = scorer.collect(jobs, len(samples), timing)

    def _with_prefix(self, s: Sample, i: int, prompt: list[int], prefix: list[int]) -> Sample:
        """Sample ``s`` of prompt ``i``: the prefix moves from the prompt into the completion, which
        keeps ``max_new_tokens`` in all (none after a prefix that ended with EOS)."""
        if prefix:
            budget = 0 if prefix[-1] == self.eos_id else self.max_new_tokens - len(prefix)
            comp = prefix + s.completion_ids[:max(budget, 0)]
            s = Sample(s.prompt_index, list(prompt), comp, self.decode(comp))
        return dataclasses.replace(s, prompt_index=i)


# why: 16 parameters: the function form of Sampler + RoutedScorer that tests and benchmarks call
# with one keyword per knob; the trainer builds the two objects instead.
def rollout_and_score(rollout: RolloutBackend, clients, prompt_ids: list[list[int]], domains: list[str], pool, *,
                      n: int, max_new_tokens: int, temperature: float, seed: int, chunks: int, overlap: bool,
                      topk: int | None, prefixes: list[list[int]] | None = None, decode=None,
                      eos_id: int | None = None, part: tuple[int, int] = (0, 1)):
    """Sample ``n`` completions per prompt and score them with each domain's teacher (see
    :class:`Sampler`). Returns (samples, scores per sample, StepTiming, prefix length per sample)."""
    batch = RolloutBatch(step=0, seed=seed, domains=domains, records=[], prompt_ids=prompt_ids, prefixes=prefixes)
    Sampler(rollout, n, max_new_tokens, temperature, chunks, overlap, decode, eos_id, part)(
        batch, RoutedScorer(clients, pool, topk, temperature))
    return batch.samples, batch.scores, batch.timing, batch.prefix_lens


__all__ = ["Sampler", "StepTiming", "chunk_bounds", "collect_scoring", "draw_domains", "rollout_and_score",
           "submit_scoring"]
