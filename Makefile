# The README's two commands: `make repro` (set up + regenerate every result) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
PROFILE ?= cpu
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONHASHSEED := 0
# Portable numerics (the values of project_lib.PORTABLE_ENV, checked by tests/test_golden_data.py): set here too, so that
# tools that import NumPy before project_lib (nbdev_test, pytest plugins) generate the same bits on every x86-64 CPU.
export NUMBA_CPU_NAME := generic
export CUBLAS_WORKSPACE_CONFIG := :4096:8
ifeq ($(shell uname -m),x86_64)
export NPY_DISABLE_CPU_FEATURES := X86_V3 X86_V4 AVX512_ICL AVX512_SPR
endif

.PHONY: repro repro-profile check-reproduction plan test venv data lab clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

## The real inputs in data/ (tests and stages read them), from the in-repo DVC remote: no network.
data: venv
	dvc pull --quiet data.dvc

## Regenerate every result of the default (cpu) profile and its reports, then compare their numbers with the
## committed reports (printed, and written to reports/reproduction.html).
repro: data
	dvc repro
	python -m project_lib.reproduction report

## Fail when a regenerated number is outside the committed report's stated uncertainty (after `make repro`).
check-reproduction: venv
	python -m project_lib.reproduction check

## Another profile, e.g. `make repro-profile PROFILE=paper`: outputs and reports go to their own folders.
repro-profile: data
	dvc exp run -S profile=$(PROFILE) -S report_dir=reports/$(PROFILE)

## What a profile costs, stage by stage, from a short calibration on this machine: `make plan PROFILE=paper`.
plan: venv
	python -m project_lib.plan $(PROFILE)

## Library in sync with the notebooks, then the pytest suite and the notebooks' inline tests.
test: data
	nbdev_export
	@if [ -n "$$(git status --porcelain -- project_lib)" ]; then \
	  echo "project_lib/ is out of sync with nbs/: run nbdev_export and commit"; \
	  git status --porcelain -- project_lib; exit 1; fi
	pytest -n 2
	nbdev_test --n_workers 0   # one process: parallel workers wait out loky's 300 s idle timeout at exit (measured: 5 min for 25 s of tests)

lab: venv
	jupyter lab --allow-root nbs

clean-venv:
	rm -rf $(VENV)
