"""The stage table (mopd.graph), per-stage code identity (mopd.codedeps), `mopd plan` and the
progress board, without running any stage."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from mopd.codedeps import code_files, import_closure
from mopd.config import ConfigError, load_config
from mopd.graph import KINDS, LISTABLE, build_graph, cache_key, key_inputs
from tests.conftest import ROOT, micro_params, write_params


def _project(tmp_path, params=None, pipes=None):
    write_params(tmp_path, params or micro_params())
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(
        pipes or yaml.safe_load((ROOT / "pipelines.yaml").read_text()), sort_keys=False))
    return tmp_path


def _pipes(**pipelines):
    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["pipelines"] |= pipelines
    return pipes


def test_full_graph_from_the_table():
    graph = {s.name: s for s in build_graph(load_config(ROOT))}
    assert list(graph)[:3] == ["data", "base", "sft"]
    assert graph["teacher:math"].out_dir == "artifacts/teachers/math"
    assert graph["teacher:math"].argv == ["--domain", "math"]
    assert graph["merge"].upstream == ("sft", "teacher:math", "teacher:code", "teacher:if")
    assert "difficulty" not in graph["merge"].upstream  # merge does not wait for difficulty
    assert graph["distill"].models == (("mopd", "model"),)
    assert graph["evaluate:teacher:math"].upstream == ("data", "teacher:math")
    assert set(graph["report:full"].upstream) == {n for n in graph if n.startswith("evaluate:")}
    assert graph["report:full"].argv == []  # its argument is --pipeline itself
    assert set(LISTABLE) == set(KINDS) - {"report", "round_teacher", "copd_merge", "copd_monitor"}


def test_variants_are_their_own_stages(tmp_path):
    params = micro_params()
    params["variants"]["distill"]["jsd"] = {"objective": "jsd", "learning_rate": 1.0e-3}
    pipes = _pipes(cmp={"domains": ["math", "code", "if"],
                        "stages": ["data", "base", "sft", "teacher", "difficulty", "distill",
                                   "distill:jsd", "evaluate"]})
    cfg = load_config(_project(tmp_path, params, pipes), pipeline="cmp")
    graph = {s.name: s for s in build_graph(cfg)}
    v = graph["distill:jsd"]
    assert v.out_dir == "artifacts/distill/jsd" and v.argv == ["--variant", "jsd"]
    assert v.params_keys == ("seed", "distill", "variants.distill.jsd", "runtime.device",
                             "runtime.dtype", "runtime.rollout", "runtime.processes")
    assert v.models == (("distill:jsd", "model"),)
    assert "evaluate:distill:jsd" in graph and graph["evaluate:distill:jsd"].out_dir == \
        "artifacts/evaluate/distill-jsd"
    eff = cfg.params.stage_params("distill", "jsd")
    assert eff.objective == "jsd" and eff.learning_rate == 1.0e-3
    assert eff.max_steps == cfg.params.distill.max_steps  # the rest from the `distill` section
    # Identity never includes the pipeline: `sft` has the same key in both pipelines.
    full = load_config(tmp_path)
    s_full = {s.name: s for s in build_graph(full)}["sft"]
    up = {"data": "d", "base": "b"}
    assert cache_key(full, s_full, up) == cache_key(cfg, graph["sft"], up)
    assert "pipeline" not in json.dumps(key_inputs(cfg, graph["sft"], up)["config"])


@pytest.mark.parametrize("mutate, message", [
    (lambda p, q: q["pipelines"]["full"]["stages"].append("distil"), "unknown stage 'distil'"),
    (lambda p, q: q["pipelines"]["full"]["stages"].append("distill:nope"),
     "needs a `variants.distill.nope` section"),
    (lambda p, q: q["pipelines"]["full"]["stages"].append("merge:x"), "only ['distill'] take a variant"),
    (lambda p, q: q["pipelines"]["full"]["stages"].append("merge"), "listed more than once"),
    (lambda p, q: q["pipelines"]["full"]["domains"].append("math"), "listed more than once"),
    (lambda p, q: q["pipelines"]["full"].update(stages=[]), "full.stages"),
    (lambda p, q: q["pipelines"]["full"].update(stages=["data", "sft"]),
     "stage 'sft' needs ['base']"),
    (lambda p, q: p.update(variants={"merge": {"a": {}}}), "has no variants"),
    (lambda p, q: p.update(variants={"distill": {"mopd": {}}}), "must be an identifier"),
    (lambda p, q: p.update(variants={"distill": {"x": {"learning_rate": "fast"}}}),
     "variants.distill.x.learning_rate"),
    (lambda p, q: p.update(variants={"distill": {"x": {"lr": 1}}}), "variants.distill.x.lr"),
    # two pipelines may share a stage only if it means the same computation
    (lambda p, q: q["pipelines"].update(m={"domains": ["math"], "stages": ["data", "base", "sft"]}),
     "domains: ['math', 'code', 'if'] vs ['math']"),
    (lambda p, q: q["pipelines"].update(m={"domains": ["math", "code", "if"], "stages": [
        "data", "base", "sft", "teacher", "distill"]}), "both run stage 'distill'"),
])
def test_bad_stage_configuration_is_rejected(tmp_path, mutate, message):
    params, pipes = micro_params(), yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    mutate(params, pipes)
    with pytest.raises(ConfigError) as err:
        load_config(_project(tmp_path, params, pipes))
    assert message in str(err.value)
    assert "yaml" in str(err.value)  # names the file


def _fake_root(tmp_path):
    root = tmp_path / "src"
    files = {
        "mopd/__init__.py": "",
        "mopd/a.py": "import mopd.b\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import mopd.typ\n",
        "mopd/b.py": "def f():\n    from mopd.pkg import lazy_name\n",
        "mopd/typ.py": "",
        "mopd/pkg/__init__.py": "__mopd_lazy__ = {'lazy_name': 'sub'}\n",
        "mopd/pkg/sub.py": "from . import helper\n",
        "mopd/pkg/helper.py": "",
        "mopd/pkg/unused.py": "",
        "mopd/validation.py": "import mopd.pkg.unused  # codedeps: ignore\n",
        "mopd/runner.py": "__mopd_deps__ = ('mopd.child',)\n",
        "mopd/child.py": "",
        "tasks/__init__.py": "",
        "tasks/stage.py": "import mopd.a\nimport mopd.validation\nimport mopd.runner\nimport numpy\n"
                          "if __name__ == '__main__':\n    import mopd.typ\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_import_closure_rules(tmp_path):
    root = _fake_root(tmp_path)
    got = {p.relative_to(root).as_posix() for p in import_closure("tasks.stage", root)}
    assert got == {"tasks/__init__.py", "tasks/stage.py", "mopd/__init__.py", "mopd/a.py",
                   "mopd/b.py", "mopd/pkg/__init__.py", "mopd/pkg/sub.py", "mopd/pkg/helper.py",
                   "mopd/validation.py", "mopd/runner.py", "mopd/child.py"}
    # (not typ.py: TYPE_CHECKING / __main__ only; not unused.py: marked `codedeps: ignore`)
    before = code_files("tasks.stage", root)
    (root / "mopd/pkg/helper.py").write_text("X = 1\n")
    after = code_files("tasks.stage", root)
    assert {k for k in before if before[k] != after[k]} == {"mopd/pkg/helper.py"}


def test_stage_code_identity_of_the_project():
    sft = code_files("tasks.sft")
    distill = code_files("tasks.distill")
    assert not any("objectives" in f for f in sft)
    assert not any("objectives" in f for f in code_files("tasks.teacher"))
    assert "mopd/objectives/opd.py" in distill and "mopd/teachers/server.py" in distill
    assert "mopd/verifiers/sandbox_child.py" in code_files("tasks.teacher")  # via __mopd_deps__
    assert "mopd/graph.py" not in distill  # the table is orchestration, not what a stage computes


def test_plan_reads_result_records(tmp_path):
    from mopd.artifacts import Result, write_result
    from mopd.graph import hash_inputs
    from mopd.plan import plan

    cfg = load_config(_project(tmp_path))
    graph = build_graph(cfg)
    assert {d.action for d in plan(cfg)} == {"run"}
    # Record `data` and `base` as done under their current keys.
    hashes = {}
    for spec in graph[:2]:
        out = tmp_path / spec.out_dir
        out.mkdir(parents=True)
        (out / "f.txt").write_text(spec.name)
        inputs = key_inputs(cfg, spec, hashes)
        from mopd.artifacts import hash_tree

        res = Result(spec.name, spec.out_dir, hash_tree(out), cache_key=hash_inputs(inputs), inputs=inputs)
        write_result(out, res)
        hashes[spec.name] = res.content_hash
    decisions = {d.stage: d for d in plan(cfg)}
    assert decisions["data"].action == decisions["base"].action == "cached"
    assert decisions["sft"].reasons == ["no output yet"]
    assert decisions["teacher:math"].reasons == ["upstream sft will run"]
    # forced, a changed key, an altered output: each says why
    assert plan(cfg, rerun=["base"])[1].reasons == ["forced (rerun)"]
    params = micro_params()
    params["profiles"]["tiny"]["hidden_size"] = 48
    write_params(tmp_path, params)
    d = {d.stage: d for d in plan(load_config(tmp_path))}["base"]
    assert d.action == "run" and d.reasons == ["config params.yaml: profiles.tiny.hidden_size: 32 -> 48"]
    write_params(tmp_path, micro_params())
    (tmp_path / "artifacts/data/f.txt").write_text("tampered")
    d = {d.stage: d for d in plan(load_config(tmp_path))}
    assert d["data"].action == "run" and "output altered" in d["data"].reasons[0]
    assert d["base"].reasons == ["upstream data will run"]


def test_progress_board_renders_states_steps_and_eta(tmp_path, monkeypatch):
    from mopd import progress

    board = progress.RunBoard(tmp_path, "r1", "full", ["data", "sft", "teacher:math", "merge"])
    board.stage("data", "cached")
    board.stage("sft", "running")
    monkeypatch.setenv(progress.ENV, str(board.progress_file("sft")))
    progress.report(25, 100, "steps", force=True)
    board.data["stages"]["sft"]["started"] = time.time() - 50  # 25 steps in 50 s
    board.stage("teacher:math", "failed")
    text, ended = progress.render(board.dir)
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "cached" in lines["data"]
    assert "running" in lines["sft"] and "25/100" in lines["sft"] and "~2m30s left" in lines["sft"]
    assert "failed" in lines["teacher:math"] and "waiting" in lines["merge"]
    assert not ended
    board.finish("completed")
    assert progress.render(board.dir)[1]
    assert progress.latest_run(tmp_path) == board.dir


def test_multiround_stages_chain_students_and_teachers(tmp_path):
    """MOPD §4.4.3: round r's teachers start from round r-1's student (round 1 = `distill`);
    round r distils those domains from that student; three rounds order topologically."""
    params = micro_params()
    params["multiround"] = {"rounds": 3, "domains": ["math", "if"]}
    cfg = load_config(_project(tmp_path, params), pipeline="multiround")
    specs = build_graph(cfg)
    graph = {s.name: s for s in specs}
    assert graph["round_teacher:2:math"].upstream == ("data", "distill")
    assert graph["round_teacher:3:if"].upstream == ("data", "multiround:2")
    assert graph["round_teacher:2:math"].argv == ["--round", "2", "--domain", "math"]
    assert graph["round_teacher:2:math"].params_keys == ("seed", "teacher.math", "multiround", "runtime.device",
                                                         "runtime.dtype", "runtime.rollout", "runtime.processes")
    assert graph["multiround:3"].upstream == ("data", "multiround:2", "difficulty", "round_teacher:3:math",
                                              "round_teacher:3:if")
    assert "round_teacher:2:code" not in graph  # code is neither retrained nor distilled again
    assert graph["multiround:2"].models == (("mopd:round2", "model"),)
    assert graph["round_teacher:3:if"].models == (("teacher:if:round3", "model"),)
    order = [s.name for s in specs]
    for s in specs:
        assert all(order.index(u) < order.index(s.name) for u in s.upstream), s.name
    # shares SFT, teachers and round-1 MOPD with `full`: the same names mean the same computation
    full = {s.name: s for s in build_graph(cfg.for_pipeline("full"))}
    for name in ("sft", "teacher:math", "difficulty", "distill"):
        assert graph[name].identity() == full[name].identity()
    params["multiround"]["domains"] = ["math", "chem"]
    with pytest.raises(ConfigError, match="multiround.domains"):
        load_config(_project(tmp_path, params), pipeline="multiround")


UPSTREAM_OF_DISTILL = ("mopd/opd/", "mopd/objectives/", "mopd/trainers/distill.py", "mopd/config.py",
                       "mopd/graph.py")


def test_sft_and_teacher_identities_hold_no_distillation_module():
    """Issue #23: a stage's code identity holds its own section's settings, not the root config or
    another kind's: SFT, the teachers and the data stages import no distillation module."""
    for kind in ("data", "base", "sft", "teacher", "difficulty", "mix_rl", "cascade_rl", "merge", "evaluate"):
        files = code_files(KINDS[kind].module)
        leaked = sorted(f for f in files if f.startswith(UPSTREAM_OF_DISTILL) and f != "mopd/objectives/__init__.py"
                        and not (kind == "difficulty" and f == "mopd/objectives/balancing.py"))
        assert not leaked, (kind, leaked)
    assert "mopd/opd/settings.py" in code_files("tasks.distill")
    assert "mopd/settings/sft.py" in code_files("tasks.sft")
    # each kind holds its own section's model and no other kind's
    own = {"sft": "sft.py", "teacher": "grpo.py", "mix_rl": "baselines.py", "cascade_rl": "baselines.py",
           "merge": "merge.py", "evaluate": "evaluate.py", "difficulty": "difficulty.py", "weight_shift": "analysis.py"}
    for kind, module in own.items():
        sections = {f.rsplit("/", 1)[1] for f in code_files(KINDS[kind].module) if f.startswith("mopd/settings/")}
        assert module in sections, (kind, sections)
        allowed = {module} | ({"grpo.py"} if module == "baselines.py" else set())  # Mix-RL is a GRPO recipe
        assert not sections & (set(own.values()) - allowed), (kind, sections)
    assert "mopd/settings/baselines.py" not in code_files("tasks.teacher")
    assert "mopd/opd/settings.py" not in code_files("tasks.copd")  # CoPD runs the loop, not the distill section


def test_editing_the_distill_settings_module_reruns_only_the_distill_family(tmp_path, monkeypatch):
    """Append a comment to the module holding the distill section's model (in a copy of the code):
    `mopd plan --pipeline full` then runs distill, its evaluation, teacher_fit and the report;
    data, base, SFT, the teachers, difficulty and every other method stay cached."""
    import shutil

    import mopd.codedeps as codedeps
    from mopd.artifacts import Result, hash_tree, write_result
    from mopd.graph import hash_inputs
    from mopd.opd import settings as distill_settings
    from mopd.plan import plan

    src = tmp_path / "src"
    for pkg in ("mopd", "tasks"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codedeps, "project_root", lambda: src)
    (tmp_path / "project").mkdir()
    cfg = load_config(_project(tmp_path / "project"))
    hashes = {}
    for spec in build_graph(cfg):  # every stage recorded as done under its current key
        out = cfg.project_dir / spec.out_dir
        out.mkdir(parents=True)
        (out / "f.txt").write_text(spec.name)
        inputs = key_inputs(cfg, spec, {u: hashes[u] for u in spec.upstream})
        res = Result(spec.name, spec.out_dir, hash_tree(out), cache_key=hash_inputs(inputs), inputs=inputs)
        write_result(out, res)
        hashes[spec.name] = res.content_hash
    assert {d.action for d in plan(cfg)} == {"cached"}
    module = src / "mopd/opd/settings.py"
    assert module.read_text() == open(distill_settings.__file__).read()  # the module that holds DistillParams
    with open(module, "a") as f:
        f.write("# a comment\n")
    decisions = {d.stage: d for d in plan(cfg)}
    runs = {name for name, d in decisions.items() if d.action == "run"}
    assert runs == {"distill", "evaluate:distill", "teacher_fit:full", "budget_curve:full", "report:full"}, runs
    assert decisions["distill"].reasons == ["code mopd/opd/settings.py: changed"]
    assert len(decisions) == 26  # the `full` pipeline, budget_curve included


def test_a_variant_section_is_checked_against_the_pipeline(tmp_path):
    """A variant's `domain_weights` that leaves out a domain is refused at load (as the base
    section's is), naming the variant and the key, not after SFT and the teachers have run."""
    params = micro_params()
    params["variants"]["distill"]["tropd"]["domain_weights"] = {"math": 0.5, "code": 0.5}
    with pytest.raises(ConfigError, match=r"params.yaml: variants.distill.tropd.domain_weights: keys "
                                          r"\['code', 'math'\] must be exactly the domains of pipeline 'tropd'"):
        load_config(_project(tmp_path, params), pipeline="tropd")
    params["variants"]["distill"]["tropd"]["domain_weights"] = {"math": 0.5, "code": 0.25, "if": 0.5}
    with pytest.raises(ConfigError, match=r"variants.distill.tropd.domain_weights = .*: must sum to 1"):
        load_config(_project(tmp_path, params), pipeline="tropd")


def test_a_plugin_module_counts_in_the_distill_identity_only(tmp_path):
    """A method module dropped into mopd/opd/plugins (imported by discovery with the registry)
    is part of the code identity of the stages that load the registry, and of no other."""
    import shutil

    src = tmp_path / "src"
    for pkg in ("mopd", "tasks"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "mopd/opd/plugins/my_method.py").write_text("from mopd.opd.methods import register_method\n")
    assert "mopd/opd/plugins/my_method.py" in code_files("tasks.distill", src)
    assert "mopd/opd/plugins/my_method.py" not in code_files("tasks.sft", src)
