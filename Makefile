# Two commands on a fresh machine: `make serve` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# An unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU wheel this project trains with.
TORCH_PIN ?= torch==2.13.0
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q
# Every install is held to the versions in constraints.txt (`make constraints` regenerates it).
CONSTRAINTS := -c constraints.txt
# `make serve` also opens the REST port with the draw-a-digit page.
SERVE_ARGS ?= --http-port 8000
PYTEST_ARGS ?=

.PHONY: help serve test lint typecheck unit train evaluate proto bench fuzz soak audit constraints clean system-deps deploy-check image image-deps font-deps peer

help:
	@echo "make serve    install the server into $(VENV) and serve models/lenet5.onnx (SERVE_ARGS=...)"
	@echo "make test     install everything into $(VENV); run ruff, mypy and pytest"
	@echo "make lint     ruff + mypy + pip-audit (skipped with a note when offline)"
	@echo "make fuzz     bounded libFuzzer run on the image decoder (FUZZ_RUNS, FUZZ_SECONDS)"
	@echo "make soak     a hostile mix against a real server for SOAK_SECONDS (60): peak RSS, loop lag, log growth"
	@echo "make constraints  regenerate constraints.txt from .venv"
	@echo "make train    retrain the shipped models on ../shared/data/mnist-sample (cross-validated; JOBS=2)"
	@echo "make proto    regenerate service/gen from proto/"
	@echo "make bench    measure the server (docs/benchmarks.md + plot; BENCH_ARGS=--quick for a smoke run)"
	@echo "make peer     install MLServer 1.7.1 into runs/mlserver-venv (digits bench --peer mlserver)"
	@echo "make image    build the CPU server image with podman or docker (IMAGE_TARGET=train, IMAGE_TAG=...)"
	@echo "make deploy-check  lint the Dockerfile, check the compose stack, render + validate deploy/k8s and deploy/kserve"

# The server's install: no torch. The stamp is redone when pyproject.toml changes.
$(VENV)/.serve-installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e . $(CONSTRAINTS)
	touch $@

$(VENV)/.dev-installed: pyproject.toml constraints.txt $(VENV)/.serve-installed
	$(PIP) $(TORCH_PIN) $(CONSTRAINTS)
	$(PIP) -e '.[train,dev]' $(TORCH_PIN) $(CONSTRAINTS)
	touch $@

serve: $(VENV)/.serve-installed
	$(BIN)/digits serve $(SERVE_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check service training tests proto
	$(BIN)/mypy service training tests
	@$(MAKE) --no-print-directory audit

# pip-audit checks every pin in constraints.txt against PyPI's vulnerability data, which is online:
# where PyPI's per-release JSON API (what pip-audit reads) cannot be reached, as behind a package-only
# mirror, the audit is skipped with a note, never failing an offline build. AUDIT=0 skips it on purpose.
AUDIT ?= 1
AUDIT_PROBE ?= https://pypi.org/pypi/pip/24.0/json
audit: $(VENV)/.dev-installed
	@if [ "$(AUDIT)" = 0 ]; then echo "pip-audit: skipped (AUDIT=0)"; \
	elif $(BIN)/python -c "import urllib.request as u; u.urlopen('$(AUDIT_PROBE)', timeout=5)" >/dev/null 2>&1; then \
	  $(BIN)/pip-audit --requirement constraints.txt --no-deps --disable-pip --progress-spinner off; \
	else echo "pip-audit: SKIPPED - cannot reach $(AUDIT_PROBE) (the vulnerability data is online); dependencies were NOT audited"; fi

# Regenerate constraints.txt from what is installed in $(VENV) (after changing dependencies in
# pyproject.toml and installing them). torch loses its local "+cpu" label: PyPI has no such version.
constraints:
	@{ echo "# Pins for every runtime, dev, train and fuzz dependency, as installed and tested: \`make constraints\`"; \
	  echo "# regenerates it from .venv (pip list --format=freeze --exclude-editable). Installs use -c constraints.txt."; \
	  $(BIN)/python -m pip list --format=freeze --exclude-editable --disable-pip-version-check \
	    | grep -viE '^(pip|setuptools|wheel)==' | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > constraints.txt

# libFuzzer on the decoder path (tests/fuzz/fuzz_decode.py), bounded: FUZZ_RUNS inputs or FUZZ_SECONDS.
# Crashes are saved under runs/fuzz/. Where atheris cannot be installed, the hypothesis fuzz tests run.
FUZZ_RUNS ?= 20000
FUZZ_SECONDS ?= 120
fuzz: $(VENV)/.dev-installed
	@if $(PIP) -e '.[fuzz]' $(CONSTRAINTS); then \
	  mkdir -p runs/fuzz && corpus=$$(mktemp -d) && $(BIN)/python tests/fuzz/seeds.py $$corpus && \
	  $(BIN)/python tests/fuzz/fuzz_decode.py -runs=$(FUZZ_RUNS) -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
	    -artifact_prefix=runs/fuzz/ -print_final_stats=1 $$corpus 2>runs/fuzz/last.log; \
	  status=$$?; rm -rf $$corpus; grep -E '^(stat::|Done|==[0-9]+== ERROR)' runs/fuzz/last.log; \
	  echo "fuzz: libFuzzer exit status $$status (full log: runs/fuzz/last.log)"; exit $$status; \
	else echo "fuzz: atheris could not be installed (no wheel for this platform and no clang to build it);" \
	  "running the hypothesis fuzz tests instead"; $(BIN)/pytest -q tests/api/test_fuzz.py; fi

# A hostile mix for SOAK_SECONDS against a real server (tests/soak.py): peak RSS, loop lag, log growth.
SOAK_SECONDS ?= 60
soak: $(VENV)/.dev-installed
	$(BIN)/python tests/soak.py --seconds $(SOAK_SECONDS)

# Tools the tests use that come from Debian: chromium + chromium-driver (tests/api/test_browser.py),
# libb64-0d (Triton's perf_analyzer, from the tritonclient wheel, links it even for CPU runs),
# prometheus with promtool (tests/deploy/test_prometheus_grafana.py), Fashion-MNIST (the IDX reader at
# full scale, and rejection measured on clothing). `make test` installs them where we are root with
# apt-get; elsewhere the tests that need them skip and say why, and under CI=true any skip fails the run
# (tests/conftest.py). (On a host running systemd, the prometheus package also starts a service on :9090.)
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
# $(1): a command or path that shows the packages are there; $(2): the packages.
define apt_need
	@if command -v $(1) >/dev/null 2>&1 || [ -e "$(1)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $(2) for the tests"; \
	  $(APT_GET) $(2) >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && $(APT_GET) $(2) >/dev/null 2>&1; } || \
	  echo "could not install $(2); the tests that need it will skip"; \
	else echo "$(2): not installed, and apt-get needs root here; the tests that need it will skip"; fi
endef
system-deps:
	$(call apt_need,chromedriver,chromium chromium-driver)
	$(call apt_need,/usr/lib/$(shell uname -m)-linux-gnu/libb64.so.0d,libb64-0d)
	$(call apt_need,promtool,prometheus)
	$(call apt_need,/usr/share/datasets/fashion-mnist,dataset-fashion-mnist)
	$(call apt_need,curl,curl)

# tests/deploy/test_image.py builds the real images and runs them: it needs podman (runc for cgroup v1 hosts,
# which crun refuses) and debootstrap (to make the Python base where Docker Hub is out of reach). Installed
# like the above where we are root with apt-get; elsewhere the test skips and says why. Under CI=true the
# image test must not skip, so a tool that cannot be installed fails the build here.
IMAGE_PACKAGES := podman runc debootstrap
IMAGE_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(IMAGE_PACKAGES)
image-deps:
	@if command -v podman >/dev/null 2>&1 && command -v runc >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $(IMAGE_PACKAGES) for the container image test"; \
	  $(IMAGE_INSTALL) >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && $(IMAGE_INSTALL) >/dev/null 2>&1; } || \
	  if [ "$(CI)" = true ]; then echo "could not install $(IMAGE_PACKAGES), which CI needs for the image test"; exit 1; \
	  else echo "could not install $(IMAGE_PACKAGES); the image test will skip"; fi; \
	elif [ "$(CI)" = true ]; then echo "$(IMAGE_PACKAGES) are missing and cannot be installed here (root and apt-get);" \
	  "CI needs them for the image test"; exit 1; \
	else echo "podman, runc or debootstrap is missing and apt-get needs root here; the image test will skip"; fi

# MLServer, the peer `digits bench --peer mlserver` measures against, in a virtual environment of its own:
# MLServer 1.7.1 needs protobuf < 7 and tritonclient >= 2.42, this project protobuf 7 and tritonclient 2.41,
# so pip cannot put both in .venv. Pinned by constraints-mlserver.txt; where it cannot be installed (no
# registry), the peer's test skips and says why, and `digits bench --peer mlserver` reports it not measured.
PEER_VENV := runs/mlserver-venv
peer: $(PEER_VENV)/.installed
$(PEER_VENV)/.installed: constraints-mlserver.txt
	@test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	@if $(PEER_VENV)/bin/python -m pip install --disable-pip-version-check -q mlserver==1.7.1 onnxruntime \
	    -c constraints-mlserver.txt; then touch $@; \
	else echo "could not install MLServer into $(PEER_VENV); its test will skip and the bench reports it not measured"; fi

unit: $(VENV)/.dev-installed system-deps image-deps font-deps peer
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint unit

# Dockerfile, compose stack, Kubernetes and KServe manifests (docs/deploy.md); no engine or cluster needed.
deploy-check: $(VENV)/.dev-installed
	$(BIN)/pytest -q tests/deploy/test_docker.py tests/deploy/test_compose.py tests/deploy/test_k8s.py \
	    tests/deploy/test_kserve.py

# The real images, with podman or docker (deploy/image/build.sh: it makes the Python base with debootstrap
# where Docker Hub is out of reach, once per machine). IMAGE_TARGET=train builds the training image.
IMAGE_TARGET ?= runtime
IMAGE_TAG ?=
image:
	deploy/image/build.sh build --target $(IMAGE_TARGET)$(if $(IMAGE_TAG), --tag $(IMAGE_TAG))

# The negatives that teach the model to reject letters and symbols are printed with the DejaVu fonts, and
# recipes are chosen with letters in Liberation (training.synth.glyphs): installed where we can (root and
# apt-get), as for the browser test. Without them training falls back to Pillow's own font and the model
# is not the shipped one, bit for bit.
FONT_PACKAGES := fonts-dejavu-core fonts-dejavu-extra fonts-liberation
FONT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(FONT_PACKAGES)
font-deps:
	@if [ -f /usr/share/fonts/truetype/dejavu/DejaVuSansCondensed.ttf ] && \
	    [ -f /usr/share/fonts/truetype/dejavu/DejaVuMathTeXGyre.ttf ] && \
	    [ -f /usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $(FONT_PACKAGES) for the generated negatives"; \
	  $(FONT_INSTALL) >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && $(FONT_INSTALL) >/dev/null 2>&1; } || \
	  echo "could not install $(FONT_PACKAGES): letters fall back to Pillow's font (not the shipped model)"; \
	else echo "$(FONT_PACKAGES) missing and apt-get needs root: letters fall back to Pillow's font"; fi

# The exact commands behind models/lenet5.onnx and models/lenet5-int8.onnx (docs/training.md): 5-fold
# cross-validation on 7,000 digits, the final model on all of them, calibration and thresholds on the
# out-of-fold outputs, one measurement on the 1,000 test digits. JOBS parallel trainings (one thread each).
DATA_DIR ?= ../shared/data/mnist-sample
JOBS ?= 2
TRAIN_ARGS := --data-dir $(DATA_DIR) --out-dir runs/lenet5 --cv 5 --seed 1 --model-out models/lenet5.onnx \
    --version 2.3.0
train: $(VENV)/.dev-installed font-deps
	$(BIN)/digits train $(TRAIN_ARGS) --jobs $(JOBS)
	$(BIN)/digits export --checkpoint runs/lenet5/final.pt --quantize int8 --version 2.3.0

# Rewrites the generated section of docs/benchmarks.md and docs/benchmarks.png (a few minutes).
BENCH_ARGS ?= --peer mlserver
bench: $(VENV)/.dev-installed system-deps peer
	$(BIN)/digits bench $(BENCH_ARGS)

proto: $(VENV)/.dev-installed
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
