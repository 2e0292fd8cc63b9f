"""A damaged in-stage checkpoint (ours or transformers') is set aside with a message and the stage
goes on from the previous one, or afresh: never a crash at every rerun. CI once failed this way: a
kill while transformers wrote ``trainer_state.json`` left it empty, and every rerun of the teacher
stopped on ``Expecting value: line 1 column 1``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mopd import checkpoint as ckpt
from mopd.trainers.callbacks import _last_complete, _resume_point


@pytest.fixture(scope="module")
def tiny():
    import torch

    from mopd.models import build_tiny_model, build_tokenizer
    from mopd.settings.model import TinyProfile

    tok = build_tokenizer(["hello world, a tiny corpus"] * 4, 300)
    model = build_tiny_model(TinyProfile(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8), tok, seed=0)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optim.step()
    return model, tok, optim


def _save(path: Path, tiny, step: int = 4) -> None:
    model, tok, optim = tiny
    ckpt.save(path, key="k", step=step, model=model, tokenizer=tok, optim=optim, py_rng=random.Random(0),
              history={"loss": [(1, 0.5)]})


@pytest.mark.parametrize("damage", ["state_empty", "state_cut", "weights_cut", "rng_missing", "rng_garbage",
                                    "older_format", "other_shape"])
def test_damaged_distill_checkpoint_is_set_aside_and_the_stage_starts_afresh(tmp_path, tiny, damage, capsys):
    path = tmp_path / ".mopd/checkpoints/distill"
    _save(path, tiny)
    model, _, optim = tiny
    assert ckpt.load(path, key="k", model=model, optim=optim, py_rng=random.Random()).step == 4  # intact: resumes
    state = path / ckpt.STATE_FILE
    if damage == "state_empty":
        state.write_text("")
    elif damage == "state_cut":
        state.write_text(state.read_text()[:40])
    elif damage == "weights_cut":
        w = path / "model/model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "rng_missing":
        (path / "rng.safetensors").unlink()
    elif damage == "rng_garbage":
        (path / "rng.safetensors").write_bytes(b"\x08" + bytes(64))
    elif damage == "older_format":  # a state without the Python RNG (an older mopd)
        st = json.loads(state.read_text())
        del st["python_random"]
        state.write_text(json.dumps(st))
    else:
        from safetensors.torch import load_file, save_file

        w = load_file(str(path / "model/model.safetensors"))
        name = next(iter(w))
        w[name] = w[name][..., :1].contiguous()
        save_file(w, str(path / "model/model.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert ckpt.load(path, key="k", model=model, optim=optim, py_rng=random.Random()) is None
    assert not path.exists()
    aside, = (tmp_path / ".mopd/checkpoints/distill.damaged").iterdir()
    assert (aside / "model").is_dir()  # moved whole, for a person to look at
    assert "is damaged" in capsys.readouterr().out
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())  # nothing half-restored


def _trl_checkpoint(root: Path, step: int) -> Path:
    """The files transformers writes into ``checkpoint-N`` (trainer_state.json last)."""
    import torch
    from safetensors.torch import save_file

    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, path / "optimizer.pt")  # (a zip, as transformers writes it)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return path


def test_trainer_checkpoint_cut_short_is_set_aside_and_the_previous_one_resumed(tmp_path, capsys):
    root = tmp_path / ".mopd/checkpoints/teacher__if"
    for step in (4, 8, 12, 16):
        _trl_checkpoint(root, step)
    (root / "checkpoint-16/trainer_state.json").write_text("")  # the kill in CI: empty
    w = root / "checkpoint-12/model.safetensors"
    w.write_bytes(w.read_bytes()[:20])  # weights cut short
    (root / "checkpoint-8/trainer_state.json").write_text(json.dumps({"global_step": 3}))  # another step's
    half = root / "checkpoint-20"
    half.mkdir()  # a kill before trainer_state.json: removed
    (half / "model.safetensors").write_bytes(b"")
    assert _resume_point(root, "key", main=True) == str(root / "checkpoint-4")
    assert not half.exists() and sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-4"]
    aside = sorted(p.name.split("-2")[0] for p in (tmp_path / ".mopd/checkpoints/teacher__if.damaged").iterdir())
    assert aside == ["checkpoint-12", "checkpoint-16", "checkpoint-8"]
    out = capsys.readouterr().out
    assert "trainer_state.json: JSONDecodeError" in out and "model.safetensors" in out and "names step 3" in out
    # a second rerun finds the same point, without new messages (no loop)
    assert _resume_point(root, "key", main=True) == str(root / "checkpoint-4")
    assert "damaged" not in capsys.readouterr().out
    assert _last_complete(root, remove=False) == str(root / "checkpoint-4")


def test_unreadable_key_mark_sets_the_checkpoints_aside(tmp_path, capsys):
    root = tmp_path / ".mopd/checkpoints/teacher__if"
    _trl_checkpoint(root, 4)
    (root / "key.json").write_text('{"ke')
    assert _resume_point(root, "key", main=True) is None  # whose they are is unknown: start afresh
    assert json.loads((root / "key.json").read_text()) == {"key": "key"}
    assert not list(root.glob("checkpoint-*"))
    assert "key.json unreadable" in capsys.readouterr().out


@pytest.mark.parametrize("record", ["[]", '{"stage": "data", "out_dir": "artifacts/data", "files": null}',
                                    "{", '"text"', '{"stage": "data"}', '{"stage": "data", "out_dir": "x", '
                                    '"files": {"a": 1}}', '{"stage": 1, "out_dir": "x", "files": {}}'])
def test_a_damaged_record_makes_its_stage_run_with_the_reason(micro_project, record):
    """`mopd plan` never crashes on a damaged result.json: that stage is `run`, the reason says
    `record unreadable`, and so are the stages after it."""
    import subprocess
    import sys

    out_dir = micro_project / "artifacts" / "data"
    out_dir.mkdir(parents=True)
    (out_dir / "result.json").write_text(record)
    proc = subprocess.run([sys.executable, "-m", "mopd.cli", "plan", "--json"], cwd=micro_project,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = {d["stage"]: d for d in json.loads(proc.stdout)}["data"]
    assert data["action"] == "run" and "record unreadable" in data["reasons"][0], data


def test_an_unrecorded_file_in_an_output_folder_makes_its_stage_run(tmp_path):
    from mopd.artifacts import Result, hash_tree, load_result, write_result

    out = tmp_path / "artifacts" / "x"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"w")
    write_result(out, Result(stage="x", out_dir="artifacts/x", files=hash_tree(out)))
    assert load_result(out).problems(tmp_path) == []
    (out / "chat_template.jinja").write_text("{{ messages }}")
    assert load_result(out).problems(tmp_path) == [f"{out / 'chat_template.jinja'}: not in the record (added since)"]


def test_a_changed_byte_only_the_manifest_sees_sets_the_checkpoint_aside(tmp_path, tiny, capsys):
    """A flipped byte inside the optimiser's tensors parses fine (header intact): the sha256
    manifest, written last, is what catches it."""
    path = tmp_path / ".mopd/checkpoints/distill"
    _save(path, tiny)
    f = path / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    model, _, optim = tiny
    assert ckpt.load(path, key="k", model=model, optim=optim, py_rng=random.Random()) is None
    assert "optimizer.safetensors does not match its sha256" in capsys.readouterr().out


def test_interrupted_saves_leave_no_debris_and_an_interrupted_swap_is_restored(tmp_path, tiny, monkeypatch):
    model, _, optim = tiny
    path = tmp_path / ".mopd/checkpoints/distill"
    _save(path, tiny, step=8)
    # a kill between the two renames of a save: the previous checkpoint sits at .old-PID, none in place
    path.rename(path.parent / ".distill.old-4242")
    (path.parent / ".distill.partial-4242").mkdir()  # ... and the unfinished new one
    assert ckpt.load(path, key="k", model=model, optim=optim, py_rng=random.Random()).step == 8
    assert sorted(p.name for p in path.parent.iterdir()) == ["distill"]
    # a full disk during a save: the error propagates, no partial folder stays, the old one is intact

    def full(*a, **k):
        (a[0] / "model").mkdir(parents=True)
        (a[0] / "model" / "model.safetensors").write_bytes(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_write", full)
    with pytest.raises(OSError, match="No space left"):
        _save(path, tiny, step=12)
    assert sorted(p.name for p in path.parent.iterdir()) == ["distill"]
    monkeypatch.undo()
    assert ckpt.load(path, key="k", model=model, optim=optim, py_rng=random.Random()).step == 8


@pytest.mark.parametrize("damage", ["optimizer_cut", "rng_garbage", "weights_data_cut", "other_shape"])
def test_damaged_trainer_checkpoint_parts_set_it_aside(tmp_path, capsys, damage):
    """Each file transformers resumes from is checked before `resume_from_checkpoint`: the torch
    files read back whole (zip CRCs), the weights hold every byte their header promises and fit
    the model."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path / ".mopd/checkpoints/teacher__if"
    for step in (4, 8):
        path = _trl_checkpoint(root, step)
        torch.save({"python": [1, 2, 3]}, path / "rng_state.pth")
    bad = root / "checkpoint-8"
    if damage == "optimizer_cut":
        f = bad / "optimizer.pt"
        f.write_bytes(f.read_bytes()[:-40])
    elif damage == "rng_garbage":
        (bad / "rng_state.pth").write_bytes(b"garbage" * 10)
    elif damage == "weights_data_cut":
        save_file({"w": torch.zeros(4096)}, str(bad / "model.safetensors"))
        f = bad / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "other_shape":
        save_file({"w": torch.zeros(3)}, str(bad / "model.safetensors"))
    expected = {"w": (2,)}
    assert _resume_point(root, "key", main=True, expected=expected) == str(root / "checkpoint-4")
    out = capsys.readouterr().out
    assert f"{bad} is damaged" in out, out
    assert {"optimizer_cut": "optimizer.pt", "rng_garbage": "rng_state.pth", "weights_data_cut": "truncated",
            "other_shape": "other shape ['w']"}[damage] in out, out
