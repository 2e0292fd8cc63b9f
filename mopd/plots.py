"""Figure builders for stage reports: training curves, score tables, difficulty histograms.

Each returns a ``matplotlib.figure.Figure`` built without pyplot, so no global figure state is
created (stages run in worker threads) and nothing is ever shown; save it with
``fig.savefig(path)`` or ``tracker.log_figure(fig, name)``. The Agg backend is selected for any
pyplot use elsewhere in the process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: never open a window, whatever MPLBACKEND says

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["ema", "training_curves", "score_table_chart", "difficulty_histogram"]


def ema(values_T: Sequence[float], smoothing: float = 0.9) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing), shape (T,).

    ``s_t = smoothing * s_{t-1} + (1 - smoothing) * x_t`` from ``s_{-1} = 0``, divided by
    ``1 - smoothing^(t+1)`` so the first points are not pulled towards 0. NaNs are skipped (the
    previous smoothed value is carried).
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    x_T = np.asarray(values_T, dtype=np.float64)
    out_T = np.empty_like(x_T)
    acc, n = 0.0, 0
    for t, x in enumerate(x_T):
        if math.isfinite(x):
            acc = smoothing * acc + (1.0 - smoothing) * x
            n += 1
        out_T[t] = acc / (1.0 - smoothing**n) if n else math.nan
    return out_T


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def training_curves(
    history: Mapping[str, Sequence[tuple[int, float]]], title: str, *, smoothing: float = 0.9
) -> Figure:
    """One panel per metric: raw ``(step, value)`` points faint, the EMA trend bold.

    On noisy RL curves (reward, KL) the smoothed trend is what one reads; the raw line shows
    the spread. Points are sorted by step.
    """
    if not history:
        raise ValueError("training_curves: history is empty; nothing to plot")
    empty = [name for name, pts in history.items() if len(pts) == 0]
    if empty:
        raise ValueError(f"training_curves: metric(s) {empty} have no points")
    rows, cols = _grid(len(history))
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (name, points) in zip(axes, history.items()):
        pts = sorted((int(s), float(v)) for s, v in points)
        steps = np.array([s for s, _ in pts])
        values = np.array([v for _, v in pts])
        (raw,) = ax.plot(steps, values, alpha=0.3, linewidth=1.0, label="raw")
        ax.plot(steps, ema(values, smoothing), color=raw.get_color(), linewidth=2.0, label=f"EMA {smoothing:g}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    for ax in axes[len(history):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig


def score_table_chart(df, title: str, *, value_fmt: str = "{:.3g}", ci=None) -> Figure:
    """Grouped bars (left) and an annotated heatmap (right) of a methods x columns score table.

    ``df``: pandas DataFrame, index = methods (e.g. "SFT", "MOPD", "Param-Merge (TA)"), columns
    = domains / benchmarks / "normalised"; numeric cells, NaN for missing entries.
    ``ci``: optional (lower, upper) DataFrames shaped like ``df``: drawn as error bars, and the
    heatmap cells read ``value [lo, hi]``.
    """
    if df is None or df.shape[0] == 0 or df.shape[1] == 0:
        raise ValueError("score_table_chart: the score table is empty (need >= 1 method row and >= 1 column)")
    try:
        vals = df.to_numpy(dtype=np.float64)  # methods x columns
    except (TypeError, ValueError) as e:
        raise ValueError(f"score_table_chart: non-numeric cells in the score table: {e}") from None
    methods = [str(m) for m in df.index]
    columns = [str(c) for c in df.columns]
    n_m, n_c = vals.shape
    fig = Figure(figsize=(max(8.0, 1.2 * n_c * 2 + 4), 0.5 * n_m + 3.5), layout="constrained")
    ax_bar, ax_heat = fig.subplots(1, 2, width_ratios=[3, 2])

    width = 0.8 / n_m
    x_C = np.arange(n_c)
    lo_MC = hi_MC = None
    if ci is not None:
        lo_MC = ci[0].reindex(index=df.index, columns=df.columns).to_numpy(dtype=np.float64)
        hi_MC = ci[1].reindex(index=df.index, columns=df.columns).to_numpy(dtype=np.float64)
    for i, method in enumerate(methods):
        yerr = None
        if lo_MC is not None:
            yerr = np.nan_to_num(np.stack([vals[i] - lo_MC[i], hi_MC[i] - vals[i]]).clip(min=0))
        ax_bar.bar(x_C + (i - (n_m - 1) / 2) * width, np.nan_to_num(vals[i]), width, label=method,
                   yerr=yerr, capsize=2 if yerr is not None else 0, error_kw={"linewidth": 0.8})
    ax_bar.set_xticks(x_C, columns, rotation=30, ha="right")
    ax_bar.axhline(0.0, color="black", linewidth=0.6)
    ax_bar.grid(axis="y", alpha=0.3)
    ax_bar.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=min(n_m, 3), frameon=False)

    finite = vals[np.isfinite(vals)]
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    im = ax_heat.imshow(vals, cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1)
    ax_heat.set_xticks(x_C, columns, rotation=30, ha="right")
    ax_heat.set_yticks(np.arange(n_m), methods)
    mid = (vmin + vmax) / 2
    for i in range(n_m):
        for j in range(n_c):
            v = vals[i, j]
            text = "—" if not math.isfinite(v) else value_fmt.format(v)
            if lo_MC is not None and math.isfinite(v) and math.isfinite(lo_MC[i, j]):
                text += f"\n[{value_fmt.format(lo_MC[i, j])}, {value_fmt.format(hi_MC[i, j])}]"
            color = "white" if math.isfinite(v) and v <= mid else "black"  # NaN cells are blank
            ax_heat.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(im, ax=ax_heat, shrink=0.8)
    fig.suptitle(title)
    return fig


def difficulty_histogram(
    h_before: Sequence[int], h_after: Sequence[int], *, title: str = "Prompt difficulty (pass count c of N)"
) -> Figure:
    """Side-by-side bars of the pass-count histograms ``h[c]``, c = 0..N, before and after
    Uni-OPD offline balancing (ALGORITHMS §4, Uni-OPD A.1), with each bar's count written on it."""
    hb = np.asarray(h_before, dtype=np.int64)
    ha = np.asarray(h_after, dtype=np.int64)
    if hb.ndim != 1 or ha.ndim != 1 or hb.shape != ha.shape or hb.size < 2:
        raise ValueError(
            f"difficulty_histogram: h_before and h_after must be 1-D of the same length N+1 >= 2, "
            f"got shapes {hb.shape} and {ha.shape}"
        )
    if (hb < 0).any() or (ha < 0).any():
        raise ValueError("difficulty_histogram: histogram counts must be >= 0")
    n_bins = hb.size
    c = np.arange(n_bins)
    fig = Figure(figsize=(max(6.0, 0.7 * n_bins + 2), 4.0), layout="constrained")
    ax = fig.subplots()
    for offset, h, label in ((-0.2, hb, f"before (n={hb.sum()})"), (0.2, ha, f"after (n={ha.sum()})")):
        bars = ax.bar(c + offset, h, 0.4, label=label)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(c)
    ax.set_xlabel(f"correct responses c out of N={n_bins - 1}")
    ax.set_ylabel("prompts")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    return fig


def weight_shift_chart(table, title: str = "Weight shift: Jaccard overlap of changed weights") -> Figure:
    """Per parameter group (x), one bar per checkpoint pair: the Jaccard overlap of the two
    checkpoints' changed-weight masks; a black tick on each bar marks the random-mask reference
    (the overlap two independent masks with those change rates would have). ``table``: the
    output of :func:`mopd.metrics.weight_shift_pairs`."""
    if table is None or len(table) == 0:
        raise ValueError("weight_shift_chart: the table is empty (need >= 2 RL checkpoints)")
    groups = list(dict.fromkeys(table["group"]))
    pairs = list(dict.fromkeys(zip(table["a"], table["b"])))
    fig = Figure(figsize=(max(7.0, 1.4 * len(groups) + 3), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(pairs)
    x = np.arange(len(groups))
    for i, (a, b) in enumerate(pairs):
        rows = table[(table["a"] == a) & (table["b"] == b)].set_index("group").reindex(groups)
        pos = x + (i - (len(pairs) - 1) / 2) * width
        ax.bar(pos, np.nan_to_num(rows["jaccard"].to_numpy(dtype=float)), width, label=f"{a} ∩ {b}")
        ax.scatter(pos, rows["random_reference"].to_numpy(dtype=float), marker="_", s=200, color="black",
                   zorder=3, label="random-mask reference" if i == 0 else None)
    ax.set_xticks(x, groups)
    ax.set_ylabel("Jaccard overlap")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.suptitle(title)
    return fig


def phase_lines(table, metrics: Sequence[str], title: str) -> Figure:
    """One panel per metric, x = the training point (``point`` index, labelled by ``label``), one
    line per ``pair``: CoPD's top-k overlap and symmetric KL between branches after every phase."""
    if table is None or len(table) == 0:
        raise ValueError("phase_lines: the table is empty")
    labels = list(dict.fromkeys(zip(table["point"], table["label"])))
    fig = Figure(figsize=(max(7.0, 0.8 * len(labels) + 3), 3.6 * len(metrics)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(metrics), 1, sharex=True))
    for ax, metric in zip(axes, metrics):
        for pair, rows in table.groupby("pair", sort=False):
            rows = rows.sort_values("point")
            ax.plot(rows["point"], rows[metric], marker="o", label=pair)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, frameon=False)
    axes[-1].set_xticks([p for p, _ in labels], [lab for _, lab in labels], rotation=30)
    fig.suptitle(title)
    return fig


def budget_curve_chart(table, title: str, *, value: str = "normalized", lo: str = "ci_lo", hi: str = "ci_hi",
                       x: str = "student_rollouts") -> Figure:
    """Score against budget: one line per ``method`` (x = ``x``, y = ``value``) with its interval
    (``lo``..``hi``) shaded: the efficiency plot of an integration method against the others."""
    if table is None or len(table) == 0:
        raise ValueError("budget_curve_chart: the table is empty")
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for method, rows in table.groupby("method", sort=False):
        rows = rows.sort_values(x)
        line, = ax.plot(rows[x], rows[value], marker="o", label=method)
        if lo in rows and hi in rows:
            ax.fill_between(rows[x], rows[lo], rows[hi], color=line.get_color(), alpha=0.15)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(value.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    return fig
