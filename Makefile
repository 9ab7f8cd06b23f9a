# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv through `make setup`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
WORK   ?= work/demo

.PHONY: setup demo test test-fast lint clean

# Re-installs only when pyproject.toml changed since the last install (the stamp file records that).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/distillery demo --workdir $(WORK)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) work .pytest_cache
