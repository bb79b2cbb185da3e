# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# `make test` runs the fast tier (minutes); `make test-all` adds the slow, real-data and
# own-environment tests (what CI runs).
# Both create .venv in the project and install what they need (`make install` alone too).
#   ORT=gpu make install    -> onnxruntime-gpu instead of the CPU onnxruntime (never both)
#   TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" make install

PYTHON ?= python3
VENV ?= .venv
ORT ?= cpu
# A bare `torch` (or a range) with no torch installed pulls the newest release plus GB of CUDA
# wheels; this pin matches the CPU build available on the project's machines.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test test-all battery lint clean

install: $(VENV)/.installed-$(ORT)

$(VENV)/.installed-$(ORT): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip uninstall --quiet --yes onnxruntime onnxruntime-gpu 2>/dev/null || true
	$(PY) -m pip install --quiet -e ".[$(ORT),dev,spark]"
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	bash serving/demo.sh

test: install
	$(PY) -m pytest -m "not slow and not realdata and not serving_env"

test-all: install
	$(PY) -m pytest

battery: install  # the service audit's checks against a real store, `mlflow run` and `mlflow models serve`
	$(PY) -m pytest -m battery

lint: install
	$(PY) -m ruff check contrastive_sc tests models serving

clean:
	rm -rf demo_out outputs mlruns mlflow.db .pytest_cache
