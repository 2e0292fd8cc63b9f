"""Benchmark: chunked top-k distillation loss vs naive full logits vs TRL's generalized_jsd_loss.

Run:  .venv/bin/python benchmarks/objectives.py            (defaults: T=4096, V=151,936, H=256, k=16,64)

Each variant (forward + backward of the loss from hidden states and the LM-head weight) runs in a
fresh subprocess. Peak extra memory = peak resident set size during the step minus the resident
size just before it (inputs already allocated); the peak counter is reset through
/proc/self/clear_refs (Linux), falling back to getrusage(ru_maxrss). Torch's CPU allocator has no
statistics API and tracemalloc does not see torch, hence RSS. A child gets an address-space limit
(RLIMIT_AS) so that an out-of-memory variant fails alone instead of waking the OOM killer.

(a) mopd.logits.chunked_topk_distill_loss (MOPD §2, gradients computed chunk by chunk)
(b) naive: logits = h Wᵀ (N×V float32), mopd.objectives.topk_distill_loss, autograd
(c) TRL GKDTrainer.generalized_jsd_loss (full-vocab JSD, β=0.5) on student logits h Wᵀ and a
    precomputed N×V teacher-logit tensor (an input, not counted; it is what TRL needs, whereas
    (a) and (b) need only the teacher's top-k). TRL does not depend on k; it runs once.
H defaults to 256 instead of 1024 so that the whole run stays near 3 minutes on 2 CPU cores
(matmul time scales with H; the N×V memory does not). Use --hidden 1024 for the full size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def _child(args: argparse.Namespace) -> dict:
    import gc

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    from mopd.logits import chunked_topk_distill_loss
    from mopd.objectives import topk_distill_loss

    g = torch.Generator().manual_seed(0)
    N, V, H, K = args.tokens, args.vocab, args.hidden, args.k
    hidden = (torch.randn(N, H, generator=g) / H**0.5).requires_grad_(True)
    weight = torch.randn(V, H, generator=g).requires_grad_(True)
    teacher_logits = None
    if args.variant == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        teacher_logits = torch.randn(N, V, generator=g) * 2
    else:
        # teacher top-k: random ids with a proper (sub-)distribution of log-probs
        ids = torch.randint(0, V, (N, K), generator=g)
        tlp = torch.log_softmax(torch.randn(N, K + 1, generator=g), -1)[:, :K]
        weights = torch.full((N,), 1.0 / N)
        mask = torch.ones(1, N)
    gc.collect()
    limit = _proc_status("VmSize") + int(0.8 * _mem_available())
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    base = _proc_status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        peak_src = "VmHWM"
    except OSError:
        peak_src = "ru_maxrss"
    times = []
    for _ in range(args.repeats):  # the machine is shared: report the fastest of a few steps
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        if args.variant == "chunked":
            loss = chunked_topk_distill_loss(hidden, weight, ids, tlp, weights, chunk=args.chunk)
        elif args.variant == "naive":
            loss = topk_distill_loss((hidden @ weight.T)[None], ids[None], tlp[None], mask, token_mean=True)
        else:
            loss = GKDTrainer.generalized_jsd_loss((hidden @ weight.T)[None], teacher_logits[None], beta=0.5)
        loss.backward()
        times.append(time.perf_counter() - t0)
    elapsed = min(times)
    peak = _proc_status("VmHWM") if peak_src == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": args.variant, "k": K, "tokens": N, "seconds": elapsed, "peak_extra_bytes": peak - base,
            "loss": float(loss.detach()), "peak_source": peak_src}


# measured at T=512, V=32,000: TRL's full-vocab JSD peaks near 60 B per N×V element (+4 B teacher input)
TRL_BYTES_PER_ELEMENT = 64


def _trl_tokens(args: argparse.Namespace) -> int:
    """Largest T / 2^j whose estimated TRL peak fits in 60% of the available memory."""
    tokens = args.tokens
    while tokens > 64 and TRL_BYTES_PER_ELEMENT * tokens * args.vocab > 0.6 * _mem_available():
        tokens //= 2
    return tokens


def _run_variant(args: argparse.Namespace, variant: str, k: int, tokens: int | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--variant", variant, "--k", str(k),
           "--tokens", str(tokens or args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--chunk", str(args.chunk), "--threads", str(args.threads),
           "--repeats", str(1 if variant == "trl" else args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"variant": variant, "k": k, "error": f"exit {proc.returncode}: {tail[:160]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(r: dict, ref: dict | None) -> str:
    if "error" in r:
        return f"  {r['variant']:8s} FAILED {r['error']}"
    scale = ref["tokens"] / r["tokens"] if ref is not None and "error" not in ref else 1.0
    sec, mem = r["seconds"] * scale, r["peak_extra_bytes"] * scale
    line = f"  {r['variant']:8s} time {sec:7.2f} s   peak extra {mem / 2**20:9.1f} MiB"
    if ref is not None and "error" not in ref:
        line += (f"   ratio to chunked: time {sec / ref['seconds']:5.2f}x  "
                 f"memory {mem / max(ref['peak_extra_bytes'], 1):6.2f}x")
    if scale != 1.0:
        line += (f"   [measured at T={r['tokens']}: {r['seconds']:.2f} s, {r['peak_extra_bytes'] / 2**20:.1f} MiB; "
                 f"scaled x{scale:g} linearly in T, not measured at T={ref['tokens']}]")
    return line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per variant; the minimum is reported")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL variant")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["chunked", "naive", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=16, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return
    print(f"T={args.tokens} V={args.vocab} H={args.hidden} chunk={args.chunk} threads={args.threads}; "
          f"forward+backward, fresh process per variant, time = min of {args.repeats} steps (TRL: 1)")
    trl = None if args.no_trl else _run_variant(args, "trl", args.ks[0], _trl_tokens(args))
    for k in args.ks:
        chunked = _run_variant(args, "chunked", k)
        naive = _run_variant(args, "naive", k)
        print(f"k={k}")
        for r in (chunked, naive) + ((trl,) if trl else ()):
            print(_fmt(r, chunked))
        if "error" not in chunked and "error" not in naive:
            mem = chunked["peak_extra_bytes"] / max(naive["peak_extra_bytes"], 1)
            tim = chunked["seconds"] / naive["seconds"]
            print(f"  loss chunked {chunked['loss']:.8g} vs naive {naive['loss']:.8g}")
            print(f"  chunked/naive: memory {mem:.3f}x (target <= 0.3) {'OK' if mem <= 0.3 else 'MISS'}; "
                  f"time {tim:.2f}x (target <= 1.2) {'OK' if tim <= 1.2 else 'MISS'}")


if __name__ == "__main__":
    main()
