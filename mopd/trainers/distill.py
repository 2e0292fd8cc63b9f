"""Stage 3: multi-teacher on-policy distillation (MOPD 3.2; ALGORITHMS §1-§3).

Each step: draw prompts with the configured per-batch domain shares (§3), the *student* samples
`samples_per_prompt` completions per prompt, each rollout is scored by the teacher its prompt's
domain routes to (one teacher forward pass over prompt + completion), and the student takes one
gradient step on

the objective named by `distill.objective`, looked up in `mopd.objectives.OBJECTIVES`:
- `mopd_pg` (§1, MOPD 3.2.1): K1 advantage `A_t = sg(u_t - s_t)`, two-sided clip, policy-gradient
  loss (ratio = 1 here: one optimiser step per rollout batch, so the PPO clip never binds);
- `mopd_topk` (§2, MOPD 3.2.2): the teacher ships its top-k (id, log-prob) per position and the
  loss is the truncation-corrected top-k reverse KL;
- the TrOPD objective and the baselines (§5) through the same batch.
With `distill.uniopd` (ALGORITHMS §4, Uni-OPD §3.3-3.4) every rollout is verified before the
update; online balancing keeps a subset of each prompt group (A.2) and margin calibration turns
the K1 token rewards into calibrated advantages (eq. 5/9/11, Alg. 1) that `mopd_pg` uses.
The trainer fills only the `DistillBatch` fields the objective requires; student log-probs,
top-k gathers and entropies go through the chunked LM-head path (`mopd.logits`), so the student's
B×T×V logits are never materialised.

Teachers are clients (`mopd.teachers`): in-process models or prefill services over HTTP (MOPD
3.3). The step's prompts are sampled in `rollout_chunks` micro-batches and, with `overlap`, each
chunk's scoring request is sent as soon as it is sampled, so teacher prefill runs while the
student is still sampling; the trainer waits only before the update. Per step it logs
`sample_seconds`, `teacher_seconds` (summed scoring-call time), `teacher_wait_seconds` (time
blocked on teachers) and `teacher_share` (= wait / step time).

Departures from the paper, on purpose: no Dynamic Sampling (MOPD turns it off for distillation
too); sampling is synchronous within a chunk (no continuous batching on the CPU backend).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mopd import checkpoint as ckpt, runtime
from mopd.config import DistillParams, UniOPDParams
from mopd.models import load_model, load_tokenizer, save_checkpoint
from mopd.logits import chunked_gather_logprobs, chunked_token_logprobs
from mopd.objectives.balancing import online_balance
from mopd.objectives.calibration import calibrated_token_advantages, margin, margin_calibrate_groups
from mopd.objectives.opd import opd_advantage
from mopd.objectives.registry import DistillBatch, get_objective, required_fields
from mopd.progress import report
from mopd.objectives.tropd import cosine_prefix_length
from mopd.rollout import RolloutBackend, Sample, TransformersRollout, encode_prompts, pack
from mopd.teachers import InProcessTeacher, SequenceScores, TeacherClient, TeacherError, lay_out
from mopd.teachers.ledger import Ledger, step_metrics

log = logging.getLogger(__name__)


def draw_domains(domains: list[str], weights: dict[str, float] | None, n: int,
                 rng: random.Random) -> list[str]:
    """Per-batch domain shares (MOPD: fixed ratios per batch): largest-remainder allocation of
    ``n`` prompts to domains by weight (uniform when None), so every batch has the same mix."""
    w = weights or {d: 1.0 / len(domains) for d in domains}
    exact = {d: n * w[d] for d in domains}
    counts = {d: int(exact[d]) for d in domains}
    for d in sorted(domains, key=lambda d: exact[d] - counts[d], reverse=True)[: n - sum(counts.values())]:
        counts[d] += 1
    out = [d for d in domains for _ in range(counts[d])]
    rng.shuffle(out)
    return out


@dataclass
class StepTiming:
    """Wall-clock seconds of one step's rollout phase (MOPD 3.3: teacher cost should hide
    behind sampling). ``teacher`` sums the scoring calls' own durations (they may overlap each
    other and the sampling); ``wait`` is the time the trainer blocked on them."""

    sample: float = 0.0
    teacher: float = 0.0
    wait: float = 0.0


def _timed_score(client: TeacherClient, prompt_ids, completion_ids, topk):
    t0 = time.perf_counter()
    return client.score(prompt_ids, completion_ids, topk=topk), time.perf_counter() - t0


def submit_scoring(pool: ThreadPoolExecutor, clients: dict[str, TeacherClient], samples: list[Sample],
                   rows: list[int], row_domain: list[str], topk: int | None) -> list[tuple]:
    """Send ``samples[rows]`` to their domains' teachers: one request per distinct client (domains
    routed to the same teacher share it: fewer, larger requests); returns the pending jobs
    ``(domains, rows, future)``."""
    by_client: dict[int, tuple[list[str], list[int]]] = {}
    for b in rows:
        doms, rs = by_client.setdefault(id(clients[row_domain[b]]), ([], []))
        rs.append(b)
        if row_domain[b] not in doms:
            doms.append(row_domain[b])
    return [(doms, rs, pool.submit(_timed_score, clients[doms[0]], [samples[b].prompt_ids for b in rs],
                                   [samples[b].completion_ids for b in rs], topk))
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


def chunk_bounds(n: int, chunks: int) -> list[int]:
    """Boundaries of ``chunks`` contiguous micro-batches of ``n`` prompts, the last one half-size:
    the trainer waits only for the last chunk's scoring, so a smaller tail hides more of the
    teacher (the same split is used with and without overlap, so both sample identically)."""
    c = max(1, min(chunks, n))
    weights = [1.0] * (c - 1) + [0.5]
    cum = [sum(weights[:i]) for i in range(c + 1)]
    bounds = sorted({round(n * w / cum[-1]) for w in cum})
    return bounds


def rollout_and_score(rollout: RolloutBackend, clients: dict[str, TeacherClient], prompt_ids: list[list[int]],
                      domains: list[str], pool: ThreadPoolExecutor, *, n: int, max_new_tokens: int,
                      temperature: float, seed: int, chunks: int, overlap: bool, topk: int | None,
                      prefixes: list[list[int]] | None = None, decode=None, eos_id: int | None = None,
                      part: tuple[int, int] = (0, 1)):
    """Sample ``n`` completions per prompt in ``chunks`` micro-batches of prompts. With
    ``overlap`` a chunk's scoring requests go out as soon as it is sampled, while the next
    chunks sample (MOPD 3.3); without, all scoring starts after the last chunk.

    ``prefixes`` (TrOPD §4.3): per prompt, teacher-generated tokens the student continues from;
    a sample's completion is then prefix + continuation (``max_new_tokens`` in all; none after a
    prefix that ended with EOS), and ``decode(ids)`` re-renders its text.
    ``part = (rank, world)``: data parallelism; this process samples chunks ``rank, rank + world,
    ...`` only, each with the seed it has in one process, so the processes together draw exactly
    the one-process batch.
    Returns (samples, scores per sample, StepTiming, prefix length per sample)."""
    timing = StepTiming()
    bounds = chunk_bounds(len(prompt_ids), chunks)
    rank, world = part
    if len(bounds) - 1 < world:
        raise ValueError(f"{len(prompt_ids)} prompts in {len(bounds) - 1} rollout chunk(s) cannot feed {world} "
                         f"data-parallel processes: raise distill.prompts_per_step / distill.rollout_chunks")
    pre = prefixes or [[] for _ in prompt_ids]
    samples: list[Sample] = []
    prefix_lens: list[int] = []
    row_domain: list[str] = []
    jobs: list[tuple] = []
    for c, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        if c % world != rank:
            continue
        t0 = time.perf_counter()
        got = rollout.sample_ids([list(p) + pre[i] for i, p in enumerate(prompt_ids[lo:hi], lo)], n=n,
                                 max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + 7919 * c)
        timing.sample += time.perf_counter() - t0
        first = len(samples)
        for s in got:
            i = s.prompt_index + lo
            if pre[i]:  # the prefix moves from the prompt into the completion; budget = the rest
                budget = 0 if pre[i][-1] == eos_id else max_new_tokens - len(pre[i])
                comp = pre[i] + s.completion_ids[:max(budget, 0)]
                s = Sample(s.prompt_index, list(prompt_ids[i]), comp, decode(comp))
            samples.append(dataclasses.replace(s, prompt_index=i))
            prefix_lens.append(len(pre[i]))
            row_domain.append(domains[i])
        if overlap:
            jobs += submit_scoring(pool, clients, samples, list(range(first, len(samples))), row_domain, topk)
    if not overlap:
        jobs = submit_scoring(pool, clients, samples, list(range(len(samples))), row_domain, topk)
    return samples, collect_scoring(jobs, len(samples), timing), timing, prefix_lens


def mix_teachers(pool: ThreadPoolExecutor, clients: dict[str, TeacherClient], samples: list[Sample],
                 row_domain: list[str], scores: list[SequenceScores],
                 weights: dict[str, dict[str, float]], timing: StepTiming) -> list[SequenceScores]:
    """Uni-OPD eq. 4 (ALGORITHMS §3): the rollouts of a domain with a weight row are scored by
    every teacher of the row with a positive weight, and their token log-probs combined as
    ``u = Σ_i w_i u_i`` (the K1 reward of ``Σ_i w_i KL(πS ‖ πTi)`` is ``u - s``). ``scores``
    hold the routed (own-domain) teacher's, reused for that teacher's share."""
    out = list(scores)
    mixed = {d: rows for d, row in weights.items() if row != {d: 1.0}
             if (rows := [b for b, rd in enumerate(row_domain) if rd == d])}
    jobs = []
    for d, rows in mixed.items():
        for t, w in weights[d].items():
            if w > 0 and t != d:
                jobs.append((d, t, rows, pool.submit(_timed_score, clients[t], [samples[b].prompt_ids for b in rows],
                                                     [samples[b].completion_ids for b in rows], None)))
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
    for d, rows in mixed.items():
        for j, b in enumerate(rows):
            lp_C = sum(w * (scores[b] if t == d else extra[(d, t)][j]).logprobs_C
                       for t, w in weights[d].items() if w > 0)
            out[b] = SequenceScores(lp_C)
    return out


def teacher_prefixes(clients: dict[str, TeacherClient], prompt_ids: list[list[int]], domains: list[str], *,
                     share: float, l_max: int, temperature: float, rng: random.Random,
                     seed: int) -> list[list[int]]:
    """TrOPD off-policy guidance (§4.3, ALGORITHMS §5): each prompt, with probability ``share``,
    gets a prefix of length ``l ~ U{1..l_max}`` sampled from its domain's teacher (one request per
    distinct teacher; shorter when the teacher stops). ``[]`` for the others."""
    want = [rng.randint(1, l_max) if l_max > 0 and rng.random() < share else 0 for _ in prompt_ids]
    out: list[list[int]] = [[] for _ in prompt_ids]
    by_client: dict[int, list[int]] = {}
    for i, d in enumerate(domains):
        if want[i]:
            by_client.setdefault(id(clients[d]), []).append(i)
    for rows in by_client.values():
        client = clients[domains[rows[0]]]
        if not hasattr(client, "generate"):
            raise TeacherError(f"teacher {client.name!r} (domain {domains[rows[0]]!r}) cannot generate: "
                               "TrOPD prefixes need a teacher that generates (in-process, HTTP or vLLM)")
        got = client.generate([prompt_ids[i] for i in rows], max_new_tokens=max(want[i] for i in rows),
                              temperature=temperature, seed=seed)
        for i, c in zip(rows, got):
            out[i] = list(c[:want[i]])
    return out


# step metrics that are means over the batch's response tokens (data parallelism weights them so)
TOKEN_MEAN_METRICS = {"distill/reverse_kl", "distill/clipped_fraction"}
TOPK_FIELDS = {"teacher_topk_logprobs_BTK", "student_topk_logprobs_BTK", "teacher_topk_ids_BTK"}


def student_quantities(model, ids_BT, attn_BT, *, topk_ids_BTK=None, entropy: bool = False,
                       chunk: int = 1024, temperature: float = 1.0):
    """Student ``s_BT`` (log-prob of each token), optionally ``topk_BTK`` (log-probs at the given
    ids) and ``entropy_BT``, from hidden states and the LM-head weight in token chunks. Position t
    holds the distribution that predicts token t (position 0: zeros). All differentiable.

    ``temperature``: the distribution the rollouts were sampled from, softmax(logits / T): the
    policy whose log-probs enter the ratio and the advantage is the one that sampled (logits =
    h·Wᵀ, so h / T gives logits / T exactly)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hidden_BTH = model.model(input_ids=ids_BT, attention_mask=attn_BT).last_hidden_state
    B, T, H = hidden_BTH.shape
    h_NH = hidden_BTH[:, :-1].reshape(-1, H)
    if temperature != 1.0:
        h_NH = h_NH / temperature
    weight_VH = model.lm_head.weight
    target_N = ids_BT[:, 1:].reshape(-1)

    def pad(x_N, *rest):  # (N, *rest) -> (B, T, *rest) with zeros at position 0
        return torch.nn.functional.pad(x_N.view(B, T - 1, *rest), (0, 0) * len(rest) + (1, 0))

    ent_BT = None
    if entropy:
        s_N, ent_N = chunked_token_logprobs(h_NH, weight_VH, target_N, chunk=chunk)
        ent_BT = pad(ent_N)
    if topk_ids_BTK is not None:
        K = topk_ids_BTK.shape[-1]
        ids_NK = torch.cat([target_N[:, None], topk_ids_BTK[:, 1:].reshape(-1, K)], dim=1)
        lp_NK = chunked_gather_logprobs(h_NH, weight_VH, ids_NK, chunk=chunk)
        return pad(lp_NK[:, 0]), pad(lp_NK[:, 1:], K), ent_BT
    if not entropy:
        s_N = chunked_gather_logprobs(h_NH, weight_VH, target_N[:, None], chunk=chunk)[:, 0]
    return pad(s_N), None, ent_BT


def update_passes(params: DistillParams, n_rows: int, rng: random.Random) -> list[list[int]]:
    """The optimiser steps of one rollout batch (§1): ``epochs`` passes over the rows, each split
    into ``minibatches`` shuffled minibatches (the first pass keeps row order when there is only
    one minibatch, so the default — one step — is exactly the plain update)."""
    rows = list(range(n_rows))
    if params.epochs == 1 and params.minibatches == 1:
        return [rows]
    k = min(params.minibatches, n_rows)
    out = []
    for _ in range(params.epochs):
        order = rows[:]
        rng.shuffle(order)
        out += [sorted(order[i::k]) for i in range(k)]
    return out


def _rows(x, rows: list[int]):
    return None if x is None else x[rows]


def _mean_margin(returns_B: torch.Tensor, positive_B: torch.Tensor, groups_B: torch.Tensor, mode: str,
                 keep_B: torch.Tensor | None = None) -> float | None:
    """Mean over prompt groups of the eq. 9 margin (groups with both positives and negatives)."""
    ms = []
    for g in torch.unique(groups_B):
        idx = groups_B == g
        if keep_B is not None:
            idx = idx & keep_B
        m = margin(returns_B[idx], positive_B[idx], mode=mode)
        if m is not None:
            ms.append(m)
    return sum(ms) / len(ms) if ms else None


def uniopd_balance(uni: UniOPDParams, rewards: list[float], groups: list[int],
                   generator: torch.Generator) -> tuple[list[int], dict[str, float]]:
    """Uni-OPD A.2 online balancing over one rollout batch: the rows kept (all when balancing is
    off) and the correct share before / after."""
    correct_B = torch.tensor([r >= uni.threshold for r in rewards])
    metrics = {"uniopd/correct_share": float(correct_B.double().mean())}
    if not uni.online_balance:
        return list(range(len(rewards))), metrics
    keep_B = online_balance(correct_B, torch.tensor(groups), target=uni.target, tol=uni.tol,
                            generator=generator)
    metrics |= {"uniopd/balance_kept_fraction": float(keep_B.double().mean()),
                "uniopd/correct_share_balanced": float(correct_B[keep_B].double().mean())}
    return keep_B.nonzero(as_tuple=True)[0].tolist(), metrics


def uniopd_advantages(uni: UniOPDParams, r_BT: torch.Tensor, mask_BT: torch.Tensor, rewards_B: torch.Tensor,
                      groups_B: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Uni-OPD §3.4 (ALGORITHMS §4): the distillation return ``R(y) = 1/|y| Σ_t r_t`` of each
    rollout (eq. 5, ``r_t`` the clipped K1 token reward ``u_t - s_t`` at the rollout policy),
    outcome-guided margin calibration inside each prompt group (eq. 9/11 or Alg. 1's greedy
    mask), and the calibrated token advantages ``A_t = r_t + Δ_y`` (0 for masked responses).
    Returns (advantages_BT, metrics: margin before/after, kept fraction, share of groups shifted)."""
    m_BT = mask_BT.to(r_BT.dtype)
    R_B = (r_BT * m_BT).sum(1) / m_BT.sum(1).clamp(min=1)
    after_B, keep_B = margin_calibrate_groups(R_B, rewards_B, groups_B, gamma=uni.gamma, mode=uni.calibration,
                                              strategy=uni.strategy, min_keep=uni.min_keep,
                                              threshold=uni.threshold)
    adv_BT = calibrated_token_advantages(r_BT, R_B, after_B, keep_B) * m_BT
    positive_B = rewards_B >= uni.threshold
    metrics = {"uniopd/kept_fraction": float(keep_B.double().mean()),
               "uniopd/shifted_fraction": float(((after_B != R_B) & keep_B).double().mean())}
    before = _mean_margin(R_B, positive_B, groups_B, uni.calibration)
    after = _mean_margin(after_B, positive_B, groups_B, uni.calibration, keep_B)
    if before is not None:
        metrics["uniopd/margin_before"] = before
    if after is not None:
        metrics["uniopd/margin_after"] = after
    return adv_BT, metrics


def objective_kwargs(name: str, params: DistillParams) -> dict:
    """The objective's keyword arguments: `clip` and `token_mean` from the distill section where
    the objective takes them, plus `objective_params`; an unknown one is an error naming it."""
    fn = inspect.unwrap(get_objective(name))
    accepted = set(inspect.signature(fn).parameters) - {"batch"}
    kwargs = {k: v for k, v in (("clip", params.clip), ("token_mean", params.token_mean)) if k in accepted}
    unknown = sorted(set(params.objective_params) - accepted)
    if unknown:
        raise ValueError(f"distill.objective_params: {unknown} not accepted by objective {name!r} "
                         f"(it takes {sorted(accepted)})")
    return kwargs | dict(params.objective_params)


def _accepts(name: str, arg: str) -> bool:
    return arg in inspect.signature(inspect.unwrap(get_objective(name))).parameters


def _one_thread() -> None:
    """Scoring threads run torch with one intra-op thread: an in-process teacher forward in a
    second thread with its own full-size OpenMP team oversubscribes the cores and slows the
    student's sampling ~2x on 2 cores (benchmarks/teacher_overlap.py --transport inprocess)."""
    torch.set_num_threads(1)


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


def train_mopd(sft_dir: Path, teachers: dict[str, "TeacherClient | Path"], prompts: dict[str, list[dict]],
               out_dir: Path, params: DistillParams, seed: int, tracker, *,
               score_fn=None, rollout: RolloutBackend | None = None, checkpoint: Path | None = None,
               key: str = "") -> dict[str, list[tuple[int, float]]]:
    """Distil ``teachers`` (domain -> client, or checkpoint path for an in-process teacher) into
    the SFT student; save to ``out_dir/model``.

    ``prompts``: domain -> records (need `prompt`, and `reference` when ``score_fn`` is given).
    ``score_fn(domain, texts, references) -> list[float]`` verifies the rollouts: for monitoring,
    and for Uni-OPD's balancing and calibration (`params.uniopd`), which need it; MOPD's
    objectives never use the outcome reward. ``rollout``: the student's sampling
    backend (default: transformers `generate` on the trained module). ``checkpoint``: a directory
    for in-stage checkpoints every `params.checkpoint_every` steps, resumed from when it holds one
    made under the same ``key`` (the stage's cache key; another key is an error): the resumed run
    ends with the same weights as an uninterrupted one. Returns the metric history."""
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
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = load_tokenizer(sft_dir)
    student = load_model(sft_dir, trained=True)
    student.train()
    ledger = Ledger()  # what each teacher costs, per step (mopd.teachers.ledger)
    clients = ledger.wrap(as_clients(teachers))
    rollout = rollout or TransformersRollout(student, tokenizer)
    optim = torch.optim.AdamW(student.parameters(), lr=params.learning_rate, weight_decay=0.0)
    needs = set(required_fields(params.objective))
    topk = params.topk if needs & TOPK_FIELDS else None
    history: dict[str, list[tuple[int, float]]] = {}
    start = 1
    resumed = ckpt.load(checkpoint, key=key, model=student, optim=optim, py_rng=rng) if checkpoint else None
    if resumed is not None:
        start, history = resumed.step + 1, resumed.history
        rollout.update_weights(student)
        log.warning("resumed from step %d (checkpoint %s)", resumed.step, checkpoint)
        print(f"resumed from step {resumed.step}", flush=True)
        tracker.set_tags({"resumed_from_step": resumed.step})
    with ThreadPoolExecutor(max_workers=max(2, 2 * len(clients)), thread_name_prefix="teacher",
                            initializer=_one_thread) as pool:
        for step in tqdm(range(start, params.max_steps + 1), desc="mopd distill", mininterval=5,
                         initial=start - 1, total=params.max_steps):
            metrics = _step(student, tokenizer, rollout, clients, optim, pool, prompts, domains,
                            params, topk, needs, rng, seed * 100_003 + step, score_fn, step, part)
            costs = step_metrics(ledger.step()) | {"distill/trained_tokens": metrics["distill/trained_tokens"]}
            metrics |= dict(zip(costs, runtime.all_reduce_sum(*costs.values())))  # every process's
            tracker.log_metrics(metrics, step=step)
            report(step, params.max_steps, "steps")
            for k, v in metrics.items():
                history.setdefault(k, []).append((step, v))
            if checkpoint and params.checkpoint_every and step % params.checkpoint_every == 0 \
                    and step < params.max_steps and runtime.is_main():  # the replicas are identical
                ckpt.save(checkpoint, key=key, step=step, model=student, tokenizer=tokenizer, optim=optim,
                          py_rng=rng, history=history)
    if runtime.is_main():
        save_checkpoint(student, tokenizer, out_dir / "model")
        if checkpoint:
            ckpt.remove(checkpoint)
    runtime.barrier()  # the other processes return once the model is on disk
    return history


def check_data_parallel(params: DistillParams, world: int) -> None:
    """What the data-parallel loop supports, checked before any work. Each process samples its
    share of the rollout chunks and the gradients are summed with the loss weighted by each
    process's share of the batch, which equals the one-process update for objectives that average
    per-token terms (mopd_pg, mopd_topk, reopold_clip, mask_outlier, jsd, topk_fkl). Not (yet):
    steps that need the whole batch in one place."""
    where = f"runtime.processes = {world}"
    if params.rollout_chunks % world:
        raise ValueError(f"distill.rollout_chunks = {params.rollout_chunks} must be a multiple of {where} "
                         "(each process samples whole chunks)")
    if params.uniopd is not None and params.uniopd.active:
        raise ValueError(f"distill.uniopd balances and calibrates over the whole batch: not supported with {where}")
    if params.prefix_share > 0:
        raise ValueError(f"distill.prefix_share = {params.prefix_share} (TrOPD teacher prefixes): not supported "
                         f"with {where}")
    if params.epochs > 1 or params.minibatches > 1:
        raise ValueError(f"distill.epochs / distill.minibatches > 1: not supported with {where} (one update per "
                         "rollout batch)")
    if params.objective in ("entropy_opd", "tropd"):
        raise ValueError(f"distill.objective = {params.objective!r} selects tokens over the whole batch: not "
                         f"supported with {where}")


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


def _step(student, tokenizer, rollout, clients, optim, pool, prompts, domains, params: DistillParams,
          topk, needs, rng, sample_seed, score_fn, step: int = 1, dp: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """One MOPD step: [TrOPD: teacher prefixes], rollouts + teacher scores (overlapped),
    [Uni-OPD: verify, balance, calibrate], objective, optimiser step(s)."""
    t0 = time.perf_counter()
    batch_domains = draw_domains(domains, params.domain_weights, params.prompts_per_step, rng)
    recs = [rng.choice(prompts[d]) for d in batch_domains]
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in recs])
    prefixes, pre_metrics = None, {}
    if params.prefix_share > 0:
        l_max = cosine_prefix_length(step - 1, params.max_steps, params.max_new_tokens)
        tp = time.perf_counter()
        # own seeded stream: turning guidance on does not change which prompts are drawn
        prefixes = teacher_prefixes(clients, prompt_ids, batch_domains, share=params.prefix_share, l_max=l_max,
                                    temperature=params.temperature, rng=random.Random(sample_seed * 31 + 7),
                                    seed=sample_seed + 1)
        got = [len(p) for p in prefixes if p]
        pre_metrics = {"tropd/prefix_cap": float(l_max), "tropd/prefix_seconds": time.perf_counter() - tp,
                       "tropd/prefixed_share": len(got) / len(prefixes),
                       "tropd/prefix_length": sum(got) / len(got) if got else 0.0}
    samples, scores, timing, prefix_lens = rollout_and_score(
        rollout, clients, prompt_ids, batch_domains, pool, n=params.samples_per_prompt,
        max_new_tokens=params.max_new_tokens, temperature=params.temperature, seed=sample_seed,
        chunks=params.rollout_chunks, overlap=params.overlap, topk=topk, prefixes=prefixes,
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), eos_id=tokenizer.eos_token_id,
        part=dp)
    if params.teacher_weights:
        scores = mix_teachers(pool, clients, samples, [batch_domains[s.prompt_index] for s in samples], scores,
                              params.teacher_weights, timing)
    rewards = _verify(score_fn, samples, recs, batch_domains) if score_fn is not None else None
    uni = params.uniopd if params.uniopd is not None and params.uniopd.active else None
    uni_metrics: dict[str, float] = {}
    kept = list(range(len(samples)))
    if uni is not None:
        if rewards is None:
            raise ValueError("distill.uniopd verifies every rollout: train_mopd needs score_fn")
        # the balancing draw has its own seeded stream (not the prompt sampler's)
        gen = torch.Generator().manual_seed(sample_seed)
        kept, uni_metrics = uniopd_balance(uni, rewards, [s.prompt_index for s in samples], gen)
    t_samples, t_scores = [samples[b] for b in kept], [scores[b] for b in kept]
    dev = student.lm_head.weight.device  # the batch lives where the student does (mopd.runtime)
    amp = runtime.current().autocast
    ids_BT, attn_BT, mask_BT = pack(t_samples, tokenizer.pad_token_id, device=dev)
    prefix_BT = None
    if prefixes is not None:  # teacher tokens: β·NLL only; the on-policy terms see the student's
        prefix_BT = torch.zeros_like(mask_BT)
        for row, b in enumerate(kept):
            start = len(samples[b].prompt_ids)
            prefix_BT[row, start:start + prefix_lens[b]] = 1.0
        mask_BT = mask_BT - prefix_BT
    u_BT, top_ids_BTK, top_lp_BTK = (None if x is None else x.to(dev) for x in lay_out(
        t_scores, [len(s.prompt_ids) for s in t_samples], ids_BT.shape[1], topk))
    updates = update_passes(params, ids_BT.shape[0], rng)
    calibrate = uni is not None and uni.calibration != "off"
    old_s_BT = adv_BT = None
    if len(updates) > 1 or calibrate:  # fix the rollout policy (§1): ratio, advantages, returns
        with torch.no_grad(), amp():
            old_s_BT = student_quantities(student, ids_BT, attn_BT, temperature=params.temperature)[0]
    if calibrate:
        r_BT = opd_advantage(u_BT, old_s_BT, clip=params.clip)
        adv_BT, cal_metrics = uniopd_advantages(
            uni, r_BT, mask_BT, torch.tensor([rewards[b] for b in kept], dtype=r_BT.dtype, device=dev),
            torch.tensor([samples[b].prompt_index for b in kept], device=dev))
        uni_metrics |= cal_metrics
    kwargs = objective_kwargs(params.objective, params)
    if _accepts(params.objective, "generator"):  # TrOPD's trust mask: its own seeded stream
        kwargs["generator"] = torch.Generator().manual_seed(sample_seed + 2)
    sums: dict[str, float] = {}
    for rows in updates:
        with amp():
            s_BT, s_topk_BTK, ent_BT = student_quantities(
                student, ids_BT[rows], attn_BT[rows], topk_ids_BTK=_rows(top_ids_BTK, rows),
                entropy="student_entropy_BT" in needs, temperature=params.temperature)
        m_BT = mask_BT[rows]
        batch = DistillBatch(mask_BT=m_BT, student_logprobs_BT=s_BT, teacher_logprobs_BT=u_BT[rows],
                             old_student_logprobs_BT=_rows(old_s_BT, rows), advantages_BT=_rows(adv_BT, rows),
                             teacher_topk_ids_BTK=_rows(top_ids_BTK, rows),
                             teacher_topk_logprobs_BTK=_rows(top_lp_BTK, rows),
                             student_topk_logprobs_BTK=s_topk_BTK, student_entropy_BT=ent_BT,
                             prefix_student_logprobs_BT=None if prefix_BT is None else s_BT,
                             prefix_mask_BT=_rows(prefix_BT, rows))
        loss, obj_metrics = get_objective(params.objective)(batch, **kwargs)
        # data parallelism: this process's share of the batch's averaging units (tokens with
        # token_mean, else sequences with a response token); 1 in one process
        tok_mine = float(m_BT.sum())
        n_mine = tok_mine if params.token_mean else float((m_BT.sum(-1) > 0).sum())
        n_all, tok_all = runtime.all_reduce_sum(n_mine, tok_mine)
        share = n_mine / n_all if n_all else 0.0
        optim.zero_grad(set_to_none=True)
        (loss * share).backward()
        runtime.all_reduce_grads(student)  # summed: the whole batch's gradient, identical everywhere
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optim.step()
        n_mb = m_BT.sum().clamp(min=1)
        part = {f"distill/{k}": v for k, v in obj_metrics.items()} | {
            "distill/loss": loss.item(), "distill/grad_norm": float(grad_norm),
            # K1 estimate of the per-token reverse KL to the routed teachers (§8 diagnostic)
            "distill/reverse_kl": float(((s_BT.detach() - u_BT[rows]) * m_BT).sum() / n_mb)}
        if len(updates) > 1:  # share of tokens whose PPO ratio left [1 - eps_low, 1 + eps_high]
            ratio = torch.exp(s_BT.detach() - old_s_BT[rows])
            out = (ratio < 1 - kwargs.get("eps_low", 0.2)) | (ratio > 1 + kwargs.get("eps_high", 0.2))
            part["distill/clipped_fraction"] = float((out & m_BT.bool()).sum() / n_mb)
        if dp[1] > 1:  # the batch's values: each process's share-weighted sum (token means by tokens)
            w = {k: tok_mine / tok_all if k in TOKEN_MEAN_METRICS and tok_all else share for k in part}
            part = dict(zip(part, runtime.all_reduce_sum(*(v * w[k] for k, v in part.items()))))
        for k, v in part.items():
            sums[k] = sums.get(k, 0.0) + v / len(updates)
    rollout.update_weights(student)
    step_seconds = time.perf_counter() - t0
    n_tok = mask_BT.sum().clamp(min=1)
    metrics = sums | uni_metrics | pre_metrics | {
        "distill/response_tokens": float(n_tok / len(t_samples)),
        "distill/trained_tokens": float(mask_BT.sum()),  # on-policy tokens in the loss (cost ledger)
        "distill/sample_seconds": timing.sample,
        "distill/teacher_seconds": timing.teacher,
        "distill/teacher_wait_seconds": timing.wait,
        "distill/teacher_share": timing.wait / step_seconds,
        "distill/step_seconds": step_seconds,
    }
    if rewards is not None:  # every rollout of the step (before any balancing), per domain
        row_domain = [batch_domains[s.prompt_index] for s in samples]
        for d in dict.fromkeys(row_domain):
            rs = [rewards[b] for b, rd in enumerate(row_domain) if rd == d]
            metrics[f"distill/reward_{d}"] = sum(rs) / len(rs)
    return metrics
