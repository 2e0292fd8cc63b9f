"""MOPD and every on-policy distillation method, composed from the seams of :mod:`mopd.opd`
(MOPD 3.2; ALGORITHMS §1-§5).

Each step: draw prompts with the configured per-batch domain shares (§3); the shapers act on the
prompts (TrOPD teacher prefixes, §5); the *student* samples `samples_per_prompt` completions per
prompt and every rollout is scored by the teacher its domain routes to (:class:`RoutedScorer`;
Uni-OPD eq. 4's weighted teachers: :class:`WeightedScorer`), scoring overlapped with sampling
(MOPD 3.3); the verifiers reward each rollout when a shaper needs it; shapers select rows (Uni-OPD
A.2 balancing) and shape the tensors (Uni-OPD §3.4 calibration); then one :class:`Update` of the
method's loss (`distill.objective`, a :class:`~mopd.opd.methods.MethodSpec`).

What the method spec and the distill section declare decides everything here: which batch
fields are filled (top-k, entropies), which shapers run, what data parallelism gathers.

Departures from the paper, on purpose: no Dynamic Sampling (MOPD turns it off for distillation
too); sampling is synchronous within a chunk (no continuous batching on the CPU backend).
"""

from __future__ import annotations

import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from mopd import runtime
from mopd.chat import PLAIN, PromptFormat
from mopd.objectives.registry import get_objective
from mopd.opd.batch import RolloutBatch, StepTiming
from mopd.opd.loop import LoopPlan, Student, one_thread, train_loop
from mopd.opd.methods import MethodSpec, get_method
from mopd.opd.sampler import Sampler, chunk_bounds, draw_domains, rollout_and_score
from mopd.opd.scorers import (
    AllTeachersScorer,
    RoutedScorer,
    WeightedScorer,
    as_clients,
    collect_scoring,
    mix_teachers,
    submit_scoring,
)
from mopd.opd.settings import DistillParams
from mopd.opd.shapers import (
    AdvantageRefresh,
    DomainBalance,
    MarginCalibration,
    TeacherConflict,
    OnlineBalance,
    Shaper,
    TeacherPrefixes,
    teacher_prefixes,
    uniopd_advantages,
    uniopd_balance,
)
from mopd.opd.update import TOPK_FIELDS, StudentForward, Update, student_quantities, update_passes
from mopd.rollout import RolloutBackend, Sample, TransformersRollout
from mopd.teachers import TeacherClient
from mopd.teachers.ledger import Ledger

# The seams' functions, importable from here as before the split (tests, benchmarks, CoPD).
__all__ = ["StepTiming", "as_clients", "check_data_parallel", "chunk_bounds", "collect_scoring", "draw_domains",
           "mix_teachers", "objective_kwargs", "rollout_and_score", "student_quantities", "submit_scoring",
           "teacher_prefixes", "train_distill", "train_mopd", "uniopd_advantages", "uniopd_balance", "update_passes"]
_one_thread = one_thread


def build_shapers(params: DistillParams) -> list[Shaper]:
    """The shapers the distill section turns on, in the order they act, then the method's own."""
    out: list[Shaper] = []
    if params.prefix_share > 0:
        out.append(TeacherPrefixes(params.prefix_share, params.max_steps, params.max_new_tokens, params.temperature))
    uni = params.uniopd
    if uni is not None and uni.active:
        out.append(OnlineBalance(uni))  # records the correct share; balances with online_balance
        if uni.calibration != "off":
            out.append(MarginCalibration(uni, params.clip))
    o = params.openmopd
    if o is not None and o.conflict != "off":
        out.append(TeacherConflict(o.conflict, o.conflict_nats, o.conflict_quantile))
    if o is not None and (o.gradient_shares or o.reward_scale != "off"):
        out.append(DomainBalance(o.gradient_shares, o.target_shares, o.reward_scale, o.alpha, params.clip,
                                 params.token_mean))
    if o is not None and o.refresh_advantage:
        out.append(AdvantageRefresh())
    spec = get_method(params.objective)
    factory = spec.shaper_factory()
    if factory is not None:
        out += factory(spec.params.model_validate(params.objective_params), params)
    return out


def objective_kwargs(name: str, params: DistillParams) -> dict:
    """The loss's keyword arguments: the distill settings its spec ``takes`` (`clip`,
    `token_mean`) plus `objective_params`; one its spec does not accept is an error naming it."""
    spec = get_method(name)
    accepted = set(spec.params.model_fields)
    unknown = sorted(set(params.objective_params) - accepted)
    if unknown:
        raise ValueError(f"distill.objective_params: {unknown} not accepted by objective {name!r} "
                         f"(it takes {sorted(accepted | set(spec.takes))})")
    section = {"clip": params.clip, "token_mean": params.token_mean}
    return {k: section[k] for k in spec.takes if k in section} | dict(params.objective_params)


def check_data_parallel(params: DistillParams, world: int) -> None:
    """What the data-parallel loop needs, checked before any work: each process samples whole
    rollout chunks (with the seeds they have in one process), so the chunks split evenly. Shapers
    that act on the whole batch (``whole_batch``), several update passes, and losses that select
    over the whole batch run on the gathered batch (:func:`gathers`); a shaper written against the
    earlier contract (``data_parallel``) is refused, naming the new one."""
    where = f"runtime.processes = {world}"
    if params.rollout_chunks % world:
        raise ValueError(f"distill.rollout_chunks = {params.rollout_chunks} must be a multiple of {where} "
                         "(each process samples whole chunks)")
    for sh in build_shapers(params):
        if any("data_parallel" in vars(c) for c in type(sh).__mro__ if c is not object):
            raise ValueError(f"shaper {sh.name!r} ({type(sh).__module__}) declares `data_parallel`, which is now "
                             "`whole_batch` (True: it acts on the whole batch): rename it (docs/methods.md)")


def gathers(params: DistillParams, shapers: list[Shaper]) -> bool:
    """Whether every process needs the whole batch (:meth:`RolloutBatch.gather`): a shaper acts on
    it, the update makes several passes (the same minibatches everywhere), or the loss selects over
    it (``row_local`` False). Otherwise each process keeps only the rows it sampled."""
    return (any(sh.whole_batch for sh in shapers) or params.epochs > 1 or params.minibatches > 1
            or not get_method(params.objective).row_local)


def lr_factor(step: int, steps: int, warmup_ratio: float, schedule: str, floor: float = 0.1) -> float:
    """The multiplier of the base learning rate at ``step`` (1-based) of ``steps``: linear warm-up
    over ``ceil(warmup_ratio * steps)`` steps, then 1 (`constant`) or a cosine from 1 to ``floor``."""
    warm = math.ceil(warmup_ratio * steps)
    if step <= warm:
        return step / warm
    if schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, steps - warm)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _verify(score_fn, samples: list[Sample], recs: list[dict], batch_domains: list[str]) -> list[float]:
    """Outcome reward of every rollout, by its domain's verifier (one call per domain)."""
    row_domain = [batch_domains[s.prompt_index] for s in samples]
    rewards = [0.0] * len(samples)
    for d in dict.fromkeys(row_domain):
        rows = [b for b, rd in enumerate(row_domain) if rd == d]
        got = score_fn(d, [samples[b].text for b in rows], [recs[samples[b].prompt_index]["reference"] for b in rows])
        for b, r in zip(rows, got):
            rewards[b] = float(r)
    return rewards


@dataclass
class DistillStep:
    """One step of an on-policy distillation method (the loop's ``step_fn``)."""

    params: DistillParams
    spec: MethodSpec
    student: Student
    optim: torch.optim.Optimizer
    rollout: RolloutBackend
    clients: dict[str, TeacherClient]
    prompts: dict[str, list[dict]]
    sampler: Sampler
    shapers: list[Shaper]
    update: Update
    kwargs: dict
    seed: int
    forward: torch.nn.Module  # the student's quantities (StudentForward; DDP-wrapped under data parallelism)
    score_fn: object = None
    gathered: bool = False  # every process holds the whole batch after sampling (`gathers`)

    @property
    def topk(self) -> int | None:
        """The teacher's top-k per position, when the loss reads top-k fields (§2)."""
        return self.params.topk if self.update.needs & TOPK_FIELDS else None

    def scorer(self, pool: ThreadPoolExecutor) -> RoutedScorer:
        t = self.params.temperature  # the teachers' log-probs at the student's sampling temperature
        if any("all_teachers" in sh.needs for sh in self.shapers):
            return AllTeachersScorer(self.clients, pool, self.topk, t)
        if self.params.teacher_weights:
            return WeightedScorer(self.clients, pool, self.params.teacher_weights, self.topk, t)
        return RoutedScorer(self.clients, pool, self.topk, t)

    def verifies(self, step: int) -> bool:
        """Whether this step's rollouts are verified: every step for a shaper that needs their
        rewards, else at step 1 and every `reward_every` steps (monitoring only)."""
        return (any("rewards" in sh.needs for sh in self.shapers) or step == 1
                or step % self.params.reward_every == 0)

    def restore(self, history) -> None:
        """A resumed run: the shapers take back the state they carry across steps."""
        for sh in self.shapers:
            sh.restore(history)

    def __call__(self, step: int, pool: ThreadPoolExecutor) -> dict[str, float]:
        t0 = time.perf_counter()
        p, model, tok, rng = self.params, self.student.model, self.student.tokenizer, self.student.rng
        domains = draw_domains(sorted(self.clients), p.domain_weights, p.prompts_per_step, rng, step)
        recs = [rng.choice(self.prompts[d]) for d in domains]
        batch = RolloutBatch(step, self.seed * 100_003 + step, domains, recs,
                             self.student.render(recs))
        for sh in self.shapers:
            sh.before_sampling(batch, self.clients)
        scorer = self.scorer(pool)
        self.sampler(batch, scorer)
        scorer.finish(batch)
        if self.score_fn is not None and self.verifies(step):
            batch.rewards = _verify(self.score_fn, batch.samples, recs, domains)
        if self.gathered:
            batch.gather()
        for sh in self.shapers:
            sh.select(batch)
        packed = batch.pack(tok.pad_token_id, model.lm_head.weight.device,  # where the student is
                            self.topk, prefix_mask=any(sh.prefix for sh in self.shapers))
        passes = update_passes(p, packed.rows, rng)
        if len(passes) > 1 or any("old_logprobs" in sh.needs for sh in self.shapers):
            with torch.no_grad(), runtime.current().autocast():  # fix the rollout policy (§1)
                packed.old_logprobs_BT = student_quantities(model, packed.ids_BT, packed.attn_BT,
                                                            temperature=p.temperature)[0]
        for sh in self.shapers:
            sh.shape(packed, batch)
        lr = p.learning_rate * lr_factor(step, p.max_steps, p.warmup_ratio, p.lr_schedule)
        for group in self.optim.param_groups:
            group["lr"] = lr
        kwargs = dict(self.kwargs)
        if "generator" in self.spec.takes:  # e.g. TrOPD's trust mask: its own seeded stream
            kwargs["generator"] = torch.Generator().manual_seed(batch.seed + 2)
        sums = self.update(self.forward, self.optim, packed, passes, kwargs, gathered=self.gathered)
        self.rollout.update_weights(model)
        metrics = _step_metrics(batch, packed.mask_BT, time.perf_counter() - t0)
        if self.gathered and runtime.rank() > 0:  # the loop sums trained tokens over processes: count them once
            metrics["distill/trained_tokens"] = 0.0
        return sums | batch.metrics | metrics | {"distill/learning_rate": lr}


def _step_metrics(batch: RolloutBatch, mask_BT: torch.Tensor, step_seconds: float) -> dict[str, float]:
    timing, n_tok = batch.timing, mask_BT.sum().clamp(min=1)
    metrics = {
        "distill/response_tokens": float(n_tok / len(batch.kept)),
        "distill/trained_tokens": float(mask_BT.sum()),  # on-policy tokens in the loss (cost ledger)
        "distill/sample_seconds": timing.sample,
        "distill/teacher_seconds": timing.teacher,
        "distill/teacher_wait_seconds": timing.wait,
        "distill/teacher_share": timing.wait / step_seconds,
        "distill/step_seconds": step_seconds,
    }
    if batch.rewards is not None:  # every rollout of the step (before any balancing), per domain
        row_domain = batch.row_domains
        for d in dict.fromkeys(row_domain):
            rs = [batch.rewards[b] for b, rd in enumerate(row_domain) if rd == d]
            metrics[f"distill/reward_{d}"] = sum(rs) / len(rs)
    return metrics


# why: 12 parameters: the stage's inputs (student, teachers, prompts, output), its settings, seed
# and tracker, the prompt format, plus four optional seams a caller may replace (verifier, rollout
# backend, checkpoint).
def train_distill(sft_dir: Path, teachers: dict[str, "TeacherClient | Path"], prompts: dict[str, list[dict]],
               out_dir: Path, params: DistillParams, seed: int, tracker, *, fmt: PromptFormat,
               score_fn=None, rollout: RolloutBackend | None = None, checkpoint: Path | None = None,
               key: str = "") -> dict[str, list[tuple[int, float]]]:
    """Distil ``teachers`` (domain -> client, or checkpoint path for an in-process teacher) into
    the student at ``sft_dir`` with the method ``params.objective``; save to ``out_dir/model``.

    ``prompts``: domain -> records (need `prompt`, and `reference` when ``score_fn`` is given).
    ``score_fn(domain, texts, references) -> list[float]`` verifies the rollouts: for monitoring,
    and for the shapers that need outcome rewards (Uni-OPD's balancing and calibration); MOPD's
    losses never use them. ``rollout``: the student's sampling backend (default: transformers
    `generate` on the trained module). ``checkpoint``: a directory for in-stage checkpoints every
    `params.checkpoint_every` steps, resumed from when it holds one made under the same ``key``
    (the stage's cache key; another key is an error): the resumed run ends with the same weights
    as an uninterrupted one. Returns the metric history."""
    domains = sorted(teachers)
    for d, row in (params.teacher_weights or {}).items():
        unknown = sorted({d, *row} - set(domains))
        if unknown:
            raise ValueError(f"distill.teacher_weights.{d}: {unknown} have no teacher (teachers: {domains})")
    missing = [d for d in domains if not prompts.get(d)]
    if missing:
        raise ValueError(f"no prompts for domain(s) {missing}")
    part = (runtime.rank(), runtime.world_size())
    if part[1] > 1:
        check_data_parallel(params, part[1])
    student = Student.load(sft_dir, seed, fmt, params.lora)
    if params.lora is not None and getattr(rollout, "name", "") == "vllm":
        raise ValueError("distill.lora: a colocated vLLM engine is synced by parameter name, which LoRA "
                         "adapters change; use runtime.rollout: transformers with LoRA")
    ledger = Ledger()  # what each teacher costs, per step (mopd.teachers.ledger)
    clients = ledger.wrap(as_clients(teachers))
    rollout = rollout or TransformersRollout(student.model, student.tokenizer, fmt=fmt)
    optim = torch.optim.AdamW([p for p in student.model.parameters() if p.requires_grad], lr=params.learning_rate,
                              weight_decay=0.0)
    spec = get_method(params.objective)
    kwargs = objective_kwargs(params.objective, params)
    tok = student.tokenizer
    step = DistillStep(
        params, spec, student, optim, rollout, clients, prompts,
        Sampler(rollout, params.samples_per_prompt, params.max_new_tokens, params.temperature, params.rollout_chunks,
                params.overlap, lambda ids: tok.decode(ids, skip_special_tokens=True), tok.eos_token_id, part),
        build_shapers(params),
        Update(get_objective(params.objective), frozenset(spec.requires), params.temperature, params.token_mean,
               (kwargs.get("eps_low", 0.2), kwargs.get("eps_high", 0.2)), part, clip=params.clip,
               row_local=spec.row_local),
        kwargs, seed,
        # under `accelerate launch`: the student's forward in accelerate's DDP wrapper (mopd.runtime)
        runtime.prepare_data_parallel(StudentForward(student.model)), score_fn)
    step.gathered = part[1] > 1 and gathers(params, step.shapers)
    if part[1] > 1 and runtime.is_main():
        print(f"data parallel: {part[1]} processes, the student's forward in {type(step.forward).__name__} "
              f"(accelerate); {'the whole batch gathered on every process' if step.gathered else 'each process keeps its rows'}",
              flush=True)
    plan = LoopPlan("mopd distill", params.max_steps, workers=max(2, 2 * len(clients)), thread_prefix="teacher",
                    checkpoint=checkpoint, key=key, checkpoint_every=params.checkpoint_every,
                    trained_tokens_key="distill/trained_tokens", snapshot_every=params.snapshot_every)
    return train_loop(student, optim, rollout, ledger, tracker, out_dir, plan, step)


# The name before every variant trained here, for the tests written against it: the tiny profile's
# plain-text prompts (a real profile's stage passes its own format to `train_distill`).
train_mopd = functools.partial(train_distill, fmt=PLAIN)
