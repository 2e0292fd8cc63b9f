"""Verifier throughput on 2 cores: sandboxed programs per second and math answers per second.

Targets (issue 4): >= 40 programs/s for typical small programs, >= 2,000 math answers/s;
(issue 9) >= 50 programs/s for HumanEval programs (canonical solutions and broken ones, each
run against the problem's full ``check``). Before issue 9 (one interpreter ran program and tests
together) the synthetic figure was 130 programs/s with 8 sandboxes.
Run: ``.venv/bin/python benchmarks/verifiers.py [--programs 400] [--answers 20000]``.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from mopd.domains import generate
from mopd.verifiers import default_workers, verify, verify_batch
from mopd.verifiers.code_exec import default_sandbox


def _pin_two_cores() -> int:
    cpus = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(0, cpus)
    return len(cpus)


def bench_programs(n: int, workers: int | None) -> tuple[float, float]:
    """(programs/s, share passed) over synthetic code records: 3/4 gold, 1/4 wrong answers.

    Wall-clock: other work on the same cores lowers it (the load average is printed first).
    """
    recs = generate("code", n, seed=123)
    rng = random.Random(0)
    responses = [r["completion"] if rng.random() < 0.75 else r["completion"] + "+1" for r in recs]
    default_sandbox().mode  # noqa: B018 - probe the sandbox outside the timed region
    start = time.perf_counter()
    verdicts = verify_batch(["code"] * n, responses, [r["reference"] for r in recs],
                            workers=workers)
    elapsed = time.perf_counter() - start
    return n / elapsed, sum(v.reward for v in verdicts) / n


def bench_humaneval(n: int, workers: int | None) -> tuple[float, float]:
    """(programs/s, share passed) over HumanEval: 3/4 canonical solutions, 1/4 with every
    result changed; each program runs the problem's whole ``check`` in the judge."""
    from mopd.domains.humaneval import humaneval_problems, humaneval_records

    recs, problems = humaneval_records(), humaneval_problems()
    rng = random.Random(2)
    picked = [(recs[i % len(recs)], problems[i % len(recs)]) for i in range(n)]
    responses = [r["completion"] if rng.random() < 0.75 else
                 f"{r['completion']}\n{p['entry_point']} = lambda *a, **k: None\n"
                 for r, p in picked]
    picked = [r for r, _ in picked]
    default_sandbox().mode  # noqa: B018
    start = time.perf_counter()
    verdicts = verify_batch(["code"] * n, responses, [r["reference"] for r in picked],
                            workers=workers)
    elapsed = time.perf_counter() - start
    return n / elapsed, sum(v.reward for v in verdicts) / n


def bench_math(n: int) -> tuple[float, float]:
    """(answers/s, share correct): tiny-model-like outputs, half right, some free text."""
    recs = generate("math", n, seed=321)
    rng = random.Random(1)
    responses = []
    for r in recs:
        value = int(r["reference"]) + (0 if rng.random() < 0.5 else rng.choice((-1, 1, 10)))
        style = rng.random()
        responses.append(f"\\boxed{{{value}}}" if style < 0.8 else
                         f"The answer is {value}." if style < 0.9 else f"{value} or so")
    start = time.perf_counter()
    rewards = [verify("math", resp, r["reference"]).reward for resp, r in zip(responses, recs)]
    elapsed = time.perf_counter() - start
    return n / elapsed, sum(rewards) / n


def bench_math_latex(n: int) -> float:
    """answers/s when every answer needs math-verify (LaTeX fractions against decimals)."""
    pairs = [(f"\\boxed{{\\frac{{{k}}}{{4}}}}", str(k / 4)) for k in range(1, n + 1)]
    start = time.perf_counter()
    for response, reference in pairs:
        verify("math", response, reference)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--programs", type=int, default=400)
    parser.add_argument("--humaneval", type=int, default=328)
    parser.add_argument("--answers", type=int, default=20_000)
    parser.add_argument("--latex", type=int, default=200)
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel sandboxes (default: verify_batch's, 4 x cores)")
    args = parser.parse_args()
    cores = _pin_two_cores()
    print(f"load average before: {os.getloadavg()[0]:.2f} "
          "(other work on the same cores lowers the wall-clock rates)")
    workers = args.workers or default_workers()
    prog_rate, prog_pass = bench_programs(args.programs, workers=workers)
    print(f"code: {prog_rate:8.1f} programs/s on {cores} cores (wall), {workers} workers, "
          f"{args.programs} programs, "
          f"{prog_pass:.0%} passed, sandbox={default_sandbox().mode} (target >= 40/s)")
    he_rate, he_pass = bench_humaneval(args.humaneval, workers=workers)
    print(f"code: {he_rate:8.1f} programs/s on {cores} cores (wall), {workers} workers, "
          f"{args.humaneval} HumanEval programs, {he_pass:.0%} passed (target >= 50/s; "
          "previous figure: 130 programs/s on synthetic programs, 8 sandboxes, before issue 9)")
    math_rate, math_ok = bench_math(args.answers)
    print(f"math: {math_rate:8.0f} answers/s (1 thread), {args.answers} answers, "
          f"{math_ok:.0%} correct (target >= 2,000/s)")
    latex_rate = bench_math_latex(args.latex)
    print(f"math: {latex_rate:8.0f} answers/s when every answer needs math-verify (LaTeX)")


if __name__ == "__main__":
    main()
