"""Issue #23: a new on-policy method with its own shaping is one module (here: this test module),
two YAML entries and the regenerated dvc.yaml — nothing else of mopd is edited. The method is
registered from here and run end to end on the micro project, every stage through the stage
runner (`tasks.runner.execute`), as docs/methods.md's recipe says."""

from __future__ import annotations

import importlib
import shutil
from typing import Annotated, ClassVar

import pytest
import torch
import yaml
from pydantic import Field
from safetensors.torch import load_file

from mopd.objectives._common import masked_average
from mopd.objectives.opd import opd_advantage, pg_per_token
from mopd.opd.methods import MethodSpec, register_method, unregister_method
from mopd.opd.shapers import Shaper
from mopd.settings.base import Strict
from tests.conftest import ROOT, micro_params, write_params

CALLS: list[str] = []


# ---------------------------------------------------------------- the method: its own module
class CenteredParams(Strict):
    """Its own settings (`distill.objective_params`), with types and ranges."""

    scale: Annotated[float, Field(gt=0, description="a number > 0")] = 1.0


class CenterAdvantages(Shaper):
    """Its own shaping: the K1 token rewards at the rollout policy, centred on the batch's mean."""

    name: ClassVar[str] = "center_advantages"
    needs: ClassVar[frozenset[str]] = frozenset({"old_logprobs"})
    whole_batch: ClassVar[bool] = True  # the mean is over the whole batch

    def __init__(self, scale: float):
        self.scale = scale

    def shape(self, packed, batch) -> None:
        r_BT = opd_advantage(packed.teacher_logprobs_BT, packed.old_logprobs_BT, clip=None)
        mean = (r_BT * packed.mask_BT).sum() / packed.mask_BT.sum().clamp(min=1)
        packed.advantages_BT = self.scale * (r_BT - mean) * packed.mask_BT
        batch.metrics["centered/mean_reward"] = float(mean)
        CALLS.append("shape")


def centered_loss(batch, *, scale: float = 1.0, token_mean: bool = False):
    """Policy gradient on the shaper's advantages (ratio 1 with one update per batch)."""
    per_BT = pg_per_token(batch.student_logprobs_BT, batch.student_logprobs_BT.detach(), batch.advantages_BT,
                          batch.mask_BT)
    loss = masked_average(per_BT, batch.mask_BT, token_mean=token_mean)
    CALLS.append("loss")
    return loss, {"loss": float(loss.detach())}


SPEC = MethodSpec("centered_opd", centered_loss, CenteredParams,
                  requires=("student_logprobs_BT", "teacher_logprobs_BT", "advantages_BT", "mask_BT"),
                  shapers=lambda params, section: [CenterAdvantages(params.scale)],
                  summary="K1 PG on batch-centred token rewards (a test method)")


# ---------------------------------------------------------------- the test
@pytest.fixture
def registered():
    register_method(SPEC)
    CALLS.clear()
    yield SPEC
    unregister_method(SPEC.name)


@pytest.mark.slow
def test_a_method_registered_here_runs_end_to_end(registered, micro_project, tmp_path, monkeypatch):
    from tasks.runner import execute

    from mopd import dvcgen
    from mopd.artifacts import load_result
    from mopd.config import ConfigError, load_config
    from mopd.graph import build_graph

    # the two YAML entries
    params = micro_params()
    params["variants"]["distill"]["centered"] = {"objective": "centered_opd", "objective_params": {"scale": 0.5}}
    write_params(micro_project, params)
    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["pipelines"]["centered"] = {"domains": ["math", "code", "if"],
                                      "stages": ["data", "base", "sft", "teacher", "difficulty", "distill:centered"]}
    (micro_project / "pipelines.yaml").write_text(yaml.safe_dump(pipes, sort_keys=False))
    cfg = load_config(micro_project, pipeline="centered")
    # ... and the regenerated dvc.yaml holds the new stage
    assert "distill-centered" in dvcgen.render(cfg) or "distill:centered" in dvcgen.render(cfg)

    for spec in build_graph(cfg):
        execute(cfg, spec.name, importlib.import_module(spec.module).run, track=False)
    result = load_result(micro_project / "artifacts/distill/centered")
    assert result.metrics["reverse_kl_first_quarter"] == result.metrics["reverse_kl_first_quarter"]  # finite
    assert CALLS.count("shape") == params["distill"]["max_steps"] == CALLS.count("loss")
    config = yaml.safe_load((micro_project / "artifacts/distill/centered/stage_config.json").read_text())
    assert config["variants.distill.centered"]["objective"] == "centered_opd"
    trained = load_file(str(micro_project / "artifacts/distill/centered/model/model.safetensors"))
    sft = load_file(str(micro_project / "artifacts/sft/model/model.safetensors"))
    assert any(not torch.equal(trained[k], sft[k]) for k in trained)  # it trained

    # its settings are validated against its own model, and its contract is enforced
    params["variants"]["distill"]["centered"]["objective_params"] = {"scale": -1.0}
    write_params(micro_project, params)
    with pytest.raises(ConfigError, match=r"variants.distill.centered.*objective_params.scale = -1.0: must be a "
                                          r"number > 0"):
        load_config(micro_project, pipeline="centered")
    from mopd.config import DistillParams
    from mopd.trainers.distill import build_shapers, check_data_parallel, gathers

    # its shaper acts on the whole batch: under data parallelism the batch is gathered first
    centered = DistillParams(objective="centered_opd", rollout_chunks=2)
    check_data_parallel(centered, 2)
    assert gathers(centered, build_shapers(centered))

    class Legacy(CenterAdvantages):  # the earlier contract's attribute is refused, naming the new one
        data_parallel = False

    monkeypatch.setattr("mopd.trainers.distill.build_shapers", lambda params: [Legacy(1.0)])
    with pytest.raises(ValueError, match=r"declares `data_parallel`, which is now `whole_batch`"):
        check_data_parallel(centered, 2)
    with pytest.raises(ValueError, match="teacher_weights.math mixes teachers"):  # not declared K1-mixable
        DistillParams(objective="centered_opd", teacher_weights={"math": {"math": 0.5, "code": 0.5}})
    shutil.rmtree(micro_project / "artifacts")


def test_an_unregistered_method_is_refused_naming_the_registered_ones():
    from mopd.config import DistillParams

    with pytest.raises(ValueError, match=r"unknown objective 'centered_opd'; valid names.*'mopd_pg'"):
        DistillParams(objective="centered_opd")
