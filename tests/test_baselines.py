"""The integration baselines of MOPD Table 2 (ALGORITHMS §9): Mix-RL's per-batch domain ratios
and per-row verifiers, Cascade RL's chain in the stage table, off-policy fine-tuning's filter."""

from __future__ import annotations

from collections import Counter

import pytest

from mopd.chat import PLAIN
from mopd.config import ConfigError, OffPolicyFTParams, load_config
from mopd.domains import generate
from mopd.graph import build_graph
from mopd.trainers.grpo import mixed_schedule, verifier_reward
from tasks.offpolicy_ft import teacher_rollouts
from tests.conftest import micro_params
from tests.test_graph import _pipes, _project


def _gold(kind: str, n: int, seed: int = 0) -> list[dict]:
    return [{**r, "kind": kind, "domain": kind} for r in generate(kind, n, seed)]


def test_mixed_schedule_holds_the_ratio_in_every_batch():
    records = {"math": _gold("math", 50), "code": _gold("code", 7), "if": _gold("if", 30)}
    weights = {"math": 0.5, "code": 0.3, "if": 0.2}
    P, steps = 8, 40
    stream = mixed_schedule(records, weights, P, steps, seed=1)
    assert len(stream) == P * steps
    for b in range(steps):
        block = Counter(r["domain"] for r in stream[b * P:(b + 1) * P])
        for d, w in weights.items():
            assert abs(block[d] - P * w) < 1, (b, block)  # within one prompt of P·w, every batch
    total = Counter(r["domain"] for r in stream)
    assert {d: total[d] for d in weights} == {"math": 160, "code": 96, "if": 64}  # exact overall
    # a small domain is cycled through (every prompt used before any repeats), rows keep their kind
    code = [r["prompt"] for r in stream if r["domain"] == "code"]
    assert set(code[:7]) == {r["prompt"] for r in records["code"]}
    assert all(r["kind"] == r["domain"] for r in stream)
    assert mixed_schedule(records, weights, P, steps, seed=1) == stream
    assert mixed_schedule(records, weights, P, steps, seed=2) != stream


def test_mix_rl_rewards_each_row_with_its_own_verifier():
    """A batch of gold answers from three domains: each scores 1 under its own verifier; under
    one verifier for all (what a single-domain reward would do) the other domains' rows fail."""
    rows = [r for k in ("math", "code", "if") for r in _gold(k, 3, seed=5)]
    kw = {"prompts": [r["prompt"] for r in rows], "completions": [r["completion"] for r in rows],
          "reference": [r["reference"] for r in rows]}
    got = verifier_reward(None)(**kw, kind=[r["kind"] for r in rows])
    assert got == [1.0] * 9
    as_math = verifier_reward("math")(**kw, kind=["math"] * 9)
    assert as_math[:3] == [1.0] * 3 and max(as_math[3:]) < 1.0
    # the row's kind decides: the same code answers scored as `if` rows fail
    swapped = verifier_reward(None)(**kw, kind=["math"] * 3 + ["if"] * 3 + ["if"] * 3)
    assert swapped[3:6] != [1.0] * 3 and swapped[6:] == [1.0] * 3


class ReplayTeacher:
    """A teacher whose samples are given: row i of a request gets ``answers[i % len]`` (a real
    client's `generate` signature; the filter is what is under test, not sampling)."""

    name = "replay"

    def __init__(self, tokenizer, answers: list[str]):
        self.ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
        self.asked = 0

    def generate(self, prompt_ids, *, max_new_tokens, temperature, seed):
        self.asked += len(prompt_ids)
        return [self.ids[i % len(self.ids)][:max_new_tokens] for i in range(len(prompt_ids))]


def test_offpolicy_ft_keeps_only_correct_teacher_rollouts(tmp_path):
    from mopd.config import TinyProfile
    from mopd.models import build_tokenizer

    recs = _gold("math", 6, seed=3)
    tok = build_tokenizer([r["prompt"] + r["completion"] for r in recs] * 3, TinyProfile().vocab_size)
    # each prompt is asked twice: the first answer right for prompt 0 only, the second always wrong
    teacher = ReplayTeacher(tok, [recs[0]["completion"], "\\boxed{-999999}"])
    params = OffPolicyFTParams(samples_per_prompt=2, max_prompts=6, max_new_tokens=64)
    rows = teacher_rollouts({"math": teacher}, tok, {"math": recs}, {"math": "math"}, params, seed=0, fmt=PLAIN)
    assert teacher.asked == 12 and len(rows) == 12
    for r in rows:
        right = r["completion"] == recs[0]["completion"] and r["reference"] == recs[0]["reference"]
        assert r["kept"] == (r["reward"] >= 1.0) == right, r
    assert sum(r["kept"] for r in rows) == 1
    everything = teacher_rollouts({"math": teacher}, tok, {"math": recs}, {"math": "math"},
                                  params.model_copy(update={"correct_only": False}), seed=0, fmt=PLAIN)
    assert all(r["kept"] for r in everything)


def test_baseline_stages_in_the_table(tmp_path):
    params = micro_params()
    pipes = _pipes(table2={"domains": ["math", "code", "if"],
                           "stages": ["data", "base", "sft", "teacher", "mix_rl", "cascade_rl",
                                      "offpolicy_ft", "evaluate"]})
    cfg = load_config(_project(tmp_path, params, pipes), pipeline="table2")
    graph = {s.name: s for s in build_graph(cfg)}
    assert graph["mix_rl"].upstream == ("data", "sft") and graph["mix_rl"].models == (("mix_rl", "model"),)
    # math -> code -> if; step 1 is teacher:math itself
    assert "cascade_rl:math" not in graph
    assert graph["cascade_rl:code"].upstream == ("data", "teacher:math")
    assert graph["cascade_rl:if"].upstream == ("data", "cascade_rl:code")
    assert graph["cascade_rl:code"].models == () and graph["cascade_rl:if"].models == (("cascade_rl", "model"),)
    assert graph["cascade_rl:if"].params_keys == ("seed", "cascade_rl", "teacher.if", "runtime.device",
                                                  "runtime.dtype", "runtime.rollout", "runtime.processes")
    assert graph["offpolicy_ft"].upstream == ("data", "sft", "teacher:math", "teacher:code", "teacher:if")
    evals = {n for n in graph if n.startswith("evaluate:")}
    assert {"evaluate:mix_rl", "evaluate:cascade_rl:if", "evaluate:offpolicy_ft"} <= evals
    assert "evaluate:cascade_rl:code" not in evals
    params["cascade_rl"] = {"order": ["if", "math"]}
    graph = {s.name: s for s in build_graph(load_config(_project(tmp_path, params, pipes), pipeline="table2"))}
    assert graph["cascade_rl:math"].upstream == ("data", "teacher:if") and "cascade_rl:code" not in graph
    for order, message in ((["math"], "at least two domains"), (["math", "math"], "listed more than once"),
                           (["math", "chem"], "chem")):
        params["cascade_rl"] = {"order": order}
        with pytest.raises(ConfigError, match=message):
            load_config(_project(tmp_path, params, pipes), pipeline="table2")
    params["cascade_rl"] = {"order": []}
    params["mix_rl"]["domain_weights"] = {"math": 0.5, "code": 0.5}
    with pytest.raises(ConfigError, match="mix_rl.domain_weights: keys"):
        load_config(_project(tmp_path, params, pipes), pipeline="table2")
    params["mix_rl"]["domain_weights"] = {"math": 0.5, "code": 0.3, "if": 0.3}
    with pytest.raises(ConfigError, match="must sum to 1"):
        load_config(_project(tmp_path, params, pipes), pipeline="table2")
