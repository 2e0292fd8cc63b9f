"""The `distill` section (and `variants.distill.<name>`): MOPD and every on-policy method built on
it (ALGORITHMS §1-§5). Imported by the distillation family only, so editing it reruns distill,
its evaluations and the report, and nothing upstream."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from mopd.opd.methods import BUILTIN, METHODS, get_method
from mopd.settings.base import (
    LoraOption,
    PipelineFacts,
    PosFloat,
    PosInt,
    Prob,
    Strict,
    check_shares,
    plain,
)


class UniOPDParams(Strict):
    """Uni-OPD (ALGORITHMS §4; Uni-OPD §3.3-3.4, A.2, A.4): each step the student's
    `samples_per_prompt` rollouts of a prompt form a group, every rollout is verified by its
    domain's verifier, then (optionally) online balancing and outcome-guided margin calibration
    shape the token advantages that drive the policy-gradient loss."""

    # A.2 online balancing: subsample the over-represented side (correct / incorrect) inside each
    # prompt group until the batch's correct share is back in [target - tol, target + tol].
    online_balance: bool = False
    target: Annotated[float, Field(gt=0, lt=1)] = 0.5
    tol: Prob = 0.1
    # §3.4 margin calibration: `off`, or the margin of eq. 9 (`mean` | `minmax`); `strategy` is
    # the shift of eq. 11 (`lift` | `suppress` | `spread`) or the greedy mask of Alg. 1 (`mask`).
    calibration: Literal["off", "mean", "minmax"] = "off"
    strategy: Literal["lift", "suppress", "spread", "mask"] = "lift"
    gamma: Annotated[float, Field(ge=0)] = 0.0  # target margin γ
    min_keep: Prob = 0.5  # greedy mask: smallest kept fraction of a group
    threshold: Prob = 1.0  # positives: outcome reward >= threshold (rewards lie in [0, 1])

    @property
    def active(self) -> bool:
        return self.online_balance or self.calibration != "off"


class OpenMOPDParams(Strict):
    """Open-MOPD's balancing (github.com/fwyc0573/Open-MOPD, `mt_opd.py`), each a shaper of
    :mod:`mopd.opd.shapers` on the K1 advantage: target gradient shares (M1), reward-scale
    normalisation (M2), a teacher-conflict policy (M3) and advantage refresh (M4)."""

    # M1: scale each domain's loss so its share of the gradient (of the loss's averaging units:
    # tokens with token_mean, else sequences) is `target_shares` (null = equal), total preserved.
    gradient_shares: bool = False
    target_shares: dict[str, PosFloat] | None = None
    # M2: times (gap_d / gap_d at its first step)^alpha (`multiply`, clipped to [0.05, 20]), or
    # 1 / gap_d^alpha (`divide`, measured harmful by Open-MOPD); gap = mean |u - s| per token.
    reward_scale: Literal["off", "multiply", "divide"] = "off"
    alpha: Annotated[float, Field(ge=0, le=2)] = 1.0
    # M3: every teacher scores every rollout; where their log-probs of a token spread by more than
    # `conflict_nats` (or its `conflict_quantile` over the batch's tokens), `mask` drops it and
    # `consensus` keeps the routed teacher (their mean elsewhere).
    conflict: Literal["off", "mask", "consensus"] = "off"
    conflict_nats: PosFloat = 1.0
    conflict_quantile: Annotated[float, Field(gt=0, lt=1)] | None = None
    # M4: with epochs x minibatches > 1, each pass rebuilds u - s from the student as it is then.
    refresh_advantage: bool = False

    @property
    def active(self) -> bool:
        return self.gradient_shares or self.reward_scale != "off" or self.conflict != "off" or self.refresh_advantage


class VLLMServeParams(Strict):
    """`teacher_transport: vllm`: how each local teacher checkpoint is served by `vllm serve` for
    the stage's duration (mopd.teachers.vllm_serve)."""

    # devices per teacher server (vLLM's --tensor-parallel-size)
    devices: PosInt = 1
    # `own`: each server leases its own devices from the host's inventory (mopd.placement), beside
    # the stage's; `shared`: the servers run on the stage's own devices (set
    # gpu_memory_utilization so that the student, its optimiser and every server fit)
    placement: Literal["own", "shared"] = "own"
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.85
    max_model_len: PosInt | None = None
    startup_timeout: PosFloat = 900.0  # seconds until /health answers 200
    # more `vllm serve` options, passed through as given (e.g. ["--enforce-eager"])
    extra_args: list[Annotated[str, Field(pattern=r"^--[a-z0-9-]+(=.*)?$|^[^-].*$")]] = []


class DistillParams(LoraOption):
    """MOPD (ALGORITHMS §1-§3): the student samples, each rollout is scored by its domain's teacher."""

    # A registered method (mopd.opd.methods.METHODS; the Literal lists the built-in ones, a method
    # registered later by a plugin is accepted too) and its own settings (its spec's params model).
    objective: Literal[BUILTIN] = "mopd_pg"  # type: ignore[valid-type]
    objective_params: dict[str, float | int | bool | None] = Field(default_factory=dict)
    max_steps: PosInt = 60
    learning_rate: PosFloat = 5e-4
    # Learning-rate schedule over max_steps: linear warm-up over the first `warmup_ratio` of the
    # steps, then `constant` or `cosine` decay to 0.1 x learning_rate. Stateless in the step, so a
    # resumed run follows the same schedule.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # Optimiser steps per rollout batch (ALGORITHMS §1): `epochs` passes, each over `minibatches`
    # shuffled minibatches, with the PPO clipped ratio against the rollout policy (eps_low /
    # eps_high in objective_params, default 0.2). 1 x 1 = one plain step (ratio = 1).
    epochs: PosInt = 1
    minibatches: PosInt = 1
    prompts_per_step: PosInt = 16
    samples_per_prompt: PosInt = 2
    max_new_tokens: PosInt = 32
    temperature: PosFloat = 1.0
    clip: PosFloat | None = 5.0  # two-sided advantage clip c (§1); null = no clip
    topk: PosInt = 16  # k of the top-k form (§2)
    token_mean: bool = False  # False: mean per sequence, then over sequences (§ notation)
    domain_weights: dict[str, PosFloat] | None = None  # per-batch domain shares; None = uniform
    # Uni-OPD eq. 4 (ALGORITHMS §3): a domain's rollouts scored by several teachers, token reward
    # Σ_i w_i (u_i - s). {math: {math: 0.8, code: 0.2}}; keys are the pipeline's domains (a
    # teacher is named by its domain), each row sums to 1; unlisted domains route one-hot to their
    # own teacher (MOPD). Needs an objective that uses only the sampled token's log-prob.
    teacher_weights: dict[str, dict[str, Annotated[float, Field(ge=0)]]] | None = None
    # Checkpoint inside the stage every this many steps (model, optimiser, RNG streams, step),
    # under .mopd/checkpoints/; a killed run resumes from the last one. null = never.
    checkpoint_every: PosInt | None = 50
    # Save the model every this many steps (out_dir/snapshots/step-N): the points of the budget
    # curve (stage `budget_curve`, ALGORITHMS §9). null = none.
    snapshot_every: PosInt | None = None
    # Verify the rollouts (outcome rewards, logged as `distill/reward_<domain>`) at step 1 and every
    # this many steps when nothing in the step uses them: MOPD's losses never read rewards, and
    # verifying every step cost a third of the tiny profile's distill stage (code in the sandbox).
    # A shaper that needs rewards (Uni-OPD balancing, calibration) gets them every step.
    reward_every: PosInt = 1
    # Teacher scoring (MOPD 3.3): `inprocess` loads each local teacher in the trainer; `http`
    # starts each local teacher as a prefill server (`mopd serve-teacher`) for the stage's
    # duration and scores through the same HTTP client used for remote endpoints; `vllm` serves
    # each with `vllm serve` (the `gpu` extra, CUDA) on devices from the inventory, through that
    # same client (`teacher_vllm` says how).
    teacher_transport: Literal["inprocess", "http", "vllm"] = "inprocess"
    teacher_vllm: VLLMServeParams = VLLMServeParams()
    # Submit a rollout chunk's scoring request as soon as it is sampled, while the remaining
    # chunks are still sampling; wait only at the update.
    overlap: bool = True
    rollout_chunks: PosInt = 4
    # Uni-OPD A.1: train on the difficulty stage's balanced prompt set when the pipeline runs it
    # (false: the plain training split, e.g. the OPD row of Uni-OPD's ablation).
    offline_balance: bool = True
    # Uni-OPD (ALGORITHMS §4): online balancing and margin calibration; null = off (plain MOPD).
    uniopd: UniOPDParams | None = None
    # Open-MOPD's balancing (shapers on the K1 advantage); null = off (plain MOPD).
    openmopd: OpenMOPDParams | None = None
    # TrOPD off-policy guidance (ALGORITHMS §5, TrOPD §4.3): each step a `prefix_share` of the
    # prompts gets a prefix sampled from its domain's teacher, of length uniform in
    # [1, l_max(step)], l_max annealed by a cosine from max_new_tokens to 0 over max_steps; the
    # student continues it. The `tropd` objective puts β·NLL on the prefix tokens
    # (objective_params.prefix_beta). Teachers generate in process, through the embedded
    # server's /v1/completions (transport http) or a remote vLLM endpoint.
    prefix_share: Prob = 0.0

    @field_validator("objective", mode="wrap")
    @classmethod
    def _registered(cls, value, handler):
        if isinstance(value, str) and value in METHODS:  # a plugin's method is not in the Literal
            return value
        if isinstance(value, str):
            raise ValueError(f"unknown objective {value!r}; valid names (registered methods): {sorted(METHODS)}")
        return handler(value)

    @model_validator(mode="after")
    def _objective_params_known(self) -> "DistillParams":
        spec = get_method(self.objective)
        accepted = list(spec.params.model_fields)
        unknown = sorted(set(self.objective_params) - set(accepted))
        if unknown:
            raise ValueError(f"objective_params {unknown} are not parameters of objective "
                             f"{self.objective!r} (it takes {accepted or 'none'})")
        for key, value in self.objective_params.items():
            field = spec.params.model_fields[key]
            rule = field.description or f"a valid {field.annotation}"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"objective_params.{key} = {value!r}: must be {rule}")
            try:
                spec.params.model_validate({key: value})
            except ValidationError as exc:
                raise ValueError(f"objective_params.{key} = {value!r}: must be {rule} "
                                 f"({plain(exc.errors()[0]['msg'])})") from None
        return self

    @model_validator(mode="after")
    def _teacher_weights_fit(self) -> "DistillParams":
        spec = get_method(self.objective)
        for d, row in (self.teacher_weights or {}).items():
            if not math.isclose(sum(row.values()), 1.0, rel_tol=1e-6, abs_tol=1e-9):
                raise ValueError(f"teacher_weights.{d} = {row}: weights must sum to 1")
            if row != {d: 1.0} and not spec.k1_mixable:
                mixable = [n for n, s in METHODS.items() if s.k1_mixable]
                raise ValueError(f"teacher_weights.{d} mixes teachers, which needs an objective on the sampled "
                                 f"token's log-prob ({', '.join(mixable)}); got {self.objective!r}")
        return self

    @model_validator(mode="after")
    def _prefix_fits(self) -> "DistillParams":
        if self.prefix_share > 0 and not get_method(self.objective).prefix_loss:
            with_prefix = [n for n, s in METHODS.items() if s.prefix_loss]
            raise ValueError(f"prefix_share {self.prefix_share} (TrOPD off-policy guidance) needs "
                             f"objective: {' | '.join(with_prefix)}, whose loss covers prefix tokens "
                             f"(got {self.objective!r})")
        return self

    @model_validator(mode="after")
    def _uniopd_fits(self) -> "DistillParams":
        uni = self.uniopd
        if uni is not None and uni.calibration != "off" and not get_method(self.objective).calibratable:
            takes = [n for n, s in METHODS.items() if s.calibratable]
            raise ValueError(f"uniopd.calibration {uni.calibration!r} shapes the K1 advantages of the "
                             f"policy-gradient objective: set objective: {' | '.join(takes)} "
                             f"(got {self.objective!r})")
        if uni is not None and uni.active and self.samples_per_prompt < 2:
            raise ValueError("uniopd balances and calibrates within prompt groups: samples_per_prompt "
                             f"must be >= 2 (got {self.samples_per_prompt})")
        return self

    @model_validator(mode="after")
    def _openmopd_fits(self) -> "DistillParams":
        o = self.openmopd
        if o is None or not o.active:
            return self
        if not get_method(self.objective).calibratable:
            takes = [n for n, s in METHODS.items() if s.calibratable]
            raise ValueError(f"openmopd weights the K1 advantage of the policy-gradient objective: set objective: "
                             f"{' | '.join(takes)} (got {self.objective!r})")
        if self.uniopd is not None and self.uniopd.calibration != "off":
            raise ValueError("openmopd and uniopd.calibration both set the advantages: use one of them")
        if o.refresh_advantage and self.epochs * self.minibatches == 1:
            raise ValueError("openmopd.refresh_advantage rebuilds the advantage between update passes: it needs "
                             f"epochs x minibatches > 1 (got epochs {self.epochs}, minibatches {self.minibatches})")
        if o.conflict != "off" and self.teacher_weights:
            raise ValueError("openmopd.conflict scores every rollout by every teacher itself: leave teacher_weights "
                             "unset")
        return self

    def check(self, facts: PipelineFacts) -> None:
        """Cross-section checks against the pipeline that runs this section (base or variant)."""
        check_shares(facts.key, self.domain_weights, facts)
        shares = self.openmopd.target_shares if self.openmopd else None
        if shares is not None and set(shares) != set(facts.domains):
            raise ValueError(f"{facts.key}.openmopd.target_shares: keys {sorted(shares)} must be exactly the domains "
                             f"of pipeline {facts.pipeline!r} {list(facts.domains)}")
        if self.openmopd and self.openmopd.conflict != "off" and len(facts.domains) < 2:
            raise ValueError(f"{facts.key}.openmopd.conflict compares teachers: pipeline {facts.pipeline!r} has one")
        remote = sorted(facts.remote_teachers)
        if self.temperature != 1.0 and (self.teacher_transport in ("http", "vllm") or remote):
            why = (f"teacher_transport: {self.teacher_transport}" if self.teacher_transport != "inprocess"
                   else f"the remote teacher(s) of {remote}")
            raise ValueError(f"{facts.key}.temperature = {self.temperature}: the teachers' log-probs must be taken at "
                             f"the student's sampling temperature (else the reward is not the reverse KL at it), and "
                             f"{why} return log-probs at temperature 1 only (served prompt log-probs are unscaled); "
                             f"use temperature 1.0 or in-process local teachers")
        for d, row in (self.teacher_weights or {}).items():
            bad = sorted({d, *row} - set(facts.domains))
            if bad:
                raise ValueError(f"{facts.key}.teacher_weights.{d}: {bad} not domain(s) of pipeline "
                                 f"{facts.pipeline!r} ({list(facts.domains)}); a teacher is named by its domain")
