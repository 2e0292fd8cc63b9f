"""Issue 26, item 2: the TRL stages (SFT, the GRPO teachers, Mix-RL, Cascade RL) run data-parallel
under `accelerate launch`, `runtime.processes` per stage kind, with a user's accelerate config or
the shipped ones (containers/accelerate/); DVC's command reads the count when it runs."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

CONFIGS = ROOT / "containers" / "accelerate"


def test_shipped_accelerate_configs_parse_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    want = {"ddp": DistributedType.MULTI_GPU, "fsdp2": DistributedType.FSDP, "zero3": DistributedType.DEEPSPEED}
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(want)
    for name, kind in want.items():
        cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert cfg.distributed_type == kind, name
    assert load_config_from_file(str(CONFIGS / "fsdp2.yaml")).fsdp_config["fsdp_version"] == 2
    assert load_config_from_file(str(CONFIGS / "zero3.yaml")).deepspeed_config["zero_stage"] == 3


def test_launch_command_per_kind_with_a_config_file(micro_project, monkeypatch):
    from accelerate.commands.launch import launch_command_parser

    from mopd.config import load_config
    from mopd.graph import build_graph
    from mopd.local_run import devices_for, stage_command

    params = yaml.safe_load((micro_project / "params.yaml").read_text())
    params["runtime"]["processes"] = {"default": 1, "teacher": 2}
    (micro_project / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config(micro_project)
    specs = {s.name: s for s in build_graph(cfg)}
    assert stage_command(specs["sft"], micro_project, "full")[:2] == [sys.executable, "-m"]
    cmd = stage_command(specs["teacher:math"], micro_project, "full")
    assert cmd[2] == "accelerate.commands.launch" and cmd[cmd.index("--num_processes") + 1] == "2"
    assert devices_for(cfg, specs["teacher:math"]) == 2 and devices_for(cfg, specs["data"]) == 0
    # the per-kind count is what the stage's key holds: another kind's count does not rerun it
    from mopd.graph import config_sections

    assert config_sections(cfg, specs["teacher:math"])["runtime.processes"] == 2
    assert config_sections(cfg, specs["distill"])["runtime.processes"] == 1

    shutil.copy(CONFIGS / "ddp.yaml", micro_project / "ddp.yaml")
    params["runtime"]["accelerate_config"] = "ddp.yaml"
    (micro_project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("MOPD_MACHINE_RANK", "1")
    monkeypatch.setenv("MOPD_MAIN_PROCESS_IP", "10.0.0.5")
    cmd = stage_command(specs["teacher:math"], micro_project, "full")
    args = launch_command_parser().parse_args(cmd[3:])  # what accelerate itself reads of it
    assert args.config_file == str(micro_project / "ddp.yaml") and args.num_processes == 2
    assert args.machine_rank == 1 and args.main_process_ip == "10.0.0.5" and args.module
    assert args.training_script == "tasks.teacher" and "--domain" in args.training_script_args

    from mopd.config import ConfigError

    params["runtime"]["processes"] = {"report": 2}
    (micro_project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"runtime.processes: \['report'\] not a stage kind that runs data-parallel"):
        load_config(micro_project)


def test_dvc_command_reads_the_process_count_when_it_runs(micro_project):
    from mopd.config import load_config
    from mopd.dvcgen import build

    stages = build(load_config(micro_project))["stages"]
    assert stages["teacher-math"]["cmd"] == "python -m mopd.launch tasks.teacher --domain math --pipeline full"
    assert stages["data"]["cmd"].startswith("python -m tasks.data")
    assert "runtime.processes" in stages["teacher-math"]["params"]
    bad = subprocess.run([sys.executable, "-m", "mopd.launch", "tasks.nope"], capture_output=True, text=True,
                         cwd=micro_project)
    assert bad.returncode == 2 and "'tasks.nope' is no stage module" in bad.stderr


def test_grpo_vllm_arguments_and_trl_server_command(tmp_path):
    """`runtime.rollout: vllm` in a GRPO stage: TRL's own use_vllm arguments (colocate, or its
    server client) and TRL's own `trl vllm-serve` command line; no vLLM imported (CPU)."""
    from trl import GRPOConfig

    from mopd.runtime import Runtime
    from mopd.settings.model import RuntimeParams, VLLMRolloutParams
    from mopd.trainers.grpo import grpo_vllm_args, trl_vllm_serve_command

    plain = Runtime("cuda:0", "bfloat16")
    assert grpo_vllm_args(plain) == {}
    colocate = Runtime("cuda:0", "bfloat16", "vllm", vllm={"gpu_memory_utilization": 0.4, "devices": 2})
    args = grpo_vllm_args(colocate)
    assert args == {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.4,
                    "vllm_tensor_parallel_size": 2}
    server = Runtime("cuda:0", "bfloat16", "vllm", vllm={"mode": "server"})
    assert grpo_vllm_args(server, "http://127.0.0.1:8123")["vllm_server_base_url"] == "http://127.0.0.1:8123"
    with pytest.raises(ValueError, match="no `trl vllm-serve` URL"):
        grpo_vllm_args(server)
    # TRL's config accepts them (validated without building a trainer)
    cfg = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **grpo_vllm_args(server, "http://h:1"))
    assert cfg.use_vllm and cfg.vllm_mode == "server"
    cmd, env = trl_vllm_serve_command(tmp_path / "sft", port=8123, settings=VLLMRolloutParams(devices=2),
                                      dtype="bfloat16")
    assert cmd[1:4] == ["-m", "vllm.entrypoints.cli.main", "serve"] and cmd[4] == str(tmp_path / "sft")
    joined = " ".join(cmd)
    assert "--port 8123" in joined and "--tensor-parallel-size 2" in joined and "--dtype bfloat16" in joined
    assert "--host 127.0.0.1" in joined and "--weight-transfer-config" in joined and env == {"VLLM_SERVER_DEV_MODE": "1"}
    # activation checkpointing reaches TRL's arguments (non-reentrant), and the settings validate
    assert Runtime("cpu", "float32", gradient_checkpointing=True).trainer_args()["gradient_checkpointing"] is True
    assert "gradient_checkpointing" not in Runtime("cpu", "float32").trainer_args()
    with pytest.raises(ValueError, match="mode"):
        RuntimeParams(vllm={"mode": "remote"})


@pytest.mark.learning
@pytest.mark.xdist_group("pipeline_models")  # with tests/test_distill_hard.py: the fixture is built once
def test_grpo_teacher_under_two_processes_learns(pipeline_models, tmp_path):
    """teacher:math of the pipeline's own SFT under `accelerate launch` with 2 CPU processes
    (gloo), each with half of the 64-completion batch: it completes, its reward rises over the
    run as the one-process teacher's does, and process 0 alone wrote the model."""
    from mopd.artifacts import load_result
    from mopd.config import load_config
    from mopd.local_run import run_one

    cfg, *_ = pipeline_models
    project = tmp_path / "dp"
    shutil.copytree(cfg.project_dir, project, ignore=shutil.ignore_patterns(".mopd"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["runtime"]["processes"] = {"teacher": 2}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    one = load_result(cfg.project_dir / "artifacts/teachers/math").metrics
    assert run_one(load_config(project, pipeline="hard"), "teacher:math", track=False) == "computed"
    two = load_result(project / "artifacts/teachers/math").metrics
    print(f"reward first/last quarter: 1 process {one['reward_first_quarter']:.3f} -> "
          f"{one['reward_last_quarter']:.3f}; 2 processes {two['reward_first_quarter']:.3f} -> "
          f"{two['reward_last_quarter']:.3f}")
    assert two["reward_last_quarter"] > two["reward_first_quarter"] + 0.03
    assert two["budget/student_rollouts"] == one["budget/student_rollouts"]  # the same global batch
    assert (project / "artifacts/teachers/math/model/model.safetensors").is_file()
    assert not (project / "artifacts/teachers/math/_trainer").exists()
