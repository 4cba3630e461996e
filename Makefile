# twostage: `make demo` runs the default pipeline end to end, `make test` runs the test suite.
# `make test-fast` runs the tests not marked slow. Each creates .venv and installs the project
# (CPU torch wheel where one is at hand) on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_CONFIG ?= configs/mnist_vqvae2.yaml

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.1"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@$(BIN)/python -c "import torch, ray, pyarrow, transformers; print('installed: torch', torch.__version__, '| ray', ray.__version__, '| pyarrow', pyarrow.__version__, '| transformers', transformers.__version__)"
	@touch $(STAMP)

demo: install
	$(BIN)/twostage run $(DEMO_CONFIG)

test: install
	$(BIN)/python -m pytest -q -ra --durations=25

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

bench: install
	$(BIN)/python -m bench.run

lint: install
	$(BIN)/ruff check pipeline stages models tests bench scripts

clean:
	rm -rf $(VENV) artifacts runs .pytest_cache
