"""Real `mopd serve-teacher` subprocesses: round-robin over two replicas, failover when one is
SIGKILLed, a clear error naming the domain and every endpoint when all are dead; CLI errors. The
stage's cost ledger, in front of the client, counts requests, retries and failovers as they
happened."""

from __future__ import annotations

import shutil

import pytest
import torch

from mopd.cli import main
from mopd.models import build_base, load_model
from mopd.teachers import HTTPTeacher, InProcessTeacher, TeacherError
from mopd.teachers.launch import start_server, stop_server, wait_healthy
from mopd.teachers.ledger import Ledger
from tests.test_teachers import SMALL, TEXTS


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    build_base(SMALL, TEXTS, root / "m", seed=5)
    shutil.copytree(root / "m", root / "m2")
    servers = [start_server(root / name, threads=1) for name in ("m", "m2")]
    try:
        for proc, url in servers:
            wait_healthy(url, proc, timeout=120)
        yield root / "m", servers
    finally:
        for proc, _ in servers:
            stop_server(proc)


def test_round_robin_then_failover_then_clear_error(replicas):
    path, [(p1, u1), (p2, u2)] = replicas
    ledger = Ledger()
    client = ledger.wrap({"code": HTTPTeacher("code", [u1, u2], timeout=10)})["code"]
    ref = InProcessTeacher(load_model(path))
    prompts, comps = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    want = ref.score(prompts, comps, topk=3)
    for _ in range(4):  # alternates replicas; both serve the same weights
        got = client.score(prompts, comps, topk=3)
        assert all(torch.allclose(g.logprobs_C, w.logprobs_C, atol=1e-4) for g, w in zip(got, want))
    assert client.failovers == 0
    cost = ledger.step()["code"]
    assert (cost["requests"], cost["sequences"], cost["prefill_tokens"], cost["retries"], cost["failovers"]) \
        == (4, 8, 4 * (5 + 4), 0, 0) and cost["seconds"] > 0
    p1.kill()
    p1.wait()
    for _ in range(2):  # one of the two calls starts at the dead replica and moves on
        got = client.score(prompts, comps, topk=3)
        assert torch.allclose(got[1].topk_logprobs_CK, want[1].topk_logprobs_CK, atol=1e-4)
    assert client.failovers == 1
    cost = ledger.step()["code"]
    assert (cost["requests"], cost["sequences"], cost["retries"], cost["failovers"]) == (3, 4, 1, 1)
    p2.kill()
    p2.wait()
    with pytest.raises(TeacherError, match=rf"domain 'code': no endpoint answered after 2 attempt\(s\): "
                                           rf"{u1}.*ConnectError.*; {u2}|{u2}.*; {u1}"):
        client.score(prompts, comps)
    cost = ledger.step()["code"]  # a failed call is charged too: both attempts were retries
    assert (cost["requests"], cost["retries"], cost["failovers"]) == (2, 2, 0)
    assert ledger.totals()["code"]["requests"] == 9 and ledger.totals()["code"]["retries"] == 3


def test_serve_teacher_rejects_unset_token_env(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("MOPD_NO_SUCH_TOKEN", raising=False)
    assert main(["serve-teacher", "--model", str(tmp_path), "--token-env", "MOPD_NO_SUCH_TOKEN"]) == 2
    assert "--token-env MOPD_NO_SUCH_TOKEN: environment variable is unset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve-teacher"])  # --model is required
    assert "--model" in capsys.readouterr().err
