"""The device checks of benchmarks/gpu_check.sh that are not the distill benchmark, each printing
its figures: `runtime` (auto resolves to CUDA and the profile's bf16; frozen models in bf16, trained
ones float32 under bf16 autocast, log-probs against float32), `placement` (the inventory
nvidia-smi gives, disjoint leases, what a stage process sees), `checkpointing` (peak memory and
step time of one student forward/backward with and without activation checkpointing), and
`pipeline` (a micro pipeline — data, base, SFT, GRPO teachers, MOPD, evaluation — with
`runtime.device: cuda`, stage by stage, where each ran and how long it took).

Run: ``python3 benchmarks/gpu_checks.py runtime placement checkpointing pipeline`` (any subset);
``--device cpu`` smoke-tests them on a host without CUDA (placement then fakes two devices).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def check_runtime(device: str) -> None:
    import torch

    from mopd import runtime
    from mopd.config import TinyProfile
    from mopd.models import build_base, load_model
    from mopd.opd.update import student_quantities

    rt = runtime.resolve("auto" if device == "cuda" else device, "auto", "bfloat16")
    print(f"runtime: auto -> device {rt.device}, dtype {rt.dtype} (profile bfloat16)", flush=True)
    if device == "cuda":
        assert rt.device_type == "cuda" and rt.dtype == "bfloat16", rt
        print(f"runtime: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    runtime.activate(rt if device == "cuda" else runtime.Runtime("cpu", "bfloat16"))
    with tempfile.TemporaryDirectory() as tmp:
        profile = TinyProfile(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64)
        build_base(profile, [f"{a} + {b} = {a + b}" for a in range(60) for b in range(20)], Path(tmp) / "m", seed=0)
        frozen = load_model(Path(tmp) / "m")  # the stage's dtype and device
        trained = load_model(Path(tmp) / "m", trained=True)  # float32 master weights
        reference = load_model(Path(tmp) / "m", dtype="float32")
        fp = {str(next(m.parameters()).dtype) for m in (frozen, trained, reference)}
        print(f"runtime: frozen {next(frozen.parameters()).dtype}, trained {next(trained.parameters()).dtype} "
              f"(+ autocast {runtime.current().dtype}), reference float32 -> {sorted(fp)}")
        ids = torch.randint(0, trained.config.vocab_size, (8, 128), device=next(trained.parameters()).device)
        attn = torch.ones_like(ids)
        with torch.no_grad():
            with runtime.current().autocast():
                s_amp = student_quantities(trained, ids, attn)[0]
            s_ref = student_quantities(reference, ids, attn)[0]
            s_frozen = student_quantities(frozen, ids, attn)[0]
        print(f"runtime: |log-prob bf16 autocast - float32| max {float((s_amp.float() - s_ref).abs().max()):.3e}, "
              f"|bf16 weights - float32| max {float((s_frozen.float() - s_ref).abs().max()):.3e}")


def check_placement(device: str) -> None:
    from mopd import placement

    env = {k: v for k, v in os.environ.items() if k not in ("MOPD_DEVICES", "CUDA_VISIBLE_DEVICES")}
    if device != "cuda":
        env["MOPD_DEVICES"] = "0,1"  # no nvidia-smi here: fake two devices
    with tempfile.TemporaryDirectory() as locks:
        env[placement.LOCKS_ENV] = locks
        code = ("from mopd import placement; import json; inv = placement.inventory(); "
                "a = placement.try_lease(1, 'a'); b = placement.try_lease(1, 'b'); "
                "print(json.dumps({'inventory': inv, 'a': a and a.ids, 'b': b and b.ids, "
                "'env': a and a.env()['CUDA_VISIBLE_DEVICES']}))")
        got = json.loads(subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout)
        print(f"placement: inventory {got['inventory']}; leases a={got['a']} b={got['b']} "
              f"(disjoint: {not set(got['a'] or []) & set(got['b'] or [])}); stage a sees CUDA_VISIBLE_DEVICES="
              f"{got['env']}")
        if got["a"]:
            seen = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"], check=False,
                                  env={**env, "CUDA_VISIBLE_DEVICES": got["env"]}, capture_output=True, text=True)
            print(f"placement: a stage process with that lease sees {seen.stdout.strip() or '?'} CUDA device(s)")


def check_checkpointing(device: str) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from mopd.opd.update import student_quantities

    torch.manual_seed(0)
    big = device == "cuda"
    cfg = Qwen3Config(vocab_size=32768, hidden_size=1024 if big else 128, intermediate_size=3072 if big else 256,
                      num_hidden_layers=28 if big else 2, num_attention_heads=16 if big else 4,
                      num_key_value_heads=8 if big else 2, head_dim=128 if big else 32)
    model = Qwen3ForCausalLM(cfg).to(device)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (16, 1024) if big else (2, 64), device=device)
    out = {}
    for on in (False, True):
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad(set_to_none=True)
        if big:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=big):
            s = student_quantities(model, ids, torch.ones_like(ids))[0]
        s.sum().backward()
        if big:
            torch.cuda.synchronize()
        out[on] = (torch.cuda.max_memory_allocated() / 2**30 if big else float("nan"), time.perf_counter() - t0)
    (m0, t0_), (m1, t1) = out[False], out[True]
    print(f"checkpointing: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M-parameter student, batch "
          f"{tuple(ids.shape)}: peak {m0:.1f} GiB -> {m1:.1f} GiB with activation checkpointing "
          f"({m1 / m0 if big else float('nan'):.2f}x), forward+backward {t0_:.2f} s -> {t1:.2f} s")


def check_pipeline(device: str) -> None:
    import yaml

    from tests.conftest import micro_params, write_params

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        params = micro_params()
        params["runtime"].update(device=device, dtype="auto")
        write_params(project, params)
        pipes = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
        # math and if: the code domain's verifier needs bubblewrap, which a GPU image may lack
        pipes["pipelines"] = {"gpu": {"domains": ["math", "if"],
                                      "stages": ["data", "base", "sft", "teacher", "distill", "evaluate"]}}
        (project / "pipelines.yaml").write_text(yaml.safe_dump(pipes))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mopd.cli", "run", "--pipeline", "gpu", "--no-track"], check=False,
                              cwd=project, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            print(proc.stdout[-4000:], proc.stderr[-4000:])
            raise SystemExit(f"pipeline: failed with exit {proc.returncode} after {wall:.0f} s")
        print(f"pipeline: {wall:.0f} s for the micro pipeline on {device}")
        for record in sorted(project.glob(".mopd/runs/*.json")):  # the run records (placement, timings)
            r = json.loads(record.read_text())
            where = (r.get("placement") or {}).get("devices")
            print(f"pipeline:   {r.get('stage', record.stem):16} devices {where} "
                  f"{r.get('metrics', {}).get('stage_seconds', float('nan')):7.1f} s")
        table = next(project.glob("artifacts/**/*.csv"), None)
        if table is not None:
            print(f"pipeline: {table.relative_to(project)}:\n{table.read_text()[:1500]}")


CHECKS = {"runtime": check_runtime, "placement": check_placement, "checkpointing": check_checkpointing,
          "pipeline": check_pipeline}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checks", nargs="+", choices=sorted(CHECKS))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    failed = []
    for name in args.checks:
        t0 = time.perf_counter()
        try:
            CHECKS[name](args.device)
            print(f"{name}: ok in {time.perf_counter() - t0:.0f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - every check reports; the script fails at the end
            import traceback

            traceback.print_exc()
            print(f"{name}: FAILED in {time.perf_counter() - t0:.0f} s: {type(exc).__name__}: {exc}", flush=True)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
