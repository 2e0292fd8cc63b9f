"""CoPD's exchange topology (ALGORITHMS §6; CoPD §3.3), torch-free: the DAG (`mopd.graph`), the
config checks and the Phase II trainer share it."""

from __future__ import annotations

from collections.abc import Sequence


def copd_exchange_pairs(branches: Sequence[str], *, hub: str | None = None) -> list[tuple[str, str]]:
    """(student branch k, teacher branch j) pairs for CoPD Phase II (§6).

    K=2 (or ``hub`` None with K=2): both directions. K>2 needs a hub: hub-and-spoke, the hub learns
    from every spoke and every spoke from the hub; spokes do not exchange.
    """
    if len(set(branches)) != len(branches) or len(branches) < 2:
        raise ValueError(f"branches must be >= 2 distinct names, got {list(branches)}")
    if len(branches) == 2 and hub is None:
        a, b = branches
        return [(a, b), (b, a)]
    if hub is None or hub not in branches:
        raise ValueError(f"with {len(branches)} branches a hub from {list(branches)} is required, got hub={hub!r}")
    spokes = [b for b in branches if b != hub]
    return [(hub, s) for s in spokes] + [(s, hub) for s in spokes]
