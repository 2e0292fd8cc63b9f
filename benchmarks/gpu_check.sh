#!/usr/bin/env bash
# The device check: one script, under 8 minutes on one H100, nothing from the network. It needs a
# Python with torch (CUDA), transformers and accelerate; what mopd and TRL need beyond them travels
# as wheels in .whl/ (`bash benchmarks/gpu_wheels.sh` here first; ~5 MiB, installed to /tmp/site).
# Every section prints its own figures and its time; a failed section does not stop the others,
# the script's exit status says whether all passed. Sections (each under its own timeout):
#   1. environment: GPU, driver, torch / transformers / accelerate / TRL versions
#   2. runtime + placement + checkpointing (benchmarks/gpu_checks.py): auto -> cuda/bf16, bf16
#      log-probs against float32, nvidia-smi's inventory and disjoint leases, peak memory with and
#      without activation checkpointing on the 0.6B shape
#   3. mopd's distill loop vs TRL's DistillationTrainer on Qwen3-0.6B's shape, same batch
#      (benchmarks/gpu_distill.py; targets: >= 1.5x student tokens/s, teacher share <= 10%)
#   4. a micro pipeline (data, base, SFT, GRPO teachers, MOPD, evaluation) with runtime.device: cuda
#   5. the `gpu`-marked tests (tests/test_gpu.py; the vLLM ones skip without vLLM)
# Usage: bash benchmarks/gpu_check.sh [--quick]   (--quick: CPU smoke test of the script itself)
# Output: stdout, and a copy under $OUT (the device tool's folder) or /tmp/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 MOPD_LOG_LEVEL=WARNING
PY=${PY:-python3}
DEVICE=cuda
DISTILL=(--shape 0.5b --device cuda --dtype bfloat16 --steps 4 --prompts 16 --samples 4 --max-new-tokens 256)
if [ "${1:-}" = "--quick" ]; then
  DEVICE=cpu
  DISTILL=(--shape tiny --device cpu --steps 2 --prompts 4 --samples 2 --max-new-tokens 16)
fi
LOG=${OUT:-/tmp/gpu_check}/gpu_check.log
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1

if [ "$DEVICE" = cuda ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # (--quick: this host's packages)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels: install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

status=0
section() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit} s)"
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: $([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0)) s"
  [ $rc = 0 ] || status=1
}

section environment 60 $PY -c "
import torch, transformers, accelerate, importlib.metadata as md
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'devices', torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')
print('transformers', transformers.__version__, 'accelerate', accelerate.__version__,
      *(f'{p} {md.version(p)}' for p in ('trl', 'datasets', 'pydantic')))
"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
section checks 100 $PY benchmarks/gpu_checks.py runtime placement checkpointing --device "$DEVICE"
section distill 240 $PY benchmarks/gpu_distill.py "${DISTILL[@]}" --json
section pipeline 150 $PY benchmarks/gpu_checks.py pipeline --device "$DEVICE"
# the `gpu`-marked tests (skipped on CPU; the vLLM ones also without vLLM)
section gpu-tests 90 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
echo "gpu_check: $([ $status = 0 ] && echo 'all sections passed' || echo 'some sections FAILED') in $SECONDS s"
exit $status
