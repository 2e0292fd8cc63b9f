"""MOPD trainer mechanics: per-batch domain shares, per-domain routing of teacher scores, and
the distillation loop on a tiny model (teacher == student gives zero K1 reverse KL)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from mopd.config import DistillParams, TinyProfile
from mopd.models import build_base, load_model, load_tokenizer
from mopd.rollout import pack, sample, token_logprobs
from mopd.trainers.distill import draw_domains, teacher_scores, train_mopd
from mopd.tracking import NullTracker

TEXTS = [f"[math] {a}+{b}=\\boxed{{{a + b}}}" for a in range(15) for b in range(15)]
SMALL = TinyProfile(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_base(SMALL, TEXTS, root / "a", seed=0)
    build_base(SMALL, TEXTS, root / "b", seed=1)
    return root / "a", root / "b"


def test_draw_domains_keeps_exact_shares():
    rng = random.Random(0)
    got = Counter(draw_domains(["math", "code", "if"], {"math": 0.5, "code": 0.25, "if": 0.25}, 8, rng))
    assert got == {"math": 4, "code": 2, "if": 2}
    got = Counter(draw_domains(["a", "b", "c"], None, 7, rng))
    assert sorted(got.values()) == [2, 2, 3]


def test_teacher_scores_route_each_row_to_its_domain(two_models):
    a, b = two_models
    tok = load_tokenizer(a)
    ta, tb = load_model(a).eval(), load_model(b).eval()
    samples = sample(ta, tok, ["[math] 1+2=", "[math] 3+4="], n=2, max_new_tokens=5, temperature=1.0, seed=0)
    ids, attn, mask = pack(samples, tok.pad_token_id)
    u, top_ids, top_lp = teacher_scores({"x": ta, "y": tb}, {"x": [0, 2], "y": [1, 3]}, ids, attn, topk=4)
    with torch.no_grad():
        ref_a, ref_b = token_logprobs(ta, ids, attn), token_logprobs(tb, ids, attn)
    m = mask.bool()
    for row, ref in ((0, ref_a), (2, ref_a), (1, ref_b), (3, ref_b)):
        assert torch.allclose(u[row][m[row]], ref[row][m[row]], atol=1e-5)
    assert not torch.allclose(ref_a[m], ref_b[m], atol=1e-3)  # the two teachers really differ
    assert top_ids.shape == (4, ids.shape[1], 4)
    # the sampled token's teacher log-prob never exceeds the teacher's best log-prob there
    assert bool((u[m] <= top_lp[..., 0][m] + 1e-6).all())


@pytest.mark.parametrize("objective", ["mopd_pg", "mopd_topk"])
def test_distill_with_teacher_equal_to_student_has_zero_kl(two_models, tmp_path, objective):
    a, b = two_models
    params = DistillParams(objective=objective, max_steps=2, prompts_per_step=2, samples_per_prompt=2,
                           max_new_tokens=5, topk=4)
    prompts = {"x": [{"prompt": "[math] 1+1=", "reference": "2"}],
               "y": [{"prompt": "[math] 2+2=", "reference": "4"}]}
    tracker = NullTracker()
    history = train_mopd(a, {"x": a, "y": a}, prompts, tmp_path, params, seed=0, tracker=tracker)
    kl = [v for _, v in history["distill/reverse_kl"]]
    assert len(kl) == 2 and abs(kl[0]) < 1e-4
    assert (tmp_path / "model" / "model.safetensors").is_file()
    # a different teacher gives a clearly non-zero K1 estimate on the same rollouts (its sign
    # over 20 tokens of two near-uniform random models is noise; its size is not)
    history = train_mopd(a, {"x": b, "y": b}, prompts, tmp_path / "b", params, seed=0, tracker=tracker)
    assert abs(history["distill/reverse_kl"][0][1]) > 100 * max(abs(kl[0]), 1e-6)


def test_distill_rejects_domain_without_prompts(two_models, tmp_path):
    a, _ = two_models
    with pytest.raises(ValueError, match=r"no prompts for domain\(s\) \['y'\]"):
        train_mopd(a, {"x": a, "y": a}, {"x": [{"prompt": "p"}]}, tmp_path, DistillParams(max_steps=1),
                   seed=0, tracker=NullTracker())
