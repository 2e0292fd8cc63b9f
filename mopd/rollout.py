"""Student rollouts: the `RolloutBackend` protocol, its transformers backend (`sample`, the
default) and an optional vLLM backend (the `gpu` extra, imported lazily).

Sampling is plain ancestral sampling at a temperature (top-k and top-p disabled: transformers
defaults to top_k=50, which would make the sampled policy differ from the model whose log-probs
we compute). `pack` lays prompt + completion out right-padded for scoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from mopd.chat import PromptFormat, render_prompts


@dataclass(frozen=True)
class Sample:
    prompt_index: int  # which prompt (of the batch given to `sample`) this completes
    prompt_ids: list[int]
    completion_ids: list[int]  # generated tokens, up to and including EOS when one was produced
    text: str  # decoded completion, without special tokens


# why: 9 parameters: sample_ids's keyword-only sampling knobs plus the pad and EOS ids a
# tokenizer would give, so a caller holding only token ids (no tokenizer) samples alike.
@torch.no_grad()
def generate_ids(model, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
                 seed: int, pad_id: int, eos_id: int, batch_size: int = 64) -> list[tuple[int, list[int]]]:
    """``n`` sampled continuations of each token-id prompt, grouped (prompt i's are contiguous):
    ``(prompt index, completion ids)``. Prompts are left-padded per micro-batch, exactly as the
    tokenizer pads a batch of texts, so ``sample`` and a caller holding ids sample alike."""
    if n < 1 or max_new_tokens < 1 or temperature <= 0:
        raise ValueError(f"need n>=1, max_new_tokens>=1, temperature>0; got {n}, {max_new_tokens}, {temperature}")
    expanded = [i for i in range(len(prompt_ids)) for _ in range(n)]
    out: list[tuple[int, list[int]]] = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(expanded), batch_size):
            idx = expanded[start:start + batch_size]
            width = max(len(prompt_ids[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = prompt_ids[i]
                ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                attn[row, width - len(p):] = 1
            gen = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device),
                                 do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id)
            out += [(i, _trim(gen[row, width:].tolist(), eos_id, pad_id)) for row, i in enumerate(idx)]
    model.train(was_training)
    return out


def sample_ids(model, tokenizer, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int,
               temperature: float, seed: int, batch_size: int = 64) -> list[Sample]:
    """``n`` sampled completions per token-id prompt (grouped: prompt i's samples are contiguous)."""
    got = generate_ids(model, prompt_ids, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                       batch_size=batch_size)
    return [Sample(i, list(prompt_ids[i]), comp, tokenizer.decode(comp, skip_special_tokens=True))
            for i, comp in got]


def encode_prompts(tokenizer, prompts: list[str], fmt: PromptFormat) -> list[list[int]]:
    """Token ids of each prompt as the model is asked it (mopd.chat: the chat template or text)."""
    return render_prompts(tokenizer, prompts, fmt)


# why: 9 parameters: sample_ids's sampling knobs plus the prompt format the texts are asked in.
def sample(model, tokenizer, prompts: list[str], *, fmt: PromptFormat, n: int, max_new_tokens: int,
           temperature: float, seed: int, batch_size: int = 64) -> list[Sample]:
    """``n`` sampled completions per prompt (grouped: prompt i's samples are contiguous)."""
    return sample_ids(model, tokenizer, encode_prompts(tokenizer, prompts, fmt), n=n,
                      max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size)


def _trim(ids: list[int], eos: int, pad: int) -> list[int]:
    """Cut after the first EOS (kept: the model is trained to stop); drop trailing padding."""
    for j, t in enumerate(ids):
        if t == eos:
            return ids[: j + 1]
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    return ids


def pack(samples: list[Sample], pad_id: int, device=None):
    """Right-padded ``input_ids_BT``, ``attention_mask_BT`` and ``completion_mask_BT`` (1 where
    the token at t is a completion token; its log-prob comes from position t-1)."""
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    T = max(lengths)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), T), dtype=torch.long)
    comp = torch.zeros((len(samples), T), dtype=torch.float32)
    for b, s in enumerate(samples):
        seq = s.prompt_ids + s.completion_ids
        ids[b, : len(seq)] = torch.tensor(seq)
        attn[b, : len(seq)] = 1
        comp[b, len(s.prompt_ids): len(seq)] = 1.0
    return ids.to(device), attn.to(device), comp.to(device)


@runtime_checkable
class RolloutBackend(Protocol):
    """Samples completions of the current policy. ``update_weights`` is called after each
    optimiser step by trainers that sample on-policy (a no-op for a backend sharing the module)."""

    name: str

    def sample(self, prompts: list[str], *, n: int, max_new_tokens: int, temperature: float,
               seed: int) -> list[Sample]: ...

    def sample_ids(self, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
                   seed: int) -> list[Sample]: ...

    def update_weights(self, model) -> None: ...


class TransformersRollout:
    """`sample` with ``model.generate`` on the very module being trained (no weight copy)."""

    name = "transformers"

    def __init__(self, model, tokenizer, *, fmt: PromptFormat, batch_size: int = 64):
        self.model, self.tokenizer, self.fmt, self.batch_size = model, tokenizer, fmt, batch_size

    def sample(self, prompts, *, n, max_new_tokens, temperature, seed) -> list[Sample]:
        return sample(self.model, self.tokenizer, prompts, fmt=self.fmt, n=n, max_new_tokens=max_new_tokens,
                      temperature=temperature, seed=seed, batch_size=self.batch_size)

    def sample_ids(self, prompt_ids, *, n, max_new_tokens, temperature, seed) -> list[Sample]:
        return sample_ids(self.model, self.tokenizer, prompt_ids, n=n, max_new_tokens=max_new_tokens,
                          temperature=temperature, seed=seed, batch_size=self.batch_size)

    def update_weights(self, model) -> None:
        self.model = model


class VLLMRollout:
    """vLLM sampling (GPU hosts, `gpu` extra), colocated in the trainer's process. Same sampling
    rule as `sample` (temperature only, top-k/top-p off). ``update_weights(module)`` copies a
    trained module's parameters into the engine (the colocate recipe TRL's GRPO uses: the
    engine's model ``load_weights`` over ``named_parameters``), then resets the prefix cache, so
    no rollout after an update reuses KV computed under the old weights. Needs vLLM's engine in
    this process: as TRL's colocate mode does, the engine is built with
    ``distributed_executor_backend="external_launcher"`` (RANK / LOCAL_RANK / WORLD_SIZE from the
    stage's process group, one engine per process) and a bounded ``gpu_memory_utilization``
    (default 0.3: the trained student and the teachers share the device). ``engine_kwargs``
    override either. Never run by the CPU test suite; no GPU was available to check it against a
    vLLM release."""

    name = "vllm"

    def __init__(self, model_path: str | Path, tokenizer, *, fmt: PromptFormat, dtype: str = "bfloat16",
                 **engine_kwargs):
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the host
            raise ImportError("VLLMRollout needs vLLM: install the `gpu` extra on a CUDA host") from exc
        import os

        from mopd import runtime

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine's model in this process
        if engine_kwargs.get("distributed_executor_backend", "external_launcher") == "external_launcher":
            # vLLM's external launcher joins the process group this process is in (or a group of one)
            os.environ.setdefault("RANK", str(runtime.rank()))
            os.environ.setdefault("LOCAL_RANK", str(runtime.rank()))
            os.environ.setdefault("WORLD_SIZE", str(runtime.world_size()))
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(runtime.free_port()))
        share = (runtime.current().vllm or {}).get("gpu_memory_utilization", 0.3)  # runtime.vllm
        kwargs = {"distributed_executor_backend": "external_launcher", "gpu_memory_utilization": share,
                  "seed": runtime.rank(), **engine_kwargs}
        self.tokenizer, self.fmt = tokenizer, fmt
        self.llm = LLM(model=str(model_path), dtype=dtype, **kwargs)
        self.synced = 0  # weight syncs so far

    def sample(self, prompts, *, n, max_new_tokens, temperature, seed) -> list[Sample]:
        return self.sample_ids(encode_prompts(self.tokenizer, prompts, self.fmt), n=n, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed)

    def sample_ids(self, prompt_ids, *, n, max_new_tokens, temperature, seed) -> list[Sample]:
        from vllm import SamplingParams, TokensPrompt

        if n < 1 or max_new_tokens < 1 or temperature <= 0:
            raise ValueError(f"need n>=1, max_new_tokens>=1, temperature>0; got {n}, {max_new_tokens}, {temperature}")
        ids = [list(p) for p in prompt_ids]
        params = SamplingParams(n=n, temperature=temperature, top_k=-1, top_p=1.0, seed=seed,
                                max_tokens=max_new_tokens, stop_token_ids=[self.tokenizer.eos_token_id])
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        return [Sample(i, ids[i], c, self.tokenizer.decode(c, skip_special_tokens=True))
                for i, out in enumerate(outs)
                for c in (_trim(list(o.token_ids), eos, pad) for o in out.outputs)]

    def update_weights(self, model) -> None:
        engine_model = _vllm_model(self.llm)
        engine_model.load_weights((name, p.detach()) for name, p in model.named_parameters())
        self.llm.reset_prefix_cache()
        self.synced += 1


def _vllm_model(llm):
    """The torch module inside a colocated vLLM engine (V1 worker layout first, then V0's)."""
    worker = llm.llm_engine.model_executor.driver_worker
    for path in (("worker", "model_runner", "model"), ("model_runner", "model")):
        node = worker
        try:
            for attr in path:
                node = getattr(node, attr)
        except AttributeError:
            continue
        return node
    raise RuntimeError("this vLLM release keeps its model out of reach (no driver_worker.[worker.]model_runner"
                       ".model): run it with VLLM_ENABLE_V1_MULTIPROCESSING=0, or use the transformers backend")


def open_policy(model_dir: Path, tokenizer, fmt: PromptFormat):
    """A checkpoint's sampling policy per the stage's runtime (`runtime.rollout`): its transformers
    module, or a colocated vLLM engine (difficulty, evaluate: fixed policies)."""
    from mopd import runtime
    from mopd.models import load_model

    rt = runtime.current()
    if rt.rollout == "vllm":
        return VLLMRollout(model_dir, tokenizer, fmt=fmt, dtype=rt.dtype)
    return load_model(model_dir)


# why: 9 parameters: `sample`'s, for a module or a rollout backend.
def sample_policy(policy, tokenizer, prompts: list[str], *, fmt: PromptFormat, n: int, max_new_tokens: int,
                  temperature: float, seed: int, batch_size: int = 64) -> list[Sample]:
    """`sample` for a module or a rollout backend (:func:`open_policy`)."""
    if isinstance(policy, VLLMRollout):
        return policy.sample(prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return sample(policy, tokenizer, prompts, fmt=fmt, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                  seed=seed, batch_size=batch_size)


def make_rollout(kind: str, model, tokenizer, **kwargs) -> RolloutBackend:
    """``kind``: ``transformers`` (``model`` a module) or ``vllm`` (``model`` a checkpoint path)."""
    if kind == "transformers":
        return TransformersRollout(model, tokenizer, **kwargs)
    if kind == "vllm":
        return VLLMRollout(model, tokenizer, **kwargs)
    raise ValueError(f"rollout backend {kind!r}: expected 'transformers' or 'vllm'")
