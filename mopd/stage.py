"""What a stage's ``run(ctx)`` receives: one :class:`StageContext` (STYLE "The shape of the house").

The stage runner (:mod:`tasks.runner`) builds it from the stage table (:mod:`mopd.graph`): the
stage's name and table arguments, its cache key, its output folder, its upstream outputs — by
stage name and by *role* (``student``, ``teachers``, ``partners``, ...: the graph says which stage
plays which part, so no stage rebuilds a stage name from strings) — and its tracker. The stage
returns :meth:`StageContext.result`; the runner writes ``result.json`` once, last.

Torch-free and config-free at import (the root configuration is only typed here): a stage's code
identity holds this small module, not the whole configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mopd.artifacts import Result, hash_tree
from mopd.chat import PromptFormat, prompt_format
from mopd.checkpoint import checkpoint_dir

if TYPE_CHECKING:
    from mopd.config import Config


@dataclass(frozen=True)
class StageContext:
    """One stage's run: ``roles`` maps a role to an upstream output folder, or to
    ``{domain: folder}`` for a role several stages play (teachers, partners, evaluations)."""

    name: str
    key: str
    cfg: "Config"
    out_dir: Path
    inputs: dict[str, Path]  # upstream stage name -> its output folder
    roles: dict[str, Any]
    tracker: Any
    args: dict[str, str] = field(default_factory=dict)

    def role(self, role: str) -> Path:
        """The output folder of the stage playing ``role`` (e.g. ``student``)."""
        try:
            got = self.roles[role]
        except KeyError:
            raise KeyError(f"stage {self.name}: no upstream stage plays {role!r} "
                           f"(roles: {sorted(self.roles)})") from None
        if not isinstance(got, Path):
            raise TypeError(f"stage {self.name}: role {role!r} is played by several stages; use roles_of()")
        return got

    def roles_of(self, role: str) -> dict[str, Path]:
        """``{domain or label: output folder}`` of the stages playing ``role`` ({} when none)."""
        got = self.roles.get(role, {})
        if isinstance(got, Path):
            raise TypeError(f"stage {self.name}: role {role!r} is played by one stage; use role()")
        return dict(got)

    def has(self, role: str) -> bool:
        return role in self.roles

    def teacher_models(self, domains: list[str]) -> dict[str, Any]:
        """``{domain: checkpoint}`` of the teachers served from a checkpoint: the `teacher:<d>`
        stage's, or a finished teacher's folder or hub id (`source: pretrained`)."""
        out: dict[str, Any] = {d: p / "model" for d, p in self.roles_of("teachers").items() if d in domains}
        for d in domains:
            if self.cfg.domain(d).teacher.source == "pretrained":
                out[d] = self.cfg.teacher_model(d)
        return out

    @property
    def prompt_format(self) -> PromptFormat:
        """How this run's models are asked a prompt (the profile's chat template or plain text)."""
        return prompt_format(self.cfg.params.model_profile)

    @property
    def checkpoint(self) -> dict[str, Any]:
        """The ``checkpoint`` / ``key`` keyword arguments of a trainer: in-stage checkpoints under
        ``.mopd/checkpoints/<stage>``, resumed only under this stage's cache key."""
        return {"checkpoint": checkpoint_dir(self.cfg.project_dir, self.name, self.cfg.params.storage.checkpoints),
                "key": self.key}

    def result(self, metrics: dict[str, float]) -> Result:
        """The stage's Result: its output files with their sha256 and its headline metrics. The
        runner adds the cache key and what it was made of, and writes result.json."""
        # (the runner replaces out_dir, where the stage builds, by the folder it is swapped into)
        return Result(stage=self.name, out_dir=project_relative(self.out_dir, self.cfg.project_dir),
                      files=hash_tree(self.out_dir),
                      metrics={k: float(v) for k, v in metrics.items()})


def project_relative(path: Path, project: Path) -> str:
    """``path`` relative to the project; absolute on shared storage outside it (storage.artifacts)."""
    here, root = Path(path).resolve(), Path(project).resolve()
    return str(here.relative_to(root)) if here.is_relative_to(root) else str(here)


def resolve_roles(roles: tuple[tuple[str, Any], ...], inputs: dict[str, Path]) -> dict[str, Any]:
    """A spec's roles (stage names) as output folders."""
    out: dict[str, Any] = {}
    for role, who in roles:
        out[role] = inputs[who] if isinstance(who, str) else {label: inputs[s] for label, s in who}
    return out
