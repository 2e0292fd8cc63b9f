"""MOPD trainer mechanics: per-batch domain shares, per-domain routing of teacher scores, and
the distillation loop on a tiny model (teacher == student gives zero K1 reverse KL)."""

from __future__ import annotations

import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from mopd.chat import PLAIN
from mopd.config import DistillParams, TinyProfile
from mopd.models import build_base, load_model, load_tokenizer
from mopd.objectives import OBJECTIVES
from mopd.rollout import pack, sample
from mopd.teachers import InProcessTeacher, lay_out
from mopd.trainers.distill import (StepTiming, collect_scoring, draw_domains, objective_kwargs,
                                   student_quantities, submit_scoring, train_mopd)
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


def full_logits_reference(model, ids_BT, attn_BT):
    """Naive reference: log-probs of every token and the full log-softmax, position-aligned."""
    logits = model(input_ids=ids_BT, attention_mask=attn_BT).logits[:, :-1].double()
    logp_BTV = torch.nn.functional.pad(torch.log_softmax(logits, -1), (0, 0, 1, 0))
    return logp_BTV.gather(-1, ids_BT[..., None]).squeeze(-1), logp_BTV


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
    samples = sample(ta, tok, ["[math] 1+2=", "[math] 3+4="], fmt=PLAIN, n=2, max_new_tokens=5, temperature=1.0, seed=0)
    ids, attn, mask = pack(samples, tok.pad_token_id)
    clients = {"x": InProcessTeacher(ta), "y": InProcessTeacher(tb)}
    with ThreadPoolExecutor(2) as pool:
        jobs = submit_scoring(pool, clients, samples, [0, 1, 2, 3], ["x", "y", "x", "y"], topk=4)
        timing = StepTiming()
        scores = collect_scoring(jobs, 4, timing)
    assert timing.teacher > 0 and timing.wait > 0
    u, top_ids, top_lp = lay_out(scores, [len(s.prompt_ids) for s in samples], ids.shape[1], 4)
    with torch.no_grad():
        ref_a, ref_b = full_logits_reference(ta, ids, attn)[0], full_logits_reference(tb, ids, attn)[0]
    m = mask.bool()
    for row, ref in ((0, ref_a), (2, ref_a), (1, ref_b), (3, ref_b)):
        assert torch.allclose(u[row][m[row]].double(), ref[row][m[row]], atol=1e-5)
    assert not torch.allclose(ref_a[m], ref_b[m], atol=1e-3)  # the two teachers really differ
    assert top_ids.shape == (4, ids.shape[1], 4)
    # the sampled token's teacher log-prob never exceeds the teacher's best log-prob there
    assert bool((u[m] <= top_lp[..., 0][m] + 1e-6).all())


def test_student_quantities_match_full_logits(two_models):
    a, _ = two_models
    model, tok = load_model(a), load_tokenizer(a)
    samples = sample(model, tok, ["[math] 1+2=", "[math] 13+4="], fmt=PLAIN, n=2, max_new_tokens=5, temperature=1.0, seed=1)
    ids, attn, mask = pack(samples, tok.pad_token_id)
    top_ids = torch.randint(0, model.config.vocab_size, (*ids.shape, 3))
    s, s_top, ent = student_quantities(model, ids, attn, topk_ids_BTK=top_ids, entropy=True, chunk=7)
    ref_s, ref_logp = full_logits_reference(model, ids, attn)
    m = mask.bool()
    assert torch.allclose(s[m].double(), ref_s[m], atol=1e-5)
    assert torch.allclose(s_top[m].double(), ref_logp.gather(-1, top_ids)[m], atol=1e-5)
    ref_ent = -(ref_logp.exp() * ref_logp).sum(-1)
    assert torch.allclose(ent[m].double(), ref_ent[m], atol=1e-5)
    s.sum().backward()  # differentiable through the chunked path
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradient(two_models, monkeypatch):
    """`runtime.gradient_checkpointing`: the distill student recomputes its activations in the
    backward (non-reentrant checkpoints on), with the gradient it has without them."""
    from mopd import runtime
    from mopd.opd.loop import Student

    a, _ = two_models
    grads = {}
    for on in (False, True):
        monkeypatch.setenv(runtime.GRAD_CKPT_ENV, "1" if on else "0")
        student = Student.load(a, 0, PLAIN)
        assert student.model.is_gradient_checkpointing is on
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        s, _, _ = student_quantities(student.model, ids, torch.ones_like(ids))
        s.sum().backward()
        grads[on] = torch.cat([p.grad.flatten() for p in student.model.parameters() if p.grad is not None])
    assert torch.allclose(grads[False], grads[True], atol=1e-6)


def test_config_objectives_are_the_registry():
    from typing import get_args

    from mopd.config import DistillParams

    assert set(get_args(DistillParams.model_fields["objective"].annotation)) == set(OBJECTIVES)
    assert objective_kwargs("mopd_pg", DistillParams(clip=3.0)) == {"clip": 3.0, "token_mean": False}
    with pytest.raises(ValueError, match=r"\['warp'\] are not parameters of objective 'mopd_topk'"):
        DistillParams(objective="mopd_topk", objective_params={"warp": 1.0})  # refused at load
    unchecked = DistillParams.model_construct(**{**DistillParams().model_dump(), "objective": "mopd_topk",
                                                 "objective_params": {"warp": 1.0}})
    with pytest.raises(ValueError, match=r"\['warp'\] not accepted by objective 'mopd_topk'"):
        objective_kwargs("mopd_topk", unchecked)  # and again where the trainer uses them


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
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


PROMPTS = {"x": [{"prompt": "[math] 1+1=", "reference": "2"}, {"prompt": "[math] 3+5=", "reference": "8"}],
           "y": [{"prompt": "[math] 2+2=", "reference": "4"}]}


def test_chunk_bounds_cover_every_prompt_with_a_half_size_tail():
    from mopd.trainers.distill import chunk_bounds

    assert chunk_bounds(16, 4) == [0, 5, 9, 14, 16]
    assert chunk_bounds(3, 8) == [0, 1, 2, 3] and chunk_bounds(1, 4) == [0, 1]


def test_overlap_changes_timing_not_numbers(two_models, tmp_path):
    a, b = two_models
    runs = {}
    for overlap in (True, False):
        params = DistillParams(max_steps=2, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=5,
                               rollout_chunks=3, overlap=overlap)
        runs[overlap] = train_mopd(a, {"x": b, "y": a}, PROMPTS, tmp_path / str(overlap), params, seed=0,
                                   tracker=NullTracker())
    assert runs[True]["distill/reverse_kl"] == runs[False]["distill/reverse_kl"]
    for h in runs.values():
        for (_, wait), (_, step), (_, share), (_, teach) in zip(
                h["distill/teacher_wait_seconds"], h["distill/step_seconds"], h["distill/teacher_share"],
                h["distill/teacher_seconds"]):
            assert 0 <= wait <= step and share == pytest.approx(wait / step) and teach > 0
        assert all(v > 0 for _, v in h["distill/sample_seconds"])


class _StopReplicaMidStep:
    """Rollout wrapper: after the step's first chunk is sampled (its scoring already sent),
    stop the given servers, so the remaining chunks' requests meet a dead replica."""

    name = "transformers"

    def __init__(self, inner, servers):
        self.inner, self.servers, self.calls = inner, servers, 0

    def sample_ids(self, prompt_ids, **kw):
        out = self.inner.sample_ids(prompt_ids, **kw)
        self.calls += 1
        if self.calls == 1:
            for server, url in self.servers:
                server.should_exit = True
                deadline = time.time() + 10
                while time.time() < deadline:
                    try:
                        httpx.get(f"{url}/health", timeout=0.5)
                    except httpx.HTTPError:
                        break
                    time.sleep(0.05)
        return out

    def update_weights(self, model):
        self.inner.update_weights(model)


def test_killing_a_teacher_replica_mid_step_fails_over_or_names_the_endpoint(two_models, tmp_path):
    from mopd.rollout import TransformersRollout
    from mopd.teachers import HTTPTeacher, TeacherError
    from mopd.teachers.server import create_app
    from tests.test_teachers import run_in_thread

    a, b = two_models
    params = DistillParams(max_steps=2, prompts_per_step=4, samples_per_prompt=1, max_new_tokens=5,
                           rollout_chunks=2, overlap=True)
    reference = train_mopd(a, {"x": b, "y": b}, PROMPTS, tmp_path / "ref", params, seed=0, tracker=NullTracker())
    s1, s2 = (run_in_thread(create_app(load_model(b), name="b")) for _ in range(2))
    (u1, srv1), (u2, srv2) = s1, s2
    client = HTTPTeacher("x", [u1, u2])
    student = load_model(a)
    rollout = _StopReplicaMidStep(TransformersRollout(student, load_tokenizer(a), fmt=PLAIN), [(srv1, u1)])
    history = train_mopd(a, {"x": client, "y": client}, PROMPTS, tmp_path / "fo", params, seed=0,
                         tracker=NullTracker(), rollout=rollout)
    assert client.failovers >= 1
    got = [v for _, v in history["distill/reverse_kl"]]
    want = [v for _, v in reference["distill/reverse_kl"]]
    assert got == pytest.approx(want, abs=1e-4)  # same scores as in-process: no zeros slipped in
    # every replica down mid-step: a clear error naming the domain and both endpoints
    rollout = _StopReplicaMidStep(TransformersRollout(load_model(a), load_tokenizer(a), fmt=PLAIN), [(srv2, u2)])
    with pytest.raises(TeacherError, match=rf"domain 'x'.*{u1}.*{u2}|domain 'x'.*{u2}.*{u1}"):
        train_mopd(a, {"x": client, "y": client}, PROMPTS, tmp_path / "dead", params, seed=0,
                   tracker=NullTracker(), rollout=rollout)


def test_http_transport_starts_local_servers_and_matches_inprocess(two_models, tmp_path):
    import contextlib

    from mopd.config import LocalTeacher
    from mopd.teachers.routing import open_teachers

    a, b = two_models
    params = DistillParams(objective="mopd_topk", max_steps=1, prompts_per_step=3, samples_per_prompt=2,
                           max_new_tokens=5, topk=4)
    want = train_mopd(a, {"x": b, "y": a}, PROMPTS, tmp_path / "in", params, seed=0, tracker=NullTracker())
    routes = {"x": LocalTeacher(), "y": LocalTeacher()}
    with contextlib.ExitStack() as stack:
        clients = open_teachers(routes, {"x": b, "y": a}, transport="http", stack=stack)
        urls = [c.endpoints[0] for c in clients.values()]
        assert len(set(urls)) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
        got = train_mopd(a, clients, PROMPTS, tmp_path / "http", params, seed=0, tracker=NullTracker())
    for key in ("distill/reverse_kl", "distill/loss"):
        assert got[key][0][1] == pytest.approx(want[key][0][1], abs=1e-4)
    for u in urls:  # the servers are stopped with the stage
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{u}/health", timeout=2)


def test_open_teachers_errors_name_the_problem(two_models, monkeypatch):
    import contextlib

    from mopd.config import LocalTeacher, RemoteTeacher
    from mopd.teachers.routing import open_teachers

    a, _ = two_models
    remote = RemoteTeacher(source="remote", endpoints=["http://127.0.0.1:9"], token_env="MOPD_T_TOKEN")
    monkeypatch.delenv("MOPD_T_TOKEN", raising=False)
    with contextlib.ExitStack() as stack:
        with pytest.raises(ValueError, match=r"domains.code.teacher.token_env: .*'MOPD_T_TOKEN' is unset"):
            open_teachers({"code": remote}, {}, transport="inprocess", stack=stack)
        with pytest.raises(ValueError, match=r"no teacher checkpoint for local domain\(s\) \['math'\]"):
            open_teachers({"math": LocalTeacher()}, {}, transport="inprocess", stack=stack)
        monkeypatch.setenv("MOPD_T_TOKEN", "t")
        clients = open_teachers({"code": remote, "math": LocalTeacher()}, {"math": a},
                                transport="inprocess", stack=stack)
        assert clients["code"].endpoints == ["http://127.0.0.1:9"] and clients["math"].name == "math"


def test_weighted_teachers_combine_log_probs_uni_opd_eq4(two_models, tmp_path):
    """Uni-OPD eq. 4: a one-hot row pointing elsewhere is exactly routing to that teacher; a
    mixed row scores with Σ w_i u_i (checked against each teacher scored alone)."""
    from concurrent.futures import ThreadPoolExecutor

    from mopd.rollout import sample
    from mopd.teachers import InProcessTeacher
    from mopd.trainers.distill import StepTiming, mix_teachers

    a, b = two_models
    base = dict(max_steps=2, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=5, overlap=False)
    routed = train_mopd(a, {"x": b, "y": b}, PROMPTS, tmp_path / "r", DistillParams(**base), seed=0,
                        tracker=NullTracker())
    weighted = train_mopd(a, {"x": a, "y": b}, PROMPTS, tmp_path / "w",
                          DistillParams(**base, teacher_weights={"x": {"y": 1.0}}), seed=0, tracker=NullTracker())
    own = train_mopd(a, {"x": a, "y": b}, PROMPTS, tmp_path / "o", DistillParams(**base), seed=0,
                     tracker=NullTracker())
    assert weighted["distill/reverse_kl"] == routed["distill/reverse_kl"]
    assert weighted["distill/reverse_kl"] != own["distill/reverse_kl"]

    ta, tb = InProcessTeacher.from_pretrained(a, name="x"), InProcessTeacher.from_pretrained(b, name="y")
    tok = load_tokenizer(a)
    samples = sample(load_model(a), tok, ["[math] 1+1=", "[math] 2+2="], fmt=PLAIN, n=2, max_new_tokens=5,
                     temperature=1.0, seed=0)
    p, c = [s.prompt_ids for s in samples], [s.completion_ids for s in samples]
    ua, ub = ta.score(p, c), tb.score(p, c)
    with ThreadPoolExecutor(2) as pool:
        mixed = mix_teachers(pool, {"x": ta, "y": tb}, samples, ["x", "x", "y", "y"], ua,
                             {"x": {"x": 0.25, "y": 0.75}}, StepTiming())
    for j in (0, 1):  # domain x: mixed
        assert torch.allclose(mixed[j].logprobs_C, 0.25 * ua[j].logprobs_C + 0.75 * ub[j].logprobs_C, atol=1e-6)
    for j in (2, 3):  # domain y has no row: its routed scores pass unchanged
        assert mixed[j] is ua[j]
    with pytest.raises(ValueError, match="sum to 1"):
        DistillParams(teacher_weights={"x": {"x": 0.5, "y": 0.4}})
    with pytest.raises(ValueError, match="sampled token"):
        DistillParams(objective="mopd_topk", teacher_weights={"x": {"x": 0.5, "y": 0.5}})
    with pytest.raises(ValueError, match="no teacher"):
        train_mopd(a, {"x": a}, PROMPTS, tmp_path / "z", DistillParams(**base, teacher_weights={"x": {"q": 1.0}}),
                   seed=0, tracker=NullTracker())
