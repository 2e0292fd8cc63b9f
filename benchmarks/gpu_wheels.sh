#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on a GPU host that has torch, transformers and
# accelerate but no network (the device machine: CPython 3.12, x86-64): mopd's own imports and
# TRL's, pinned to the versions the CPU suite runs. Downloads into .whl/ (git-ignored), ~10 MiB.
# Run here, where the package registries are reachable: `bash benchmarks/gpu_wheels.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PY:-.venv/bin/python}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 uvicorn==0.55.0 orjson==3.13.0
ls -la .whl
du -sh .whl
