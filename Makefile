# Set-up and everyday targets. Everything installs into .venv; torch is pinned here and installed
# first, from the CPU wheel on disk, so pip never resolves the multi-GB CUDA build.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: install tpm-deps demo test test-fast fuzz bench paper clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test,demo,softlock,hf,enclave]'
	$(BIN)/python -m pip install --quiet --no-deps digit-recognizer-py
	touch $(STAMP)

install: $(STAMP)

# The tpm source's tests run against swtpm and need tpm2-pytss, which builds against libtss2. Both are
# installed here when missing, as root with apt-get; anywhere else this only says so, and those tests skip
# with the reason. The rest of the suite does not depend on them. TPM_PIP is the `tpm` extra of pyproject.toml.
TPM_APT := swtpm swtpm-tools libtss2-dev pkg-config gcc
TPM_PIP := tpm2-pytss>=2.3

tpm-deps: $(STAMP)
	@if command -v swtpm >/dev/null 2>&1 && pkg-config --exists tss2-esys 2>/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $(TPM_APT) for the TPM tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TPM_APT) >/dev/null; } \
	    || echo "warning: apt-get could not install $(TPM_APT); the TPM tests will skip"; \
	else echo "note: swtpm or libtss2-dev is missing and this is not root with apt-get; the TPM tests will skip"; fi
	@$(BIN)/python -c 'import tpm2_pytss' 2>/dev/null || ! pkg-config --exists tss2-esys 2>/dev/null \
	  || $(BIN)/python -m pip install --quiet '$(TPM_PIP)' \
	  || echo "warning: tpm2-pytss did not build; the TPM tests will skip"

demo: $(STAMP)
	$(BIN)/chiplock demo --out chiplock-report

test: $(STAMP) tpm-deps
	$(BIN)/python -m pytest -n 2 -q

test-fast: $(STAMP) tpm-deps
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

# Long fuzz run of the container and profile readers (tests/test_fuzz_reader.py); figures in fuzz-report.json.
fuzz: $(STAMP)
	CHIPLOCK_FUZZ_EXAMPLES=$${CHIPLOCK_FUZZ_EXAMPLES:-100000} CHIPLOCK_FUZZ_REPORT=$${CHIPLOCK_FUZZ_REPORT:-fuzz-report.json} \
		$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_fuzz_reader.py

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out bench/results

# Every attack of the harness (`chiplock attack ...`) with the paper preset: docs/results.md and docs/results/*,
# the reference work's tables beside ours. About 40 min on a 2-core CPU; trained models are cached in bench/cache.
paper: $(STAMP)
	$(BIN)/chiplock attack all --preset paper --out docs --cache bench/cache

clean:
	rm -rf $(VENV) chiplock-report .pytest_cache
