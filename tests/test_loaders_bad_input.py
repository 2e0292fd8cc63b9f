"""Bad data files never do harm (issue 14): every loader error names the file, the line or row
and the column; local paths stay inside the project unless given absolute; a reference column
holds one type; prompts longer than the model's context are refused."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from mopd.config import DataParams, DomainConfig, LocalSource
from mopd.data import domain_records
from mopd.domains import load_records
from mopd.domains.local_files import resolve_local


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = [{"question": "1+1=", "answer": "2"}, {"question": "2+2=", "answer": "4"}]


@pytest.fixture
def project(tmp_path):
    root = tmp_path / "project"
    write(root / "data" / "good.jsonl", jsonl(GOOD))
    write(tmp_path / "outside" / "secret.jsonl", jsonl(GOOD))
    return root


def test_parse_errors_name_file_and_line(project):
    d = project / "data"
    cases = {
        "bad.jsonl": ('{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n',
                      r"bad.jsonl: line 2: not valid JSON \(Expecting value, column 29\)"),
        "list.jsonl": ('{"question": "a", "answer": "1"}\n[1, 2]\n',
                       r"list.jsonl: line 2: expected a JSON object, got list"),
        "bad.json": ('[{"question": "a",\n "answer": }]', r"bad.json: line 2: not valid JSON"),
        "bad.csv": ("question,answer\na,1\nb,2,3\n",
                    r"bad.csv: cannot be read as CSV: ParserError: .*Expected 2 fields in line 3, saw 3"),
        "bad.parquet": (b"garbage", r"bad.parquet: cannot be read as parquet: ArrowInvalid"),
        "latin1.jsonl": ('{"question": "a", "answer": "1"}\n'.encode() + b'{"question": "caf\xe9"}\n',
                         r"latin1.jsonl: line 2: not UTF-8 text \(byte b'\\xe9'\)"),
        "latin1.csv": (b"question,answer\ncaf\xe9,1\n", r"latin1.csv: not UTF-8 text"),
    }
    for name, (content, message) in cases.items():
        write(d / name, content)
        with pytest.raises(ValueError, match=message):
            load_records("math", f"data/{name}", root=project)


def test_row_errors_name_file_row_and_column(project):
    d = project / "data"
    write(d / "num_prompt.jsonl", jsonl([GOOD[0], {"question": 17, "answer": "2"}]))
    with pytest.raises(ValueError, match=r"num_prompt.jsonl: row 1, column 'question': the prompt is "
                                         r"of type int, not text"):
        load_records("math", "data/num_prompt.jsonl", root=project)
    write(d / "empty.csv", "question,answer\n1+1=,2\n,3\n")
    with pytest.raises(ValueError, match=r"empty.csv: row 1, column 'question': the prompt is empty"):
        load_records("math", "data/empty.csv", root=project)
    write(d / "mc.jsonl", jsonl([{"question": "?", "choices": ["a", "b"], "answer": "A"},
                                 {"question": "?", "choices": ["a", "b"], "answer": "zz"}]))
    with pytest.raises(ValueError, match=r"mc.jsonl: row 1, column 'answer': mc answer 'zz' is "
                                         "neither a letter"):
        load_records("mc", "data/mc.jsonl", root=project)
    write(d / "arc.jsonl", jsonl([{"question": "?", "choices": {"label": ["A"]}, "answer": "A"}]))
    with pytest.raises(ValueError, match=r"arc.jsonl: row 0, column 'choices': mc choices mapping "
                                         r"needs a 'text' list"):
        load_records("mc", "data/arc.jsonl", root=project)
    pd.DataFrame({"question": ["a", "b"], "answer": ["1", None]}).to_parquet(d / "nul.parquet")
    with pytest.raises(ValueError, match=r"nul.parquet: row 1, column 'answer': empty reference"):
        load_records("math", "data/nul.parquet", root=project)


def test_mixed_type_reference_columns_are_refused(project):
    d = project / "data"
    write(d / "mixed.jsonl", jsonl([GOOD[0], GOOD[1], {"question": "3+3=", "answer": 6}]))
    with pytest.raises(ValueError, match=r"mixed.jsonl: column 'answer' mixes types: row 0 is text, "
                                         r"row 2 is number; make every value one type"):
        load_records("math", "data/mixed.jsonl", root=project)
    write(d / "lists.jsonl", jsonl([{"text": "t", "test_list": ["assert 1"]},
                                    {"text": "u", "test_list": "assert 2"}]))
    with pytest.raises(ValueError, match=r"lists.jsonl: column 'test_list' mixes types: row 0 is "
                                         r"list, row 1 is text"):
        load_records("code", "data/lists.jsonl", root=project)
    write(d / "numbers.jsonl", jsonl([{"question": "a", "answer": 3}, {"question": "b", "answer": 2.5}]))
    assert [r["reference"] for r in load_records("math", "data/numbers.jsonl", root=project)] \
        == ["3", "2.5"]  # ints and floats are one kind: numbers


def test_prompts_longer_than_the_context_are_refused(project):
    d = project / "data"
    write(d / "long.jsonl", jsonl([GOOD[0], {"question": "word " * 30, "answer": "1"}]))
    with pytest.raises(ValueError, match=r"long.jsonl: row 1, column 'question': the prompt is 157 "
                                         r"characters long, over the limit of 100 \(the model's "
                                         r"context\)"):
        load_records("math", "data/long.jsonl", root=project, max_prompt_length=100)
    with pytest.raises(ValueError, match=r"row 1, column 'question': the prompt is 31 tokens long, "
                                         r"over the limit of 30"):
        load_records("math", "data/long.jsonl", root=project, max_prompt_length=30,
                     count_tokens=lambda s: len(s.split()))
    assert len(load_records("math", "data/long.jsonl", root=project, max_prompt_length=31,
                            count_tokens=lambda s: len(s.split()))) == 2


def test_paths_stay_inside_the_project_unless_absolute(project, tmp_path):
    outside = tmp_path / "outside" / "secret.jsonl"
    assert len(load_records("math", "data/good.jsonl", root=project)) == 2
    assert len(load_records("math", "./data", root=project)) == 2  # a directory
    with pytest.raises(ValueError, match=r"\.\./outside/secret.jsonl: secret.jsonl resolves to "
                                         rf"{outside}, outside the project {project}"):
        load_records("math", "../outside/secret.jsonl", root=project)
    os.symlink(outside, project / "data" / "link.jsonl")  # a symlink to a file outside
    with pytest.raises(ValueError, match=r"data/link.jsonl: link.jsonl resolves to .*outside the "
                                         r"project .*give an absolute path to read it there"):
        load_records("math", "data/link.jsonl", root=project)
    with pytest.raises(ValueError, match=r"outside the project"):  # also inside a directory
        load_records("math", "data", root=project)
    with pytest.raises(ValueError, match=r"outside the project"):  # and through a glob
        load_records("math", "data/*.jsonl", root=project)
    os.symlink(tmp_path / "outside", project / "linkdir")  # a symlinked directory
    with pytest.raises(ValueError, match=r"outside the project"):
        load_records("math", "linkdir/secret.jsonl", root=project)
    # an absolute path is an explicit choice: allowed, symlinks included
    assert len(load_records("math", str(outside), root=project)) == 2
    assert len(load_records("math", str(project / "data" / "link.jsonl"), root=project)) == 2
    with pytest.raises(ValueError, match=r"data/nope.jsonl: no such file or directory \(resolved "
                                         rf"against {project}\)"):
        load_records("math", "data/nope.jsonl", root=project)
    with pytest.raises(ValueError, match=r"data/\*.csv: the pattern matches no file"):
        resolve_local("data/*.csv", project)


def test_domain_records_resolves_local_data_against_the_project(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the project: relative paths must not depend on the cwd
    rows = [{"question": f"{a}+1=", "answer": str(a + 1)} for a in range(6)]
    write(project / "data" / "six.jsonl", jsonl(rows))
    dom = DomainConfig(verifier="math", data=LocalSource(source="local", path="data/six.jsonl"))
    recs = domain_records("math", dom, DataParams(n_train=4, n_eval=2), 0, project_dir=project)
    # n_train rows read, the last n_eval of them held out (one local file)
    assert [r["reference"] for r in recs["train"]] == ["1", "2"]
    assert [r["reference"] for r in recs["eval"]] == ["3", "4"]
    escape = DomainConfig(verifier="math", data=LocalSource(source="local",
                                                            path="../outside/secret.jsonl"))
    with pytest.raises(ValueError, match="outside the project"):
        domain_records("math", escape, DataParams(n_train=1, n_eval=1), 0, project_dir=project)
    with pytest.raises(ValueError, match=r"six.jsonl: row 0, column 'question': the prompt is 11 "
                                         r"characters long, over the limit of 10"):
        domain_records("math", dom, DataParams(n_train=4, n_eval=2), 0, project_dir=project,
                       max_prompt_length=10)


def test_data_stage_applies_max_prompt_length_from_params(tmp_path):
    """`data.max_prompt_length` reaches the loaders through the data stage (tiny profile: UTF-8
    bytes bound the byte-level tokens), and the error names the file, the row and the column."""
    import yaml

    from mopd.config import load_config
    from mopd.tracking import NullTracker
    from mopd.stage import StageContext
    from tasks import data
    from tests.conftest import ROOT, micro_params, write_params

    params = micro_params()
    params["data"]["max_prompt_length"] = 40
    params["teacher"]["mine"] = params["teacher"]["math"]
    write_params(tmp_path, params)
    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["domains"]["mine"] = {"verifier": "math", "data": {"source": "local", "path": "mine.jsonl"}}
    pipes["pipelines"] = {"full": pipes["pipelines"]["full"]}  # the others share its stages
    pipes["pipelines"]["full"]["domains"] = ["math", "mine"]
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(pipes))
    rows = [{"question": "1+1=", "answer": "2"}] * 10 + [{"question": "é" * 30, "answer": "3"}]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(tmp_path)
    with pytest.raises(ValueError) as err:
        data.run(StageContext("data", "", cfg, tmp_path / "artifacts" / "data", {}, {}, NullTracker()))
    msg = str(err.value)
    assert "mine.jsonl" in msg and "row 10" in msg and "'question'" in msg and "67 tokens" in msg, msg  # "[mine] " + 60 bytes
