"""Distillation methods: one spec per method, registered once (ALGORITHMS §1-§5).

A :class:`MethodSpec` says everything the configuration and the trainer need to know about a
method: its name (``distill.objective``), its own settings model (what ``distill.objective_params``
may set, with types and ranges), the batch fields its loss reads, and what it combines with —
weighted teachers (K1-mixable), Uni-OPD's calibrated advantages, TrOPD's prefix tokens, data
parallelism — plus the shapers it brings itself. Nothing else in the code lists methods: the
configuration validates against :data:`METHODS`, the trainer builds its batch, its shapers and its
data-parallel refusals from the spec, and :data:`mopd.objectives.OBJECTIVES` is a view of it.

Torch-free: loading the configuration (the Prefect flow process) must not import torch, so a spec
names its loss and shaper factory as ``"module:function"`` strings, imported only by the trainer.

Adding a method (docs/methods.md): a module that defines its loss and calls
:func:`register_method`, placed in :mod:`mopd.opd.plugins` (every module there is imported with the
registry, and counted in the code identity of the stages that use it).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, Field

from mopd.settings.base import Strict

# The fields a loss may read, besides mask_BT (mopd.objectives.registry.DistillBatch; kept here as
# names so that a spec is checked without importing torch; a test checks the two agree).
BATCH_FIELDS = ("student_logprobs_BT", "old_student_logprobs_BT", "teacher_logprobs_BT", "advantages_BT",
                "teacher_topk_ids_BTK", "teacher_topk_logprobs_BTK", "student_topk_logprobs_BTK",
                "student_entropy_BT", "prefix_student_logprobs_BT", "prefix_mask_BT", "mask_BT")
# Settings of the distill section a loss may take besides its own (``takes``): the §1 clip, the
# averaging, and a seeded generator for losses that draw (TrOPD's trust mask).
SECTION_ARGS = ("clip", "token_mean", "generator")


@dataclass(frozen=True)
class MethodSpec:
    """One distillation method. ``loss`` is ``"module:function"`` (or, for a method defined in
    process, the function itself), called as ``fn(batch: DistillBatch, **params, **taken) ->
    (loss, metrics)``; ``shapers`` (optional), the same, builds the method's own shapers
    (``fn(params: its params model, section: DistillParams) -> [Shaper]``)."""

    name: str
    loss: str | Callable[..., Any]
    params: type[BaseModel]  # the method's own settings: `distill.objective_params`
    requires: tuple[str, ...]  # DistillBatch fields the loss reads
    takes: tuple[str, ...] = ("token_mean",)  # SECTION_ARGS the loss receives
    k1_mixable: bool = False  # uses only the sampled token's teacher log-prob: weighted teachers are exact
    calibratable: bool = False  # uses `advantages_BT` when given (Uni-OPD calibration, CoPD)
    prefix_loss: bool = False  # has a term on TrOPD teacher-prefix tokens
    row_local: bool = True  # its loss sums per-row terms (False: it selects over the whole batch, so under
    # data parallelism every process computes it over the whole gathered batch: mopd.opd.update.Update)
    shapers: str | Callable[..., list] | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.requires) - set(BATCH_FIELDS))
        bad_takes = sorted(set(self.takes) - set(SECTION_ARGS))
        if unknown or bad_takes:
            raise ValueError(f"method {self.name!r}: unknown DistillBatch field(s) {unknown}" if unknown else
                             f"method {self.name!r}: takes {bad_takes}, not among {list(SECTION_ARGS)}")
        for ref in filter(None, (self.loss, self.shapers)):
            if isinstance(ref, str) and ref.count(":") != 1:
                raise ValueError(f"method {self.name!r}: {ref!r} must be 'module:function'")

    def loss_fn(self) -> Callable[..., Any]:
        return _resolve(self.loss)

    def shaper_factory(self) -> Callable[..., list] | None:
        return _resolve(self.shapers) if self.shapers else None


def _resolve(ref: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS` (a name is registered once)."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a method (tests that register their own)."""
    METHODS.pop(name, None)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; valid names: {sorted(METHODS)}") from None


# --------------------------------------------------------------------------- settings models
# Each range's `description` is the rule an error message states.
EpsLow = Annotated[float, Field(gt=0, lt=1, description="a number in (0, 1)")]
EpsHigh = Annotated[float, Field(gt=0, description="a number > 0")]


class NoParams(Strict):
    """A method without settings of its own."""


class PPOParams(Strict):
    """The PPO clip of the policy-gradient surrogate (ALGORITHMS §1), used with several optimiser
    steps per rollout batch (`distill.epochs` / `distill.minibatches`)."""

    eps_low: EpsLow = 0.2
    eps_high: EpsHigh = 0.2


class TrOPDParams(PPOParams):
    prefix_beta: Annotated[float, Field(ge=0, description="a number >= 0")] = 0.001  # β of the prefix NLL


class OutlierParams(PPOParams):
    tau: Annotated[float, Field(le=0, description="a number <= 0 (a threshold on u - s)")] = -5.0


class EntropyParams(PPOParams):
    frac: Annotated[float, Field(gt=0, le=1, description="a number in (0, 1]")] = 0.2


class JSDParams(PPOParams):
    beta: Annotated[float, Field(ge=0, le=1, description="a number in [0, 1]")] = 0.5


# --------------------------------------------------------------------------- the built-in methods
_R = "mopd.objectives.registry"
_TOPK = ("student_topk_logprobs_BTK", "teacher_topk_logprobs_BTK", "mask_BT")
_TROPD = ("student_logprobs_BT", "teacher_logprobs_BT", *_TOPK)
_K1 = ("student_logprobs_BT", "teacher_logprobs_BT", "mask_BT")

for _spec in (
    MethodSpec("mopd_pg", f"{_R}:mopd_pg", PPOParams, ("student_logprobs_BT", "mask_BT"),
               takes=("clip", "token_mean"), k1_mixable=True, calibratable=True,
               summary="§1 K1 policy gradient, A = clip(u - s) (MOPD 3.2.1)"),
    MethodSpec("mopd_topk", f"{_R}:mopd_topk", NoParams, _TOPK,
               summary="§2 top-k reverse KL with the -p+q truncation correction (MOPD 3.2.2)"),
    MethodSpec("tropd", f"{_R}:tropd", TrOPDParams, _TROPD, takes=("clip", "token_mean", "generator"),
               prefix_loss=True, row_local=False,  # its trust mask draws over the whole batch
               summary="§5 TrOPD: K1 PG on trusted tokens, top-k FKL on outliers, β·NLL on prefixes"),
    MethodSpec("clip_outlier", f"{_R}:clip_outlier", OutlierParams, _K1, k1_mixable=True,
               summary="§5 Clip Outlier (REOPOLD): r = max(u - s, τ)"),
    MethodSpec("mask_outlier", f"{_R}:mask_outlier", OutlierParams, _K1, k1_mixable=True,
               summary="§5 Mask Outlier: r = 1[u - s > τ](u - s)"),
    MethodSpec("entropy_opd", f"{_R}:entropy_opd", EntropyParams,
               ("student_logprobs_BT", "teacher_logprobs_BT", "student_entropy_BT", "mask_BT"),
               takes=("clip", "token_mean"), k1_mixable=True,
               row_local=False,  # selects the top-entropy tokens of the whole batch
               summary="§5 Entropy-OPD: K1 PG on the batch's highest-entropy tokens"),
    MethodSpec("jsd", f"{_R}:jsd", JSDParams, _TROPD,
               summary="§5 JSD(β): top-k direct term + K1 PG term"),
    MethodSpec("topk_fkl", f"{_R}:topk_fkl", NoParams, _TOPK,
               summary="§5 top-k forward KL on every token (collapses; a baseline)"),
):
    register_method(_spec)

BUILTIN = tuple(METHODS)  # the methods above, in order (the `objective` field's Literal)


def load_plugins() -> list[str]:
    """Import every module of :mod:`mopd.opd.plugins` (each registers its methods); returns their
    names. Called with the registry, so a method placed there needs no other file edited."""
    from mopd.opd import plugins

    names = [m.name for m in pkgutil.iter_modules(plugins.__path__) if not m.name.startswith("_")]
    for name in sorted(names):
        importlib.import_module(f"{plugins.__name__}.{name}")
    return names


load_plugins()
