"""Stage 1: supervised fine-tuning of the base model on gold completions (TRL SFTTrainer)."""

from __future__ import annotations

import logging
from pathlib import Path

from mopd.chat import PromptFormat, end_of_turn, render_prompt
from mopd.lora import peft_config
from mopd.models import load_model, load_tokenizer
from mopd.settings.sft import SFTParams
from mopd.trainers.callbacks import TrackerCallback, common_args, fit_and_save, per_process

log = logging.getLogger(__name__)


def tokenize_pairs(tokenizer, records: list[dict], fmt: PromptFormat) -> dict[str, list[list[int]]]:
    """``input_ids`` = the rendered prompt (mopd.chat.render_prompt: the chat template with its
    generation prompt, or the text) + ids(completion) + [end of turn], ``completion_mask`` over the
    latter: TRL's prompt-completion format with completion-only loss, tokenized here so that the
    prompt ids are exactly those every rollout is sampled from.

    The prompt and the completion are tokenized *apart*, because that is what the model sees at
    inference: every rollout (GRPO, distillation, evaluation) tokenizes the prompt alone and
    generates after its last token. Tokenizing ``prompt + completion`` as one string lets BPE merge
    across the boundary (``"="`` + ``"\\boxed"`` -> ``"=\\"``; ``"l"`` + ``"def"`` -> ``"ldef"``),
    so the model never sees the prompt's own last token followed by the completion and, at
    inference, repeats the prompt's tail or drops the completion's head (TRL warns of this
    mismatch and trains on the merged context; measured here: the tiny SFT model then answered
    ``"=\\boxed{..}"`` to math and ``" f(l):"`` to code, scoring 0 on those items)."""
    eot = end_of_turn(tokenizer, fmt)  # the demonstration ends the turn
    input_ids, masks = [], []
    for r in records:
        p = render_prompt(tokenizer, r["prompt"], fmt)
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [eot]
        input_ids.append(p + c)
        masks.append([0] * len(p) + [1] * len(c))
    return {"input_ids": input_ids, "completion_mask": masks}


# why: 9 parameters: the stage's inputs (init, records, output), its recipe, seed and tracker, the
# prompt format, and the in-stage checkpoint folder and key.
def train_sft(base_dir: Path, records: list[dict], out_dir: Path, params: SFTParams, seed: int,
              tracker, *, fmt: PromptFormat, checkpoint: Path | None = None, key: str = "") -> dict[str, list[tuple[int, float]]]:
    """Fine-tune ``base_dir`` on prompt/completion ``records``; save the model to ``out_dir``.

    Loss on completion tokens only. Returns the metric history."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(base_dir)
    model = load_model(base_dir, trained=True, record=False)  # fit_and_save records it
    dataset = Dataset.from_dict(tokenize_pairs(tokenizer, records, fmt))
    args = SFTConfig(
        **common_args(out_dir / "_trainer", params.max_steps, params.learning_rate, seed, checkpoint=checkpoint,
                      checkpoint_every=params.checkpoint_every),
        per_device_train_batch_size=per_process(params.batch_size, "sft.batch_size"),
        warmup_steps=params.warmup_ratio,  # a float < 1 is a ratio of max_steps in transformers 5
        lr_scheduler_type="cosine",
        max_length=params.max_length,
        completion_only_loss=True,
        dataset_num_proc=None,
    )
    callback = TrackerCallback(tracker)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[callback], peft_config=peft_config(params.lora) if params.lora else None)
    return fit_and_save(trainer, tokenizer, out_dir, callback, checkpoint=checkpoint, key=key)
