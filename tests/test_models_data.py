"""Models and data: the tiny profile builds locally and deterministically; the pretrained profile
loads a local directory by the same code path; real data loads from local files via `datasets`."""

from __future__ import annotations

import json

import pytest

from mopd.artifacts import hash_tree
from mopd.chat import PLAIN
from mopd.config import DataParams, DomainConfig, LocalSource, PretrainedProfile, TinyProfile
from mopd.data import domain_records, read_split, write_domain
from mopd.models import build_base, load_model, load_tokenizer

TEXTS = [f"[math] {a}+{b}=\\boxed{{{a + b}}}" for a in range(20) for b in range(20)]
SMALL = TinyProfile(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8)


def test_tiny_base_is_deterministic_and_roundtrips(tmp_path):
    m1 = build_base(SMALL, TEXTS, tmp_path / "a", seed=3)
    build_base(SMALL, TEXTS, tmp_path / "b", seed=3)
    assert hash_tree(tmp_path / "a") == hash_tree(tmp_path / "b")
    assert m1["vocab_size"] == 300 and m1["n_params"] > 0
    tok = load_tokenizer(tmp_path / "a")
    text = "[math] 7+8=\\boxed{15} ünïcødé ✓"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: nothing is unknown
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id
    assert (tmp_path / "a" / "model.safetensors").is_file()
    assert not list((tmp_path / "a").glob("*.bin"))


def test_pretrained_profile_loads_local_directory(tmp_path):
    build_base(SMALL, TEXTS, tmp_path / "hub_like", seed=0)
    profile = PretrainedProfile(source="pretrained", model=str(tmp_path / "hub_like"), dtype="float32",
                                chat_template=False)  # a base model: no template to ask it through
    metrics = build_base(profile, [], tmp_path / "base", seed=0)
    assert metrics["vocab_size"] == 300
    a = load_model(tmp_path / "hub_like").state_dict()
    b = load_model(tmp_path / "base").state_dict()
    assert all((a[k] == b[k]).all() for k in a)
    asked = profile.model_copy(update={"chat_template": True})
    with pytest.raises(ValueError, match="has no chat template, but the profile asks for one"):
        build_base(asked, [], tmp_path / "refused", seed=0)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="dtype 'int3'"):
        load_model(tmp_path, dtype="int3")


def test_synthetic_data_is_deterministic(tmp_path):
    params = DataParams(n_train=20, n_eval=5)
    a = domain_records("math", DomainConfig(verifier="math"), params, seed=1)
    b = domain_records("math", DomainConfig(verifier="math"), params, seed=1)
    c = domain_records("math", DomainConfig(verifier="math"), params, seed=2)
    assert a == b and a != c
    assert len(a["train"]) == 20 and len(a["eval"]) == 5
    write_domain(a, tmp_path / "math")
    back = read_split(tmp_path, "math", "train")
    assert [r["prompt"] for r in back] == [r["prompt"] for r in a["train"]]


def test_local_files_load_through_datasets(tmp_path):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}
            for i in range(12)]
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dom = DomainConfig(verifier="math", data=LocalSource(
        source="local", path=str(path), columns={"prompt": "question", "reference": "answer"}))
    recs = domain_records("arith", dom, DataParams(n_train=100, n_eval=4), seed=0)
    assert len(recs["train"]) == 8 and len(recs["eval"]) == 4  # last n_eval rows held out
    assert recs["eval"][-1]["reference"] == "22" and recs["train"][0]["domain"] == "arith"
    assert "What is 0 plus 0?" in recs["train"][0]["prompt"]


def test_local_file_missing_column_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"q": "1+1", "a": "2"}) + "\n")
    dom = DomainConfig(verifier="math", data=LocalSource(source="local", path=str(path)))
    with pytest.raises(ValueError, match="missing column"):
        domain_records("m", dom, DataParams(n_train=10, n_eval=1), seed=0)


def test_read_split_errors(tmp_path):
    with pytest.raises(ValueError, match="split 'dev'"):
        read_split(tmp_path, "math", "dev")
    with pytest.raises(FileNotFoundError, match="no train data for domain 'math'"):
        read_split(tmp_path, "math", "train")


def test_sft_tokenizes_prompt_and_completion_apart(tmp_path):
    """SFT trains on ids(prompt) + ids(completion) + EOS: the prompt exactly as every rollout
    tokenizes it. Joint tokenization merges across the boundary (this tokenizer was trained on
    joined text, so `=\\` is one token) and would train on a context inference never shows."""
    from mopd.trainers.sft import tokenize_pairs

    build_base(SMALL, TEXTS, tmp_path / "a", seed=0)
    tok = load_tokenizer(tmp_path / "a")
    records = [{"prompt": f"[math] {a}+{a}=", "completion": f"\\boxed{{{2 * a}}}"} for a in range(8)]
    joint = [tok(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"] for r in records]
    alone = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in records]
    assert any(j[:len(p)] != p for j, p in zip(joint, alone))  # the hazard is real here
    batch = tokenize_pairs(tok, records, PLAIN)
    for ids, mask, p, r in zip(batch["input_ids"], batch["completion_mask"], alone, records):
        assert ids[:len(p)] == p and mask[:len(p)] == [0] * len(p)
        completion = [i for i, m in zip(ids, mask) if m]
        assert completion[-1] == tok.eos_token_id
        assert tok.decode(completion[:-1]) == r["completion"]
