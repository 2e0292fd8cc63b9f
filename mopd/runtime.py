"""Where models run: one device / dtype setting (`runtime` in params.yaml) for every stage.

The stage runner (`tasks.runner.execute`) resolves the setting once per stage and exports it as
``$MOPD_DEVICE`` / ``$MOPD_DTYPE``, so the stage's own code and every process it starts (local
teacher servers) read the same values through :func:`current`. Outside a stage (library use,
unit tests) the default is CPU / float32.

``dtype`` is the *compute* dtype:
- frozen models (teachers, evaluation, difficulty scoring, analyses) are loaded in it;
- trained models keep float32 master weights and run their forward passes under autocast to it
  (TRL: ``bf16`` / ``fp16`` mixed precision; the distill loops: :meth:`Runtime.autocast`), the
  usual mixed-precision recipe: bf16 weights with a bf16 AdamW lose small updates.

Every model a stage places is recorded (:func:`placements`): the runner logs them and tags the
stage's MLflow run with them, so "which device did this run use" is a fact of the run, not of
the config.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

DEVICE_ENV = "MOPD_DEVICE"
DTYPE_ENV = "MOPD_DTYPE"
ROLLOUT_ENV = "MOPD_ROLLOUT"
GRAD_CKPT_ENV = "MOPD_GRADIENT_CHECKPOINTING"
VLLM_ENV = "MOPD_VLLM"  # runtime.vllm as JSON (the GRPO stages' use_vllm)
DTYPES = ("float32", "bfloat16", "float16")

_placed: list[str] = []


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu", "cuda", "cuda:1", "mps"
    dtype: str  # one of DTYPES
    rollout: str = "transformers"  # or "vllm"
    gradient_checkpointing: bool = False
    vllm: dict | None = None  # runtime.vllm (mode, gpu_memory_utilization, devices, placement, ...)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def mixed(self) -> bool:
        return self.dtype != "float32"

    def autocast(self):
        """Forward passes of a float32-weighted model in the compute dtype (no-op for float32)."""
        import torch

        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.torch_dtype)

    def trainer_args(self) -> dict:
        """The transformers TrainingArguments that put a TRL trainer on this device and dtype
        (and turn activation checkpointing on when asked: non-reentrant, which DDP accepts)."""
        ckpt = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}} \
            if self.gradient_checkpointing else {}
        return {"use_cpu": self.device_type == "cpu", "bf16": self.dtype == "bfloat16",
                "fp16": self.dtype == "float16", **ckpt}


# why: 6 parameters: the runtime section's device, dtype and rollout, the profile's dtype (what
# `auto` means), and two settings carried as they are (activation checkpointing, GRPO's vLLM).
def resolve(device: str, dtype: str, profile_dtype: str | None = None, rollout: str = "transformers",
            gradient_checkpointing: bool = False, vllm: dict | None = None) -> Runtime:
    """The setting made concrete on this host. ``device``: ``auto`` (CUDA when torch sees it,
    else CPU), ``cpu``, ``cuda`` / ``cuda:N`` or ``mps``. ``dtype``: ``auto`` (the pretrained
    profile's dtype on an accelerator; float32 on CPU and for the tiny profile) or a dtype name.
    Raises ValueError naming the key when the host cannot honour an explicit setting."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world_size() > 1:  # one device per process under `accelerate launch`
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    elif device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"runtime.device = {device!r}, but torch sees no CUDA device on this host "
                             f"(torch {torch.__version__}); use `auto` or `cpu`")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"runtime.device = {device!r}, but this host has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("runtime.device = 'mps', but torch sees no MPS device on this host")
    if dtype == "auto":
        dtype = profile_dtype if (profile_dtype and device != "cpu") else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"runtime.dtype = {dtype!r} is not one of {['auto', *DTYPES]}")
    if rollout == "vllm":
        import importlib.util

        if not device.startswith("cuda") or importlib.util.find_spec("vllm") is None:
            raise ValueError(f"runtime.rollout = 'vllm' needs vLLM (the `gpu` extra) and a CUDA device; this host "
                             f"has device {device!r} and {'no ' if importlib.util.find_spec('vllm') is None else ''}"
                             "vLLM: use `transformers`")
    elif rollout != "transformers":
        raise ValueError(f"runtime.rollout = {rollout!r}: expected 'transformers' or 'vllm'")
    return Runtime(device, dtype, rollout, gradient_checkpointing, vllm)


def activate(rt: Runtime) -> None:
    """Make ``rt`` the setting of this process and of the processes it starts; forget earlier
    placements (one stage per activation)."""
    os.environ[DEVICE_ENV] = rt.device
    os.environ[DTYPE_ENV] = rt.dtype
    os.environ[ROLLOUT_ENV] = rt.rollout
    os.environ[GRAD_CKPT_ENV] = "1" if rt.gradient_checkpointing else "0"
    if rt.vllm is not None:
        import json

        os.environ[VLLM_ENV] = json.dumps(rt.vllm)
    else:
        os.environ.pop(VLLM_ENV, None)
    _placed.clear()


def current() -> Runtime:
    dtype = os.environ.get(DTYPE_ENV) or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"${DTYPE_ENV} = {dtype!r} is not one of {list(DTYPES)}")
    import json

    vllm = json.loads(os.environ[VLLM_ENV]) if os.environ.get(VLLM_ENV) else None
    return Runtime(os.environ.get(DEVICE_ENV) or "cpu", dtype, os.environ.get(ROLLOUT_ENV) or "transformers",
                   os.environ.get(GRAD_CKPT_ENV) == "1", vllm)


# ---- data parallelism (`runtime.processes` > 1: the stage runs under `accelerate launch`) ----
# Which kinds run data-parallel and which sample through `runtime.rollout` are fields of the stage
# table (mopd.graph.StageKind: `data_parallel`, `samples`).


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def parent_death_signal() -> None:
    """Linux: this process gets SIGKILL when its parent dies (``PR_SET_PDEATHSIG``); elsewhere
    nothing. Torch-free (mopd.cluster calls it in a child before ``exec``)."""
    import sys

    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def death_with_parent_preexec():
    """A ``preexec_fn`` for a stage's ``Popen``: the child (whatever it execs: a stage module, or
    `accelerate launch`, which calls no mopd code before starting its workers) gets SIGKILL when the
    process that started it dies, even by SIGKILL. The ``prctl`` function is looked up here, before
    the fork, so the child runs no import (the flow starts stages from threads). None off Linux."""
    import sys

    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    kill = int(signal.SIGKILL)
    return lambda: prctl(1, kill, 0, 0, 0)  # PR_SET_PDEATHSIG (kept across exec)


PARENT_ENV = "MOPD_PARENT_PID"  # set by mopd's launchers: the process a stage must not outlive


def die_with_parent() -> None:
    """A stage process started by `mopd stage` / `mopd run` / the flow ($MOPD_PARENT_PID): it dies
    when that process does, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``), so it never goes on
    writing outputs for a command that is gone; a parent already gone ends it at once. Under
    `accelerate launch`, :func:`die_with_launcher` instead (the launcher is the parent)."""
    want = os.environ.pop(PARENT_ENV, None)  # not inherited by what this process starts
    if want is None or "TORCHELASTIC_RUN_ID" in os.environ:
        return
    parent_death_signal()
    if str(os.getppid()) != want:
        os._exit(137)


def die_with_launcher() -> None:
    """Under `accelerate launch`: this process dies when its launcher does. torchrun starts each
    process in its own session, outside the stage's process group, so killing the stage (SIGKILL,
    a cancelled flow run, Ctrl-C) would leave them training on devices whose lease is gone, and a
    rerun would race them. A launcher already gone ends this process at once. In a process no
    launcher started, nothing."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    parent_death_signal()
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(137)


def init_distributed() -> None:
    """Join the process group `accelerate launch` (torchrun) describes in the environment:
    gloo on CPU, NCCL on CUDA. A no-op in a single process."""
    import torch.distributed as dist

    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if current().device_type == "cuda" else "gloo")


def all_reduce_sum(*values: float) -> list[float]:
    """Sum scalars over the processes (the values themselves in a single process)."""
    if world_size() == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=current().device if current().device_type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_gather_json(obj) -> list:
    """Every process's ``obj`` (JSON-serialisable), in rank order; ``[obj]`` in one process. Sent as
    UTF-8 JSON bytes, never pickled: what travels holds model-written text."""
    if world_size() == 1:
        return [obj]
    import json

    import torch
    import torch.distributed as dist

    device = current().device if current().device_type == "cuda" else "cpu"
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    longest = int(max(int(n) for n in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(t[:int(n)].cpu().tolist()).decode()) for t, n in zip(parts, sizes)]


def prepare_data_parallel(module):
    """``module`` wrapped for data parallelism by `accelerate` (``Accelerator.prepare_model``: DDP,
    gradients all-reduced in buckets during ``backward``, averaged over the processes); the module
    itself in one process. The caller runs its forward through the returned wrapper. Mixed
    precision stays mopd's own (``runtime.dtype``'s autocast), so accelerate's is turned off.
    FSDP and DeepSpeed configs are refused with the reason: the student also samples between
    updates, from whole weights."""
    if world_size() == 1:
        return module
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    acc = Accelerator(mixed_precision="no", cpu=current().device_type == "cpu")
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(f"runtime.accelerate_config: distributed type {acc.distributed_type.value} is not supported "
                         "by the distill stages (the student samples its rollouts between updates from whole "
                         "weights); use a DDP config (containers/accelerate/ddp.yaml) for them")
    return acc.prepare_model(module)


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def free_port() -> int:
    """A free local TCP port (rendezvous of a process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_prefix(processes: int, config_file: str | None = None, project=None) -> list[str]:
    """The command-line prefix that runs a stage module in ``processes`` data-parallel processes;
    empty for one. Without ``config_file``: ``accelerate launch`` through its torchrun path
    (``--multi_gpu``; its ``--cpu`` path starts a single process unless MPI is configured), one
    machine — or, when ``$MOPD_NUM_MACHINES`` > 1 (a multi-node stage on Ray, mopd.cluster), this
    node's share of ``processes`` with its ``$MOPD_MACHINE_RANK`` and node 0's
    ``$MOPD_MAIN_PROCESS_IP`` / ``_PORT``. With an `accelerate config` file (``runtime.accelerate_config``, relative to the
    project): that file decides the distributed type (DDP, FSDP, DeepSpeed), the machines, this
    machine's rank and the rendezvous; mopd passes only ``--num_processes``, and the environment's
    ``MOPD_MACHINE_RANK`` / ``MOPD_MAIN_PROCESS_IP`` / ``MOPD_MAIN_PROCESS_PORT`` when set (one
    config for every node). The processes put their models where `runtime.device` says (CPU:
    gloo, CUDA: NCCL, one device per process). Torch-free (flows)."""
    import sys

    head = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        from pathlib import Path

        path = Path(config_file) if project is None else Path(project) / config_file
        if not path.is_file():
            raise FileNotFoundError(f"runtime.accelerate_config = {config_file!r}: no such file ({path})")
        extra = []
        for env, flag in (("MOPD_MACHINE_RANK", "--machine_rank"), ("MOPD_MAIN_PROCESS_IP", "--main_process_ip"),
                          ("MOPD_MAIN_PROCESS_PORT", "--main_process_port")):
            if os.environ.get(env):
                extra += [flag, os.environ[env]]
        return [*head, "--config_file", str(path), "--num_processes", str(processes), *extra, "-m"]
    machines = int(os.environ.get("MOPD_NUM_MACHINES") or 1)
    if processes <= 1 and machines <= 1:
        return []
    if machines > 1:  # one node of a multi-node stage (mopd.cluster): the rendezvous is node 0's
        where = ["--num_machines", str(machines), "--machine_rank", os.environ["MOPD_MACHINE_RANK"],
                 "--main_process_ip", os.environ["MOPD_MAIN_PROCESS_IP"],
                 "--main_process_port", os.environ["MOPD_MAIN_PROCESS_PORT"]]
    else:
        where = ["--num_machines", "1", "--main_process_port", str(free_port())]  # stages may run at once
    return [*head, "--multi_gpu", "--num_processes", str(processes), *where,
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]


def record(model, *, amp: str | None = None) -> None:
    """Note where ``model`` lives, as ``device/dtype`` of its parameters (``+amp:<dtype>`` for a
    trained model whose forwards autocast to ``amp``)."""
    p = next(model.parameters())
    entry = f"{p.device.type}/{str(p.dtype).removeprefix('torch.')}"
    _placed.append(entry + (f"+amp:{amp}" if amp else ""))


def placements() -> list[str]:
    """What :func:`record` saw since the last :func:`activate`, in order."""
    return list(_placed)
