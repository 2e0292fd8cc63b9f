"""The GPU paths (marker `gpu`: skipped without a CUDA device; the vLLM ones also without the `gpu`
extra). CI has no GPU: these run on a CUDA host (`pytest -m gpu`), beside benchmarks/gpu_check.sh."""

from __future__ import annotations

import random

import pytest
import torch

from mopd import runtime
from mopd.config import DistillParams, TinyProfile
from mopd.models import build_base

pytestmark = pytest.mark.gpu

TEXTS = [f"[math] {a}+{b}=\\boxed{{{a + b}}}" for a in range(30) for b in range(30)]
# head_dim 64: what vLLM's attention backends take
SHAPE = TinyProfile(vocab_size=400, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    build_base(SHAPE, TEXTS, root / "student", seed=0)
    build_base(SHAPE, TEXTS, root / "teacher", seed=1)
    return root / "student", root / "teacher"


@pytest.fixture
def cuda_bf16():
    runtime.activate(runtime.resolve("cuda", "bfloat16"))
    yield
    runtime.activate(runtime.Runtime("cpu", "float32"))


def test_distill_on_cuda_in_bf16(models, tmp_path, cuda_bf16):
    """MOPD on CUDA: float32 master weights, bf16 autocast, an in-process bf16 teacher."""
    from mopd.tracking import NullTracker
    from mopd.trainers.distill import train_mopd

    student, teacher = models
    prompts = {"math": [{"prompt": f"[math] {a}+{b}="} for a in range(10) for b in range(3)]}
    history = train_mopd(student, {"math": teacher}, prompts, tmp_path,
                         DistillParams(max_steps=3, prompts_per_step=8, checkpoint_every=None), seed=0,
                         tracker=NullTracker())
    assert len(history["distill/loss"]) == 3 and all(torch.isfinite(torch.tensor(v)) for _, v in history["distill/loss"])
    assert runtime.placements()[0].startswith("cuda")


def test_vllm_teacher_server_scores_as_the_checkpoint_does(models, cuda_bf16):
    """`teacher_transport: vllm`: `vllm serve` on the teacher's checkpoint, scored through the HTTP
    client, gives the in-process teacher's log-probs (bf16 tolerance)."""
    pytest.importorskip("vllm")
    from mopd.opd.settings import VLLMServeParams
    from mopd.teachers import InProcessTeacher
    from mopd.teachers.http import HTTPTeacher
    from mopd.teachers.vllm_serve import vllm_teacher_servers

    _, teacher = models
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(8)] for _ in range(4)]
    completions = [[rng.randrange(3, 300) for _ in range(6)] for _ in range(4)]
    local = InProcessTeacher.from_pretrained(teacher, name="math").score(prompts, completions, topk=4)
    settings = VLLMServeParams(placement="shared", gpu_memory_utilization=0.2, extra_args=["--enforce-eager"])
    with vllm_teacher_servers({"math": teacher}, settings, dtype="bfloat16", max_logprobs=4) as urls:
        served = HTTPTeacher("math", [urls["math"]], model="math").score(prompts, completions, topk=4)
    for a, b in zip(local, served):
        assert torch.allclose(a.logprobs_C.float(), b.logprobs_C.float(), atol=0.1), (a.logprobs_C, b.logprobs_C)


def test_grpo_with_trl_colocated_vllm(models, tmp_path, cuda_bf16):
    """`runtime.rollout: vllm` in a GRPO stage: TRL's colocated engine samples, TRL syncs it."""
    pytest.importorskip("vllm")
    from mopd.chat import PLAIN
    from mopd.settings.grpo import GRPOParams
    from mopd.tracking import NullTracker
    from mopd.trainers.grpo import train_grpo

    student, _ = models
    runtime.activate(runtime.Runtime("cuda:0", "bfloat16", "vllm", vllm={"gpu_memory_utilization": 0.2}))
    records = [{"prompt": f"[math] {a}+{b}=", "reference": str(a + b)} for a in range(10) for b in range(3)]
    params = GRPOParams(max_steps=2, batch_size=8, num_generations=4, max_completion_length=8)
    history = train_grpo(student, records, "math", tmp_path / "out", params, 0, NullTracker(), fmt=PLAIN)
    assert len(history["train/reward"]) == 2 and (tmp_path / "out/model/model.safetensors").is_file()
