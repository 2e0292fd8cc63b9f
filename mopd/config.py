"""The root of the configuration: `params.yaml` (hyperparameters) and `pipelines.yaml` (domains and
pipelines), each loaded into one pydantic model that assembles the sections, and validated against
each other in one pass (:func:`validate`).

Each section's model lives next to what reads it (:mod:`mopd.settings`, :mod:`mopd.opd.settings`),
so a stage's code identity holds its own section only; this module is imported by orchestration
(the stage runner, the flow, `mopd plan`, DVC generation), never by a stage's computation. Any
wrong key, type or value fails before any work with a :class:`ConfigError` naming the file, the
dotted key and the offending value.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, get_args

from pydantic import BaseModel, Field, ValidationError, model_validator

from mopd.copd import copd_exchange_pairs
from mopd.domains.local_files import DataFileError, resolve_local
from mopd.graph import (
    DEFAULT_DISTILL_METHOD,
    KINDS,
    LISTABLE,
    VARIANT_KINDS,
    check_shared_stages,
    generation_lengths,
    parse_entry,
)
from mopd.opd.settings import DistillParams, UniOPDParams
from mopd.overrides import OverrideError, overridden
from mopd.overrides import apply as apply_overrides
from mopd.settings.analysis import TeacherFitParams, WeightShiftParams
from mopd.settings.base import (
    IDENT,
    LABEL,
    LABEL_RULE,
    PipelineFacts,
    Strict,
    check_names,
    cut,
    plain,
    short,
)
from mopd.settings.baselines import CascadeRLParams, MixRLParams
from mopd.settings.copd import CoPDOPDParams, CoPDParams
from mopd.settings.data import (
    DataParams,
    DataSourceConfig,
    DomainConfig,
    HubSource,
    HumanEvalSource,
    LocalSource,
    LocalTeacher,
    PretrainedTeacher,
    ReasoningGymSource,
    RemoteTeacher,
    SyntheticSource,
    TeacherSource,
    VerifierKind,
)
from mopd.settings.difficulty import DifficultyParams
from mopd.settings.evaluate import EvaluateParams
from mopd.settings.grpo import GRPOParams
from mopd.settings.merge import MergeMethod, MergeParams
from mopd.settings.model import (
    GGUFProfile,
    PretrainedProfile,
    Profile,
    RuntimeParams,
    TinyProfile,
)
from mopd.settings.multiround import MultiRoundParams
from mopd.settings.offpolicy import OffPolicyFTParams
from mopd.settings.sft import SFTParams
from mopd.yamlio import YamlError, read_yaml_mapping

# The section models, re-exported for callers that assemble or inspect a whole configuration.
__all__ = [
    "CascadeRLParams",
    "CoPDOPDParams",
    "CoPDParams",
    "Config",
    "ConfigError",
    "DataParams",
    "DataSourceConfig",
    "DifficultyParams",
    "DistillParams",
    "DomainConfig",
    "EvaluateParams",
    "GGUFProfile",
    "GRPOParams",
    "HubSource",
    "HumanEvalSource",
    "LocalSource",
    "LocalTeacher",
    "MergeMethod",
    "MergeParams",
    "MixRLParams",
    "MultiRoundParams",
    "OffPolicyFTParams",
    "Params",
    "PipelineConfig",
    "Pipelines",
    "PretrainedProfile",
    "PretrainedTeacher",
    "Profile",
    "ReasoningGymSource",
    "RemoteTeacher",
    "RuntimeParams",
    "SFTParams",
    "SyntheticSource",
    "TeacherFitParams",
    "TeacherSource",
    "TinyProfile",
    "UniOPDParams",
    "VerifierKind",
    "WeightShiftParams",
    "load_config",
    "load_params",
    "load_pipelines",
    "validate",
]

PARAMS_FILE = "params.yaml"
PIPELINES_FILE = "pipelines.yaml"


class ConfigError(ValueError):
    """A configuration file is missing, unparsable or invalid. The message names file, key and value."""


# --------------------------------------------------------------------------------------------
# params.yaml
# --------------------------------------------------------------------------------------------
class StorageParams(Strict):
    """Where stage outputs and in-stage checkpoints live: relative to the project directory (the
    default), or an absolute path — a filesystem every node mounts (NFS), shared by several
    checkouts of the same code and params (`mopd plan` in each sees the same results). Not part of
    any cache key: where an output lives does not change it."""

    artifacts: str = Field(default="artifacts", min_length=1)
    checkpoints: str = Field(default=".mopd/checkpoints", min_length=1)


class Params(Strict):
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    profile: str = "tiny"
    profiles: dict[str, Profile] = Field(default_factory=lambda: {"tiny": TinyProfile()})
    runtime: RuntimeParams = RuntimeParams()
    storage: StorageParams = StorageParams()
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
    def _variants_valid(self) -> Params:
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
                    raise ValueError(f"{where}: {plain(err['msg'])} (a variant inherits every key of "
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
    def _names_and_lengths(self) -> Params:
        check_names("profiles", "profile", self.profiles, LABEL, LABEL_RULE)
        check_names("teacher", "teacher recipe", self.teacher)
        prof = self.profiles.get(self.profile)
        if isinstance(prof, TinyProfile):  # a pretrained model's context is known once loaded
            ctx = prof.max_position_embeddings
            prompt = self.data.max_prompt_length or 0
            lengths = generation_lengths(self)
            for key, n in lengths.items():
                if prompt + n > ctx:
                    raise ValueError(
                        f"{key} = {n}" + (f" + data.max_prompt_length = {prompt}" if prompt else "")
                        + f" does not fit profile {self.profile!r}'s context (max_position_embeddings"
                        f" = {ctx}): lower it or raise the profile's max_position_embeddings")
            if self.sft.max_length > ctx:
                raise ValueError(f"sft.max_length = {self.sft.max_length} exceeds profile "
                                 f"{self.profile!r}'s context (max_position_embeddings = {ctx})")
            # a top-k over more tokens than the vocabulary has (a pretrained model's vocabulary
            # is known once loaded: torch's topk refuses it then)
            topks = {"distill.topk": self.distill.topk, "teacher_fit.topk": self.teacher_fit.topk,
                     "copd.monitor_topk": self.copd.monitor_topk,
                     **{f"variants.distill.{v}.topk": o["topk"] for v, o in self.variants.get("distill", {}).items()
                        if isinstance(o, dict) and isinstance(o.get("topk"), int)}}
            for key, k in topks.items():
                if k > prof.vocab_size:
                    raise ValueError(f"{key} = {k} exceeds profile {self.profile!r}'s vocabulary "
                                     f"(vocab_size = {prof.vocab_size}): a top-k is over the vocabulary's tokens")
        return self

    @model_validator(mode="after")
    def _profile_exists(self) -> Params:
        if self.profile not in self.profiles:
            raise ValueError(
                f"profile {self.profile!r} is not defined under `profiles` "
                f"(defined: {sorted(self.profiles)})"
            )
        return self

    @property
    def model_profile(self) -> TinyProfile | PretrainedProfile | GGUFProfile:
        return self.profiles[self.profile]




# --------------------------------------------------------------------------------------------
# pipelines.yaml
# --------------------------------------------------------------------------------------------

DEFAULT_STAGES = ("data", "base", "sft", "teacher", "difficulty", "distill", "merge", "evaluate")


class PipelineConfig(Strict):
    """A pipeline: its domains and the stages it runs. ``stages`` names stage kinds of the
    stage table (:data:`mopd.graph.KINDS`) and method variants ``<kind>:<variant>``."""

    domains: list[str] = Field(min_length=1)
    stages: list[str] = Field(default_factory=lambda: list(DEFAULT_STAGES), min_length=1)

    @model_validator(mode="after")
    def _entries_valid(self) -> PipelineConfig:
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


class Pipelines(Strict):
    domains: dict[str, DomainConfig] = Field(min_length=1)
    pipelines: dict[str, PipelineConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_and_kinds(self) -> Pipelines:
        check_names("domains", "domain", self.domains)
        check_names("pipelines", "pipeline", self.pipelines)
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
    def _benchmarks_known(self) -> Pipelines:
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
    def _domains_known(self) -> Pipelines:
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
class Config(Strict):
    """Both files, validated against each other, plus the pipeline selected to run."""

    params: Params
    pipelines: Pipelines
    pipeline: str
    project_dir: Path
    # dotted params.yaml key -> value set at trigger time (mopd.overrides): already applied to
    # `params`; kept to pass on to each stage's process and to name them in reasons
    overrides: dict[str, Any] = Field(default_factory=dict)

    def for_pipeline(self, pipeline: str) -> Config:
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

    def teacher_model(self, domain: str) -> str:
        """A finished teacher's folder (relative paths: from the project dir) or hub id."""
        name = self.pipelines.domains[domain].teacher.model
        path = Path(name)
        if not path.is_absolute() and (self.project_dir / path).exists():
            return str(self.project_dir / path)
        return name

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
        branches = self.copd_branches
        return copd_exchange_pairs(branches, hub=self.params.copd.hub if len(branches) > 2 else None)

    @property
    def round_domains(self) -> list[str]:
        """Multi-round MOPD: the domains retrained and distilled again from round 2 on."""
        return list(self.params.multiround.domains) or self.local_teacher_domains

    def facts(self, kind: str, variant: str | None = None) -> PipelineFacts:
        """What the `kind` section (or its variant) is checked against in this pipeline."""
        return PipelineFacts(key=f"variants.{kind}.{variant}" if variant else kind, pipeline=self.pipeline,
                             domains=tuple(self.domains), local_teachers=tuple(self.local_teacher_domains),
                             remote_teachers=tuple(d for d in self.domains
                                                   if self.domain(d).teacher.source == "remote"))

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
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and part < len(node):
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


def _format_errors(path: Path, exc: ValidationError, raw: dict, overrides: Mapping[str, Any] = {}) -> str:
    errors = exc.errors()
    lines = [f"{path}{' with --set overrides' if overrides else ''}: {len(errors)} invalid setting(s):"]
    for err in errors[:MAX_ERRORS]:
        keys, value = _user_path(raw, tuple(err["loc"]))
        key = ".".join(keys) or "<top level>"
        by = overridden(key, overrides)
        if by is not None:
            key = f"{key} (from --set {by})"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (remove it or check its spelling)")
        elif isinstance(value, (dict, list)) and err["type"] in ("value_error", "assertion_error"):
            lines.append(f"  {key}: {cut(plain(err['msg']))}")  # the message names the entry
        else:
            lines.append(f"  {key} = {short(value)}: {cut(plain(err['msg']))}")
    if len(errors) > MAX_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS} more")
    return "\n".join(lines)


def _validate(model: type[BaseModel], path: Path, raw: dict, overrides: Mapping[str, Any] = {}) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc, raw, overrides)) from None
    except RecursionError:
        raise ConfigError(f"{path}: a value nested too deeply (lists or mappings hundreds of levels "
                          f"deep); a configuration is a few levels deep") from None


def load_params(path: Path | str, overrides: Mapping[str, Any] | None = None) -> Params:
    """params.yaml, with ``overrides`` (dotted key -> value, :mod:`mopd.overrides`) applied to the
    file's mapping before validation: an override is checked exactly like the file."""
    path = Path(path)
    raw = _read_yaml(path)
    if overrides:
        try:
            raw = apply_overrides(raw, overrides, str(path))
        except OverrideError as exc:
            raise ConfigError(str(exc)) from None
    return _validate(Params, path, raw, overrides or {})


def load_pipelines(path: Path | str) -> Pipelines:
    path = Path(path)
    return _validate(Pipelines, path, _read_yaml(path))



def load_config(
    project_dir: Path | str = ".",
    *,
    pipeline: str = "full",
    params_file: str = PARAMS_FILE,
    pipelines_file: str = PIPELINES_FILE,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load both files and validate them against each other, with ``overrides`` (dotted
    params.yaml key -> value, set at trigger time) applied. Raises ConfigError before any work."""
    project_dir = Path(project_dir).resolve()
    overrides = dict(overrides or {})
    params = load_params(project_dir / params_file, overrides)
    pipes = load_pipelines(project_dir / pipelines_file)
    if pipeline not in pipes.pipelines:
        raise ConfigError(
            f"{project_dir / pipelines_file}: pipelines.{pipeline}: no such pipeline "
            f"(defined: {sorted(pipes.pipelines)})"
        )
    cfg = Config(params=params, pipelines=pipes, pipeline=pipeline, project_dir=project_dir, overrides=overrides)
    validate(cfg, project_dir / params_file, project_dir / pipelines_file)
    return cfg


def validate(cfg: Config, params_file: Path, pipelines_file: Path) -> None:
    """The one cross-file validation pass: every section the pipeline runs — the base section and
    each variant it lists — is checked against it (``section.check``; a section that shapes the
    stage graph, CoPD's, against every pipeline that lists it);
    then the selected pipeline's local data, and that a stage name means one computation in
    every pipeline (:func:`mopd.graph.check_shared_stages`, which also builds every graph)."""
    params, pipes = cfg.params, cfg.pipelines
    for key, per_kind, what, fits in (
            ("devices_per_stage", params.runtime.devices_per_stage, "runs models", lambda row: "gpu" in row.tags),
            ("processes", params.runtime.processes, "runs data-parallel", lambda row: row.data_parallel),
            ("cluster.resources", params.runtime.cluster.resources, "is", lambda row: True),
            ("cluster.cpus", params.runtime.cluster.cpus, "is", lambda row: True),
            ("cluster.nodes", params.runtime.cluster.nodes, "runs data-parallel", lambda row: row.data_parallel)):
        kinds = sorted(k for k, row in KINDS.items() if fits(row))
        odd = sorted(set(per_kind) - {"default", *kinds}) if isinstance(per_kind, dict) else []
        if odd:
            raise ConfigError(f"{params_file}: runtime.{key}: {odd} not a stage kind that {what} "
                              f"(kinds: {kinds}, or `default`)")
    for kind, nodes in params.runtime.cluster.nodes.items():
        procs = params.runtime.processes_for(kind)
        if nodes > 1 and procs % nodes:
            raise ConfigError(f"{params_file}: runtime.cluster.nodes.{kind} = {nodes} does not divide "
                              f"runtime.processes for {kind!r} ({procs}): each node runs an equal share")
    stray = sorted(set(params.teacher) - set(pipes.domains))  # a typo (`maht`) would be ignored
    if stray:
        near = difflib.get_close_matches(stray[0], list(pipes.domains), n=1)
        raise ConfigError(f"{params_file}: teacher.{stray[0]}: a recipe for a domain {pipelines_file} does not "
                          f"declare (domains: {sorted(pipes.domains)})"
                          + (f"; did you mean teacher.{near[0]}?" if near else ""))
    unknown = [d for d in [*params.copd.branches, params.copd.hub] if d is not None and d not in pipes.domains]
    if unknown:
        raise ConfigError(f"{params_file}: copd.{'hub' if params.copd.hub in unknown else 'branches'}: "
                          f"{unknown} not domain(s) of {pipelines_file} ({sorted(pipes.domains)})")
    for name in pipes.pipelines:
        one = cfg.for_pipeline(name)
        missing = [d for d in one.local_teacher_domains if d not in params.teacher]
        if missing and name == cfg.pipeline:  # another pipeline's recipes are checked when it runs
            raise ConfigError(f"{params_file}: teacher.{missing[0]}: missing recipe for domain {missing[0]!r} "
                              f"of pipeline {name!r} (add a `teacher.{missing[0]}` section)")
        for entry in one.pipe.stages:
            kind, variant = parse_entry(entry)
            if variant and variant not in params.variants.get(kind, {}):
                raise ConfigError(
                    f"{pipelines_file}: pipelines.{name}.stages: {entry!r} needs a `variants.{kind}.{variant}` "
                    f"section in {params_file} (defined: {sorted(params.variants.get(kind, {}))})")
            section = params.stage_params(kind, variant) if hasattr(params, kind) else None
            # the selected pipeline's sections, and everywhere those that shape a graph
            # (check_shared_stages builds every pipeline's)
            if hasattr(section, "check") and (name == cfg.pipeline or getattr(section, "shapes_graph", False)):
                try:
                    section.check(one.facts(kind, variant))
                except ValueError as exc:
                    raise ConfigError(f"{params_file}: {exc}") from None
    _check_local_paths(cfg, pipelines_file)
    try:
        check_shared_stages(cfg)  # also builds every pipeline's graph: missing upstream stages
    except ValueError as exc:
        raise ConfigError(f"{pipelines_file}: {exc}") from None


def _check_local_paths(cfg: Config, file: Path) -> None:
    """Local data of the selected pipeline exists and stays inside the project unless written as
    an absolute path (the rule of :mod:`mopd.domains.local_files`), checked before any work."""
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
                raise ConfigError(f"{file}: domains.{d}.data.{key} = {short(value)}: {exc}") from None
