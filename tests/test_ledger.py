"""The teacher cost ledger (mopd.teachers.ledger): counts what passes through, changes nothing,
names a shared teacher by its domains, and totals a stage's history (a resumed stage's steps
once each). Retries and failovers over real HTTP replicas: tests/test_teachers_failover.py; the
ledger in MLflow and in the comparison table: tests/test_flow.py."""

from __future__ import annotations

import pytest
import torch

from mopd.models import build_base, load_model
from mopd.teachers import InProcessTeacher
from mopd.teachers.ledger import FIELDS, Ledger, history_totals, step_metrics
from tests.test_teachers import SMALL, TEXTS


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("ledger")
    build_base(SMALL, TEXTS, root / "m", seed=3)
    return InProcessTeacher(load_model(root / "m"), name="m")


def test_metered_teacher_counts_calls_and_returns_the_same_scores(teacher):
    ledger = Ledger()
    shared = ledger.wrap({"math": teacher, "code": teacher, "if": InProcessTeacher(teacher.model, name="x")})
    assert shared["math"] is shared["code"] and shared["if"] is not shared["math"]
    prompts, comps = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    got = shared["math"].score(prompts, comps, topk=2)
    want = teacher.score(prompts, comps, topk=2)
    assert all(torch.equal(g.logprobs_C, w.logprobs_C) and torch.equal(g.topk_ids_CK, w.topk_ids_CK)
               for g, w in zip(got, want))
    outs = shared["code"].generate([[1, 2], [3]], max_new_tokens=4, temperature=1.0, seed=0)
    step = ledger.step()
    assert set(step) == {"code+math", "if"}
    c = step["code+math"]
    assert (c["requests"], c["sequences"], c["prefill_tokens"], c["generated_tokens"]) \
        == (2, 4, (3 + 2) + (1 + 3) + 2 + 1, sum(map(len, outs)))
    assert c["seconds"] > 0 and c["retries"] == c["failovers"] == 0
    assert step["if"] == dict.fromkeys(FIELDS, 0.0)
    assert ledger.step()["code+math"]["requests"] == 0  # a step's counts start anew
    assert ledger.totals()["code+math"]["requests"] == 2
    assert shared["math"].name == "m"  # everything but the counting is the inner client's


def test_a_client_that_cannot_generate_stays_so_behind_the_ledger():
    class ScoreOnly:
        name = "s"

        def score(self, prompt_ids, completion_ids, *, topk=None, temperature=1.0):
            return []

        def close(self):
            pass

    metered = Ledger().wrap({"math": ScoreOnly()})["math"]
    assert not hasattr(metered, "generate")  # TrOPD checks this to refuse a scoring-only teacher


def test_history_totals_sum_each_step_once_and_divide_by_the_student_tokens():
    history = {**{f"teacher/math/{k}": [(1, 1.0), (2, 3.0)] for k in FIELDS},
               **{f"teacher/code+if/{k}": [(1, 0.5), (2, 0.5)] for k in FIELDS},
               "distill/trained_tokens": [(1, 10.0), (2, 30.0)], "distill/loss": [(1, 9.0), (2, 9.0)]}
    t = history_totals(history, "distill/trained_tokens")
    assert t["teacher_cost/math/seconds"] == 4.0 and t["teacher_cost/code+if/requests"] == 1.0
    assert t["teacher_cost/all/seconds"] == 5.0 and t["teacher_cost/all/student_tokens"] == 40.0
    assert t["teacher_cost/all/seconds_per_student_token"] == pytest.approx(5.0 / 40.0)
    assert history_totals({"distill/loss": [(1, 1.0)]}, "distill/trained_tokens") == {}
    assert step_metrics({"math": {"seconds": 2.0}}) == {"teacher/math/seconds": 2.0}
