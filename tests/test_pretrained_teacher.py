"""Teachers from finished checkpoints (issue 24): `teacher: {source: pretrained, model: <folder>}`
distils from a folder with no teacher stage in the pipeline; the folder's content enters the cache
key, so new teacher weights rerun the distill stage (and nothing upstream of it)."""

from __future__ import annotations

import importlib
import shutil

import pytest
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT


def test_a_finished_teacher_folder_is_distilled_from_and_its_weights_key_the_stage(micro_project):
    from mopd.artifacts import load_result
    from mopd.config import load_config
    from mopd.graph import build_graph
    from mopd.plan import plan
    from tasks.runner import execute

    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["domains"]["math"]["teacher"] = {"source": "pretrained", "model": "finished/math"}
    pipes["pipelines"] = {"finished": {"domains": ["math"], "stages": ["data", "base", "sft", "distill"]}}
    (micro_project / "pipelines.yaml").write_text(yaml.safe_dump(pipes, sort_keys=False))
    cfg = load_config(micro_project, pipeline="finished")
    names = [s.name for s in build_graph(cfg)]
    assert names == ["data", "base", "sft", "distill"]  # no teacher stage
    for name in names[:3]:
        execute(cfg, name, importlib.import_module(build_graph(cfg)[names.index(name)].module).run, track=False)
    # the finished teacher: a copy of the SFT checkpoint, then trained elsewhere (here: perturbed)
    teacher = micro_project / "finished" / "math"
    shutil.copytree(micro_project / "artifacts/sft/model", teacher)
    execute(cfg, "distill", importlib.import_module("tasks.distill").run, track=False)
    result = load_result(micro_project / build_graph(cfg)[3].out_dir)
    assert result.metrics["reverse_kl_first_quarter"] == pytest.approx(0.0, abs=1e-5)  # teacher = student
    assert {d.stage: d.action for d in plan(cfg)} == {s: "cached" for s in names}
    from mopd import dvcgen

    assert "finished/math" in dvcgen.build(cfg)["stages"]["distill"]["deps"]  # `dvc repro` reruns it too

    weights = load_file(str(teacher / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    decisions = {d.stage: d for d in plan(load_config(micro_project, pipeline="finished"))}
    assert {s: d.action for s, d in decisions.items()} == {"data": "cached", "base": "cached", "sft": "cached",
                                                            "distill": "run"}
    assert decisions["distill"].reasons == ["pretrained teacher of math changed (its folder's content)"]

    # a finished teacher with another tokenizer is refused before any step, naming both
    from mopd.models import build_tokenizer
    from mopd.opd.fidelity import FidelityError

    build_tokenizer(["another corpus entirely"] * 20, 300).save_pretrained(teacher)
    with pytest.raises(FidelityError, match=r"teacher 'math' \(.*finished/math\) renders prompt .* differently "
                                            r"from the student .*artifacts/sft/model: first difference at token 1: student .math. vs "
                                            r"teacher .m."):
        execute(load_config(micro_project, pipeline="finished"), "distill",
                importlib.import_module("tasks.distill").run, track=False)
