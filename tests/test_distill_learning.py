"""The distillation trainer learns (issue 11): on a fixed, peaked teacher, every objective lowers
the full-vocabulary reverse KL of the student to the teacher along the student's own rollouts;
several optimiser steps per rollout batch use the PPO ratio against the rollout policy; log-probs
are taken at the sampling temperature."""

from __future__ import annotations

import random

import pytest
import torch

from mopd.chat import PLAIN
from mopd.config import DistillParams
from mopd.models import build_base, load_model, load_tokenizer, save_checkpoint
from mopd.objectives import DistillBatch, get_objective
from mopd.rollout import pack, sample
from mopd.tracking import NullTracker
from mopd.trainers.distill import student_quantities, train_mopd, update_passes
from tests.test_distill import SMALL, TEXTS, full_logits_reference

PROMPTS = ["[math] 1+2=", "[math] 3+4=", "[math] 5+5=", "[math] 7+1="]


def make_student_and_teacher(root, *, teacher_seed: int = 1, steps: int = 60):
    """A random tiny student, and a teacher: another init trained (plain next-token loss, 60
    Adam steps) on the arithmetic texts, so it is peaked and far from the student. The reverse
    KL starts around 4 nats and only a working update can shrink it."""
    build_base(SMALL, TEXTS, root / "student", seed=0)
    build_base(SMALL, TEXTS, root / "teacher", seed=teacher_seed)
    torch.manual_seed(0)
    model, tok = load_model(root / "teacher"), load_tokenizer(root / "teacher")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    enc = tok([t + tok.eos_token for t in TEXTS], return_tensors="pt", padding=True,
              padding_side="right", add_special_tokens=False)
    for _ in range(steps):
        idx = torch.randint(0, len(TEXTS), (32,))
        ids, att = enc["input_ids"][idx], enc["attention_mask"][idx]
        loss = model(input_ids=ids, attention_mask=att, labels=ids.masked_fill(att == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(model, tok, root / "teacher")
    return root / "student", root / "teacher"


@pytest.fixture(scope="module")
def student_and_teacher(tmp_path_factory):
    return make_student_and_teacher(tmp_path_factory.mktemp("learn"))


def reverse_kl(student_dir, teacher_dir, seed: int = 123) -> float:
    """Mean over response tokens of KL(πS(·|prefix) ‖ πT(·|prefix)), full vocabulary, along 16
    fresh student rollouts."""
    student, teacher = load_model(student_dir).eval(), load_model(teacher_dir).eval()
    tok = load_tokenizer(student_dir)
    with torch.no_grad():
        samples = sample(student, tok, PROMPTS, fmt=PLAIN, n=4, max_new_tokens=6, temperature=1.0, seed=seed)
        ids, attn, mask = pack(samples, tok.pad_token_id)
        _, logp_s = full_logits_reference(student, ids, attn)
        _, logp_t = full_logits_reference(teacher, ids, attn)
        kl_BT = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    return float(kl_BT[mask.bool()].mean())


# Measured on this fixture at 60 steps (2 cores): mopd_topk -71%, topk_fkl -96%, tropd -89% of
# the reverse KL. The bounds leave room for other CPUs and thread counts. The policy-gradient
# forms are tested on a same-origin teacher below.
DROP = {"mopd_topk": 0.4, "topk_fkl": 0.6, "tropd": 0.5}


@pytest.mark.parametrize("objective", sorted(DROP))
def test_top_k_objectives_lower_the_reverse_kl(student_and_teacher, tmp_path, objective):
    s_dir, t_dir = student_and_teacher
    params = DistillParams(objective=objective, max_steps=60, learning_rate=1e-2, prompts_per_step=4,
                           samples_per_prompt=4, max_new_tokens=6, topk=8, overlap=False)
    prompts = {"math": [{"prompt": p, "reference": "0"} for p in PROMPTS]}
    before = reverse_kl(s_dir, t_dir)
    train_mopd(s_dir, {"math": t_dir}, prompts, tmp_path, params, seed=0, tracker=NullTracker())
    after = reverse_kl(tmp_path / "model", t_dir)
    assert before > 2.0, before  # the trained teacher is far from the random student
    assert after < (1 - DROP[objective]) * before, (objective, before, after)


@pytest.fixture(scope="module")
def same_origin(tmp_path_factory):
    """MOPD's setting (same-origin teachers, MOPD 4.4.2): the teacher is the student's own init
    after 20 next-token steps on the arithmetic texts; reverse KL ~0.8 nats."""
    return make_student_and_teacher(tmp_path_factory.mktemp("same"), teacher_seed=0, steps=20)


# The policy-gradient forms on the same-origin fixture, 60 steps of 4 prompts x 16 rollouts
# (measured on 2 cores: mopd_pg -78%, clip_outlier -75%, mask_outlier -65%, entropy_opd -62%,
# jsd -66%). tau = -1 makes the outlier rules act on this fixture (at -5 no token is an
# outlier and both equal mopd_pg). On the far teacher above, PG forms with 16 rollouts a step
# barely move (mopd_pg -3%) and mask_outlier *raises* the KL (+78%: masking the most negative
# tokens favours them) — the instability that TrOPD's trust region addresses.
PG_DROP = 0.35
PG_OBJECTIVES = {"mopd_pg": {}, "clip_outlier": {"tau": -1.0}, "mask_outlier": {"tau": -1.0},
                 "entropy_opd": {}, "jsd": {}}


@pytest.mark.parametrize("objective", sorted(PG_OBJECTIVES))
def test_policy_gradient_objectives_lower_the_reverse_kl(same_origin, tmp_path, objective):
    s_dir, t_dir = same_origin
    params = DistillParams(objective=objective, objective_params=PG_OBJECTIVES[objective], max_steps=60,
                           learning_rate=1e-2, prompts_per_step=4, samples_per_prompt=16, max_new_tokens=6,
                           topk=8, overlap=False)
    prompts = {"math": [{"prompt": p, "reference": "0"} for p in PROMPTS]}
    before = reverse_kl(s_dir, t_dir)
    train_mopd(s_dir, {"math": t_dir}, prompts, tmp_path, params, seed=0, tracker=NullTracker())
    after = reverse_kl(tmp_path / "model", t_dir)
    assert before > 0.4, before
    assert after < (1 - PG_DROP) * before, (objective, before, after)


def test_update_passes_cover_every_row_once_per_epoch():
    rng = random.Random(0)
    assert update_passes(DistillParams(), 5, rng) == [[0, 1, 2, 3, 4]]
    passes = update_passes(DistillParams(epochs=3, minibatches=2), 5, rng)
    assert len(passes) == 6
    for e in range(3):
        assert sorted(passes[2 * e] + passes[2 * e + 1]) == [0, 1, 2, 3, 4]


def test_ppo_ratio_against_the_rollout_policy_matches_a_hand_computed_loss():
    torch.manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float32)
    old = torch.randn(2, 4) - 2
    s = (old + torch.tensor([[0, 0.5, -0.5, 0.05], [0, -0.3, 0.3, 0]])).requires_grad_()
    u = old + torch.randn(2, 4)
    batch = DistillBatch(mask_BT=mask, student_logprobs_BT=s, teacher_logprobs_BT=u,
                         old_student_logprobs_BT=old)
    loss, _ = get_objective("mopd_pg")(batch, clip=None, eps_low=0.2, eps_high=0.2)
    # hand: A = u - old (fixed at the rollout), rho = exp(s - old), -min(rho A, clip(rho) A),
    # averaged per sequence over its response tokens, then over sequences
    adv, rho = u - old, torch.exp(s.detach() - old)
    per = -torch.minimum(rho * adv, rho.clamp(0.8, 1.2) * adv)
    want = torch.stack([(per[b] * mask[b]).sum() / mask[b].sum() for b in range(2)]).mean()
    assert torch.allclose(loss, want, atol=1e-6)
    assert not torch.allclose(rho[mask.bool()], torch.ones(5))  # the ratio is not 1 here


def test_several_updates_per_batch_move_the_ratio(student_and_teacher, tmp_path):
    s_dir, t_dir = student_and_teacher
    prompts = {"math": [{"prompt": p, "reference": "0"} for p in PROMPTS]}
    one = train_mopd(s_dir, {"math": t_dir}, prompts, tmp_path / "one",
                     DistillParams(max_steps=2, learning_rate=1e-2, prompts_per_step=4, max_new_tokens=6),
                     seed=0, tracker=NullTracker())
    assert "distill/clipped_fraction" not in one  # one step per batch: ratio = 1, nothing to log
    many = train_mopd(s_dir, {"math": t_dir}, prompts, tmp_path / "many",
                      DistillParams(max_steps=2, learning_rate=1e-2, prompts_per_step=4, max_new_tokens=6,
                                    epochs=4, minibatches=2),
                      seed=0, tracker=NullTracker())
    clipped = [v for _, v in many["distill/clipped_fraction"]]
    assert len(clipped) == 2 and max(clipped) > 0  # later minibatches see a moved policy


def test_log_probs_are_taken_at_the_sampling_temperature(student_and_teacher):
    s_dir, _ = student_and_teacher
    model, tok = load_model(s_dir), load_tokenizer(s_dir)
    samples = sample(model, tok, PROMPTS[:2], fmt=PLAIN, n=2, max_new_tokens=5, temperature=0.7, seed=3)
    ids, attn, mask = pack(samples, tok.pad_token_id)
    s_T, _, _ = student_quantities(model, ids, attn, temperature=0.7)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].double() / 0.7
    ref = torch.nn.functional.pad(torch.log_softmax(logits, -1), (0, 0, 1, 0))
    ref = ref.gather(-1, ids[..., None]).squeeze(-1)
    m = mask.bool()
    assert torch.allclose(s_T[m].double(), ref[m], atol=1e-5)
    s_1, _, _ = student_quantities(model, ids, attn)
    assert not torch.allclose(s_T[m], s_1[m], atol=1e-3)
