"""The request schema of the embedded teacher server's ``POST /v1/completions``: every field of
the OpenAI completions API and of vLLM's `CompletionRequest` is accepted (vLLM's
``vllm/entrypoints/openai/completion/protocol.py``); anything else is a 400 naming the field.

The server scores prompts (``prompt_logprobs``, ``echo``) and generates (``max_tokens`` tokens,
sampled as vLLM samples: :mod:`mopd.teachers.generation`). Fields split four ways:

- honoured: ``model`` (404 unless the served name or the model path), ``prompt`` (token ids, a
  list of them, a string or a list of strings; strings need the server's tokenizer),
  ``max_tokens`` (default 16 as in vLLM; null: up to the model's context), ``n``, ``best_of``
  (null or ``n``), ``temperature`` (0: greedy), ``top_p``, ``top_k``, ``seed``, ``stop``,
  ``stop_token_ids``, ``include_stop_str_in_output``, ``ignore_eos``, ``min_tokens``,
  ``skip_special_tokens``, ``prompt_logprobs``, ``echo``, ``logprobs``,
  ``add_special_tokens``, ``truncate_prompt_tokens`` / ``truncation_side``,
  ``return_tokens_as_token_ids``, ``return_token_ids``;
- a scoring request (``prompt_logprobs`` or ``echo``) with ``max_tokens`` 1 generates nothing:
  vLLM would sample one token that scoring clients (ours, lm-eval) discard;
- accepted only at their neutral value, because this server does not implement them (anything
  else is a 400 saying so): ``stream``, ``use_beam_search``, ``suffix``, ``prompt_embeds``, and
  when tokens are generated the sampling modifiers in :data:`NEUTRAL` (penalties, logit bias,
  min-p, bad words, allowed tokens, structured output);
- accepted, type-checked and ignored (:data:`IGNORED`): scheduling, tracing and detokenisation
  details that change no token and no log-prob.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

INT64 = {"ge": -(2**63), "le": 2**63 - 1}
TokenIds = list[Annotated[StrictInt, Field(ge=0)]]
Prompt = TokenIds | list[TokenIds] | StrictStr | list[StrictStr]

# Accepted and ignored: they change no generated token and no log-prob (scheduling, tracing),
# or they only matter for fields that are refused anyway (length_penalty: beam search).
IGNORED = (
    "spaces_between_special_tokens", "length_penalty", "stream_options", "stream_interval",
    "user", "priority", "request_id", "session_id", "cache_salt", "kv_transfer_params",
    "ec_transfer_params", "vllm_xargs", "routed_experts_prompt_start", "return_token_offsets",
    "return_mm_kwargs",
)

# Fields that take effect (scoring, generation, or the shape of the answer).
HONOURED = (
    "model", "prompt", "max_tokens", "n", "best_of", "temperature", "top_p", "top_k", "seed",
    "stop", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "prompt_logprobs", "echo", "logprobs", "add_special_tokens",
    "truncate_prompt_tokens", "truncation_side", "return_tokens_as_token_ids", "return_token_ids",
)

# Sampling modifiers this server does not implement: accepted at their neutral value only when
# tokens are generated (a scoring request generates none, so they change nothing there).
NEUTRAL: dict[str, tuple[tuple, str]] = {
    "frequency_penalty": ((None, 0.0), "0"), "presence_penalty": ((None, 0.0), "0"),
    "repetition_penalty": ((None, 1.0), "1"), "logit_bias": ((None, {}), "null"),
    "min_p": ((None, 0.0), "0"), "bad_words": ((None, []), "null"),
    "allowed_token_ids": ((None,), "null"), "logprob_token_ids": ((None,), "null"),
    "response_format": ((None,), "null"), "structured_outputs": ((None,), "null"),
    "watermarking": ((None, False), "false"),
    "repetition_detection": ((None,), "null"), "thinking_token_budget": ((None,), "null"),
}


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # OpenAI completions API
    model: StrictStr | None = None
    prompt: Prompt
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    echo: StrictBool | None = False
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 16
    n: Annotated[StrictInt, Field(ge=1)] | None = 1
    presence_penalty: float | None = None
    seed: Annotated[StrictInt, Field(**INT64)] | None = None
    stop: str | list[str] | None = None
    stream: StrictBool | None = False
    stream_options: dict[str, Any] | None = None
    suffix: str | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    user: str | None = None
    # vLLM sampling parameters
    use_beam_search: StrictBool | None = False
    top_k: StrictInt | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    watermarking: bool | None = None
    length_penalty: float | None = None
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    allowed_token_ids: list[StrictInt] | None = None
    prompt_logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    logprob_token_ids: list[StrictInt] | None = None
    bad_words: list[str] | None = None
    # vLLM extra parameters
    prompt_embeds: Any = None
    add_special_tokens: StrictBool = True
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    priority: Annotated[StrictInt, Field(**INT64)] | None = None
    request_id: str | None = None
    session_id: str | None = None
    return_tokens_as_token_ids: StrictBool | None = None
    return_token_ids: StrictBool | None = None
    routed_experts_prompt_start: Annotated[StrictInt, Field(ge=0)] | None = None
    return_token_offsets: bool | None = None
    return_mm_kwargs: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    repetition_detection: dict[str, Any] | None = None
    thinking_token_budget: StrictInt | None = None
    stream_interval: Annotated[StrictInt, Field(ge=1)] | None = None


# Accepted fields whose other values need what this server does not do: field -> (the value
# that is supported, why the others are refused).
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "stream": (False, "streaming is not supported by this server; send false or leave it out"),
    "use_beam_search": (False, "beam search is not supported; sampling and greedy (temperature 0) are"),
    "suffix": (None, "not supported (as in vLLM); leave it out"),
    "prompt_embeds": (None, "prompt embeddings are not supported; send token ids or text"),
}


def generates(req: CompletionRequest) -> bool:
    """Whether the request samples tokens: not for ``max_tokens`` 0, nor for a scoring request
    (``prompt_logprobs`` or ``echo``) with ``max_tokens`` 1."""
    if req.max_tokens == 0:
        return False
    return not (req.max_tokens == 1 and (req.prompt_logprobs is not None or bool(req.echo)))


def unsupported(req: CompletionRequest) -> str | None:
    """The 400 message for the first accepted field holding a value this server cannot serve."""
    for name, (ok, why) in UNSUPPORTED.items():
        value = getattr(req, name)
        if value is not None and value != ok:
            return f"{name}: {why}"
    if req.best_of is not None and req.best_of != (req.n or 1):
        return f"best_of: {req.best_of} differs from n = {req.n or 1}; best-of-n ranking is not supported"
    if generates(req):
        for name, (ok, neutral) in NEUTRAL.items():
            if getattr(req, name) not in ok:
                return (f"{name}: {getattr(req, name)!r} is not supported when generating; "
                        f"send {neutral} or leave it out")
        if req.top_k is not None and req.top_k < -1:
            return f"top_k: {req.top_k}; use -1 or 0 (off) or a positive k"
    elif (req.n or 1) > 1:
        return f"n: {req.n} choices of a request that generates no token would only repeat each other; send 1"
    return None
