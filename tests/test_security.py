"""Secrets never logged (URL credentials redacted wherever teacher endpoints are shown or
recorded) and run directories restricted to the configured project roots (issue 14)."""

from __future__ import annotations

import json
import logging
import os

import pytest
import yaml

from mopd import security
from mopd.security import allowed_project_dir, redact_secrets, redact_text, redact_url
from mopd.teachers import HTTPTeacher, TeacherError
from mopd.teachers.launch import free_port
from mopd.tracking import flatten_params

SECRET = "hunter2"


@pytest.mark.parametrize("url, shown", [
    ("http://user:hunter2@host:8000/v1", "http://***@host:8000/v1"),
    ("https://hunter2@host", "https://***@host"),
    ("http://host:8000/?api_key=hunter2&x=1", "http://host:8000/?api_key=***&x=1"),
    ("https://bucket.s3/obj?X-Amz-Signature=hunter2", "https://bucket.s3/obj?X-Amz-Signature=***"),
    ("http://127.0.0.1:8001", "http://127.0.0.1:8001"),  # nothing to hide: unchanged
    ("not a url", "not a url"),
    ("http://u:hunter2@host:bad/x", "http://***@host:bad/x"),  # malformed port: still masked
    ("http://host:99999999/x", "http://host:99999999/x"),  # malformed, nothing to hide
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_redact_secrets_in_config_sections():
    section = {"pipelines:domains.math.teacher": {
        "source": "remote", "endpoints": ["http://u:hunter2@10.0.0.1:8000", "http://10.0.0.2:8000"],
        "model": "m", "token_env": "MATH_TOKEN"},
        "tracking": {"api_key": SECRET, "pad_token": "<pad>", "cache_key": "abc"},
        "note": f"see https://x:{SECRET}@host/path for details"}
    safe = redact_secrets(section)
    assert SECRET not in json.dumps(safe) and SECRET not in json.dumps(flatten_params(safe))
    teacher = safe["pipelines:domains.math.teacher"]
    assert teacher["endpoints"] == ["http://***@10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert teacher["token_env"] == "MATH_TOKEN"  # names a variable, kept
    assert safe["tracking"] == {"api_key": "***", "pad_token": "<pad>", "cache_key": "abc"}
    assert SECRET in json.dumps(section)  # the input is not modified


def test_stage_params_with_endpoint_credentials_are_redacted(tmp_path):
    """What tasks/runner.py writes to config.json and logs as MLflow params for the distill stage."""
    from mopd.config import load_config
    from mopd.graph import config_sections, get_spec
    from tests.conftest import ROOT, micro_params, write_params

    pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    pipes["domains"]["math"]["teacher"] = {"source": "remote",
                                          "endpoints": [f"http://u:{SECRET}@127.0.0.1:9/"]}
    params = micro_params()
    params["teacher"].pop("math")
    write_params(tmp_path, params)
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(pipes))
    cfg = load_config(tmp_path)
    sections = config_sections(cfg, get_spec(cfg, "distill"))
    assert SECRET in json.dumps(sections)  # what would have been recorded
    logged = flatten_params(redact_secrets(sections))
    assert SECRET not in json.dumps(logged)
    assert "http://***@127.0.0.1:9/" in logged["pipelines:domains.math.teacher.endpoints"]


def test_http_teacher_never_shows_endpoint_credentials(caplog):
    dead = [f"http://user:{SECRET}@127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    client = HTTPTeacher("math", dead, timeout=2)
    assert SECRET not in client.name and "http://***@127.0.0.1" in client.name
    with caplog.at_level(logging.WARNING), pytest.raises(TeacherError) as err:
        client.score([[1]], [[2]])
    assert "ConnectError" in str(err.value) and "http://***@127.0.0.1" in str(err.value)
    assert SECRET not in str(err.value) and SECRET not in caplog.text
    assert caplog.records  # the failover warning was logged, redacted
    assert SECRET not in json.dumps(client.health())
    assert redact_text(f"GET http://a:{SECRET}@h/x failed") == "GET http://***@h/x failed"


def test_allowed_project_dir(tmp_path, monkeypatch):
    root, other = tmp_path / "projects", tmp_path / "elsewhere"
    (root / "a" / "sub").mkdir(parents=True)
    other.mkdir()
    (root / "escape").symlink_to(other)
    (root / "file").write_text("x")
    (tmp_path / "projects-evil").mkdir()
    monkeypatch.setenv("MOPD_PROJECT_ROOTS", f"{root}{os.pathsep}{tmp_path / 'second'}")
    assert allowed_project_dir(root / "a") == (root / "a").resolve()
    assert allowed_project_dir(root) == root.resolve()
    assert allowed_project_dir(str(root / "a" / "sub" / "..")) == (root / "a").resolve()
    for bad in (other, root / "escape", root / "a" / ".." / "..", "/", tmp_path / "projects-evil"):
        with pytest.raises(PermissionError, match=r"outside the allowed project roots .*projects.*; "
                                                  r"set MOPD_PROJECT_ROOTS"):
            allowed_project_dir(bad)
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        allowed_project_dir(root / "file")
    # default: the directory the worker was started in; relative paths are taken from there
    monkeypatch.delenv("MOPD_PROJECT_ROOTS")
    monkeypatch.setattr(security, "START_DIR", root)
    assert allowed_project_dir("a") == (root / "a").resolve()
    assert allowed_project_dir(".") == root.resolve()
    with pytest.raises(PermissionError, match=rf"resolves to {other}"):
        allowed_project_dir(str(other))
    assert allowed_project_dir(other, roots=[other]) == other.resolve()
