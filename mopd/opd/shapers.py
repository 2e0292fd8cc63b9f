"""Shapers: what a method does to a step's batch besides its loss (ALGORITHMS §4-§5).

A shaper declares its contract — what it ``needs`` (``rewards``: outcome rewards from the
verifiers; ``old_logprobs``: the rollout policy's log-probs; ``teacher_generate``: teachers that
sample), whether it acts on the whole batch (``whole_batch``: under data parallelism the
processes then first gather every row, :meth:`RolloutBatch.gather`, and each shapes the whole
batch as one process would) and whether it splits prefix tokens from the response (``prefix``) — and acts at
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
from dataclasses import dataclass, field
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
    whole_batch: ClassVar[bool] = False
    prefix: ClassVar[bool] = False

    def before_sampling(self, batch: RolloutBatch, clients: dict[str, TeacherClient]) -> None:
        """Before the student samples: may set ``batch.prefixes``."""

    def select(self, batch: RolloutBatch) -> None:
        """After sampling, scoring and verifying: may set ``batch.keep``."""

    def shape(self, packed: PackedBatch, batch: RolloutBatch) -> None:
        """After packing: may set ``packed.advantages_BT`` / masks / ``weight_BT``."""

    def restore(self, history: dict[str, list[tuple[int, float]]]) -> None:
        """On resume: the state a shaper carries across steps, from the run's metric history."""


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
    # every process draws the same prefixes for every prompt (the same seed): the teachers generate
    # each prompt's prefix once per process, a cost data parallelism repeats (docs/devices.md)
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
    whole_batch: ClassVar[bool] = True  # balances the whole batch

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
    whole_batch: ClassVar[bool] = True  # calibrates within prompt groups over the whole batch

    def shape(self, packed: PackedBatch, batch: RolloutBatch) -> None:
        dev = packed.mask_BT.device
        r_BT = opd_advantage(packed.teacher_logprobs_BT, packed.old_logprobs_BT, clip=self.clip)
        packed.advantages_BT, metrics = uniopd_advantages(
            self.uni, r_BT, packed.mask_BT, torch.tensor(packed.rewards_B, dtype=r_BT.dtype, device=dev),
            torch.tensor(packed.groups_B, device=dev))
        batch.metrics |= metrics


# --------------------------------------------------------------------------- Open-MOPD balancing
# Open-MOPD (github.com/fwyc0573/Open-MOPD, `training/verl/verl/workers/actor/mt_opd.py`): four
# mechanisms that close naive multi-teacher OPD's gap to Mix-RL there, each a shaper here. They
# write multiplicative weights on the K1 advantage (``packed.weight_BT``; the update builds
# ``A_t = w_t · clip(u_t - s_t)``), or the teacher target itself (consensus), so they compose with
# each other and need a method whose loss takes advantages (`calibratable`: mopd_pg).
def loss_units(mask_BT: torch.Tensor, token_mean: bool) -> torch.Tensor:
    """Each row's weight in the loss's average: its response tokens (token_mean) or 1 (a mean per
    sequence, then over sequences): the units a domain's gradient share is counted in."""
    tokens_B = mask_BT.sum(-1)
    return tokens_B if token_mean else (tokens_B > 0).to(mask_BT.dtype)


def share_weights(row_domains: list[str], units_B: torch.Tensor, targets: dict[str, float] | None,
                  scale: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Open-MOPD M1 (target gradient shares, `compute_domain_loss_weights`): per-row loss weights
    ``w_d = target_d / observed_d`` (``observed_d``: domain d's share of the loss units, ``target_d``:
    ``targets`` renormalised over the domains present; None = equal), times ``scale[d]`` (M2's
    factor) when given, then rescaled so that ``Σ_i w_i·units_i = Σ_i units_i``: the loss's total
    magnitude (hence the effective learning rate) is preserved. Returns (w_B, w per domain)."""
    present = list(dict.fromkeys(row_domains))
    units = {d: float(sum(u for u, rd in zip(units_B.tolist(), row_domains) if rd == d)) for d in present}
    total = sum(units.values())
    raw = {d: (targets or {}).get(d, 0.0) if targets else 1.0 for d in present}
    if sum(raw.values()) <= 0:
        raw = dict.fromkeys(present, 1.0)
    norm = sum(raw.values())
    w = {d: (raw[d] / norm) / (units[d] / total) if units[d] > 0 else 0.0 for d in present}
    if scale:
        w = {d: w[d] * scale.get(d, 1.0) for d in present}
    mass = sum(w[d] * units[d] for d in present)
    w = {d: w[d] * total / mass if mass > 0 else 1.0 for d in present}
    w_B = torch.tensor([w[d] for d in row_domains], dtype=units_B.dtype, device=units_B.device)
    return w_B, w


def reward_scale_factors(magnitude: dict[str, float], anchor: dict[str, float], mode: str, alpha: float,
                         lo: float = 0.05, hi: float = 20.0) -> dict[str, float]:
    """Open-MOPD M2 (reward-scale normalisation): each domain's weight factor from its remaining
    teacher–student gap ``magnitude[d]`` (mean |u - s| over its tokens this step). ``multiply``:
    ``clip((mag_d / anchor_d)^α, lo, hi)``, the gap relative to the domain's own at its first step —
    a domain whose gap closes gets less of the gradient, one still far from its teacher keeps its
    share; ``divide``: ``1 / mag_d^α`` (equalises the reward scales; Open-MOPD measured it harmful:
    an easy domain's collapsing gap inflates its weight)."""
    out = {}
    for d, mag in magnitude.items():
        if mode == "multiply":
            ref = anchor.get(d, 0.0)
            out[d] = 1.0 if ref <= 1e-8 else min(hi, max(lo, (mag / ref) ** alpha))
        elif mode == "divide":
            out[d] = 1.0 if mag <= 1e-8 else 1.0 / mag ** alpha
        else:
            raise ValueError(f"reward-scale mode must be multiply or divide, got {mode!r}")
    return out


def conflict_policy(u_MBT: torch.Tensor, routed_BT: torch.Tensor, mask_BT: torch.Tensor, policy: str,
                    nats: float, quantile: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Open-MOPD M3 (`apply_teacher_conflict_policy`) on the sampled token: ``u_MBT`` = every
    teacher's log-prob of each response token; the spread ``max_m u - min_m u`` (nats); teachers
    agree where it is <= the threshold (``nats``, or the ``quantile`` of the spread over response
    tokens). ``mask``: contested tokens get weight 0 and the agreed ones ``valid / kept`` (total
    preserved); ``consensus``: where teachers agree the target is their mean log-prob, where they
    are contested the routed teacher's. Returns (token weight_BT, target u_BT, spread_BT, threshold)."""
    m = mask_BT.bool()
    spread_BT = (u_MBT.max(0).values - u_MBT.min(0).values) * mask_BT
    thresh = nats
    if quantile is not None and m.any():
        thresh = float(torch.quantile(spread_BT[m].double(), quantile))
    agree_BT = (spread_BT <= thresh) & m
    weight_BT = mask_BT.clone()
    target_BT = routed_BT
    if policy == "mask":
        kept, valid = float(agree_BT.sum()), float(m.sum())
        weight_BT = agree_BT.to(mask_BT.dtype) * (valid / kept if kept else 0.0)
    elif policy == "consensus":
        target_BT = torch.where(agree_BT, u_MBT.mean(0), routed_BT)
    else:
        raise ValueError(f"conflict policy must be mask or consensus, got {policy!r}")
    return weight_BT, target_BT, spread_BT, thresh


def _per_domain(values_BT: torch.Tensor, mask_BT: torch.Tensor, row_domains: list[str]) -> dict[str, float]:
    """Mean of ``values_BT`` over each domain's response tokens."""
    out = {}
    for d in dict.fromkeys(row_domains):
        rows = torch.tensor([rd == d for rd in row_domains], device=mask_BT.device)
        m = mask_BT[rows]
        out[d] = float((values_BT[rows] * m).sum() / m.sum().clamp(min=1))
    return out


def _multiply_weight(packed: PackedBatch, w_BT: torch.Tensor) -> None:
    packed.weight_BT = w_BT if packed.weight_BT is None else packed.weight_BT * w_BT


@dataclass
class TeacherConflict(Shaper):
    """Open-MOPD M3: every teacher scores every rollout (the weighted-teacher scoring path); where
    the teachers' log-probs of a token spread beyond the threshold, ``mask`` drops it, ``consensus``
    keeps the routed teacher and averages the teachers elsewhere (see :func:`conflict_policy`)."""

    policy: str
    nats: float
    quantile: float | None

    name: ClassVar[str] = "openmopd_conflict"
    setting: ClassVar[str] = "openmopd.conflict"
    needs: ClassVar[frozenset[str]] = frozenset({"all_teachers"})
    whole_batch: ClassVar[bool] = True  # the quantile and the mask's rescale are over the whole batch

    def shape(self, packed: PackedBatch, batch: RolloutBatch) -> None:
        from mopd.teachers import lay_out

        kept = batch.kept
        T, dev = packed.ids_BT.shape[1], packed.mask_BT.device
        lens = [len(batch.samples[b].prompt_ids) for b in kept]
        u_MBT = torch.stack([lay_out([scores[b] for b in kept], lens, T, None)[0].to(dev)
                             for _, scores in sorted(batch.all_scores.items())])
        w_BT, packed.teacher_logprobs_BT, spread_BT, thresh = conflict_policy(
            u_MBT, packed.teacher_logprobs_BT, packed.mask_BT, self.policy, self.nats, self.quantile)
        if self.policy == "mask":
            _multiply_weight(packed, w_BT)
        rows = [batch.row_domains[b] for b in kept]
        contested = ((spread_BT > thresh) & packed.mask_BT.bool()).to(packed.mask_BT.dtype)
        batch.metrics |= {"openmopd/conflict_threshold": thresh} | {
            f"openmopd/{d}/spread": v for d, v in _per_domain(spread_BT, packed.mask_BT, rows).items()} | {
            f"openmopd/{d}/contested_fraction": v for d, v in _per_domain(contested, packed.mask_BT, rows).items()}


@dataclass
class DomainBalance(Shaper):
    """Open-MOPD M1 + M2: per-domain loss weights so that each domain's share of the gradient is its
    target (``targets``; None = equal; ``shares=False``: M2 alone) times, with ``reward_scale``,
    the factor of its remaining gap (anchored at the domain's first step), total preserved. Logs
    per domain: prompt share, token share, reward magnitude, loss weight."""

    shares: bool
    targets: dict[str, float] | None
    reward_scale: str  # off | multiply | divide
    alpha: float
    clip: float | None
    token_mean: bool
    anchor: dict[str, float] = field(default_factory=dict)

    name: ClassVar[str] = "openmopd_balance"
    setting: ClassVar[str] = "openmopd"
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})
    whole_batch: ClassVar[bool] = True  # shares are over the whole batch

    def shape(self, packed: PackedBatch, batch: RolloutBatch) -> None:
        rows = [batch.row_domains[b] for b in batch.kept]
        m_BT = packed.mask_BT
        gap_BT = (packed.teacher_logprobs_BT - packed.old_logprobs_BT).abs()  # |K1 reward| at the rollout policy
        magnitude = _per_domain(gap_BT, m_BT, rows)
        for d, v in magnitude.items():
            self.anchor.setdefault(d, v)  # the domain's first step (restored on resume)
        scale = (reward_scale_factors(magnitude, self.anchor, self.reward_scale, self.alpha)
                 if self.reward_scale != "off" else None)
        units_B = loss_units(m_BT, self.token_mean)
        if self.shares:
            targets = self.targets
        else:  # M2 alone: the observed shares are the targets (weights 1 before the gap factor)
            targets = {d: float(sum(u for u, rd in zip(units_B.tolist(), rows) if rd == d)) for d in magnitude}
        w_B, w = share_weights(rows, units_B, targets, scale)
        _multiply_weight(packed, w_B[:, None] * m_BT)
        tokens_B = m_BT.sum(-1).tolist()
        n_tok, n_prompts = sum(tokens_B), len(batch.domains)
        metrics = {}
        for d in w:
            metrics |= {f"openmopd/{d}/prompt_share": batch.domains.count(d) / n_prompts,
                        f"openmopd/{d}/token_share": sum(t for t, rd in zip(tokens_B, rows) if rd == d) / n_tok,
                        f"openmopd/{d}/reward_magnitude": magnitude[d],
                        f"openmopd/{d}/reward_anchor": self.anchor[d],
                        f"openmopd/{d}/loss_weight": w[d]}
        batch.metrics |= metrics

    def restore(self, history: dict[str, list[tuple[int, float]]]) -> None:
        """A resumed run keeps the anchors of the run it continues (from the logged history)."""
        for key, points in history.items():
            head, _, rest = key.partition("/")
            d, _, what = rest.rpartition("/")
            if head == "openmopd" and what == "reward_anchor" and points:
                self.anchor[d] = points[-1][1]


@dataclass
class AdvantageRefresh(Shaper):
    """Open-MOPD M4: with several optimiser passes per rollout batch (`epochs` x `minibatches` > 1),
    each pass rebuilds the K1 advantage ``u - s`` from the student as it is at that pass (detached)
    instead of the rollout policy's; the domain / conflict weights stay those of the step."""

    name: ClassVar[str] = "openmopd_refresh"
    setting: ClassVar[str] = "openmopd.refresh_advantage"
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})

    def shape(self, packed: PackedBatch, batch: RolloutBatch) -> None:
        packed.refresh = True
