"""The pipeline DAG, defined once, as data.

:data:`KINDS` is the stage table: each stage kind declares its module, the ``params.yaml`` /
``pipelines.yaml`` keys it reads, its arguments (domain, variant, model, pipeline) and its
upstream rule. Everything else is derived from it: the Prefect flow (``flows/``), the stage
runner (``tasks/runner.py``), ``dvc.yaml`` (:mod:`mopd.dvcgen`), the methods the report compares,
``mopd plan`` (:mod:`mopd.plan`) and the validation of stage names in ``pipelines.yaml``.

A pipeline's ``stages`` list names kinds (``teacher`` expands to one stage per local domain,
``evaluate`` to one evaluation per model stage plus the pipeline's report) and *method variants*
(``distill:tropd``: a distillation stage with its own ``variants.distill.tropd`` params section).

Identity (Marin's StepSpec, STYLE "The DAG as data"): a stage's name, output folder and cache
key never depend on which pipeline asked for it — only the report, whose job is to compare one
pipeline's methods, is named by its pipeline. So two pipelines that share SFT and teachers share
their output folders and cache entries, and :func:`check_shared_stages` refuses configurations in
which the same stage name would mean two different computations.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mopd.artifacts import hash_tree
from mopd.codedeps import code_files
from mopd.security import redact_secrets
from mopd.settings.multiround import MultiRoundParams

if TYPE_CHECKING:
    from mopd.config import Config

ARTIFACTS = "artifacts"
DEFAULT_DISTILL_METHOD = "mopd"  # the label of the plain `distill` stage in tables (MOPD Table 2)


@dataclass(frozen=True)
class StageSpec:
    """One concrete stage of a pipeline (a row of the expanded table)."""

    name: str  # "teacher:math", "distill:tropd", "evaluate:teacher:math", "report:full"
    kind: str  # "teacher"
    module: str  # "tasks.teacher"
    out_dir: str  # relative to the project dir: "artifacts/teachers/math"
    args: tuple[tuple[str, str], ...] = ()  # (("domain", "math"),): keyword arguments of run()
    params_keys: tuple[str, ...] = ()  # dotted keys of params.yaml this stage reads
    pipeline_keys: tuple[str, ...] = ()  # dotted keys of pipelines.yaml this stage reads
    upstream: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()  # the domains the stage covers (part of its identity)
    tags: tuple[str, ...] = ()
    models: tuple[tuple[str, str], ...] = ()  # (method label, model dir inside out_dir)
    # which upstream stage plays which part: (role, stage) or (role, ((label, stage), ...))
    roles: tuple[tuple[str, Any], ...] = ()
    data_parallel: bool = False  # runs `runtime.processes` processes (its kind's `data_parallel`)

    @property
    def kwargs(self) -> dict[str, str]:
        return dict(self.args)

    @property
    def domain(self) -> str | None:
        return self.kwargs.get("domain")

    @property
    def argv(self) -> list[str]:
        """Arguments of ``python -m <module>`` (the same as dvc.yaml's cmd), less --pipeline (the
        report's `pipeline` argument is that option itself)."""
        return [tok for k, v in self.args if k != "pipeline" for tok in (f"--{k}", v)]

    def identity(self) -> dict[str, Any]:
        """What the stage computes, apart from config values, upstream contents and code."""
        return {"module": self.module, "out_dir": self.out_dir, "args": list(self.args),
                "params_keys": list(self.params_keys), "pipeline_keys": list(self.pipeline_keys),
                "upstream": list(self.upstream), "domains": list(self.domains)}


@dataclass
class _Ctx:
    """What the expansion has built so far, for the upstream rules."""

    cfg: "Config"
    wanted: dict[str, list[str | None]]  # kind -> variants listed in the pipeline (None = plain)
    specs: list[StageSpec] = field(default_factory=list)

    def names(self, kind: str) -> list[str]:
        return [s.name for s in self.specs if s.kind == kind]

    def has(self, kind: str) -> bool:
        return bool(self.names(kind))


@dataclass(frozen=True)
class StageKind:
    """One row of the stage table.

    ``args``: the names of the stage's arguments, in order (its name is ``kind:arg1:arg2``).
    ``expand(ctx)`` yields one argument dict per stage of this kind in the pipeline.
    ``params`` / ``pipeline_keys`` / ``upstream`` / ``out_dir`` / ``models`` derive the rest
    from ``(ctx, args)``. ``variants``: the kind accepts ``kind:<variant>`` entries, each reading
    its own ``variants.<kind>.<variant>`` section on top of the ``<kind>`` section."""

    kind: str
    module: str
    expand: Callable[[_Ctx], list[dict[str, str]]]
    params: Callable[[_Ctx, dict], tuple[str, ...]]
    out_dir: Callable[[dict], str]
    upstream: Callable[[_Ctx, dict], tuple[str, ...]] = lambda ctx, a: ()
    pipeline_keys: Callable[[_Ctx, dict], tuple[str, ...]] = lambda ctx, a: ()
    args: tuple[str, ...] = ()
    variants: bool = False
    per_domain: bool = False  # covers one domain (its `domain` argument), not the pipeline's set
    tags: tuple[str, ...] = ()
    models: Callable[[_Ctx, dict], tuple[tuple[str, str], ...]] = lambda ctx, a: ()
    listed_as: str | None = None  # the pipelines.yaml entry that enables it (default: kind)
    # role -> upstream stage name, or {domain/label: stage name} for a role several stages play
    # (StageContext.role / roles_of); `data` is added for every stage that reads the data stage
    roles: Callable[[_Ctx, dict], dict[str, Any]] = lambda ctx, a: {}
    samples: bool = False  # samples rollouts through `runtime.rollout` (transformers or vLLM; GRPO: TRL's use_vllm)
    data_parallel: bool = False  # runs `runtime.processes` processes under `accelerate launch`
    # params.yaml keys of generation lengths: each plus the longest prompt must fit a tiny
    # profile's context (`teacher.*` = every recipe's)
    length_keys: tuple[str, ...] = ()
    # figures the stage draws in its output folder (file names): dvc.yaml's top-level `plots`
    plots: tuple[str, ...] = ()


def _one(ctx: _Ctx) -> list[dict]:
    return [{}]


def _variants(kind: str) -> Callable[[_Ctx], list[dict]]:
    def expand(ctx: _Ctx) -> list[dict]:
        return [{"variant": v} if v else {} for v in ctx.wanted.get(kind, [])]
    return expand


def _domain_keys(*fields: str) -> Callable[[_Ctx, dict], tuple[str, ...]]:
    return lambda ctx, a: tuple(f"domains.{d}.{f}" for d in ctx.cfg.domains for f in fields)


def _teachers(ctx: _Ctx) -> tuple[str, ...]:
    """Every local teacher's stage: a pipeline that distils or merges without a `teacher` stage
    is refused at load time (missing upstream), not after SFT."""
    return tuple(f"teacher:{d}" for d in ctx.cfg.local_teacher_domains)


def _distill_params(ctx: _Ctx, a: dict) -> tuple[str, ...]:
    return ("seed", "distill", *((f"variants.distill.{a['variant']}",) if a.get("variant") else ()))


def _distill_out(a: dict) -> str:
    return f"{ARTIFACTS}/distill/{a.get('variant') or DEFAULT_DISTILL_METHOD}"


def _distill_models(ctx: _Ctx, a: dict) -> tuple[tuple[str, str], ...]:
    label = f"distill:{a['variant']}" if a.get("variant") else DEFAULT_DISTILL_METHOD
    return ((label, "model"),)


def _rounds(ctx: _Ctx) -> range:
    return range(2, ctx.cfg.params.multiround.rounds + 1)


def _round_teacher_upstream(ctx: _Ctx, a: dict) -> tuple[str, ...]:
    return ("data", MultiRoundParams.student_stage(int(a["round"]) - 1))


def _round_distill_upstream(ctx: _Ctx, a: dict) -> tuple[str, ...]:
    r = int(a["round"])
    return ("data", MultiRoundParams.student_stage(r - 1), *(("difficulty",) if ctx.has("difficulty") else ()),
            *(f"round_teacher:{r}:{d}" for d in ctx.cfg.round_domains))


def _cascade_upstream(ctx: _Ctx, a: dict) -> tuple[str, ...]:
    """Cascade RL step i starts from step i-1's model; step 1 (GRPO of SFT on the first domain
    with its recipe and seed) is `teacher:<first>` itself, so it is not run twice."""
    order = ctx.cfg.cascade_order
    i = order.index(a["domain"])
    prev = f"teacher:{order[0]}" if i == 1 else f"cascade_rl:{order[i - 1]}"
    return ("data", prev)


def _cascade_models(ctx: _Ctx, a: dict) -> tuple[tuple[str, str], ...]:
    return (("cascade_rl", "model"),) if a["domain"] == ctx.cfg.cascade_order[-1] else ()


def _copd_expand(ctx: _Ctx) -> list[dict]:
    """CoPD (ALGORITHMS §6): one stage per cycle x phase x branch, `copd:<n>:<rl|opd>:<branch>`."""
    return [{"cycle": str(n), "phase": ph, "domain": d}
            for n in range(1, ctx.cfg.params.copd.cycles + 1) for ph in ("rl", "opd") for d in ctx.cfg.copd_branches]


def _copd_upstream(ctx: _Ctx, a: dict) -> tuple[str, ...]:
    """Phase I of cycle n starts from the branch's Phase II of cycle n-1 (cycle 1: SFT); Phase II
    of cycle n from its own Phase I, with each exchange partner's Phase I of the same cycle as the
    teacher (the partner's current weights, CoPD eq. 8)."""
    n, d = int(a["cycle"]), a["domain"]
    if a["phase"] == "rl":
        return ("data", "sft" if n == 1 else f"copd:{n - 1}:opd:{d}")
    partners = [j for k, j in ctx.cfg.copd_pairs() if k == d]
    return ("data", f"copd:{n}:rl:{d}", *(f"copd:{n}:rl:{j}" for j in partners))


def _copd_params(ctx: _Ctx, a: dict) -> tuple[str, ...]:
    if a["phase"] == "rl":
        return ("seed", "copd.rl_steps", f"teacher.{a['domain']}")
    return ("seed", "copd.opd_steps", "copd.opd")


def _copd_last(ctx: _Ctx) -> tuple[str, ...]:
    n = ctx.cfg.params.copd.cycles
    return tuple(f"copd:{n}:opd:{d}" for d in ctx.cfg.copd_branches)


def _student(stage: str) -> Callable[[_Ctx, dict], dict[str, Any]]:
    return lambda ctx, a: {"student": stage}


def _local_teachers(ctx: _Ctx) -> dict[str, str]:
    return {d: f"teacher:{d}" for d in ctx.cfg.local_teacher_domains}


def _distill_roles(ctx: _Ctx, a: dict) -> dict[str, Any]:
    return {"student": "sft", "teachers": _local_teachers(ctx), **({"balanced": "difficulty"} if ctx.has("difficulty") else {})}


def _round_distill_roles(ctx: _Ctx, a: dict) -> dict[str, Any]:
    r = int(a["round"])
    return {"student": MultiRoundParams.student_stage(r - 1),
            "teachers": {d: f"round_teacher:{r}:{d}" for d in ctx.cfg.round_domains},
            **({"balanced": "difficulty"} if ctx.has("difficulty") else {})}


def _copd_roles(ctx: _Ctx, a: dict) -> dict[str, Any]:
    student, *partners = _copd_upstream(ctx, a)[1:]
    return {"student": student, "partners": {p.rsplit(":", 1)[1]: p for p in partners}} if partners \
        else {"student": student}


def _copd_monitor_roles(ctx: _Ctx, a: dict) -> dict[str, Any]:
    return {"student": "sft", "phases": {s.name.partition(":")[2]: s.name for s in ctx.specs if s.kind == "copd"},
            "final": {d: name for d, name in zip(ctx.cfg.copd_branches, _copd_last(ctx))}}


def _model_stages(ctx: _Ctx) -> list[StageSpec]:
    return [s for s in ctx.specs if s.models]


def _eval_out(a: dict) -> str:
    return f"{ARTIFACTS}/evaluate/{a['model'].replace(':', '-')}"


CURVE_KINDS = ("distill", "mix_rl")  # the methods whose budget curve the pipeline draws


def _curve_stages(ctx: _Ctx) -> list[str]:
    return [s.name for s in ctx.specs if s.kind in CURVE_KINDS]


def _curve_references(ctx: _Ctx) -> list[str]:
    """The evaluations a normalised score needs (SFT's and each local teacher's), and those of the
    curve stages' final models when the pipeline runs them (the curve's last points, not redone)."""
    wanted = ("evaluate:sft", *(f"evaluate:{t}" for t in _teachers(ctx)),
              *(f"evaluate:{n}" for n in _curve_stages(ctx)))
    return [n for n in ctx.names("evaluate") if n in wanted]


def _report_upstream(ctx: _Ctx, a: dict) -> tuple[str, ...]:
    return tuple(ctx.names("evaluate"))


# The stage table. Its order is a topological order of the kinds: a kind's upstream rule may
# only name kinds above it.
CURVES = ("training_curves.png",)  # tasks.plotting.log_curves (its points: curves.csv)
KINDS: dict[str, StageKind] = {k.kind: k for k in (
    StageKind("data", "tasks.data", _one, lambda ctx, a: ("seed", "data"),
              lambda a: f"{ARTIFACTS}/data",
              pipeline_keys=lambda ctx, a: tuple(f"domains.{d}.{f}" for d in ctx.cfg.data_domains
                                                 for f in ("verifier", "data"))),
    StageKind("base", "tasks.base", _one, lambda ctx, a: ("seed", "profile", "profiles"),
              lambda a: f"{ARTIFACTS}/base", upstream=lambda ctx, a: ("data",)),
    StageKind("sft", "tasks.sft", _one, lambda ctx, a: ("seed", "sft"), lambda a: f"{ARTIFACTS}/sft",
              upstream=lambda ctx, a: ("data", "base"), tags=("gpu",), data_parallel=True,
              models=lambda ctx, a: (("sft", "model"),), plots=CURVES,
              roles=lambda ctx, a: {"base": "base"}),
    # MOPD 3.1: one GRPO teacher per domain whose teacher is trained here (remote ones are not).
    StageKind("teacher", "tasks.teacher",
              lambda ctx: [{"domain": d} for d in ctx.cfg.local_teacher_domains],
              lambda ctx, a: ("seed", f"teacher.{a['domain']}"),
              lambda a: f"{ARTIFACTS}/teachers/{a['domain']}", args=("domain",), per_domain=True,
              upstream=lambda ctx, a: ("data", "sft"),
              pipeline_keys=lambda ctx, a: (f"domains.{a['domain']}.verifier",),
              tags=("gpu", "teacher"), models=lambda ctx, a: ((f"teacher:{a['domain']}", "model"),),
              length_keys=("teacher.*.max_completion_length",), data_parallel=True, samples=True, plots=CURVES,
              roles=_student("sft")),
    # Uni-OPD A.1: difficulty is scored with the student, so it needs only data + SFT and runs
    # beside the teachers; distillation then trains on its balanced prompt set.
    StageKind("difficulty", "tasks.difficulty", _one, lambda ctx, a: ("seed", "difficulty"),
              lambda a: f"{ARTIFACTS}/difficulty", upstream=lambda ctx, a: ("data", "sft"),
              pipeline_keys=_domain_keys("verifier"), tags=("gpu",),
              samples=True, length_keys=("difficulty.max_new_tokens",),
              roles=_student("sft")),
    # MOPD §1-§3 and its variants; the routing table is part of what it reads (new endpoints or
    # model names rerun it).
    StageKind("distill", "tasks.distill", _variants("distill"), _distill_params, _distill_out,
              args=("variant",), variants=True,
              upstream=lambda ctx, a: ("data", "sft", *(("difficulty",) if ctx.has("difficulty") else ()),
                                       *_teachers(ctx)),
              pipeline_keys=_domain_keys("verifier", "teacher"), tags=("gpu",),
              models=_distill_models,
              samples=True, data_parallel=True, length_keys=("distill.max_new_tokens",), plots=CURVES,
              roles=_distill_roles),
    # Multi-round MOPD (MOPD §4.4.3): round r's teachers start from round r-1's student and train
    # with the domain's recipe; then MOPD again over those domains from that student.
    StageKind("round_teacher", "tasks.round_teacher",
              lambda ctx: [{"round": str(r), "domain": d} for r in _rounds(ctx) for d in ctx.cfg.round_domains],
              lambda ctx, a: ("seed", f"teacher.{a['domain']}", "multiround"),
              lambda a: f"{ARTIFACTS}/rounds/{a['round']}/teachers/{a['domain']}", args=("round", "domain"),
              per_domain=True, upstream=_round_teacher_upstream,
              pipeline_keys=lambda ctx, a: (f"domains.{a['domain']}.verifier",), tags=("gpu", "teacher"),
              models=lambda ctx, a: ((f"teacher:{a['domain']}:round{a['round']}", "model"),),
              listed_as="multiround", data_parallel=True, samples=True, plots=CURVES,
              roles=lambda ctx, a: {"student": MultiRoundParams.student_stage(int(a["round"]) - 1)}),
    StageKind("multiround", "tasks.multiround", lambda ctx: [{"round": str(r)} for r in _rounds(ctx)],
              lambda ctx, a: ("seed", "distill", "multiround"),
              lambda a: f"{ARTIFACTS}/rounds/{a['round']}/distill", args=("round",),
              upstream=_round_distill_upstream, pipeline_keys=_domain_keys("verifier", "teacher"), tags=("gpu",),
              models=lambda ctx, a: ((f"{DEFAULT_DISTILL_METHOD}:round{a['round']}", "model"),),
              samples=True, data_parallel=True, plots=CURVES,
              roles=_round_distill_roles),
    # Integration baselines (MOPD Table 2, ALGORITHMS §9). Mix-RL: one GRPO run on the pooled
    # prompts, each rewarded by its domain's verifier.
    StageKind("mix_rl", "tasks.mix_rl", _one, lambda ctx, a: ("seed", "mix_rl"),
              lambda a: f"{ARTIFACTS}/baselines/mix_rl", upstream=lambda ctx, a: ("data", "sft"),
              pipeline_keys=_domain_keys("verifier"), tags=("gpu",),
              models=lambda ctx, a: (("mix_rl", "model"),),
              length_keys=("mix_rl.max_completion_length",), data_parallel=True, samples=True, plots=CURVES,
              roles=_student("sft")),
    # Cascade RL: GRPO per domain in `cascade_rl.order`, each from the previous step's model.
    StageKind("cascade_rl", "tasks.cascade_rl",
              lambda ctx: [{"domain": d} for d in ctx.cfg.cascade_order[1:]],
              lambda ctx, a: ("seed", "cascade_rl", f"teacher.{a['domain']}"),
              lambda a: f"{ARTIFACTS}/baselines/cascade_rl/{a['domain']}", args=("domain",),
              per_domain=True, upstream=_cascade_upstream,
              pipeline_keys=lambda ctx, a: (f"domains.{a['domain']}.verifier",), tags=("gpu",),
              models=_cascade_models, data_parallel=True, samples=True, plots=CURVES,
              roles=lambda ctx, a: {"student": _cascade_upstream(ctx, a)[1]}),
    # Off-policy fine-tuning: SFT of the student on its teachers' correct rollouts.
    StageKind("offpolicy_ft", "tasks.offpolicy_ft", _one, lambda ctx, a: ("seed", "offpolicy_ft"),
              lambda a: f"{ARTIFACTS}/baselines/offpolicy_ft",
              upstream=lambda ctx, a: ("data", "sft", *_teachers(ctx)),
              pipeline_keys=_domain_keys("verifier", "teacher"), tags=("gpu",),
              models=lambda ctx, a: (("offpolicy_ft", "model"),),
              length_keys=("offpolicy_ft.max_new_tokens",), plots=CURVES,
              roles=lambda ctx, a: {"student": "sft", "teachers": _local_teachers(ctx)}),
    # CoPD (ALGORITHMS §6): each branch-cycle-phase is a stage, so a failure in cycle n reruns
    # only cycle n onward; the final branches merged through mergekit are the method `copd`.
    StageKind("copd", "tasks.copd", _copd_expand, _copd_params,
              lambda a: f"{ARTIFACTS}/copd/{a['cycle']}/{a['phase']}/{a['domain']}",
              args=("cycle", "phase", "domain"), per_domain=True, upstream=_copd_upstream,
              pipeline_keys=lambda ctx, a: (f"domains.{a['domain']}.verifier",), tags=("gpu",),
              length_keys=("copd.opd.max_new_tokens",), plots=CURVES,
              roles=_copd_roles),
    StageKind("copd_merge", "tasks.copd_merge", _one,
              lambda ctx, a: ("seed", "copd.merge_method", "copd.task_arithmetic_lambda", "copd.density"),
              lambda a: f"{ARTIFACTS}/copd/merge", upstream=lambda ctx, a: ("sft", *_copd_last(ctx)),
              models=lambda ctx, a: (("copd", "model"),), listed_as="copd",
              roles=lambda ctx, a: {"base": "sft", "branches": dict(zip(ctx.cfg.copd_branches, _copd_last(ctx)))}),
    # CoPD's monitor (§6): top-k overlap and symmetric KL between exchange partners after every phase.
    StageKind("copd_monitor", "tasks.copd_monitor", _one,
              lambda ctx, a: ("seed", "copd.monitor_prompts", "copd.monitor_topk", "copd.opd.max_new_tokens",
                              "copd.opd.temperature", "weight_shift"),
              lambda a: f"{ARTIFACTS}/analysis/copd_monitor",
              upstream=lambda ctx, a: ("data", "sft", *ctx.names("copd")), tags=("gpu",), listed_as="copd",
              plots=("monitor.png", "weight_shift.png"),
              roles=_copd_monitor_roles),
    # Param-Merge baselines (MOPD 4.1, M2RL): mergekit, base = SFT, only local teachers.
    StageKind("merge", "tasks.merge", _one, lambda ctx, a: ("seed", "merge"),
              lambda a: f"{ARTIFACTS}/merge", upstream=lambda ctx, a: ("sft", *_teachers(ctx)),
              models=lambda ctx, a: tuple((f"merge:{m}", m) for m in ctx.cfg.params.merge.methods),
              roles=lambda ctx, a: {"base": "sft", "teachers": _local_teachers(ctx)}),
    # Analysis (M2RL 3.3): the teachers' changed-weight overlaps against SFT.
    StageKind("weight_shift", "tasks.weight_shift", _one, lambda ctx, a: ("weight_shift",),
              lambda a: f"{ARTIFACTS}/analysis/weight_shift", upstream=lambda ctx, a: ("sft", *_teachers(ctx)), plots=("jaccard.png",),
              roles=lambda ctx, a: {"base": "sft", "teachers": _local_teachers(ctx)}),
    # Analysis (§8): every method's reverse KL / top-k overlap to each domain's teacher along its
    # own rollouts; named by its pipeline (it compares that pipeline's models, as the report).
    StageKind("teacher_fit", "tasks.teacher_fit", lambda ctx: [{"pipeline": ctx.cfg.pipeline}],
              lambda ctx, a: ("seed", "teacher_fit"), lambda a: f"{ARTIFACTS}/analysis/teacher_fit/{a['pipeline']}",
              args=("pipeline",), upstream=lambda ctx, a: ("data", *(s.name for s in _model_stages(ctx))),
              pipeline_keys=_domain_keys("teacher"), tags=("gpu",),
              length_keys=("teacher_fit.max_new_tokens",),
              roles=lambda ctx, a: {"models": {s.name: s.name for s in _model_stages(ctx)}}),
    # One evaluation per model stage, shared by every pipeline that has that model ...
    StageKind("evaluate", "tasks.evaluate",
              lambda ctx: [{"model": s.name} for s in _model_stages(ctx)],
              lambda ctx, a: ("seed", "evaluate"), _eval_out, args=("model",),
              upstream=lambda ctx, a: ("data", a["model"]),
              pipeline_keys=_domain_keys("verifier", "benchmarks"), tags=("gpu",),
              samples=True, length_keys=("evaluate.max_new_tokens",),
              roles=lambda ctx, a: {"model": a["model"]}),
    # The budget curve (ALGORITHMS §9): each curve method's normalised score at its snapshots, against
    # the student rollouts it had sampled by then; named by its pipeline, like the report.
    StageKind("budget_curve", "tasks.budget_curve", lambda ctx: [{"pipeline": ctx.cfg.pipeline}],
              lambda ctx, a: ("seed", "evaluate"), lambda a: f"{ARTIFACTS}/analysis/budget_curve/{a['pipeline']}",
              args=("pipeline",), upstream=lambda ctx, a: ("data", *_curve_stages(ctx), *_curve_references(ctx)),
              pipeline_keys=_domain_keys("verifier", "benchmarks", "teacher"), tags=("gpu",), samples=True, plots=("budget_curve.png",),
              roles=lambda ctx, a: {"curves": {n: n for n in _curve_stages(ctx)},
                                    "evaluations": {n: n for n in _curve_references(ctx)}}),
    # ... and the pipeline's comparison table over them (MOPD 4.1 normalised score, §8).
    StageKind("report", "tasks.report", lambda ctx: [{"pipeline": ctx.cfg.pipeline}],
              lambda ctx, a: ("evaluate",), lambda a: f"{ARTIFACTS}/report/{a['pipeline']}",
              args=("pipeline",), upstream=_report_upstream,
              pipeline_keys=_domain_keys("benchmarks", "teacher"), listed_as="evaluate", plots=("avg_at_k.png", "normalized.png"),
              roles=lambda ctx, a: {"evaluations": {n: n for n in ctx.names("evaluate")}}),
)}

def runtime_keys(kind: str, row: StageKind) -> tuple[str, ...]:
    """The `runtime` keys a stage's results depend on: device and dtype for every stage that runs
    a model; who samples for the ones that sample through it; the process count for the
    data-parallel ones (mopd.runtime). Another setting recomputes exactly those stages."""
    if "gpu" not in row.tags:
        return ()
    return ("runtime.device", "runtime.dtype", *(("runtime.rollout",) if row.samples else ()),
            *(("runtime.processes",) if row.data_parallel else ()))


def generation_lengths(params) -> dict[str, int]:
    """Every generation length the stage table declares (``length_keys``), by dotted key, read
    from a ``Params``: what must fit the model's context with the longest prompt."""
    data = params.model_dump(mode="json")
    out: dict[str, int] = {}
    for row in KINDS.values():
        for key in row.length_keys:
            head, _, rest = key.partition(".*.")
            if rest:  # teacher.*.max_completion_length: every recipe
                out |= {f"{head}.{name}.{rest}": _lookup(sub, rest) for name, sub in data[head].items()}
            else:
                out[key] = _lookup(data, key)
    return out


# What `pipelines.<p>.stages` may list: every kind that is not enabled through another entry.
LISTABLE = tuple(k for k, v in KINDS.items() if v.listed_as is None)
VARIANT_KINDS = tuple(k for k, v in KINDS.items() if v.variants)


def parse_entry(entry: str) -> tuple[str, str | None]:
    """``distill:tropd`` -> ("distill", "tropd"); ``teacher`` -> ("teacher", None)."""
    kind, _, variant = entry.partition(":")
    return kind, (variant or None)


def _stage_name(kind: str, args: dict) -> str:
    return ":".join([kind, *[v for v in args.values() if v]])


def stored(cfg: "Config", out_dir: str) -> str:
    """A stage's output folder under `storage.artifacts` (default ``artifacts``, in the project;
    an absolute path puts every stage's outputs on shared storage)."""
    root = cfg.params.storage.artifacts.rstrip("/")
    return out_dir if root == ARTIFACTS else root + out_dir[len(ARTIFACTS):]


def outside_project(cfg: "Config") -> bool:
    """Whether `storage.artifacts` is outside the project directory (shared storage)."""
    root = Path(cfg.project_dir) / cfg.params.storage.artifacts  # an absolute root replaces the project
    return not root.resolve().is_relative_to(Path(cfg.project_dir).resolve())


def build_graph(cfg: "Config") -> list[StageSpec]:
    """The stages of ``cfg.pipeline`` in a topological order."""
    wanted: dict[str, list[str | None]] = {}
    for entry in cfg.pipe.stages:
        kind, variant = parse_entry(entry)
        wanted.setdefault(kind, []).append(variant)
    for kind, row in KINDS.items():
        if row.listed_as and row.listed_as in wanted:
            wanted.setdefault(kind, [None])
    ctx = _Ctx(cfg, wanted)
    for kind, row in KINDS.items():
        if kind not in wanted:
            continue
        for a in row.expand(ctx):
            a = {k: v for k, v in a.items() if v}
            ctx.specs.append(StageSpec(
                name=_stage_name(kind, a), kind=kind, module=row.module, out_dir=stored(cfg, row.out_dir(a)),
                args=tuple(a.items()), params_keys=row.params(ctx, a) + runtime_keys(kind, row),
                pipeline_keys=row.pipeline_keys(ctx, a), upstream=row.upstream(ctx, a),
                domains=(a["domain"],) if row.per_domain else tuple(cfg.domains),
                tags=row.tags, models=row.models(ctx, a), roles=_roles(row, ctx, a),
                data_parallel=row.data_parallel))
    specs = ctx.specs
    names = {s.name for s in specs}
    for s in specs:
        missing = [u for u in s.upstream if u not in names]
        if missing:
            raise ValueError(f"pipelines.{cfg.pipeline}.stages: stage {s.name!r} needs {missing}, "
                             f"which the pipeline does not run")
    return _topological(specs)


def _roles(row: StageKind, ctx: _Ctx, a: dict) -> tuple[tuple[str, Any], ...]:
    roles = ({"data": "data"} if "data" in row.upstream(ctx, a) else {}) | row.roles(ctx, a)
    return tuple((role, who if isinstance(who, str) else tuple(who.items())) for role, who in roles.items())


def _topological(specs: list[StageSpec]) -> list[StageSpec]:
    """Stable topological order: the table order, except that a stage waits for its upstream
    (multi-round stages alternate kinds: round_teacher:3 needs multiround:2)."""
    done: set[str] = set()
    out: list[StageSpec] = []
    pending = list(specs)
    while pending:
        ready = next(s for s in pending if all(u in done for u in s.upstream))
        out.append(ready)
        done.add(ready.name)
        pending.remove(ready)
    return out


def levels(specs: list[StageSpec]) -> list[list[StageSpec]]:
    """Stages grouped by depth (longest upstream chain); used to share cores between the stages
    that can run at the same time."""
    depth: dict[str, int] = {}
    for s in specs:  # specs are topologically ordered
        depth[s.name] = 1 + max((depth[u] for u in s.upstream), default=-1)
    out: list[list[StageSpec]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for s in specs:
        out[depth[s.name]].append(s)
    return out


def get_spec(cfg: "Config", name: str) -> StageSpec:
    for s in build_graph(cfg):
        if s.name == name:
            return s
    raise ValueError(f"no stage {name!r} in pipeline {cfg.pipeline!r}")


def all_stages(cfg: "Config") -> dict[str, tuple[str, StageSpec]]:
    """Every stage of every pipeline: name -> (the first pipeline that runs it, its spec)."""
    out: dict[str, tuple[str, StageSpec]] = {}
    for pipeline in cfg.pipelines.pipelines:
        for spec in build_graph(cfg.for_pipeline(pipeline)):
            out.setdefault(spec.name, (pipeline, spec))
    return out


def check_shared_stages(cfg: "Config") -> None:
    """A stage name must mean one computation in every pipeline that runs it (its outputs and
    cache entry are shared): e.g. two pipelines over different domain sets cannot share `sft`."""
    seen: dict[str, tuple[str, StageSpec]] = {}
    for pipeline in cfg.pipelines.pipelines:
        for spec in build_graph(cfg.for_pipeline(pipeline)):
            if spec.name not in seen:
                seen[spec.name] = (pipeline, spec)
                continue
            other, first = seen[spec.name]
            a, b = first.identity(), spec.identity()
            if a != b:
                diff = "; ".join(f"{k}: {a[k]} vs {b[k]}" for k in a if a[k] != b[k])
                raise ValueError(
                    f"pipelines {other!r} and {pipeline!r} both run stage {spec.name!r}, but it "
                    f"differs ({diff}); a stage's outputs are shared by name across pipelines, so "
                    f"pipelines that share a stage must agree on its domains and upstream stages "
                    f"(give one of them a variant, or the same domains and stages)")


def config_sections(cfg: "Config", spec: StageSpec) -> dict[str, Any]:
    """The exact configuration a stage reads: its params.yaml and pipelines.yaml keys."""
    params = cfg.params.model_dump(mode="json")
    out: dict[str, Any] = {k: _lookup(params, k) for k in spec.params_keys}
    if "runtime.processes" in out:  # per kind: another kind's count does not rerun this stage
        out["runtime.processes"] = cfg.params.runtime.processes_for(spec.kind)
    pipes = cfg.pipelines.model_dump(mode="json")
    for k in spec.pipeline_keys:
        out[f"pipelines:{k}"] = _lookup(pipes, k)
    return out


def _lookup(data: Any, dotted: str) -> Any:
    """The plain-data value of a dotted key, e.g. ``teacher.math`` (used in cache keys)."""
    for part in dotted.split("."):
        data = data[part]
    return data


def static_key_inputs(cfg: "Config", spec: StageSpec) -> dict[str, Any]:
    """The part of a stage's key known before its upstream stages have run. Config values are
    taken with credentials redacted (URL passwords, secret-named keys): they are recorded in
    result.json, and a new password does not change what a stage computes."""
    out = {
        "stage": spec.name,
        "domains": list(spec.domains),
        "config": redact_secrets(config_sections(cfg, spec)),
        "code": code_files(spec.module),
    }
    finished = pretrained_teachers(cfg, spec)
    if finished:  # only then: every other stage's key is what it was
        out["pretrained_teachers"] = finished
    return out


def finished_teachers(cfg: "Config", spec: StageSpec) -> dict[str, str]:
    """``{domain: folder or hub id}`` of the finished teachers (`teacher: {source: pretrained}`)
    whose `domains.<d>.teacher` key a stage reads (its cache key and its DVC deps follow them)."""
    out = {}
    for key in spec.pipeline_keys:
        parts = key.split(".")
        if parts[0] == "domains" and parts[-1] == "teacher" and parts[1] in cfg.pipelines.domains \
                and cfg.pipelines.domains[parts[1]].teacher.source == "pretrained":
            out[parts[1]] = cfg.teacher_model(parts[1])
    return out


def pretrained_teachers(cfg: "Config", spec: StageSpec) -> dict[str, str]:
    """``{domain: content hash}`` of the finished teachers a stage reads: a local folder's files
    hashed (new weights rerun the stage), a hub id by name."""
    return {d: hash_inputs(hash_tree(Path(m))) if Path(m).is_dir() else m
            for d, m in finished_teachers(cfg, spec).items()}


def with_upstream(static: dict[str, Any], spec: StageSpec, upstream_hashes: dict[str, str]
                  ) -> dict[str, Any]:
    return {**static, "upstream": {u: upstream_hashes[u] for u in spec.upstream}}


def key_inputs(cfg: "Config", spec: StageSpec, upstream_hashes: dict[str, str]) -> dict[str, Any]:
    """Everything a stage's cache key is made of (recorded in result.json, so `mopd plan` can say
    what changed): its name and domains, config sections, upstream content hashes and the sha256
    of every project module it imports (:func:`mopd.codedeps.code_files`). Never the pipeline."""
    return with_upstream(static_key_inputs(cfg, spec), spec, upstream_hashes)


def hash_inputs(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def cache_key(cfg: "Config", spec: StageSpec, upstream_hashes: dict[str, str]) -> str:
    return hash_inputs(key_inputs(cfg, spec, upstream_hashes))


def out_path(cfg: "Config", spec: StageSpec) -> Path:
    return cfg.project_dir / spec.out_dir
