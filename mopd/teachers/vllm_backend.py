"""Teacher scoring with an in-process vLLM engine (the `gpu` extra; imported lazily, GPU hosts
only). Uses vLLM's prompt log-probs (``SamplingParams(max_tokens=1, prompt_logprobs=k)``), the
same quantities `vllm serve` returns over HTTP. Not exercised by the CPU test suite."""

from __future__ import annotations

from mopd.teachers.base import SequenceScores, TeacherError, check_scores, unscaled_only, validate_request
from mopd.teachers.http import parse_prompt_logprobs


class VLLMTeacher:
    def __init__(self, model: str, *, name: str | None = None, dtype: str = "bfloat16", **engine_kwargs):
        try:
            from vllm import LLM
        except ImportError as exc:  # pragma: no cover - depends on the host
            raise ImportError("VLLMTeacher needs vLLM: install the `gpu` extra (pip install "
                              "'mopd[gpu]') on a CUDA host") from exc
        self.name = name or model
        self.llm = LLM(model=model, dtype=dtype, **engine_kwargs)

    def score(self, prompt_ids, completion_ids, *, topk: int | None = None,
              temperature: float = 1.0) -> list[SequenceScores]:
        from vllm import SamplingParams, TokensPrompt

        unscaled_only(temperature, f"vLLM teacher {self.name!r}")
        validate_request(prompt_ids, completion_ids, topk)
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        params = SamplingParams(max_tokens=1, prompt_logprobs=topk or 0, temperature=1.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        scores = []
        for out, s, p in zip(outs, seqs, prompt_ids):
            positions = [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank}
                                                 for t, lp in e.items()} for e in out.prompt_logprobs]
            scores.append(parse_prompt_logprobs(positions, s, len(p), topk, f"vLLM teacher {self.name!r}"))
        check_scores(scores, completion_ids, topk, f"vLLM teacher {self.name!r}")
        return scores

    def generate(self, prompt_ids, *, max_new_tokens: int, temperature: float, seed: int) -> list[list[int]]:
        """One sampled continuation per prompt (TrOPD's teacher prefixes): top-k/top-p off."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(n=1, max_tokens=max_new_tokens, temperature=temperature, top_p=1.0,
                                top_k=-1, seed=seed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                 use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        del self.llm


__all__ = ["VLLMTeacher", "TeacherError"]
