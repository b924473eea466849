# Set-up and everyday targets. Everything installs into .venv; torch is pinned here and installed
# first, from the CPU wheel on disk, so pip never resolves the multi-GB CUDA build.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps digit-recognizer-py
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/chiplock demo --out chiplock-report

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out bench/results

clean:
	rm -rf $(VENV) chiplock-report bench/results .pytest_cache
