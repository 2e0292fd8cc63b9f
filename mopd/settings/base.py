"""What every settings model shares: strict pydantic models, the numeric types, name rules and the
short, secret-free rendering of a value in error messages."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_serializer

from mopd.security import redact_secrets

# Every count, size and batch of the configuration is at most this: a larger step count, dataset
# size or batch is no run a machine finishes or holds (`sft.max_steps: 1e30` is a typo, not a plan)
MAX_COUNT = 10**9


def _at_most_max_count(v: int) -> int:
    if v > MAX_COUNT:
        raise ValueError(f"{v:,} is over {MAX_COUNT:,}: no step count, size or batch that large fits what "
                         f"a machine can run or hold")
    return v


PosInt = Annotated[int, Field(gt=0), AfterValidator(_at_most_max_count)]
PosFloat = Annotated[float, Field(gt=0)]
Prob = Annotated[float, Field(ge=0, le=1)]

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
NAME_RULE = "an identifier ([A-Za-z_][A-Za-z0-9_]*, at most 64 characters)"
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LABEL_RULE = "letters, digits, '_', '.', '-' (at most 64, not starting with '.' or '-')"
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Strict(BaseModel):
    """Unknown keys are errors; values are frozen; every float is finite (`.inf` is no learning
    rate)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def check_names(where: str, kind: str, names, pattern: re.Pattern = NAME, rule: str = NAME_RULE) -> None:
    """Names become stage names, folder names and MLflow keys: identifiers only (a `/` or `..`
    in a domain name would write outside the project)."""
    for name in names:
        if not isinstance(name, str) or not pattern.fullmatch(name):
            raise ValueError(f"{where}: {kind} name {short(name)} must be {rule}")


def cut(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def short(value: Any, limit: int = 120) -> str:
    """repr(value), cut to ``limit`` characters and with URL credentials masked: error messages
    stay short and secret-free whatever was written."""
    text = repr(redact_secrets(value))
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def plain(msg: str) -> str:
    """A validator's message without pydantic's "Value error, " prefix."""
    return msg.removeprefix("Value error, ")


@dataclass(frozen=True)
class PipelineFacts:
    """What a section's cross-section check (``check(facts)``) may look at: the pipeline that runs
    the section, its domains, the domains whose teacher it trains, and the dotted key the section
    sits under (``distill``, ``variants.distill.tropd``), which error messages name."""

    key: str
    pipeline: str
    domains: tuple[str, ...]
    local_teachers: tuple[str, ...]
    remote_teachers: tuple[str, ...] = ()  # domains scored through a served endpoint


def check_shares(key: str, weights: dict[str, float] | None, facts: PipelineFacts) -> None:
    """Per-batch domain shares (`distill.domain_weights`, `mix_rl.domain_weights`): exactly the
    pipeline's domains, summing to 1."""
    if weights is None:
        return
    if set(weights) != set(facts.domains):
        raise ValueError(f"{key}.domain_weights: keys {sorted(weights)} must be exactly the domains of "
                         f"pipeline {facts.pipeline!r} {list(facts.domains)}")
    if not math.isclose(sum(weights.values()), 1.0, rel_tol=1e-6):
        raise ValueError(f"{key}.domain_weights = {weights}: must sum to 1")


class LoraParams(Strict):
    """LoRA adapters (`peft`) instead of full fine-tuning: rank ``r``, scale ``alpha / r``, on
    ``target_modules`` (``all-linear``: every linear layer but the LM head). The stage trains the
    adapters and saves the *merged* weights, so every later stage and mergekit read a plain
    checkpoint (mopd.lora)."""

    r: PosInt = 16
    alpha: PosFloat = 32.0
    dropout: Prob = 0.0
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class LoraOption(Strict):
    """A section that may train through LoRA (`lora: {r: ..}`; null: full fine-tuning). Left out
    of the section's dump while null, so adding the option changed no existing cache key."""

    lora: LoraParams | None = None

    @model_serializer(mode="wrap")
    def _without_unset_lora(self, handler):
        out = handler(self)
        if isinstance(out, dict) and out.get("lora") is None:
            out.pop("lora", None)
        return out
