"""Stage 3: multi-teacher on-policy distillation (MOPD 3.2; ALGORITHMS §1-§3).

Each step: draw prompts with the configured per-batch domain shares (§3), the *student* samples
`samples_per_prompt` completions per prompt, each rollout is scored by the teacher its prompt's
domain routes to (one teacher forward pass over prompt + completion), and the student takes one
gradient step on

- `mopd_pg` (§1, MOPD 3.2.1): K1 advantage `A_t = sg(u_t - s_t)`, two-sided clip, policy-gradient
  loss (ratio = 1 here: one optimiser step per rollout batch, so the PPO clip never binds);
- `mopd_topk` (§2, MOPD 3.2.2): the teacher ships its top-k (id, log-prob) per position and the
  loss is the truncation-corrected top-k reverse KL on the student's logits.

Departures from the paper, on purpose: teachers run in-process (the prefill-service form with
overlap is issue 5); no Dynamic Sampling (MOPD turns it off for distillation too).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mopd.config import DistillParams
from mopd.models import load_model, load_tokenizer, save_checkpoint
from mopd.objectives import opd_advantage, pg_loss, topk_distill_loss
from mopd.rollout import pack, sample, token_logprobs

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
    topk = params.topk if params.objective == "mopd_topk" else None
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

        if topk:
            logits = student(input_ids=ids_BT, attention_mask=attn_BT).logits
            logits_BTV = torch.nn.functional.pad(logits[:, :-1], (0, 0, 1, 0))  # align to token t
            s_BT = torch.log_softmax(logits_BTV.float(), -1).gather(-1, ids_BT[..., None]).squeeze(-1)
            loss = topk_distill_loss(logits_BTV.float(), top_ids_BTK, top_lp_BTK, mask_BT,
                                     token_mean=params.token_mean)
            adv_BT = opd_advantage(u_BT, s_BT)  # for monitoring only
        else:
            s_BT = token_logprobs(student, ids_BT, attn_BT)
            adv_BT = opd_advantage(u_BT, s_BT, clip=params.clip)  # MOPD 3.2.1: A_t, two-sided clip
            loss = pg_loss(s_BT, s_BT.detach(), adv_BT, mask_BT, token_mean=params.token_mean)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optim.step()

        n_tok = mask_BT.sum().clamp(min=1)
        metrics = {
            "distill/loss": loss.item(),
            # K1 estimate of the per-token reverse KL to the routed teachers (§8 diagnostic)
            "distill/reverse_kl": float(((s_BT.detach() - u_BT) * mask_BT).sum() / n_tok),
            "distill/advantage_mean": float((adv_BT * mask_BT).sum() / n_tok),
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
