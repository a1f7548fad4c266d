# Quick start: `make demo` runs the demo on bundled data, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OMP ?= 2

.PHONY: setup demo test clean

$(BIN)/deepregister: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# setuptools: the build backend Testing/test_wheel.py builds the wheel with, offline (PEP 639 licence field: >= 77).
	$(BIN)/pip install --quiet --upgrade pip "setuptools>=77"
	# torch first with an exact pin: a looser request pulls a multi-GB CUDA build (see README).
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,bench]"
	touch $@

setup: $(BIN)/deepregister

demo: setup
	OMP_NUM_THREADS=$(OMP) $(BIN)/deepregister demo --out demo-output --overwrite

test: setup
	OMP_NUM_THREADS=$(OMP) $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-output .pytest_cache
