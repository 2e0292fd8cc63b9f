"""CoPD (ALGORITHMS §6): the stage table (cycles x phases x branches, hub-and-spoke, Phase II
teachers = the partners' weights of the same cycle), Phase II's advantages (native GRPO + the
partner's token signal, which changes when the partner changes), the final merge and monitor."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import random

import pytest
import torch

from mopd.analysis import divergence_along_rollouts
from mopd.chat import PLAIN
from mopd.config import CoPDOPDParams, ConfigError, load_config
from mopd.graph import build_graph
from mopd.models import build_base, load_model, load_tokenizer
from mopd.objectives import group_advantages
from mopd.rollout import TransformersRollout, encode_prompts, pack, sample_ids
from mopd.teachers import InProcessTeacher
from mopd.opd.loop import Student
from mopd.trainers.copd import phase2_batch
from mopd.trainers.distill import student_quantities
from tests.conftest import micro_params
from tests.test_distill import SMALL, TEXTS, full_logits_reference
from tests.test_graph import _pipes, _project

COPD = ["data", "base", "sft", "copd", "evaluate"]


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("copd-models")
    for i, name in enumerate(("k", "j1", "j2")):
        build_base(SMALL, TEXTS, root / name, seed=i)
    return root / "k", root / "j1", root / "j2"


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    got = group_advantages(r, g)
    # group 0: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²) / 3) = 0.5
    want0 = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    assert torch.allclose(got[:4], want0)
    assert torch.equal(got[4:], torch.zeros(5))  # equal rewards, and a group of one: no signal


def test_copd_stage_table_hub_and_spoke(tmp_path):
    params = micro_params()
    params["copd"].update(cycles=3, hub="code")
    cfg = load_config(_project(tmp_path, params, _pipes(c={"domains": ["math", "code", "if"], "stages": COPD})),
                      pipeline="c")
    graph = {s.name: s for s in build_graph(cfg)}
    names = [n for n in graph if n.startswith("copd:")]
    assert len(names) == 3 * 2 * 3 and "copd:3:opd:if" in names
    assert graph["copd:1:rl:math"].upstream == ("data", "sft")
    assert graph["copd:2:rl:math"].upstream == ("data", "copd:1:opd:math")  # from its own Phase II
    # Phase II teachers are the partners' Phase I of the *same* cycle; K=3: hub-and-spoke through code
    assert graph["copd:2:opd:code"].upstream == ("data", "copd:2:rl:code", "copd:2:rl:math", "copd:2:rl:if")
    assert graph["copd:2:opd:math"].upstream == ("data", "copd:2:rl:math", "copd:2:rl:code")
    assert graph["copd:2:opd:if"].upstream == ("data", "copd:2:rl:if", "copd:2:rl:code")
    assert graph["copd_merge"].upstream == ("sft", "copd:3:opd:math", "copd:3:opd:code", "copd:3:opd:if")
    assert graph["copd_merge"].models == (("copd", "model"),)
    assert "evaluate:copd_merge" in graph and set(graph["copd_monitor"].upstream) >= set(names)
    assert graph["copd:1:rl:if"].params_keys == ("seed", "copd.rl_steps", "teacher.if", "runtime.device",
                                                        "runtime.dtype")
    assert graph["copd:1:opd:if"].domains == ("if",)
    # K = 2: both directions, no hub needed
    params["copd"].update(branches=["math", "if"], hub=None)
    graph = {s.name: s for s in build_graph(load_config(_project(tmp_path, params, _pipes(
        c={"domains": ["math", "code", "if"], "stages": COPD})), pipeline="c"))}
    assert graph["copd:1:opd:math"].upstream == ("data", "copd:1:rl:math", "copd:1:rl:if")
    assert graph["copd:1:opd:if"].upstream == ("data", "copd:1:rl:if", "copd:1:rl:math")
    assert not any(n.endswith(":code") for n in graph if n.startswith("copd:"))


@pytest.mark.parametrize("copd, message", [
    ({"hub": None}, "copd.hub = None: with 3 branches"),
    ({"hub": "chem"}, r"copd.hub: \['chem'\] not domain"),
    ({"hub": "gsm8k"}, "copd.hub = 'gsm8k'"),
    ({"branches": ["math"]}, "at least two branches"),
    ({"branches": ["math", "math"]}, "listed more than once"),
    ({"branches": ["math", "chem"]}, r"copd.branches: \['chem'\] not domain"),
    ({"branches": ["math", "gsm8k"]}, r"\['gsm8k'\] are not domains"),
])
def test_copd_config_errors_name_the_key(tmp_path, copd, message):
    params = micro_params()
    params["copd"].update(copd)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(_project(tmp_path, params, _pipes(c={"domains": ["math", "code", "if"], "stages": COPD})),
                    pipeline="c")
    assert "params.yaml" in str(err.value)


def _batch(student, tok, partner_dir, seed=3):
    params = CoPDOPDParams(native_prompts=2, group_size=4, cross_prompts=3, cross_samples=2, max_new_tokens=6,
                           beta=0.7, clip=None)
    native = [{"prompt": "[math] 1+2=", "reference": "3"}, {"prompt": "[math] 4+4=", "reference": "8"}]
    cross = {"code": [{"prompt": f"[math] {i}+1=", "reference": str(i + 1)} for i in range(3)]}
    rewards = iter([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])

    def score(texts, refs):
        return [next(rewards) for _ in texts]

    with ThreadPoolExecutor(2) as pool:
        return phase2_batch(student, Student(student, tok, random.Random(0), PLAIN), TransformersRollout(student, tok, fmt=PLAIN),
                            {"code": InProcessTeacher(load_model(partner_dir).eval())}, pool, native, cross,
                            score, params, seed), params


def test_phase2_advantage_is_the_partners_current_signal(three_models):
    """Cross-branch rows: β (log π_partner - log π_branch) with the partner given (CoPD eq. 8); a
    different partner (e.g. the partner after another cycle) changes them, not the native rows."""
    k, j1, j2 = three_models
    tok = load_tokenizer(k)
    student = load_model(k)
    b1, params = _batch(student, tok, j1)
    b2, _ = _batch(student, tok, j2)
    n = b1.n_native
    assert n == 2 * 4 and b1.row_partner == [None] * n + ["code"] * 6
    assert torch.equal(b1.ids_BT, b2.ids_BT)  # the same rollouts of the branch ...
    assert torch.equal(b1.advantages_BT[:n], b2.advantages_BT[:n])  # ... the same native GRPO signal ...
    m = b1.mask_BT[n:].bool()
    assert not torch.allclose(b1.advantages_BT[n:][m], b2.advantages_BT[n:][m])  # ... another partner's
    with torch.no_grad():
        own = student_quantities(student, b1.ids_BT[n:], b1.attn_BT[n:])[0]
        for batch, partner in ((b1, j1), (b2, j2)):
            other = student_quantities(load_model(partner), batch.ids_BT[n:], batch.attn_BT[n:])[0]
            assert torch.allclose(batch.advantages_BT[n:][m], (params.beta * (other - own))[m], atol=1e-5)
    # native rows: each group's normalised reward on every completion token, 0 elsewhere
    want = group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1]), torch.tensor([0] * 4 + [1] * 4))
    nm = b1.mask_BT[:n]
    assert torch.allclose(b1.advantages_BT[:n], want[:, None].float() * nm)
    assert b1.metrics["copd/native_reward"] == pytest.approx(3 / 8)


def test_divergence_along_rollouts_against_itself_and_another(three_models):
    k, j1, _ = three_models
    tok = load_tokenizer(k)
    a, b = load_model(k), load_model(j1)
    prompts = ["[math] 1+2=", "[math] 3+3="]
    same = divergence_along_rollouts(a, a, tok, prompts, fmt=PLAIN, n=2, max_new_tokens=5, seed=0, k=5)
    assert same["reverse_kl"] == pytest.approx(0, abs=1e-9) and same["topk_overlap"] == 1.0
    got = divergence_along_rollouts(a, b, tok, prompts, fmt=PLAIN, n=2, max_new_tokens=5, seed=0, k=5)
    # a naive reference on the same rollouts (same sampler, same seed): full softmax per position
    samples = sample_ids(a, tok, encode_prompts(tok, prompts, PLAIN), n=2, max_new_tokens=5, temperature=1.0, seed=0)
    ids_BT, attn_BT, mask_BT = pack(samples, tok.pad_token_id)
    with torch.no_grad():
        _, la_BTV = full_logits_reference(a, ids_BT, attn_BT)
        _, lb_BTV = full_logits_reference(b, ids_BT, attn_BT)
    m = mask_BT.bool()
    la, lb = la_BTV[m], lb_BTV[m]
    rkl = (la.exp() * (la - lb)).sum(-1)
    skl = ((la.exp() - lb.exp()) * (la - lb)).sum(-1)
    over = [len(set(x.topk(5).indices.tolist()) & set(y.topk(5).indices.tolist())) / 5 for x, y in zip(la, lb)]
    assert got["tokens"] == m.sum()
    assert got["reverse_kl"] == pytest.approx(float(rkl.mean()), rel=1e-6) and got["reverse_kl"] > 0
    assert got["symmetric_kl"] == pytest.approx(float(skl.mean()), rel=1e-6)
    assert got["topk_overlap"] == pytest.approx(sum(over) / len(over))
