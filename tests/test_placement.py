"""Placement (mopd.placement): the host's device inventory, what each stage asks for, and the
host-wide lease the flow, `mopd run`, `mopd stage` and `dvc repro` share (flock per device)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from mopd import placement
from mopd.placement import PlacementError, acquire, inventory, leased, try_lease, wanted


@pytest.fixture
def locks(tmp_path, monkeypatch):
    monkeypatch.setenv(placement.LOCKS_ENV, str(tmp_path / "locks"))
    return tmp_path / "locks"


def test_inventory_from_mopd_devices_then_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("MOPD_DEVICES", "0, 1,2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert inventory() == ["0", "1", "2"]
    for empty in ("", "none", "cpu"):
        monkeypatch.setenv("MOPD_DEVICES", empty)
        assert inventory() == []
    monkeypatch.delenv("MOPD_DEVICES")
    assert inventory() == ["5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8a1b2c3d-0000,GPU-8a1b2c3d-0001")  # UUIDs are ids too
    assert len(inventory()) == 2
    for bad, why in (("0,0", "an id repeats"), ("0;1", "not an id"), ("0,,1", "not an id")):
        monkeypatch.setenv("MOPD_DEVICES", bad)
        with pytest.raises(PlacementError, match=rf"\$MOPD_DEVICES = '{bad}'.*{why}"):
            inventory()


def test_what_a_stage_asks_for():
    per = {"default": 1, "distill": 2}
    assert wanted(per, "data", runs_models=False) == 0
    assert wanted(per, "teacher", runs_models=True) == 1
    assert wanted(per, "distill", runs_models=True) == 2
    assert wanted(per, "distill", runs_models=True, processes=4) == 4  # one device per process
    assert wanted({"teacher": 2}, "sft", runs_models=True) == 1  # no `default`: one


def test_leases_are_disjoint_and_freed(locks):
    devs = ["0", "1", "2"]
    a = try_lease(2, "a", devs)
    assert a is not None and a.ids == ["0", "1"]
    assert try_lease(2, "b", devs) is None  # one left
    b = try_lease(1, "b", devs)
    assert b is not None and b.ids == ["2"]
    assert placement.holders(["0"])["0"].endswith(" a")  # who holds it, for the waiting message
    env = b.env()
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and '"devices": ["2"]' in env[placement.PLACEMENT_ENV]
    a.release()
    c = try_lease(2, "c", devs)
    assert c is not None and c.ids == ["0", "1"]
    c.release()
    b.release()
    with pytest.raises(PlacementError, match=r"asks for 4 device\(s\).*devices_per_stage.*has 3"):
        acquire(4, "distill", devices=devs)
    with leased(0, "data", devices=devs) as none, leased(1, "sft", devices=[]) as cpu_host:
        assert none is None and cpu_host is None


def test_a_lease_is_host_wide_and_dies_with_its_process(locks):
    """Another process (another flow, `mopd stage` in a second terminal) holding device 0: this
    one gets device 1, waits for two, and gets device 0 once that process is killed."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom mopd.placement import try_lease\n"
        "lease = try_lease(1, 'other', ['0'])\nprint('held' if lease else 'busy', flush=True)\ntime.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env={**__import__("os").environ})
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = try_lease(1, "me", ["0", "1"])
        assert mine is not None and mine.ids == ["1"]
        assert try_lease(2, "me", ["0", "1"]) is None
        mine.release()
        holder.kill()
        holder.wait()
        t0 = time.time()
        both = acquire(2, "me", devices=["0", "1"], poll=0.05)
        assert both.ids == ["0", "1"] and time.time() - t0 < 5
        both.release()
    finally:
        holder.kill()


def test_devices_per_stage_names_kinds_that_run_models(micro_project):
    import yaml

    from mopd.config import ConfigError, load_config

    params = yaml.safe_load((micro_project / "params.yaml").read_text())
    params["runtime"]["devices_per_stage"] = {"default": 1, "teacher": 2}
    (micro_project / "params.yaml").write_text(yaml.safe_dump(params))
    assert load_config(micro_project).params.runtime.devices_per_stage["teacher"] == 2
    for bad, match in (({"report": 1}, r"runtime.devices_per_stage: \['report'\] not a stage kind that runs models"),
                       ({"teacher": 0}, r"runtime.devices_per_stage.teacher")):
        params["runtime"]["devices_per_stage"] = bad
        (micro_project / "params.yaml").write_text(yaml.safe_dump(params))
        with pytest.raises(ConfigError, match=match):
            load_config(micro_project)


def test_vllm_teacher_servers_commands_and_devices(locks, monkeypatch, tmp_path):
    """`teacher_transport: vllm` (mopd.teachers.vllm_serve) on a faked 4-device host, no vLLM
    imported: each teacher server's `vllm serve` command, and devices leased beside the stage's."""
    import contextlib

    from mopd.opd.settings import DistillParams, VLLMServeParams
    from mopd.teachers.vllm_serve import server_devices, vllm_serve_command

    monkeypatch.setenv("MOPD_DEVICES", "0,1,2,3")
    settings = VLLMServeParams(devices=2, gpu_memory_utilization=0.6, max_model_len=4096,
                               extra_args=["--enforce-eager"])
    cmd = vllm_serve_command(tmp_path / "teacher", port=8123, name="math", dtype="bfloat16", max_logprobs=64,
                             settings=settings, cli=["vllm"])
    assert cmd == ["vllm", "serve", str(tmp_path / "teacher"), "--host", "127.0.0.1", "--port", "8123",
                   "--served-model-name", "math", "--dtype", "bfloat16", "--tensor-parallel-size", "2",
                   "--gpu-memory-utilization", "0.6", "--max-logprobs", "64", "--max-model-len", "4096",
                   "--enforce-eager"]
    assert "--max-logprobs 20" in " ".join(vllm_serve_command("m", port=1, name="m", dtype="float32", max_logprobs=0,
                                                              settings=VLLMServeParams(), cli=["vllm"]))
    with contextlib.ExitStack() as stack:  # the stage holds device 0: two 1-device servers get 1 and 2
        got = server_devices(2, VLLMServeParams(), ["0"], "distill", stack)
        assert got == [["1"], ["2"]]
        other = try_lease(1, "other")
        assert other is not None and other.ids == ["0"]  # the stage's own device is not leased here: free
        other.release()
    assert try_lease(3, "after") is not None  # released with the stack
    with contextlib.ExitStack() as stack, pytest.raises(PlacementError, match=r"2 teacher server\(s\) x 2 "
                                                                                r"device\(s\) do not fit.*shared"):
        server_devices(2, settings, ["0"], "distill", stack)
    with contextlib.ExitStack() as stack:  # shared: on the stage's own devices
        assert server_devices(3, VLLMServeParams(placement="shared"), ["0"], "distill", stack) == [["0"]] * 3
    # the settings: validated, and a temperature the served log-probs cannot honour is refused
    with pytest.raises(ValueError, match="extra_args"):
        DistillParams(teacher_transport="vllm", teacher_vllm={"extra_args": ["-x; rm"]})
    assert DistillParams(teacher_transport="vllm").teacher_vllm.placement == "own"
