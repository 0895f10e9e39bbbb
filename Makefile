# Two commands on a fresh machine: `make serve` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# An unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU wheel this project trains with.
TORCH_PIN ?= torch==2.13.0
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: help serve test lint typecheck unit train evaluate proto bench fuzz clean browser-deps prometheus-deps deploy-check

help:
	@echo "make serve    install the server into $(VENV) and serve models/lenet5.onnx (SERVE_ARGS=...)"
	@echo "make test     install everything into $(VENV); run ruff, mypy and pytest"
	@echo "make lint     ruff + mypy only"
	@echo "make train    retrain the shipped model on ../shared/data/mnist-sample"
	@echo "make proto    regenerate service/gen from proto/"
	@echo "make deploy-check  lint the Dockerfile, check the compose stack and render + validate deploy/k8s"

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

# tests/test_browser.py drives Debian's chromium through chromium-driver: install them where we can
# (root and apt-get), never failing where we cannot; the browser test then skips and says why.
BROWSER_PACKAGES := chromium chromium-driver
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BROWSER_PACKAGES)
browser-deps:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $(BROWSER_PACKAGES) for the browser test"; \
	  $(APT_INSTALL) >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && $(APT_INSTALL) >/dev/null 2>&1; } || \
	  echo "could not install $(BROWSER_PACKAGES); the browser test will skip"; \
	else echo "chromium is not installed and apt-get needs root here; the browser test will skip"; fi

# promtool (and prometheus) validate deploy/prometheus and run the dashboard queries in
# tests/test_prometheus_grafana.py; Debian's `prometheus` package has both. Same rules as above:
# installed where we are root with apt-get, never failing; without them those checks skip. (On a host
# running systemd the package also enables a prometheus service on :9090; containers have none.)
PROMETHEUS_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
prometheus-deps:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing prometheus (promtool) for the deploy/prometheus checks"; \
	  $(PROMETHEUS_INSTALL) >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && $(PROMETHEUS_INSTALL) >/dev/null 2>&1; } || \
	  echo "could not install prometheus; promtool checks will skip (structural checks still run)"; \
	else echo "promtool is not installed and apt-get needs root here; promtool checks will skip"; fi

unit: $(VENV)/.dev-installed browser-deps prometheus-deps
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint unit

# Dockerfile, compose stack and Kubernetes manifests (docs/deploy.md); no Docker engine or cluster needed.
deploy-check: $(VENV)/.dev-installed
	$(BIN)/pytest -q tests/test_deploy_docker.py tests/test_deploy_compose.py tests/test_deploy_k8s.py

DATA_DIR ?= ../shared/data/mnist-sample
train: $(VENV)/.dev-installed
	$(BIN)/digits train --data-dir $(DATA_DIR) --out-dir runs/shipped --model-out models/lenet5.onnx

proto: $(VENV)/.dev-installed
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
