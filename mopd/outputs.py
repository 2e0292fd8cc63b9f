"""A stage's output folder is replaced only by a complete new one (issue 29): the stage builds in a
scratch folder beside it (``.<name>.building``, same filesystem) and the runner swaps it in after
the record is written. Until then the previous outputs, and their record, stay as they were: a
stage that fails, is killed, or loses its tracking store mid-run costs no finished work.

The swap is two renames (old aside, new in) and a removal; a kill between the two renames leaves
no output folder, so the stage is `run` again (its record went with the old folder), and the
debris (``.building``, ``.previous``) is removed when the stage next starts.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("mopd.stage")


def building_dir(final: Path) -> Path:
    """Where the stage building ``final`` writes, until it is swapped in."""
    return final.parent / f".{final.name}.building"


def previous_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.previous"


def begin(final: Path) -> Path:
    """A fresh, empty scratch folder for ``final``'s next outputs. Debris of an earlier run killed
    mid-build or mid-swap is removed first (and said)."""
    build = building_dir(final)
    for debris in (build, previous_dir(final)):
        if debris.exists():
            log.warning("removing %s: left by an earlier run of this stage that did not finish", debris)
            shutil.rmtree(debris)
    build.mkdir(parents=True)
    return build


def swap_in(build: Path, final: Path) -> None:
    """Make the complete folder ``build`` the stage's output folder ``final``."""
    previous = previous_dir(final)
    if final.exists():
        os.replace(final, previous)
    os.replace(build, final)
    shutil.rmtree(previous, ignore_errors=True)


def abandon(build: Path) -> None:
    """Remove the scratch folder of a stage that failed (its previous outputs stay)."""
    shutil.rmtree(build, ignore_errors=True)
