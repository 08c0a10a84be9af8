# The README's two commands: `make repro` (set up + regenerate every result) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
PROFILE ?= cpu
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONHASHSEED := 0

.PHONY: repro repro-profile plan test venv data lab clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

## The real inputs in data/ (tests and stages read them), from the in-repo DVC remote: no network.
data: venv
	dvc pull --quiet data.dvc

## Regenerate every result of the default (cpu) profile and its reports.
repro: data
	dvc repro

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
	pytest
	nbdev_test --n_workers 2

lab: venv
	jupyter lab --allow-root nbs

clean-venv:
	rm -rf $(VENV)
