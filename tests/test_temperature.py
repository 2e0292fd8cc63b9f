"""Issue 25: at a sampling temperature T != 1 the teacher's log-probs are taken at T too, so the
trainer's K1 reward is the reverse KL at T — the quantity `teacher_fit` measures. Transports that
cannot scale (served prompt log-probs) refuse T != 1, before any work."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mopd.analysis import divergence_along_rollouts
from mopd.chat import PLAIN
from mopd.models import build_base, load_model, load_tokenizer
from mopd.opd.sampler import rollout_and_score
from mopd.opd.update import student_quantities
from mopd.rollout import TransformersRollout, encode_prompts, pack, sample_ids
from mopd.teachers import InProcessTeacher
from mopd.teachers.http import HTTPTeacher
from tests.test_distill import SMALL, TEXTS

PROMPTS = ["[math] 1+2=", "[math] 3+4=", "[math] 5+5="]
T = 0.5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("temp")
    build_base(SMALL, TEXTS, root / "s", seed=0)
    build_base(SMALL, TEXTS, root / "t", seed=1)
    return load_model(root / "s").eval(), load_model(root / "t").eval(), load_tokenizer(root / "s")


def _trainer_reverse_kl(student, teacher, tok, temperature, teacher_temperature):
    """The exact per-token reverse KL from the trainer's own quantities: the student's log-probs
    of every vocabulary token (student_quantities at T) against the teacher client's full top-V
    (InProcessTeacher.score at ``teacher_temperature``), along the student's samples at T."""
    samples = [s for s in sample_ids(student, tok, encode_prompts(tok, PROMPTS, PLAIN), n=4, max_new_tokens=6,
                                     temperature=temperature, seed=3) if s.completion_ids]
    V = student.config.vocab_size
    ids_BT, attn_BT, mask_BT = pack(samples, tok.pad_token_id)
    all_ids_BTV = torch.arange(V).expand(*ids_BT.shape, V)
    with torch.no_grad():
        s_BT, s_all_BTV, _ = student_quantities(student, ids_BT, attn_BT, topk_ids_BTK=all_ids_BTV,
                                                temperature=temperature)
    scores = InProcessTeacher(teacher).score([s.prompt_ids for s in samples], [s.completion_ids for s in samples],
                                             topk=V, temperature=teacher_temperature)
    total, tokens = 0.0, 0
    for b, (smp, sc) in enumerate(zip(samples, scores)):
        start = len(smp.prompt_ids)
        for j in range(len(smp.completion_ids)):
            s_V = s_all_BTV[b, start + j].double()
            u_V = torch.empty(V, dtype=torch.double)
            u_V[sc.topk_ids_CK[j]] = sc.topk_logprobs_CK[j].double()
            total += float((s_V.exp() * (s_V - u_V)).sum())
            tokens += 1
            # the sampled token's reward terms are the same quantities
            assert float(sc.logprobs_C[j]) == pytest.approx(float(u_V[smp.completion_ids[j]]), abs=1e-5)
            assert float(s_BT[b, start + j]) == pytest.approx(float(s_V[smp.completion_ids[j]]), abs=1e-5)
    return total / tokens


def test_trainer_and_teacher_fit_compute_the_same_reverse_kl_at_temperature(pair):
    student, teacher, tok = pair
    fit = divergence_along_rollouts(student, teacher, tok, PROMPTS, fmt=PLAIN, n=4, max_new_tokens=6,
                                    temperature=T, seed=3)["reverse_kl"]
    assert _trainer_reverse_kl(student, teacher, tok, T, T) == pytest.approx(fit, rel=1e-4, abs=1e-5)
    # the old behaviour (teacher at temperature 1, student at T) is another quantity
    assert abs(_trainer_reverse_kl(student, teacher, tok, T, 1.0) - fit) > 0.2 * fit


def test_the_routed_scorer_asks_teachers_at_the_sampling_temperature(pair):
    student, teacher, tok = pair
    client = InProcessTeacher(teacher, name="math")
    with ThreadPoolExecutor(2) as pool:
        samples, scores, _, _ = rollout_and_score(
            TransformersRollout(student, tok, fmt=PLAIN), {"math": client}, encode_prompts(tok, PROMPTS, PLAIN),
            ["math"] * len(PROMPTS), pool, n=2, max_new_tokens=5, temperature=T, seed=0, chunks=1, overlap=False,
            topk=None)
    want = client.score([s.prompt_ids for s in samples], [s.completion_ids for s in samples], temperature=T)
    at_one = client.score([s.prompt_ids for s in samples], [s.completion_ids for s in samples])
    for got, w, one in zip(scores, want, at_one):
        torch.testing.assert_close(got.logprobs_C, w.logprobs_C)
    assert any(not torch.allclose(g.logprobs_C, o.logprobs_C) for g, o in zip(scores, at_one) if len(o.logprobs_C))


def test_served_teachers_refuse_another_temperature():
    client = HTTPTeacher("math", ["http://127.0.0.1:9"], max_attempts=1)
    with pytest.raises(ValueError, match="temperature 1 only.*0.7"):
        client.score([[1, 2]], [[3]], temperature=0.7)


def test_configuration_refuses_temperature_with_http_transport(tmp_path):
    import shutil

    import yaml

    from mopd.config import load_config
    from tests.conftest import ROOT

    shutil.copy(ROOT / "pipelines.yaml", tmp_path / "pipelines.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["distill"] |= {"temperature": 0.8, "teacher_transport": "http"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match=r"distill.temperature = 0.8.*teacher_transport: http"):
        load_config(tmp_path, pipeline="full")
    params["distill"]["teacher_transport"] = "inprocess"  # in-process teachers scale their logits: fine
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert load_config(tmp_path, pipeline="full").params.distill.temperature == 0.8
