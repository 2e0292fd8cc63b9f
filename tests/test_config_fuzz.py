"""Fuzzing both configuration files (issue 14): hundreds of generated mutations of the shipped
params.yaml and pipelines.yaml, every category a careless user or an attacker produces (wrong
types, non-finite and out-of-range numbers, unknown keys, missing keys, names that are paths,
unknown kinds, incomplete pipelines, inconsistent verifiers, unknown objective parameters, data
paths missing or outside the project, lengths beyond the model's context, duplicate keys, alias
bombs, bad encodings). Each must be refused by `load_config` — before any work — with a message
that names the file and the key, in under 2 s and 2 KB."""

from __future__ import annotations

import copy
import math
import random
import time
from pathlib import Path

import pytest
import yaml

from mopd.config import ConfigError, load_config
from tests.conftest import ROOT

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
PIPES = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
# Mutations act on `full`; the shipped method pipelines share its stages, so a change of `full`'s
# domains would also be refused for that reason — they are left out to test each check alone.
PIPES["pipelines"] = {"full": PIPES["pipelines"]["full"]}


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    else:
        yield path, node


def _set(doc, path, value):
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def _mutations():
    """(id, file, key named in the message, params dict | text, pipelines dict | text)."""
    out = []

    def add(tag, file, key, params=None, pipes=None):
        out.append((tag, file, key, params if params is not None else copy.deepcopy(PARAMS),
                    pipes if pipes is not None else copy.deepcopy(PIPES)))

    # Every scalar leaf of params.yaml, given values of the wrong type or out of range.
    for path, value in _leaves(PARAMS):
        dotted = ".".join(map(str, path))
        if isinstance(value, bool):
            bad = ["maybe", 7, [True]]
        elif isinstance(value, (int, float)) and value is not None:
            bad = ["fast", -1, math.inf, -math.inf, math.nan, [1, 2], {"x": 1}]
        elif isinstance(value, str):
            bad = [42.5 if path[-1] != "model" else "", ["a"], "no such thing"]
        elif value is None:
            bad = ["auto"]
        elif isinstance(value, list):
            bad = [["soup"] if path[-1] == "methods" else "notalist", [{"a": 1}]]
        else:
            continue
        for i, v in enumerate(bad):
            if path[-1] == "tau" and v == -1:
                continue  # a valid outlier threshold (tau <= 0)
            if path == ("profiles", "qwen3-0.6b", "model") and v == "no such thing":
                continue  # any non-empty hub id is well-formed; it fails when loaded
            p = copy.deepcopy(PARAMS)
            _set(p, path, v)
            add(f"params:{dotted}:{i}", "params.yaml", path[-1] if not isinstance(path[-1], int)
                else str(path[-2]), p)
    # Unknown keys at every level of params.yaml.
    for path, node in [((), PARAMS), *[(pth, v) for pth, v in _walk_maps(PARAMS)]]:
        p = copy.deepcopy(PARAMS)
        target = p
        for k in path:
            target = target[k]
        target["learning_rat"] = 1
        add(f"params:unknown:{'.'.join(path)}", "params.yaml", "learning_rat", p)
    # Semantics across keys of params.yaml.
    sem = [
        ("seed", lambda p: p.update(seed=2**32)),
        ("seed", lambda p: p.update(seed=-5)),
        ("max_completion_length", lambda p: p["teacher"]["math"].update(max_completion_length=4096)),
        ("max_length", lambda p: p["sft"].update(max_length=257)),
        ("max_new_tokens", lambda p: p["evaluate"].update(max_new_tokens=300)),
        ("max_prompt_length", lambda p: p["data"].update(max_prompt_length=250)),
        ("objective_params", lambda p: p["distill"].update(objective_params={"temperature": 2})),
        ("objective_params", lambda p: p["distill"].update(objective="mopd_topk",
                                                           objective_params={"eps_low": 0.2})),
        ("k", lambda p: p["evaluate"].update(k=8, n=4)),
        ("batch_size", lambda p: p["teacher"]["code"].update(batch_size=30)),
        ("bins", lambda p: p["difficulty"].update(bins=[1, 9])),
        ("domain_weights", lambda p: p["distill"].update(domain_weights={"math": 1.0})),
        ("domain_weights", lambda p: p["distill"].update(domain_weights={"math": 0.5, "code": 0.5,
                                                                         "if": 0.5})),
        ("profile", lambda p: p.update(profile="huge")),
        ("teacher", lambda p: p["teacher"].pop("if")),
        ("variants", lambda p: p.update(variants={"distill": {"../x": {"max_steps": 2}}})),
        ("variants", lambda p: p.update(variants={"merge": {"a": {}}})),
        ("variants", lambda p: p.update(variants={"distill": {"fast": {"max_steps": -2}}})),
        ("variants", lambda p: p.update(variants={"distill": {"fast": {"learning_rate": math.inf}}})),
        ("teacher", lambda p: p["teacher"].update({"ma th": p["teacher"]["math"]})),
        ("profiles", lambda p: p["profiles"].update({"../up": {"source": "tiny"}})),
        ("num_key_value_heads", lambda p: p["profiles"]["tiny"].update(num_key_value_heads=3)),
        ("vocab_size", lambda p: p["profiles"]["tiny"].update(vocab_size=10**9)),
    ]
    for i, (key, fn) in enumerate(sem):
        p = copy.deepcopy(PARAMS)
        fn(p)
        add(f"params:semantic:{i}", "params.yaml", key, p)

    # pipelines.yaml: names, kinds, sources, completeness, consistency, paths.
    def pipes_with(fn):
        d = copy.deepcopy(PIPES)
        fn(d)
        return d

    def rename_domain(new):
        def fn(d):
            d["domains"][new] = d["domains"].pop("math")
            d["pipelines"]["full"]["domains"][0] = new
        return fn

    for i, name in enumerate(["../escape", "a/b", "..", "", "with space", "x" * 300, "1abc", "é"]):
        add(f"pipes:domain-name:{i}", "pipelines.yaml", "domain", pipes=pipes_with(rename_domain(name)))
    for i, name in enumerate(["../p", "a/b", "", "-x"]):
        add(f"pipes:pipeline-name:{i}", "pipelines.yaml", "pipeline",
            pipes=pipes_with(lambda d, n=name: d["pipelines"].update({n: d["pipelines"]["full"]})))
    stage_lists = {
        "no-teacher": ["data", "base", "sft", "difficulty", "distill", "evaluate"],
        "merge-no-teacher": ["data", "base", "sft", "merge", "evaluate"],
        "no-sft": ["data", "base", "teacher", "evaluate"],
        "no-data": ["base", "sft"],
        "empty": [],
        "dup": ["data", "base", "sft", "sft"],
        "unknown": ["data", "base", "sft", "pretrain"],
        "bad-variant": ["data", "base", "sft", "teacher", "distill:../x"],
        "undefined-variant": ["data", "base", "sft", "teacher", "distill:nope"],
        "variant-of-sft": ["data", "base", "sft:fast"],
    }
    for tag, stages in stage_lists.items():
        add(f"pipes:stages:{tag}", "pipelines.yaml", "stages" if tag not in ("no-teacher",
            "merge-no-teacher", "no-sft", "no-data") else "teacher" if "teacher" in tag else "needs",
            pipes=pipes_with(lambda d, s=stages: d["pipelines"]["full"].update(stages=s)))
    pipe_sem = [
        ("domains", lambda d: d["pipelines"]["full"].update(domains=["math", "math", "code"])),
        ("domains", lambda d: d["pipelines"]["full"].update(domains=[])),
        ("chemistry", lambda d: d["pipelines"]["full"]["domains"].append("chemistry")),
        ("verifier", lambda d: d["domains"]["math"].update(verifier="code")),
        ("verifier", lambda d: d["domains"]["code"].update(verifier="if")),
        ("verifier", lambda d: d["domains"]["humaneval"].update(verifier="math")),
        ("verifier", lambda d: d["domains"]["arithmetic"].update(verifier="code")),
        ("verifier", lambda d: d["domains"]["math"].update(verifier="abacus")),
        ("source", lambda d: d["domains"]["math"].update(data={"source": "ftp"})),
        ("path", lambda d: d["domains"]["math"].update(data={"source": "local", "path": "nothere.jsonl"})),
        ("path", lambda d: d["domains"]["math"].update(data={"source": "local", "path": "../../etc/passwd.json"})),
        ("eval_path", lambda d: d["domains"]["math"].update(
            data={"source": "local", "path": "train.jsonl", "eval_path": "missing.jsonl"})),
        ("endpoints", lambda d: d["domains"]["math"].update(teacher={"source": "remote", "endpoints": []})),
        ("endpoints", lambda d: d["domains"]["math"].update(
            teacher={"source": "remote", "endpoints": ["ftp://x"]})),
        ("benchmarks", lambda d: d["domains"]["math"].update(benchmarks=["math", "chess"])),
        ("benchmarks", lambda d: d["domains"]["math"].update(benchmarks=["math", "code"])),
        ("seed", lambda d: d["domains"]["arithmetic"]["data"].update(seed=-1)),
        ("size", lambda d: d["domains"]["arithmetic"]["data"].update(size=0)),
        ("columns", lambda d: d["domains"]["gsm8k"]["data"].update(columns=["question"])),
        ("domains", lambda d: d.pop("domains")),
        ("pipelines", lambda d: d.pop("pipelines")),
        ("stages", lambda d: d["pipelines"]["full"].update(stages="data")),
        ("bogus", lambda d: d["domains"]["math"].update(bogus=1)),
        ("bogus", lambda d: d["pipelines"]["full"].update(bogus=1)),
    ]
    for i, (key, fn) in enumerate(pipe_sem):
        add(f"pipes:semantic:{i}", "pipelines.yaml", key, pipes=pipes_with(fn))
    for i, url in enumerate(["http://", "http:// ", "https://a b", "http://h:99999", "http://:8000",
                             "https://h:0"]):  # parsed, not matched by prefix (issue 29)
        add(f"pipes:endpoint:{i}", "pipelines.yaml", "endpoints", pipes=pipes_with(
            lambda d, u=url: d["domains"]["math"].update(teacher={"source": "remote", "endpoints": [u]})))

    # Issue 29: what a careless edit produces that loaded before.
    def params_with(fn):
        d = copy.deepcopy(PARAMS)
        fn(d)
        return d

    huge = [("sft", "max_steps"), ("data", "n_train"), ("distill", "prompts_per_step"), ("evaluate", "n"),
            ("teacher", "math", "batch_size"), ("mix_rl", "max_steps"), ("difficulty", "max_prompts")]
    for i, path in enumerate(huge):
        for j, value in enumerate([10**30, 10**9 + 1]):
            add(f"params:huge:{i}:{j}", "params.yaml", path[-1],
                params=params_with(lambda d, p=path, v=value: _set(d, p, v)))
    for i, (field, value) in enumerate([("hidden_size", 10**30), ("hidden_size", 100_000),
                                        ("num_hidden_layers", 10_000), ("intermediate_size", 10**7)]):
        add(f"params:tiny-size:{i}", "params.yaml", field,
            params=params_with(lambda d, f=field, v=value: d["profiles"]["tiny"].update({f: v})))
    for i, (path, value) in enumerate([(("distill", "topk"), 100_000), (("teacher_fit", "topk"), 513),
                                       (("copd", "monitor_topk"), 10**6)]):
        add(f"params:topk:{i}", "params.yaml", path[-1], params=params_with(lambda d, p=path, v=value: _set(d, p, v)))
    add("params:merge-methods-empty", "params.yaml", "merge.methods",
        params=params_with(lambda d: d["merge"].update(methods=[])))
    for i, typo in enumerate(["maht", "cod", "chemistry"]):
        add(f"params:teacher-typo:{i}", "params.yaml", f"teacher.{typo}",
            params=params_with(lambda d, t=typo: d["teacher"].update({t: copy.deepcopy(d["teacher"]["math"])})))

    # Text-level attacks on either file.
    params_text = (ROOT / "params.yaml").read_text()
    pipes_text = (ROOT / "pipelines.yaml").read_text()
    bomb = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
                   for p, c in zip([None, "a", "b", "c", "d", "e", "f", "g"], "abcdefgh"))
    texts = [
        ("params.yaml", "seed", params_text + "seed: 3\n", None),
        ("params.yaml", "learning_rate", params_text.replace("  learning_rate: 3.0e-3\n",
                                                             "  learning_rate: 3.0e-3\n  learning_rate: 1\n"), None),
        ("pipelines.yaml", "math", None, pipes_text.replace("domains:\n  math:\n",
                                                            "domains:\n  math: {verifier: math}\n  math:\n", 1)),
        ("params.yaml", "alias", bomb + params_text, None),
        ("pipelines.yaml", "alias", None, bomb + pipes_text),
        ("params.yaml", "UTF-8", params_text.encode() + b"\nnote: \xff\xfe\n", None),
        ("pipelines.yaml", "UTF-8", None, b"\xef\xbb\xbf" + pipes_text.encode("utf-16")),
        ("params.yaml", "YAML", "seed: [1,\n", None),
        ("params.yaml", "mapping", "- 1\n- 2\n", None),
        ("pipelines.yaml", "mapping", None, "just a string\n"),
        ("params.yaml", "bytes", "# " + "x" * (1 << 20) + "\n" + params_text, None),
        ("params.yaml", "alias", "a: &a [1, *a]\n" + params_text, None),
        ("params.yaml", "nested", params_text + "deep: " + "[" * 3000 + "]" * 3000 + "\n", None),
        ("pipelines.yaml", "nested", None, pipes_text + "deep: " + "{a: " * 2000 + "1" + "}" * 2000 + "\n"),
    ]
    for i, (file, key, ptext, qtext) in enumerate(texts):
        add(f"text:{i}", file, key, ptext if ptext is not None else None,
            qtext if qtext is not None else None)
    return out


def _walk_maps(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, dict):
                yield (*path, k), v
                yield from _walk_maps(v, (*path, k))


MUTATIONS = _mutations()


def _write(project: Path, name: str, content) -> None:
    path = project / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(yaml.safe_dump(content, sort_keys=False, allow_unicode=True))


def test_there_are_hundreds_of_mutations():
    assert len(MUTATIONS) >= 300, len(MUTATIONS)
    assert len({m[0] for m in MUTATIONS}) == len(MUTATIONS)


def test_every_mutation_is_refused_naming_file_and_key(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n')
    failures = []
    rng = random.Random(0)
    for tag, file, key, params, pipes in MUTATIONS:
        project = tmp_path / f"p{rng.randrange(10**9)}"
        project.mkdir()
        (project / "train.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n')
        _write(project, "params.yaml", params)
        _write(project, "pipelines.yaml", pipes)
        before = sorted(p.name for p in project.iterdir())
        start = time.perf_counter()
        try:
            load_config(project)
        except ConfigError as exc:
            msg = str(exc)
        else:
            failures.append(f"{tag}: accepted")
            continue
        took = time.perf_counter() - start
        if file not in msg or key not in msg:
            failures.append(f"{tag}: message lacks {file!r} or {key!r}: {msg[:300]}")
        if len(msg.encode()) > 2048:
            failures.append(f"{tag}: message of {len(msg.encode())} bytes")
        if took > 30.0:  # a hang guard (an alias bomb, deep nesting), not a performance target
            failures.append(f"{tag}: took {took:.2f} s")
        if sorted(p.name for p in project.iterdir()) != before:
            failures.append(f"{tag}: wrote into the project")
    assert not failures, f"{len(failures)} of {len(MUTATIONS)}:\n" + "\n".join(failures)


@pytest.mark.parametrize("stages", [["data", "base", "sft", "teacher", "distill", "evaluate"]])
def test_the_shipped_files_and_a_distilling_pipeline_still_load(tmp_path, stages):
    d = copy.deepcopy(PIPES)
    d["pipelines"]["full"] = {"domains": ["math", "code"], "stages": stages}
    _write(tmp_path, "params.yaml", PARAMS)
    _write(tmp_path, "pipelines.yaml", d)
    assert load_config(tmp_path).domains == ["math", "code"]


def test_errors_never_echo_credentials(tmp_path):
    d = copy.deepcopy(PIPES)
    d["domains"]["math"]["teacher"] = {"source": "remote", "endpoints": ["ftp://bob:hunter2@x/?token=abc"]}
    _write(tmp_path, "params.yaml", PARAMS)
    _write(tmp_path, "pipelines.yaml", d)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert "domains.math.teacher" in str(err.value) and "endpoints" in str(err.value)
    assert "hunter2" not in str(err.value) and "abc" not in str(err.value)
