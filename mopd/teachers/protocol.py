"""The request schema of the embedded teacher server's ``POST /v1/completions``: every field of
the OpenAI completions API and of vLLM's `CompletionRequest` is accepted (vLLM's
``vllm/entrypoints/openai/completion/protocol.py``); anything else is a 400 naming the field.

The server scores prompts and generates no token, so fields split three ways:

- honoured: ``model`` (404 unless the served name or the model path), ``prompt`` (token ids, a
  list of them, a string or a list of strings; strings need the server's tokenizer),
  ``max_tokens`` (0 or 1: nothing is generated), ``prompt_logprobs``, ``echo`` and ``logprobs``
  (with ``echo``: the legacy OpenAI log-probs over the prompt), ``add_special_tokens``,
  ``truncate_prompt_tokens`` / ``truncation_side``, ``return_tokens_as_token_ids``,
  ``return_token_ids``;
- accepted only at the value that needs no generation or streaming (anything else is a 400 saying
  so): ``n`` and ``best_of`` (1), ``stream`` (false), ``use_beam_search`` (false), ``suffix`` and
  ``prompt_embeds`` (null);
- accepted, type-checked and ignored (:data:`IGNORED`): they steer sampling of generated tokens,
  scheduling or tracing. vLLM computes prompt log-probs from the raw model output (before
  temperature, penalties, logit bias, top-p/k), so ignoring them returns what vLLM returns.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

INT64 = {"ge": -(2**63), "le": 2**63 - 1}
TokenIds = list[Annotated[StrictInt, Field(ge=0)]]
Prompt = TokenIds | list[TokenIds] | StrictStr | list[StrictStr]

# Accepted and ignored: they affect only generated tokens (none here), scheduling or tracing.
IGNORED = (
    "temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "logit_bias", "seed", "stop", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "allowed_token_ids", "bad_words", "logprob_token_ids",
    "length_penalty", "watermarking", "response_format", "structured_outputs", "stream_options",
    "stream_interval", "repetition_detection", "thinking_token_budget", "user", "priority",
    "request_id", "session_id", "cache_salt", "kv_transfer_params", "ec_transfer_params",
    "vllm_xargs", "routed_experts_prompt_start", "return_token_offsets", "return_mm_kwargs",
)


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
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = 1
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


# Accepted fields whose other values would need generation or streaming: field -> (the value
# that is supported, why the others are refused).
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "n": (1, "this server generates no token, so more choices would only repeat it; send 1"),
    "best_of": (1, "this server generates no token; send 1 or leave it out"),
    "stream": (False, "streaming is not supported by this server; send false or leave it out"),
    "use_beam_search": (False, "beam search is not supported (no token is generated)"),
    "suffix": (None, "not supported (as in vLLM); leave it out"),
    "prompt_embeds": (None, "prompt embeddings are not supported; send token ids or text"),
}


def unsupported(req: CompletionRequest) -> str | None:
    """The 400 message for the first accepted field holding a value this server cannot serve."""
    if req.max_tokens is not None and req.max_tokens > 1:
        return (f"max_tokens: {req.max_tokens}; this server scores prompts and generates no "
                "token, send 0 or 1 (generation needs vLLM)")
    for name, (ok, why) in UNSUPPORTED.items():
        value = getattr(req, name)
        if value is not None and value != ok:
            return f"{name}: {why}"
    return None
