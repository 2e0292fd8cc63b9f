"""mergekit merges of tiny Qwen3 checkpoints, checked numerically against the formulas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mopd.merging import CONFIG_FILE, merge, resolve_params

transformers = pytest.importorskip("transformers")


def _tiny_config():
    return transformers.Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
    )


def _save_tokenizer(path: Path) -> None:
    """A word-level tokenizer made on the spot (the hub cannot be reached)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(126)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base (the "SFT" model) and three "teachers" = base + a small random shift each."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    base = transformers.Qwen3ForCausalLM(_tiny_config())
    base.save_pretrained(root / "base")
    _save_tokenizer(root / "base")
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    teachers = []
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        model = transformers.Qwen3ForCausalLM(_tiny_config())
        model.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base_sd.items()})
        model.save_pretrained(root / f"t{i}")
        teachers.append(root / f"t{i}")
    return root / "base", teachers


def _sd(path: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def test_linear_is_mean_of_teachers_and_copies_tokenizer(ckpts, tmp_path):
    base, teachers = ckpts
    out = merge("linear", base=base, models=teachers, out_dir=tmp_path / "lin")
    merged, ts = _sd(out), [_sd(t) for t in teachers]
    assert set(merged) == set(ts[0]) and "lm_head.weight" in merged
    for k in merged:
        torch.testing.assert_close(merged[k], sum(t[k] for t in ts) / 3, atol=1e-6, rtol=0)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.bin"))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("w5 w7")["input_ids"] == [7, 9]
    cfg = yaml.safe_load((out / CONFIG_FILE).read_text())
    assert cfg["merge_method"] == "linear" and "base_model" not in cfg  # base does not participate
    assert [m["parameters"]["weight"] for m in cfg["models"]] == [1.0, 1.0, 1.0]


def test_linear_weighted(ckpts, tmp_path):
    base, teachers = ckpts
    out = merge("linear", base=base, models=teachers[:2], out_dir=tmp_path / "w", weights=[3.0, 1.0])
    merged, t0, t1 = _sd(out), _sd(teachers[0]), _sd(teachers[1])
    for k in merged:
        torch.testing.assert_close(merged[k], (3 * t0[k] + t1[k]) / 4, atol=1e-6, rtol=0)


def test_task_arithmetic_formula(ckpts, tmp_path):
    base, teachers = ckpts
    lam = 0.7
    out = merge("task_arithmetic", base=base, models=teachers, out_dir=tmp_path / "ta", params={"lambda": lam})
    merged, b, ts = _sd(out), _sd(base), [_sd(t) for t in teachers]
    for k in merged:  # base + lambda * sum_i (t_i - base)
        torch.testing.assert_close(merged[k], b[k] + lam * sum(t[k] - b[k] for t in ts), atol=1e-6, rtol=0)
    cfg = yaml.safe_load((out / CONFIG_FILE).read_text())
    assert cfg["parameters"] == {"lambda": 0.7} and cfg["base_model"] == str(base.resolve())


def test_ties_density_1_matches_sign_election(ckpts, tmp_path):
    """Without trimming, TIES = base + sum of the deltas agreeing with the elected sign / their count."""
    base, teachers = ckpts
    out = merge("ties", base=base, models=teachers, out_dir=tmp_path / "ties", params={"density": 1.0})
    merged, b, ts = _sd(out), _sd(base), [_sd(t) for t in teachers]
    for k in merged:
        d_N = torch.stack([t[k] - b[k] for t in ts])  # N x weight shape
        elected = torch.where(d_N.sum(0) >= 0, 1.0, -1.0)
        agree_N = (d_N.sign() == elected).double()
        expected = b[k] + (d_N * agree_N).sum(0) / agree_N.sum(0).clamp(min=1)
        torch.testing.assert_close(merged[k], expected, atol=1e-6, rtol=0)


def test_ties_trims_to_density(ckpts, tmp_path):
    base, teachers = ckpts
    out = merge("ties", base=base, models=teachers[:1], out_dir=tmp_path / "t", params={"density": 0.2})
    merged, b = _sd(out), _sd(base)
    w = "model.layers.0.mlp.up_proj.weight"  # 64 x 32 entries
    changed = (merged[w] != b[w]).double().mean().item()
    assert changed == pytest.approx(0.2, abs=0.01)


def test_dare_drops_80_percent_seeded(ckpts, tmp_path):
    base, teachers = ckpts
    b = _sd(base)
    w = "model.layers.1.mlp.down_proj.weight"  # 32 x 64 entries
    runs = {}
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        out = merge("dare_linear", base=base, models=teachers[:1], out_dir=tmp_path / name, params={"seed": seed})
        runs[name] = _sd(out)[w]
    changed = (runs["a"] != b[w]).double().mean().item()
    assert 0.15 < changed < 0.25  # drop p = 0.8 (M2RL mask ratio), binomial noise over 2048 entries
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.equal(runs["a"], runs["c"])
    assert torch.equal(torch.rand(3), expected_next)  # the caller's global RNG stream is untouched


def test_dare_ties_and_sce_run(ckpts, tmp_path):
    base, teachers = ckpts
    b, t0 = _sd(base), _sd(teachers[0])
    dt = _sd(merge("dare_ties", base=base, models=teachers, out_dir=tmp_path / "dt"))
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.isfinite(dt[w]).all() and not torch.equal(dt[w], b[w])
    # SCE of a single teacher: weight 1, no sign conflict -> exactly that teacher
    one = _sd(merge("sce", base=base, models=teachers[:1], out_dir=tmp_path / "sce1"))
    for k in one:
        torch.testing.assert_close(one[k], t0[k], atol=1e-6, rtol=0)
    three = _sd(merge("sce", base=base, models=teachers, out_dir=tmp_path / "sce3", params={"select_topk": 0.5}))
    assert not torch.equal(three[w], b[w])


def test_bad_inputs_fail_before_work(ckpts, tmp_path):
    base, teachers = ckpts
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="unknown merge method 'slurp'"):
        merge("slurp", base=base, models=teachers, out_dir=out)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['density'\] for merge method 'task_arithmetic'"):
        merge("task_arithmetic", base=base, models=teachers, out_dir=out, params={"density": 0.5})
    with pytest.raises(ValueError, match="'density' must be a number in \\(0, 1\\], got 0"):
        merge("ties", base=base, models=teachers, out_dir=out, params={"density": 0})
    with pytest.raises(ValueError, match="'lambda' must be a finite number > 0"):
        merge("task_arithmetic", base=base, models=teachers, out_dir=out, params={"lambda": float("nan")})
    with pytest.raises(ValueError, match="weights has 2 entries but there are 3 models"):
        merge("linear", base=base, models=teachers, out_dir=out, weights=[1, 1])
    with pytest.raises(ValueError, match="'sce' takes no per-model weights"):
        merge("sce", base=base, models=teachers, out_dir=out, weights=[1, 1, 1])
    with pytest.raises(ValueError, match="models is empty"):
        merge("linear", base=base, models=[], out_dir=out)
    assert not out.exists()


def test_bad_checkpoints(ckpts, tmp_path):
    base, teachers = ckpts
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((base / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ValueError, match="has no model.safetensors.*pickled .bin weights are never loaded"):
        merge("linear", base=base, models=[teachers[0], pickled], out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="no config.json"):
        merge("linear", base=tmp_path / "missing", models=teachers, out_dir=tmp_path / "o")
    wide = tmp_path / "wide"
    cfg = _tiny_config()
    cfg.hidden_size = 48
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(wide)
    with pytest.raises(ValueError, match="hidden_size=48 but base .* has 32"):
        merge("ties", base=base, models=[teachers[0], wide], out_dir=tmp_path / "o")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True"):
        merge("linear", base=base, models=teachers, out_dir=full)
    assert (full / "x").read_text() == "keep me"
    merge("linear", base=base, models=teachers, out_dir=full, overwrite=True)
    assert not (full / "x").exists() and (full / "model.safetensors").is_file()
    assert json.loads((full / "config.json").read_text())["model_type"] == "qwen3"


def test_resolve_params_defaults():
    assert resolve_params("dare_ties", None) == {
        "dtype": None,
        "seed": 0,
        "density": 0.2,
        "lambda": 1.0,
        "normalize": False,
    }
    with pytest.raises(ValueError, match="'dtype' must be one of"):
        resolve_params("linear", {"dtype": "fp8"})


def test_dtype_bfloat16_output(ckpts, tmp_path):
    from safetensors import safe_open

    base, teachers = ckpts
    out = merge("linear", base=base, models=teachers, out_dir=tmp_path / "bf", params={"dtype": "bfloat16"})
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
