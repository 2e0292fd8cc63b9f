"""LoRA as an option of SFT, GRPO and distill (issue 24, item 5): only the adapters train, and the
stage saves merged weights — a plain checkpoint of the base architecture that every later stage
and mergekit load. Observed on the saved file: no adapter tensor in it, the layers LoRA does not
touch (embeddings, LM head, norms) bit-identical to the start, the targeted linear layers moved."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mopd.chat import PLAIN
from mopd.config import DistillParams
from mopd.models import build_base, load_model
from mopd.settings.base import LoraParams
from mopd.settings.grpo import GRPOParams
from mopd.settings.sft import SFTParams
from mopd.tracking import NullTracker
from tests.test_distill import SMALL, TEXTS

LORA = LoraParams(r=4, alpha=8.0)
RECORDS = [{"prompt": f"[math] {a}+{b}=", "completion": f"\\boxed{{{a + b}}}", "reference": str(a + b)}
           for a in range(4) for b in range(4)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    build_base(SMALL, TEXTS, root / "base", seed=0)
    return root / "base"


def assert_merged_lora(start, trained_dir):
    got = load_file(str(trained_dir / "model.safetensors"))
    assert not [k for k in got if "lora" in k or "base_layer" in k], "adapter tensors in the saved checkpoint"
    assert set(got) == set(start), "the saved checkpoint is not of the base architecture"
    untouched = [k for k in got if "embed_tokens" in k or "lm_head" in k or "norm" in k]
    assert untouched and all(torch.equal(got[k], start[k]) for k in untouched)
    moved = [k for k in got if k.endswith("proj.weight") and not torch.equal(got[k], start[k])]
    assert moved, "no targeted linear layer changed"
    load_model(trained_dir)  # a plain checkpoint: loads like any other


def test_sft_with_lora_saves_merged_weights(base, tmp_path):
    from mopd.trainers.sft import train_sft

    start = load_file(str(base / "model.safetensors"))
    train_sft(base, RECORDS, tmp_path, SFTParams(max_steps=2, batch_size=4, learning_rate=1e-2, lora=LORA), 0,
              NullTracker(), fmt=PLAIN)
    assert_merged_lora(start, tmp_path / "model")


def test_grpo_with_lora_saves_merged_weights(base, tmp_path):
    from mopd.trainers.grpo import train_grpo

    start = load_file(str(base / "model.safetensors"))
    train_grpo(base, RECORDS, "math", tmp_path,
               GRPOParams(max_steps=2, batch_size=4, num_generations=2, max_completion_length=4, learning_rate=1e-2,
                          lora=LORA), 0, NullTracker(), fmt=PLAIN)
    got = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert not [k for k in got if "lora" in k or "base_layer" in k] and set(got) == set(start)
    assert all(torch.equal(got[k], start[k]) for k in got if "embed_tokens" in k or "lm_head" in k)


def test_distill_with_lora_trains_adapters_only_and_saves_merged_weights(base, tmp_path):
    from mopd.trainers.distill import train_distill

    teacher = tmp_path / "teacher"
    build_base(SMALL, TEXTS, teacher, seed=1)
    start = load_file(str(base / "model.safetensors"))
    params = DistillParams(max_steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4,
                           learning_rate=1e-2, checkpoint_every=None, lora=LORA)
    train_distill(base, {"math": teacher}, {"math": RECORDS}, tmp_path / "out", params, 0, NullTracker(), fmt=PLAIN)
    assert_merged_lora(start, tmp_path / "out" / "model")


def test_lora_is_left_out_of_the_cache_key_while_unset():
    assert "lora" not in SFTParams().model_dump() and "lora" not in DistillParams().model_dump()
    assert SFTParams(lora=LORA).model_dump()["lora"]["r"] == 4
