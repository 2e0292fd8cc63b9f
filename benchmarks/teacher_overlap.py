"""What the teacher costs: MOPD distillation steps on the tiny profile, three ways in one run.

1. ``sampling-only``: no teacher (a stand-in client that answers zeros at once; timing only);
2. ``serial``: the teacher scores after all of the step's sampling (``overlap: false``);
3. ``overlapped``: each rollout chunk's scoring request goes out as soon as the chunk is sampled
   (``overlap: true``, MOPD 3.3), the trainer waits only before the update.

The teacher runs in a separate `mopd serve-teacher` process (HTTP, as in production); student and
teacher are fresh tiny-profile models built locally (weights do not matter for timing). Every mode
starts from the same student with the same seeds. Prints per-mode step/sample/teacher/wait times
and the ratio overlapped / sampling-only (target <= 1.10).

Run: ``.venv/bin/python benchmarks/teacher_overlap.py [--steps 6] [--rounds 3] [--pin]
[--trainer-threads 1] [--server-threads 1]``. Wall-clock on a shared machine: the load average is printed first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from mopd.chat import PLAIN
from mopd.config import DistillParams, TinyProfile
from mopd.domains import generate
from mopd.models import build_base
from mopd.teachers import HTTPTeacher, InProcessTeacher, SequenceScores
from mopd.teachers.launch import start_server, stop_server, wait_healthy
from mopd.tracking import NullTracker
from mopd.trainers.distill import train_distill

ROOT = Path(__file__).resolve().parents[1]


class NoTeacher:
    """Benchmark stand-in for "no teacher": zeros, instantly. Never used for training."""

    name = "none"

    def score(self, prompt_ids, completion_ids, *, topk=None, temperature=1.0):
        k = topk or 0
        return [SequenceScores(torch.zeros(len(c)), torch.arange(k).expand(len(c), k) if k else None,
                               torch.zeros(len(c), k) if k else None) for c in completion_ids]

    def close(self):
        pass


def setup(root: Path) -> tuple[Path, Path, dict]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    profile = TinyProfile(**params["profiles"]["tiny"])
    records = {d: generate(d, 200, seed=1) for d in ("math", "code", "if")}
    texts = [r["prompt"] + r["completion"] for recs in records.values() for r in recs]
    build_base(profile, texts, root / "student", seed=0)
    build_base(profile, texts, root / "teacher", seed=1)
    return root / "student", root / "teacher", records


KEYS = ("step_seconds", "sample_seconds", "teacher_seconds", "teacher_wait_seconds", "teacher_share",
        "response_tokens")


def run_mode(student: Path, teachers: dict, records: dict, params: DistillParams, out: Path) -> dict:
    """Per-step values of KEYS, the first (warm-up) step dropped."""
    history = train_distill(student, teachers, records, out, params, seed=0, tracker=NullTracker(), fmt=PLAIN)
    return {k: [v for _, v in history[f"distill/{k}"]][1:] for k in KEYS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="steps per mode (the first is warm-up)")
    ap.add_argument("--chunks", type=int, default=4, help="rollout_chunks")
    ap.add_argument("--objective", default=None, help="e.g. mopd_topk (top-k scoring); default params.yaml's")
    ap.add_argument("--trainer-threads", type=int, default=1)
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3,
                    help="modes run interleaved this many times (load drift hits them alike)")
    ap.add_argument("--transport", choices=["http", "inprocess"], default="http",
                    help="inprocess: the teacher in the trainer process, scored from a worker thread")
    ap.add_argument("--pin", action="store_true",
                    help="trainer on CPU 0, teacher server on CPU 1 (a core each, like separate devices)")
    args = ap.parse_args()
    torch.set_num_threads(args.trainer_threads)
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin:
        os.sched_setaffinity(0, cpus[:1])
    print(f"load average {os.getloadavg()}; cores {os.cpu_count()}; trainer threads "
          f"{args.trainer_threads}, teacher server threads {args.server_threads}")
    base = yaml.safe_load((ROOT / "params.yaml").read_text())["distill"]
    base.update(max_steps=args.steps, rollout_chunks=args.chunks)
    if args.objective:
        base["objective"] = args.objective
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        student, teacher_dir, records = setup(root)
        proc, url = start_server(teacher_dir, threads=args.server_threads)
        if args.pin:
            os.sched_setaffinity(proc.pid, cpus[1:2])
        try:
            wait_healthy(url, proc)
            http = (HTTPTeacher("all", [url]) if args.transport == "http"
                    else InProcessTeacher.from_pretrained(teacher_dir, name="all"))
            modes = {
                "sampling-only": ({d: NoTeacher() for d in records}, True),
                "serial": ({d: http for d in records}, False),
                "overlapped": ({d: http for d in records}, True),
            }
            steps: dict[str, dict[str, list[float]]] = {m: {k: [] for k in KEYS} for m in modes}
            for r in range(args.rounds):
                order = list(modes)[r % 3:] + list(modes)[: r % 3]
                for name in order:
                    clients, overlap = modes[name]
                    params = DistillParams(**base | {"overlap": overlap})
                    for k, vs in run_mode(student, clients, records, params, root / name).items():
                        steps[name][k] += vs
            results = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in steps.items()}
        finally:
            stop_server(proc)
    print(f"\n{base['prompts_per_step']} prompts x {base['samples_per_prompt']} samples, "
          f"max_new_tokens {base['max_new_tokens']}, {args.chunks} chunks, objective "
          f"{base['objective']}; median over steps 2..{args.steps} of {args.rounds} interleaved rounds; "
          f"pinned: {args.pin}; teacher transport: {args.transport}")
    print(f"{'mode':<14}{'step s':>8}{'sample s':>10}{'teacher s':>11}{'wait s':>8}{'share':>7}{'tokens':>8}")
    for name, r in results.items():
        print(f"{name:<14}{r['step_seconds']:>8.3f}{r['sample_seconds']:>10.3f}{r['teacher_seconds']:>11.3f}"
              f"{r['teacher_wait_seconds']:>8.3f}{r['teacher_share']:>7.1%}{r['response_tokens']:>8.1f}")
    ratio = results["overlapped"]["step_seconds"] / results["sampling-only"]["step_seconds"]
    serial = results["serial"]["step_seconds"] / results["sampling-only"]["step_seconds"]
    print(f"\noverlapped / sampling-only = {ratio:.3f} (target <= 1.10); serial / sampling-only = {serial:.3f}")


if __name__ == "__main__":
    main()
