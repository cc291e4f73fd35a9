# Each target does its own set-up on a fresh machine: .venv + editable install, then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test test-fast lint format bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Train the quickstart (built-in digits, small DiT, CPU is fine), then sample and score it.
train: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python train.py experiment=quickstart

## The whole suite, multi-process and end-to-end tests included.
test: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q

## Unit tests only (skips the slow multi-process / end-to-end ones).
test-fast: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m "not slow"

## Style: ruff's formatter and linter (configured in pyproject.toml); `make format` rewrites in place.
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py model=dit_s batch_size=8 precision=32-true steps=10

clean:
	rm -rf outputs multirun wandb .pytest_cache
