"""Figure builders: EMA against a naive reference, each figure saved as a real PNG."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mopd.plots import difficulty_histogram, ema, score_table_chart, training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(fig, path):
    fig.savefig(path, dpi=60)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas
    return img


def test_ema_matches_naive_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    a = 0.8
    ref, s = [], 0.0
    for t, v in enumerate(x):
        s = a * s + (1 - a) * v
        ref.append(s / (1 - a ** (t + 1)))
    np.testing.assert_allclose(ema(x, a), ref, rtol=1e-12)
    assert ema([3.0, 3.0, 3.0], 0.9).tolist() == pytest.approx([3.0, 3.0, 3.0])  # debiased: no pull to 0
    out = ema([1.0, math.nan, 1.0], 0.5)
    assert out[1] == 1.0 and out[2] == 1.0
    with pytest.raises(ValueError, match="smoothing must be in"):
        ema([1.0], 1.0)


def test_training_curves_png(tmp_path):
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(1)
    history = {
        "reward": [(s, 0.01 * s + rng.normal(scale=0.2)) for s in range(200)],
        "loss": [(s, 1.0 / (s + 1)) for s in reversed(range(100))],  # unsorted input
        "kl": [(0, 0.5)],
        "entropy": [(s, 2.0 - 0.001 * s) for s in range(50)],
    }
    fig = training_curves(history, "distill")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["reward", "loss", "kl", "entropy"]
    raw, smooth = visible[1].get_lines()
    assert list(raw.get_xdata()[:3]) == [0, 1, 2]  # sorted by step
    np.testing.assert_allclose(smooth.get_ydata(), ema(raw.get_ydata(), 0.9))
    _png(fig, tmp_path / "curves.png")
    assert plt.get_fignums() == []  # built without pyplot's global state
    with pytest.raises(ValueError, match=r"metric\(s\) \['kl'\] have no points"):
        training_curves({"kl": []}, "x")
    with pytest.raises(ValueError, match="history is empty"):
        training_curves({}, "x")


def test_score_table_chart_png(tmp_path):
    df = pd.DataFrame(
        {"math": [0.0, 1.0, 0.42, 0.91], "if": [0.0, 1.0, 1.12, 0.95], "swe": [0.0, 1.0, np.nan, 0.88]},
        index=["SFT", "Teacher", "Param-Merge (TA)", "MOPD"],
    )
    fig = score_table_chart(df, "Normalised score per domain")
    ax_bar, ax_heat = fig.axes[:2]
    assert len(ax_bar.patches) == 12  # 4 methods x 3 domains
    texts = [t.get_text() for t in ax_heat.texts]
    assert "1.12" in texts and "—" in texts and len(texts) == 12
    _png(fig, tmp_path / "scores.png")
    with pytest.raises(ValueError, match="score table is empty"):
        score_table_chart(pd.DataFrame(), "x")
    with pytest.raises(ValueError, match="non-numeric cells"):
        score_table_chart(pd.DataFrame({"a": ["high"]}, index=["m"]), "x")


def test_difficulty_histogram_png(tmp_path):
    h_before = [40, 5, 3, 2, 3, 4, 6, 9, 60]  # U shape, N = 8
    h_after = [40, 20, 12, 8, 12, 16, 24, 36, 60]
    fig = difficulty_histogram(h_before, h_after)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == h_before + h_after
    assert ax.get_xlabel() == "correct responses c out of N=8"
    _png(fig, tmp_path / "difficulty.png")
    with pytest.raises(ValueError, match="same length"):
        difficulty_histogram([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="counts must be >= 0"):
        difficulty_histogram([1, -2, 3], [1, 2, 3])
