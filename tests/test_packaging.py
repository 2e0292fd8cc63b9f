"""requirements.lock against pyproject.toml: `make install` installs the lock and then the project,
so a dependency missing from the lock, or locked outside its range, is installed unlocked."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _locked() -> dict[str, Version]:
    text = (ROOT / "requirements.lock").read_text()
    return {canonicalize_name(n): Version(v) for n, v in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)}


def test_lock_pins_every_dependency_inside_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = _locked()
    checked = 0
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={locked[name]}, outside pyproject.toml's {req}: run `make lock`")
        checked += 1
    assert checked >= 30


def test_lock_is_cpu_only_and_hashed():
    locked = _locked()
    assert locked["torch"].local == "cpu"  # only the CPU index has it: PyPI's CUDA torch cannot satisfy it
    assert not [n for n in locked if n.startswith("nvidia-") or n == "triton"]
    text = (ROOT / "requirements.lock").read_text()
    blocks = re.split(r"^(?=[A-Za-z0-9])", text, flags=re.M)[1:]
    assert len(blocks) == len(locked) and all("--hash=sha256:" in b for b in blocks)
