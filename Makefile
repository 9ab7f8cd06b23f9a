# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv through `make setup`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
WORK   ?= work/demo

# The paths recipes/teacher-bible-de-en.yaml names (a comment after the value would end up in it).
TEACHER_WORK := work/teacher

.PHONY: setup demo demo-full teacher test test-fast multinode lint clean

# Re-installs only when pyproject.toml changed since the last install (the stamp file records that).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/distillery demo --workdir $(WORK)

demo-full: setup
	$(BIN)/distillery demo --full --workdir $(WORK)

# Rebuilds teachers/bible-de-en (hours on 2 CPU cores): each input is made once, training resumes where it stopped.
$(TEACHER_WORK)/data/prepare.json:
	$(BIN)/distillery data prepare --out $(TEACHER_WORK)/data
$(TEACHER_WORK)/train.parquet: $(TEACHER_WORK)/data/prepare.json
	$(BIN)/distillery data teacher-corpus --prepared $(TEACHER_WORK)/data --out $@
$(TEACHER_WORK)/tokenizer/tokenizer.json: $(TEACHER_WORK)/data/prepare.json
	$(BIN)/distillery tokenizer train --data $(TEACHER_WORK)/data --out $(TEACHER_WORK)/tokenizer

teacher: setup $(TEACHER_WORK)/train.parquet $(TEACHER_WORK)/tokenizer/tokenizer.json
	$(BIN)/distillery teacher train recipes/teacher-bible-de-en.yaml
	$(BIN)/distillery teacher package $(TEACHER_WORK)/run --out teachers/bible-de-en --average 5 \
		--test $(TEACHER_WORK)/data/test.parquet --recipe recipes/teacher-bible-de-en.yaml

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Two `ray start` nodes on this machine, an S3 server, the job service: distil, train, kill a node (also in `make test`).
multinode: setup
	$(BIN)/python -m pytest -q tests/test_multinode.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) work .pytest_cache
