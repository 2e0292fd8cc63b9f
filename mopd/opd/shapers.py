"""Shapers: what a method does to a step's batch besides its loss (ALGORITHMS §4-§5).

A shaper declares its contract — what it ``needs`` (``rewards``: outcome rewards from the
verifiers; ``old_logprobs``: the rollout policy's log-probs; ``teacher_generate``: teachers that
sample), whether it is safe under data parallelism (``data_parallel``: it sees only this
process's rows) and whether it splits prefix tokens from the response (``prefix``) — and acts at
up to three points of the step, each a no-op by default:

- ``before_sampling(batch, clients)``: on the prompts (TrOPD: teacher prefixes);
- ``select(batch)``: on the rollouts, choosing the rows kept (Uni-OPD A.2: online balancing);
- ``shape(packed, batch)``: on the tensors (Uni-OPD §3.4: calibrated advantages).

Each draws from its own stream seeded from the step's seed, so turning one on changes no other
draw. verl keeps the same split (``core_algos.py``: advantage estimators apart from losses).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from mopd.objectives.balancing import online_balance
from mopd.objectives.calibration import (
    calibrated_token_advantages,
    margin,
    margin_calibrate_groups,
)
from mopd.objectives.opd import opd_advantage, response_return
from mopd.objectives.tropd import cosine_prefix_length
from mopd.opd.batch import PackedBatch, RolloutBatch
from mopd.teachers import TeacherClient, TeacherError


class Shaper:
    """The contract every shaper states (class attributes) and its three hooks (no-ops here)."""

    name: ClassVar[str] = "shaper"
    setting: ClassVar[str] = ""  # the distill key that turns it on (error messages name it)
    needs: ClassVar[frozenset[str]] = frozenset()
    data_parallel: ClassVar[bool] = True
    prefix: ClassVar[bool] = False

    def before_sampling(self, batch: RolloutBatch, clients: dict[str, TeacherClient]) -> None:
        """Before the student samples: may set ``batch.prefixes``."""

    def select(self, batch: RolloutBatch) -> None:
        """After sampling, scoring and verifying: may set ``batch.keep``."""

    def shape(self, packed: PackedBatch, batch: RolloutBatch) -> None:
        """After packing: may set ``packed.advantages_BT`` / masks."""


# --------------------------------------------------------------------------- TrOPD prefixes
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


@dataclass
class TeacherPrefixes(Shaper):
    """TrOPD §4.3: a ``share`` of each step's prompts start from a teacher prefix of length
    U{1..l_max(step)}, l_max annealed by a cosine from ``max_new_tokens`` to 0 over ``max_steps``;
    the prefix tokens are split from the student's (``prefix_BT``) for the loss's β·NLL term."""

    share: float
    max_steps: int
    max_new_tokens: int
    temperature: float

    name: ClassVar[str] = "tropd_prefixes"
    setting: ClassVar[str] = "prefix_share"
    needs: ClassVar[frozenset[str]] = frozenset({"teacher_generate"})
    data_parallel: ClassVar[bool] = False  # not written for it yet (the prefix draw is per batch)
    prefix: ClassVar[bool] = True

    def before_sampling(self, batch: RolloutBatch, clients: dict[str, TeacherClient]) -> None:
        l_max = cosine_prefix_length(batch.step - 1, self.max_steps, self.max_new_tokens)
        t0 = time.perf_counter()
        # own seeded stream: turning guidance on does not change which prompts are drawn
        batch.prefixes = teacher_prefixes(clients, batch.prompt_ids, batch.domains, share=self.share, l_max=l_max,
                                          temperature=self.temperature, rng=random.Random(batch.seed * 31 + 7),
                                          seed=batch.seed + 1)
        got = [len(p) for p in batch.prefixes if p]
        batch.metrics |= {"tropd/prefix_cap": float(l_max), "tropd/prefix_seconds": time.perf_counter() - t0,
                          "tropd/prefixed_share": len(got) / len(batch.prefixes),
                          "tropd/prefix_length": sum(got) / len(got) if got else 0.0}


# --------------------------------------------------------------------------- Uni-OPD
def uniopd_balance(uni, rewards: list[float], groups: list[int],
                   generator: torch.Generator) -> tuple[list[int], dict[str, float]]:
    """Uni-OPD A.2 online balancing over one rollout batch (``uni``: the `distill.uniopd`
    settings): the rows kept (all when balancing is off) and the correct share before / after."""
    correct_B = torch.tensor([r >= uni.threshold for r in rewards])
    metrics = {"uniopd/correct_share": float(correct_B.double().mean())}
    if not uni.online_balance:
        return list(range(len(rewards))), metrics
    keep_B = online_balance(correct_B, torch.tensor(groups), target=uni.target, tol=uni.tol,
                            generator=generator)
    metrics |= {"uniopd/balance_kept_fraction": float(keep_B.double().mean()),
                "uniopd/correct_share_balanced": float(correct_B[keep_B].double().mean())}
    return keep_B.nonzero(as_tuple=True)[0].tolist(), metrics


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


def uniopd_advantages(uni, r_BT: torch.Tensor, mask_BT: torch.Tensor, rewards_B: torch.Tensor,
                      groups_B: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Uni-OPD §3.4 (ALGORITHMS §4): the distillation return ``R(y) = 1/|y| Σ_t r_t`` of each
    rollout (eq. 5), outcome-guided margin calibration inside each prompt group (eq. 9/11 or
    Alg. 1's greedy mask), and the calibrated token advantages ``A_t = r_t + Δ_y`` (0 for masked
    responses). Returns (advantages_BT, metrics: margin before/after, kept fraction, share of
    groups shifted).

    Departure from eq. 5, on purpose: ``r_t`` is the token reward the loss uses, i.e. the K1
    reward ``u_t - s_t`` *after* MOPD's two-sided clip (`distill.clip`, §1), not the raw one, so
    that the calibrated advantage ``r_t + Δ_y`` shifts exactly the advantages the update would
    otherwise use (with `clip: null` it is eq. 5 itself: :func:`mopd.objectives.opd.distillation_return`)."""
    m_BT = mask_BT.to(r_BT.dtype)
    R_B = response_return(r_BT, m_BT)
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


@dataclass
class OnlineBalance(Shaper):
    """Uni-OPD A.2: records the batch's correct share and, with ``uni.online_balance``, keeps a
    subset of each prompt group until it is within ``target ± tol`` (own seeded stream)."""

    uni: object  # the `distill.uniopd` settings

    name: ClassVar[str] = "uniopd_balance"
    setting: ClassVar[str] = "uniopd"
    needs: ClassVar[frozenset[str]] = frozenset({"rewards"})
    data_parallel: ClassVar[bool] = False  # balances the whole batch

    def select(self, batch: RolloutBatch) -> None:
        if batch.rewards is None:
            raise ValueError("distill.uniopd verifies every rollout: train_mopd needs score_fn")
        # the balancing draw has its own seeded stream (not the prompt sampler's)
        gen = torch.Generator().manual_seed(batch.seed)
        batch.keep, metrics = uniopd_balance(self.uni, batch.rewards, batch.groups, gen)
        batch.metrics |= metrics


@dataclass
class MarginCalibration(Shaper):
    """Uni-OPD §3.4: the clipped K1 token rewards at the rollout policy, calibrated by outcome
    inside each prompt group, become the advantages of the policy-gradient loss."""

    uni: object  # the `distill.uniopd` settings
    clip: float | None

    name: ClassVar[str] = "uniopd_calibration"
    setting: ClassVar[str] = "uniopd.calibration"
    needs: ClassVar[frozenset[str]] = frozenset({"rewards", "old_logprobs"})
    data_parallel: ClassVar[bool] = False  # calibrates within prompt groups over the whole batch

    def shape(self, packed: PackedBatch, batch: RolloutBatch) -> None:
        dev = packed.mask_BT.device
        r_BT = opd_advantage(packed.teacher_logprobs_BT, packed.old_logprobs_BT, clip=self.clip)
        packed.advantages_BT, metrics = uniopd_advantages(
            self.uni, r_BT, packed.mask_BT, torch.tensor(packed.rewards_B, dtype=r_BT.dtype, device=dev),
            torch.tensor(packed.groups_B, device=dev))
        batch.metrics |= metrics
