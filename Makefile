# Two commands on a fresh machine: `make serve` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# An unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU wheel this project trains with.
TORCH_PIN ?= torch==2.13.0
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: help serve test lint typecheck unit train evaluate proto bench fuzz clean

help:
	@echo "make serve    install the server into $(VENV) and serve models/lenet5.onnx (SERVE_ARGS=...)"
	@echo "make test     install everything into $(VENV); run ruff, mypy and pytest"
	@echo "make lint     ruff + mypy only"
	@echo "make train    retrain the shipped model on ../shared/data/mnist-sample"
	@echo "make proto    regenerate service/gen from proto/"

# The server's install: no torch. The stamp is redone when pyproject.toml changes.
$(VENV)/.serve-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.serve-installed
	$(PIP) $(TORCH_PIN)
	$(PIP) -e '.[train,dev]' $(TORCH_PIN)
	touch $@

serve: $(VENV)/.serve-installed
	$(BIN)/digits serve $(SERVE_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check service training tests proto
	$(BIN)/mypy service training

unit: $(VENV)/.dev-installed
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint unit

DATA_DIR ?= ../shared/data/mnist-sample
train: $(VENV)/.dev-installed
	$(BIN)/digits train --data-dir $(DATA_DIR) --out-dir runs/shipped --model-out models/lenet5.onnx

proto: $(VENV)/.dev-installed
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
