"""mopd's distill loop against TRL's `DistillationTrainer`: student tokens per second and the
teacher's share of a step, same locally built models, same batch and lengths, one run.

Both sides distil a teacher into a student of the same Qwen3 shape with random weights, built here
(no hub): ``--shape 0.5b`` is Qwen3-0.6B's shape (28 layers, hidden 1024, 16/8 heads) with the
vocabulary of a tokenizer trained on mopd's synthetic prompts; ``--shape tiny`` is the CPU smoke
size. Each step samples ``--prompts`` prompts x ``--samples`` completions of ``--max-new-tokens``
tokens from the student, scores them with the teacher and takes one optimiser step:
- mopd: `train_distill` with an in-process teacher (objective `mopd_pg`, the stage's default),
  rollout chunks scored while the next chunks sample (``overlap``);
- TRL: `DistillationTrainer` with ``beta=1.0`` (reverse KL, its on-policy setting) and the same
  number of completions per step (``per_device_train_batch_size``), sampling with transformers.

Student tokens/s = completion tokens trained on / wall time of the steps after the first (warm-up).
Teacher share = teacher-wait seconds / step seconds (mopd: its own timing; TRL: the time inside the
teacher's forward, measured by a hook, over the step time). Printed side by side, with the ratio
mopd / TRL. Targets (issue #13): ratio >= 1.5, mopd teacher share <= 10 %.

Run: ``.venv/bin/python benchmarks/gpu_distill.py --shape 0.5b --device cuda --dtype bfloat16``
(GPU host) or ``--shape tiny --device cpu --steps 3`` (smoke). ``--json`` adds one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mopd import runtime
from mopd.chat import PLAIN
from mopd.config import DistillParams, TinyProfile
from mopd.domains import generate
from mopd.models import build_base, load_tokenizer
from mopd.teachers import InProcessTeacher
from mopd.tracking import NullTracker
from mopd.trainers.distill import train_distill

SHAPES = {
    "tiny": TinyProfile(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512),
    # Qwen3-0.6B's shape (vocabulary: this tokenizer's; 151,936 in the real model)
    "0.5b": TinyProfile(vocab_size=32768, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=2048),
}


def build(root: Path, shape: str) -> tuple[Path, Path, list[str]]:
    records = [r for d in ("math", "code", "if") for r in generate(d, 400, seed=1)]
    texts = [r["prompt"] + r["completion"] for r in records]
    profile = SHAPES[shape]
    build_base(profile, texts, root / "student", seed=0)
    build_base(profile, texts, root / "teacher", seed=1)
    return root / "student", root / "teacher", [r["prompt"] for r in records]


def run_mopd(student: Path, teacher: Path, prompts: list[str], args) -> dict[str, float]:
    params = DistillParams(max_steps=args.steps, prompts_per_step=args.prompts, samples_per_prompt=args.samples,
                           max_new_tokens=args.max_new_tokens, learning_rate=1e-5, rollout_chunks=args.chunks, overlap=args.chunks > 1,
                           checkpoint_every=None)
    client = InProcessTeacher.from_pretrained(teacher, name="teacher")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        history = train_distill(student, {"math": client}, {"math": [{"prompt": p} for p in prompts]}, Path(out),
                             params, 0, NullTracker(), fmt=PLAIN)
    wall = time.perf_counter() - t0
    steps = [v for _, v in history["distill/step_seconds"]][1:]
    tokens = [v for _, v in history["distill/trained_tokens"]][1:]
    share = [v for _, v in history["distill/teacher_share"]][1:]
    return {"tokens_per_s": sum(tokens) / sum(steps), "teacher_share": statistics.mean(share),
            "step_s": statistics.mean(steps), "wall_s": wall}


def run_trl(student: Path, teacher: Path, prompts: list[str], args) -> dict[str, float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from mopd.models import load_model

    tok = load_tokenizer(student)
    student_model = load_model(student, trained=True)
    teacher_model = load_model(teacher)
    spent = {"teacher": 0.0}

    def pre(module, inputs):
        if runtime.current().device_type == "cuda":
            torch.cuda.synchronize()
        spent["t0"] = time.perf_counter()

    def post(module, inputs, output):
        if runtime.current().device_type == "cuda":
            torch.cuda.synchronize()
        spent["teacher"] += time.perf_counter() - spent["t0"]

    teacher_model.register_forward_pre_hook(pre)
    teacher_model.register_forward_hook(post)

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps, self.shares, self.tokens = [], [], []

        def on_step_begin(self, a, state, control, **kw):
            self.t0, spent["teacher"] = time.perf_counter(), 0.0

        def on_step_end(self, a, state, control, **kw):
            dt = time.perf_counter() - self.t0
            self.steps.append(dt)
            self.shares.append(spent["teacher"] / dt)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:  # TRL's own count of the step's completions
                self.tokens.append(float(logs["completions/mean_length"]) * n)

    n = args.prompts * args.samples
    # the same completions per step as mopd: `prompts` distinct prompts, each `samples` times
    data = Dataset.from_dict({"prompt": [p for p in prompts[: args.prompts * args.steps] for _ in range(args.samples)]})
    cfg = DistillationConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=n, learning_rate=1e-5,
        max_completion_length=args.max_new_tokens, temperature=1.0, beta=1.0, shuffle_dataset=False,
        logging_steps=1, save_strategy="no", report_to=[], **runtime.current().trainer_args())
    timer = Timer()
    trainer = DistillationTrainer(model=student_model, teacher_model=teacher_model, args=cfg, train_dataset=data,
                                  processing_class=tok, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    # completion tokens trained per step: TRL's logged mean completion length x completions
    if len(timer.tokens) != len(timer.steps):
        raise RuntimeError(f"TRL logged completion lengths for {len(timer.tokens)} of {len(timer.steps)} steps")
    steps = timer.steps[1:]
    return {"tokens_per_s": sum(timer.tokens[1:]) / sum(steps), "teacher_share": statistics.mean(timer.shares[1:]),
            "step_s": statistics.mean(steps), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=4,
                    help="mopd's rollout_chunks (1: one generate call per step and no overlap with the teacher)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is warm-up)")
    rt = runtime.resolve(args.device, args.dtype, "bfloat16")
    runtime.activate(rt)
    print(f"device {rt.device}, dtype {rt.dtype}, shape {args.shape}, {args.prompts} prompts x {args.samples} "
          f"samples x {args.max_new_tokens} tokens, {args.steps} steps (first = warm-up)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        student, teacher, prompts = build(Path(tmp), args.shape)
        n_params = sum(p.numel() for p in InProcessTeacher.from_pretrained(student).model.parameters())
        print(f"models: {n_params / 1e6:.1f}M parameters each", flush=True)
        got = {"mopd": run_mopd(student, teacher, prompts, args), "trl": run_trl(student, teacher, prompts, args)}
    print(f"{'':6} {'tokens/s':>10} {'teacher share':>14} {'step s':>8}")
    for name, r in got.items():
        print(f"{name:6} {r['tokens_per_s']:10.1f} {r['teacher_share']:14.1%} {r['step_s']:8.3f}")
    ratio = got["mopd"]["tokens_per_s"] / got["trl"]["tokens_per_s"]
    print(f"mopd / TRL tokens/s: {ratio:.2f}x (target >= 1.5); mopd teacher share "
          f"{got['mopd']['teacher_share']:.1%} (target <= 10%)")
    if args.json:
        print(json.dumps({"device": rt.device, "dtype": rt.dtype, "shape": args.shape, "ratio": ratio, **got}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
