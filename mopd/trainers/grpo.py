"""Stage 2: one RL teacher per domain: GRPO from the SFT checkpoint with the domain's verifier
as the reward (TRL GRPOTrainer). MOPD 3.1: teachers are trained independently per domain."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from mopd import runtime
from mopd.chat import PromptFormat
from mopd.lora import peft_config
from mopd.models import load_model, load_tokenizer
from mopd.settings.grpo import GRPOParams
from mopd.trainers.callbacks import (
    TrackerCallback,
    common_args,
    fit_and_save,
    per_process,
)

log = logging.getLogger(__name__)


def verifier_reward(kind: str | None = None):
    """A TRL reward function scoring completions with a verifier (reward in [0, 1]): ``kind``'s,
    or, when ``kind`` is None, each row's own (the dataset's ``kind`` column: Mix-RL)."""
    from mopd.verifiers import verify_batch

    def reward(prompts, completions, reference, **kwargs) -> list[float]:
        kinds = [kind] * len(completions) if kind is not None else list(kwargs["kind"])
        verdicts = verify_batch(kinds, [_text(c) for c in completions], list(reference))
        return [v.reward for v in verdicts]

    reward.__name__ = f"{kind}_verifier" if kind else "per_row_verifier"
    return reward


def _text(completion) -> str:
    """A completion's text: TRL gives a string, or a conversational ``[{"role": "assistant",
    "content": ...}]`` when the prompts are conversations (chat-template profiles)."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if m.get("role") == "assistant")


def grpo_prompts(records: list[dict], fmt: PromptFormat) -> list:
    """TRL's prompt column: a conversation (TRL renders it with the tokenizer's chat template and
    the generation prompt, exactly as mopd.chat.render_prompt does) or the plain text."""
    return [fmt.messages(r["prompt"]) if fmt.template else r["prompt"] for r in records]


def mixed_schedule(records: dict[str, list[dict]], weights: dict[str, float], prompts_per_step: int,
                   steps: int, seed: int) -> list[dict]:
    """Mix-RL's prompt stream (ALGORITHMS §9: domain ratios per batch): ``steps`` blocks of
    ``prompts_per_step`` (P) prompts. Block b gives domain d ``floor(P·w_d)`` prompts, and the
    slots left go, one each, to the domains furthest behind their cumulative share ``b·P·w_d``:
    every block holds each domain to within one prompt of ``P·w_d``, and the totals track the
    shares to within one prompt. Each domain's prompts are drawn without replacement from a seeded
    shuffle, reshuffled when used up; rows keep their ``kind`` (the verifier)."""
    import math
    import random

    rng = random.Random(seed)
    names = sorted(records)
    pools: dict[str, list[dict]] = {d: [] for d in names}
    given = {d: 0 for d in names}

    def draw(d: str) -> dict:
        if not pools[d]:
            pools[d] = list(records[d])
            rng.shuffle(pools[d])
        return pools[d].pop()

    out: list[dict] = []
    P = prompts_per_step
    base = {d: math.floor(P * weights[d] + 1e-9) for d in names}
    for b in range(steps):
        want = dict(base)
        behind = sorted(names, key=lambda d: (-((b + 1) * P * weights[d] - given[d] - want[d]), d))
        for d in behind[:P - sum(want.values())]:
            want[d] += 1
        block = [draw(d) for d in names for _ in range(want[d])]
        for d in names:
            given[d] += want[d]
        rng.shuffle(block)
        out += block
    return out


def rollout_budget(history: dict[str, list[tuple[int, float]]], batch_size: int) -> dict[str, float]:
    """What a GRPO run sampled from the policy it trains (the comparison's budget, ALGORITHMS §9):
    ``budget/student_rollouts`` = steps x `batch_size` completions, ``budget/student_tokens`` =
    the completion tokens (TRL's per-step mean completion length x `batch_size`)."""
    steps = len(history.get("train/reward", []))
    lengths = [v for _, v in history.get("train/completions_mean_length", [])]
    return {"budget/student_rollouts": float(steps * batch_size), "budget/rollouts_per_step": float(batch_size),
            "budget/student_tokens": float(sum(lengths) * batch_size)}


def trl_vllm_serve_command(model: Path | str, *, port: int, settings, dtype: str) -> tuple[list[str], dict[str, str]]:
    """`trl vllm-serve`'s own command line for ``model`` (TRL builds it: `vllm serve` with the
    weight-transfer endpoints its trainers sync through) and the environment it needs;
    ``settings``: runtime.vllm (a VLLMRolloutParams)."""
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    args = ScriptArguments(model=str(model), host="127.0.0.1", port=port, tensor_parallel_size=settings.devices,
                           gpu_memory_utilization=settings.gpu_memory_utilization, dtype=dtype)
    return build_command(args), {"VLLM_SERVER_DEV_MODE": "1"}


def grpo_vllm_args(rt: runtime.Runtime, base_url: str | None = None) -> dict:
    """GRPOConfig's vLLM arguments for the stage's runtime: none with `rollout: transformers`;
    TRL's colocated engine, or its server client at ``base_url`` (`runtime.vllm.mode`)."""
    if rt.rollout != "vllm":
        return {}
    from mopd.settings.model import VLLMRolloutParams

    v = VLLMRolloutParams.model_validate(rt.vllm or {})
    if v.mode == "server":
        if not base_url:
            raise ValueError("runtime.vllm.mode = 'server': no `trl vllm-serve` URL (the stage starts one)")
        return {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": base_url}
    return {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": v.gpu_memory_utilization,
            "vllm_tensor_parallel_size": v.devices}


@contextlib.contextmanager
def grpo_vllm_server(model: Path | str, rt: runtime.Runtime, who: str) -> Iterator[str | None]:
    """With `rollout: vllm` in `server` mode: `trl vllm-serve` on ``model`` for the block, on
    devices from the inventory (process 0 starts it; every process gets its URL). Else None."""
    from mopd.settings.model import VLLMRolloutParams

    v = VLLMRolloutParams.model_validate(rt.vllm or {})
    if rt.rollout != "vllm" or v.mode != "server":
        yield None
        return
    from mopd import placement
    from mopd.teachers.launch import free_port, stop_server, wait_healthy
    from mopd.teachers.vllm_serve import server_devices, start_on_devices

    with contextlib.ExitStack() as stack:
        url = None
        if runtime.is_main():
            devices = server_devices(1, v, list((placement.current() or {}).get("devices") or []), who, stack)[0]
            port = free_port()
            cmd, env = trl_vllm_serve_command(model, port=port, settings=v, dtype=rt.dtype)
            proc = start_on_devices(cmd, devices, who, env)
            stack.callback(stop_server, proc, 30.0)
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc, v.startup_timeout)
        yield runtime.all_gather_json(url)[0]


# why: 11 parameters: the stage's inputs (init, records, verifier kind, output), its recipe, seed
# and tracker, plus the prompt format, the prompt order (Cascade RL) and the in-stage checkpoint
# folder and key.
def train_grpo(sft_dir: Path, records: list[dict], kind: str | None, out_dir: Path, params: GRPOParams,
               seed: int, tracker, *, fmt: PromptFormat, ordered: bool = False, checkpoint: Path | None = None,
               key: str = "") -> dict[str, list[tuple[int, float]]]:
    """Train a policy from ``sft_dir`` on ``records`` (prompt + reference, and ``kind`` per row
    when ``kind`` is None); save to ``out_dir``. ``ordered``: take the prompts in the given order
    (one step's prompts after the other: Mix-RL's per-batch ratios) instead of TRL's shuffle.
    ``checkpoint``/``key``: in-stage checkpoints every `params.checkpoint_every` steps, resumed
    after a kill (`mopd.trainers.callbacks.fit_and_save`)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = load_tokenizer(sft_dir)
    model = load_model(sft_dir, trained=True, record=False)  # fit_and_save records it
    fmt.check(tokenizer, f"{sft_dir}'s tokenizer")
    columns = {"prompt": grpo_prompts(records, fmt), "reference": [r["reference"] for r in records]}
    if kind is None:
        columns["kind"] = [r["kind"] for r in records]
    dataset = Dataset.from_dict(columns)
    rt = runtime.current()
    with grpo_vllm_server(sft_dir, rt, f"GRPO {out_dir.name}") as base_url:
        args = GRPOConfig(
            **common_args(out_dir / "_trainer", params.max_steps, params.learning_rate, seed, checkpoint=checkpoint,
                          checkpoint_every=params.checkpoint_every),
            **grpo_vllm_args(rt, base_url),  # runtime.rollout: vllm -> TRL's use_vllm (colocate or server)
            per_device_train_batch_size=per_process(params.batch_size),
            num_generations=params.num_generations,
            max_completion_length=params.max_completion_length,
            temperature=params.temperature,
            beta=params.beta,
            epsilon=params.epsilon,
            lr_scheduler_type="constant",
            loss_type="dapo",
            shuffle_dataset=not ordered,
        )
        callback = TrackerCallback(tracker)
        trainer = GRPOTrainer(model=model, reward_funcs=verifier_reward(kind), args=args,
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[callback],
                              peft_config=peft_config(params.lora) if params.lora else None)
        return fit_and_save(trainer, tokenizer, out_dir, callback, checkpoint=checkpoint, key=key,
                            snapshot_every=params.snapshot_every)
