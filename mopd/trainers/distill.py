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
The trainer fills only the `DistillBatch` fields the objective requires; student log-probs,
top-k gathers and entropies go through the chunked LM-head path (`mopd.logits`), so the student's
B×T×V logits are never materialised.

Departures from the paper, on purpose: teachers run in-process (the prefill-service form with
overlap is issue 5); no Dynamic Sampling (MOPD turns it off for distillation too).
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mopd.config import DistillParams
from mopd.models import load_model, load_tokenizer, save_checkpoint
from mopd.logits import chunked_gather_logprobs, chunked_token_logprobs
from mopd.objectives.registry import DistillBatch, get_objective, required_fields
from mopd.rollout import pack, sample

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


@torch.no_grad()
def teacher_scores(teachers: dict, rows_by_domain: dict[str, list[int]], ids_BT, attn_BT, *,
                   topk: int | None):
    """Each row scored by its own domain's teacher: ``u_BT`` (log-probs of the sampled tokens) and,
    for the top-k form, the teacher's top-k ``(ids_BTK, logprobs_BTK)`` at every position."""
    B, T = ids_BT.shape
    u_BT = torch.zeros((B, T))
    top_ids = torch.zeros((B, T, topk), dtype=torch.long) if topk else None
    top_lp = torch.zeros((B, T, topk)) if topk else None
    for domain, rows in rows_by_domain.items():
        idx = torch.tensor(rows)
        logits = teachers[domain](input_ids=ids_BT[idx], attention_mask=attn_BT[idx]).logits
        logp_BTV = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # predicts tokens 1..T-1
        u_BT[idx, 1:] = logp_BTV.gather(-1, ids_BT[idx, 1:, None]).squeeze(-1)
        if topk:
            lp, ii = logp_BTV.topk(topk, dim=-1)
            top_lp[idx, 1:], top_ids[idx, 1:] = lp, ii
    return u_BT, top_ids, top_lp


TOPK_FIELDS = {"teacher_topk_logprobs_BTK", "student_topk_logprobs_BTK", "teacher_topk_ids_BTK"}


def student_quantities(model, ids_BT, attn_BT, *, topk_ids_BTK=None, entropy: bool = False,
                       chunk: int = 1024):
    """Student ``s_BT`` (log-prob of each token), optionally ``topk_BTK`` (log-probs at the given
    ids) and ``entropy_BT``, from hidden states and the LM-head weight in token chunks. Position t
    holds the distribution that predicts token t (position 0: zeros). All differentiable."""
    hidden_BTH = model.model(input_ids=ids_BT, attention_mask=attn_BT).last_hidden_state
    B, T, H = hidden_BTH.shape
    h_NH = hidden_BTH[:, :-1].reshape(-1, H)
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


def train_mopd(sft_dir: Path, teacher_dirs: dict[str, Path], prompts: dict[str, list[dict]],
               out_dir: Path, params: DistillParams, seed: int, tracker, *,
               score_fn=None) -> dict[str, list[tuple[int, float]]]:
    """Distil ``teacher_dirs`` (domain -> checkpoint) into the SFT student; save to ``out_dir/model``.

    ``prompts``: domain -> records (need `prompt`, and `reference` when ``score_fn`` is given).
    ``score_fn(domain, texts, references) -> list[float]`` optionally verifies the rollouts for
    monitoring (the objective never uses the outcome reward). Returns the metric history."""
    domains = sorted(teacher_dirs)
    missing = [d for d in domains if not prompts.get(d)]
    if missing:
        raise ValueError(f"no prompts for domain(s) {missing}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = load_tokenizer(sft_dir)
    student = load_model(sft_dir)
    student.train()
    teachers = {d: load_model(p).eval() for d, p in teacher_dirs.items()}
    optim = torch.optim.AdamW(student.parameters(), lr=params.learning_rate, weight_decay=0.0)
    objective = get_objective(params.objective)
    kwargs = objective_kwargs(params.objective, params)
    needs = set(required_fields(params.objective))
    topk = params.topk if needs & TOPK_FIELDS else None
    history: dict[str, list[tuple[int, float]]] = {}

    for step in tqdm(range(1, params.max_steps + 1), desc="mopd distill", mininterval=5):
        t0 = time.time()
        batch_domains = draw_domains(domains, params.domain_weights, params.prompts_per_step, rng)
        recs = [rng.choice(prompts[d]) for d in batch_domains]
        samples = sample(student, tokenizer, [r["prompt"] for r in recs], n=params.samples_per_prompt,
                         max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                         seed=seed * 100_003 + step)
        t_sample = time.time() - t0
        ids_BT, attn_BT, mask_BT = pack(samples, tokenizer.pad_token_id)
        row_domain = [batch_domains[s.prompt_index] for s in samples]
        rows_by_domain: dict[str, list[int]] = {}
        for b, d in enumerate(row_domain):
            rows_by_domain.setdefault(d, []).append(b)

        t1 = time.time()
        u_BT, top_ids_BTK, top_lp_BTK = teacher_scores(teachers, rows_by_domain, ids_BT, attn_BT, topk=topk)
        t_teacher = time.time() - t1

        s_BT, s_topk_BTK, ent_BT = student_quantities(
            student, ids_BT, attn_BT, topk_ids_BTK=top_ids_BTK, entropy="student_entropy_BT" in needs)
        batch = DistillBatch(mask_BT=mask_BT, student_logprobs_BT=s_BT, teacher_logprobs_BT=u_BT,
                             teacher_topk_ids_BTK=top_ids_BTK, teacher_topk_logprobs_BTK=top_lp_BTK,
                             student_topk_logprobs_BTK=s_topk_BTK, student_entropy_BT=ent_BT)
        loss, obj_metrics = objective(batch, **kwargs)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optim.step()

        n_tok = mask_BT.sum().clamp(min=1)
        metrics = {f"distill/{k}": v for k, v in obj_metrics.items()} | {
            "distill/loss": loss.item(),
            # K1 estimate of the per-token reverse KL to the routed teachers (§8 diagnostic)
            "distill/reverse_kl": float(((s_BT.detach() - u_BT) * mask_BT).sum() / n_tok),
            "distill/response_tokens": float(n_tok / len(samples)),
            "distill/grad_norm": float(grad_norm),
            "distill/sample_seconds": t_sample,
            "distill/teacher_seconds": t_teacher,
            "distill/step_seconds": time.time() - t0,
        }
        if score_fn is not None:
            for d, rows in rows_by_domain.items():
                rewards = score_fn(d, [samples[b].text for b in rows],
                                   [recs[samples[b].prompt_index]["reference"] for b in rows])
                metrics[f"distill/reward_{d}"] = sum(rewards) / len(rewards)
        tracker.log_metrics(metrics, step=step)
        for k, v in metrics.items():
            history.setdefault(k, []).append((step, v))
    save_checkpoint(student, tokenizer, out_dir / "model")
    return history
