# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

# torch is pinned to the CPU wheel (2.13.0) on machines without CUDA, where an
# unpinned torch would pull a multi-GB CUDA build; with nvidia-smi present the
# normal pip resolution (a CUDA build) is used. pip installs torch (it finds the
# local CPU wheel); uv installs the rest, keeping that torch: the same packages as
# pip resolves, in 13 s instead of 123 s on 2 cores (pip freeze compared).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(VENV)/bin/uv pip install -q --python $(PY) -e '.[dev]'
	touch $(STAMP)

# The main job on the demo zoo: builds the zoo when missing (about 3 minutes on
# 2 cores), then a 48-trial CMA-ES search on 2 Ray workers.
demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(VENV)/bin/evomerge run configs/demo.yaml --out runs/demo

# mergekit 0.1.5 in a virtual environment of its own, outside the project's (its pins
# differ) and kept between runs: the parity tests compare evomerge's tensors with it.
MERGEKIT_VENV ?= $(HOME)/.cache/evomerge/mergekit-0.1.5
MERGEKIT := $(MERGEKIT_VENV)/bin/mergekit-yaml

$(MERGEKIT):
	$(PYTHON) -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/python -m pip install -q --upgrade pip uv
	if command -v nvidia-smi >/dev/null 2>&1; then $(MERGEKIT_VENV)/bin/python -m pip install -q torch; \
	else $(MERGEKIT_VENV)/bin/python -m pip install -q torch==2.13.0; fi
	$(MERGEKIT_VENV)/bin/uv pip install -q --python $(MERGEKIT_VENV)/bin/python mergekit==0.1.5
	test -x $(MERGEKIT)

# PYTHONFAULTHANDLER: a process of the suite that crashes (tests or their subprocesses,
# during a test or at exit) prints every thread's Python stack
test: $(STAMP) $(MERGEKIT)
	$(VENV)/bin/ruff check evomerge tests bench
	$(VENV)/bin/mypy evomerge
	RAY_AUTH_MODE=disabled MERGEKIT_YAML=$(MERGEKIT) EVOMERGE_REQUIRE_MERGEKIT=1 PYTHONFAULTHANDLER=1 \
		$(PY) -m pytest -q -p no:cacheprovider --durations=25 tests

bench: $(STAMP)
	$(PY) bench/merge_speed.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
