"""TrOPD off-policy guidance in the trainer (issue 11; ALGORITHMS §5, TrOPD §4.3): prefixes are
sampled from the teacher, the student continues them, the prefix cap follows the cosine schedule,
prefix tokens get β·NLL and only the student's own tokens get the on-policy terms."""

from __future__ import annotations

import functools
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import mopd.trainers.distill as distill_mod
from mopd.chat import PLAIN
from mopd.config import DistillParams
from mopd.models import load_model, load_tokenizer
from mopd.objectives.tropd import cosine_prefix_length
from mopd.rollout import TransformersRollout, encode_prompts
from mopd.teachers import InProcessTeacher
from mopd.tracking import NullTracker
from mopd.trainers.distill import rollout_and_score, teacher_prefixes, train_mopd
from tests.test_distill_learning import PROMPTS, student_and_teacher  # noqa: F401  (fixture)


def test_prefixes_come_from_the_teacher_and_the_student_continues(student_and_teacher):
    s_dir, t_dir = student_and_teacher
    tok = load_tokenizer(s_dir)
    teacher = InProcessTeacher.from_pretrained(t_dir, name="math")
    clients = {"math": teacher}
    ids = encode_prompts(tok, PROMPTS, PLAIN)
    doms = ["math"] * len(PROMPTS)
    pre = teacher_prefixes(clients, ids, doms, share=1.0, l_max=3, temperature=1.0, rng=random.Random(0), seed=5)
    assert all(1 <= len(p) <= 3 for p in pre)
    # the teacher's own samples, same seed: the prefixes are their first l tokens
    full = teacher.generate(ids, max_new_tokens=3, temperature=1.0, seed=5)
    assert all(p == f[:len(p)] for p, f in zip(pre, full))
    none = teacher_prefixes(clients, ids, doms, share=0.0, l_max=3, temperature=1.0, rng=random.Random(0), seed=5)
    assert none == [[]] * len(PROMPTS)
    student = load_model(s_dir)
    with ThreadPoolExecutor(2) as pool:
        samples, scores, _, lens = rollout_and_score(
            TransformersRollout(student, tok, fmt=PLAIN), clients, ids, doms, pool, n=2, max_new_tokens=6, temperature=1.0,
            seed=1, chunks=2, overlap=False, topk=None, prefixes=pre,
            decode=lambda x: tok.decode(x, skip_special_tokens=True), eos_id=tok.eos_token_id)
    for s, n_pre in zip(samples, lens):
        assert s.prompt_ids == ids[s.prompt_index]  # the prefix is part of the response, not the prompt
        assert s.completion_ids[:n_pre] == pre[s.prompt_index] and n_pre == len(pre[s.prompt_index])
        assert len(s.completion_ids) <= 6
        if pre[s.prompt_index][-1] == tok.eos_token_id:
            assert len(s.completion_ids) == n_pre  # the teacher ended the response
        assert s.text == tok.decode(s.completion_ids, skip_special_tokens=True)
    assert all(len(sc.logprobs_C) == len(s.completion_ids) for s, sc in zip(samples, scores))


def test_trainer_anneals_the_prefix_cap_and_puts_beta_nll_on_prefix_tokens(student_and_teacher, tmp_path,
                                                                          monkeypatch):
    s_dir, t_dir = student_and_teacher
    seen = []
    real = distill_mod.get_objective

    def spy(name):
        fn = real(name)

        @functools.wraps(fn)
        def wrapped(batch, **kw):
            loss, metrics = fn(batch, **kw)
            seen.append((batch, kw, metrics))
            return loss, metrics
        return wrapped

    monkeypatch.setattr(distill_mod, "get_objective", spy)
    params = DistillParams(objective="tropd", prefix_share=1.0, max_steps=4, learning_rate=1e-3,
                           prompts_per_step=4, samples_per_prompt=2, max_new_tokens=6, topk=8, overlap=False,
                           objective_params={"prefix_beta": 0.5})
    prompts = {"math": [{"prompt": p, "reference": "0"} for p in PROMPTS]}
    hist = train_mopd(s_dir, {"math": t_dir}, prompts, tmp_path, params, seed=0, tracker=NullTracker())
    caps = [v for _, v in hist["tropd/prefix_cap"]]
    assert caps == [cosine_prefix_length(s, 4, 6) for s in range(4)] == [6, 5, 3, 0]
    lengths = [v for _, v in hist["tropd/prefix_length"]]
    assert all(0 < n <= c for n, c in zip(lengths[:3], caps[:3])) and lengths[3] == 0
    assert len(seen) == 4
    for batch, kw, metrics in seen[:3]:
        pm, m = batch.prefix_mask_BT, batch.mask_BT
        assert pm.sum() > 0 and ((pm > 0) & (m > 0)).sum() == 0  # disjoint: prefix vs student tokens
        assert isinstance(kw["generator"], torch.Generator)  # the trust mask's own seeded stream
        s = batch.prefix_student_logprobs_BT.detach()
        per_seq = torch.stack([(-s[b] * pm[b]).sum() / pm[b].sum() for b in range(pm.shape[0]) if pm[b].sum()])
        assert metrics["prefix_loss"] == pytest.approx(0.5 * float(per_seq.mean()), rel=1e-4)
    # the last step is fully on-policy: no prefix token left
    assert seen[3][0].prefix_mask_BT.sum() == 0


def test_prefix_config_is_checked():
    with pytest.raises(ValueError, match="objective: tropd"):
        DistillParams(prefix_share=0.5)
    DistillParams(objective="tropd", prefix_share=0.5, teacher_transport="http")  # servers generate too
