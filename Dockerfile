# syntax=docker/dockerfile:1
#
# The digit-recognition service and its training job, as one multi-stage build.
#
#   docker build -t digits:1.0.0 .                              # CPU server (the last stage: the default)
#   docker build --target runtime-gpu -t digits:1.0.0-gpu .     # CUDA server (onnxruntime-gpu)
#   docker build --target train -t digits-train:1.0.0 .         # training job (torch, CPU)
#   deploy/image/build.sh build [--target train]                # the same with podman or docker, making the
#                                                               # Python base itself where Docker Hub is out of reach
#
# The server is configured only through DIGITS_* environment variables (the fields of
# service/server/config.py); docs/deploy.md has the run commands. tests/deploy/test_docker.py lints this file
# with hadolint and checks each stage's contract; tests/deploy/test_image.py builds the CPU server and the
# training image with deploy/image/build.sh and runs them.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu 1.31 is built against CUDA 13 and cuDNN 9: the base must carry both.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG ORT_GPU_VERSION=1.31.1
ARG TORCH_VERSION=2.13.0
# Where the CPU torch wheel comes from: PyTorch's own index, or a mirror of it (an index that also has torch's
# dependencies). PyPI's torch for Linux is the multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---------------------------------------------------------------------------------------------------
# build: the server and its runtime dependencies in a self-contained venv. No torch: `pip install .`
# without extras is the server's install.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY service/ service/
COPY training/ training/
# pip and setuptools leave the venv once they have done their job: nothing at run time installs code.
# constraints.txt holds every dependency to the versions the tests ran with.
RUN /opt/venv/bin/python -m pip install --constraint constraints.txt . \
    && /opt/venv/bin/python -m pip uninstall --yes pip setuptools

# ---------------------------------------------------------------------------------------------------
# build-gpu: the same install on the CUDA base's python, with onnxruntime-gpu in place of onnxruntime
# (both provide the `onnxruntime` package, so one replaces the other).
FROM ${CUDA_IMAGE} AS build-gpu
ARG ORT_GPU_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# Ubuntu's python3 follows the base image's security updates; pinning its exact patch release would
# break the build each time the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY service/ service/
COPY training/ training/
RUN /opt/venv/bin/python -m pip install --constraint constraints.txt . \
    && /opt/venv/bin/python -m pip uninstall --yes onnxruntime \
    && /opt/venv/bin/python -m pip install "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && /opt/venv/bin/python -m pip uninstall --yes pip

# ---------------------------------------------------------------------------------------------------
# runtime-gpu: the server on the CUDA runtime; --device auto takes CUDA when the GPU is visible.
FROM ${CUDA_IMAGE} AS runtime-gpu
# Same reason as in build-gpu: Ubuntu's python3 tracks the archive's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 digits \
    && useradd --system --uid 10001 --gid digits --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin digits \
    && install -d -o digits -g digits /models
COPY --from=build-gpu /opt/venv /opt/venv
COPY models/lenet5.onnx /opt/digits/models/lenet5.onnx
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DIGITS_MODEL=/opt/digits/models/lenet5.onnx \
    DIGITS_HOST=0.0.0.0 \
    DIGITS_PORT=50051 \
    DIGITS_METRICS_PORT=8002 \
    DIGITS_HTTP_PORT=8000 \
    DIGITS_DEVICE=auto \
    DIGITS_GRACE_PERIOD_S=8 \
    DIGITS_LOG_FORMAT=json \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /opt/digits
EXPOSE 50051 8002 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "exec digits health --server \"127.0.0.1:${DIGITS_PORT}\" --timeout 4"]
ENTRYPOINT ["digits", "serve"]

# ---------------------------------------------------------------------------------------------------
# train: the pipeline job. Reads MNIST IDX files from /data, keeps checkpoints and curves in /runs,
# writes the exported model to the /models volume (mount one there).
FROM ${PYTHON_IMAGE} AS train
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# The generated negatives print letters and symbols in these fonts (training.synth.glyphs; `make font-deps`
# in a checkout). Without them training falls back to Pillow's own font, one of the fonts rejection is
# measured on. Debian's font packages follow the archive, like python3 in the GPU stages.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends fonts-dejavu-core fonts-dejavu-extra \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY service/ service/
COPY training/ training/
# The CPU wheel from PyTorch's own index: an unpinned torch from PyPI pulls a multi-GB CUDA build.
RUN /opt/venv/bin/python -m pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && /opt/venv/bin/python -m pip install --constraint constraints.txt ".[train]" \
    && groupadd --system --gid 10001 digits \
    && useradd --system --uid 10001 --gid digits --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin digits \
    && mkdir -p /data /runs /models \
    && chown digits:digits /runs /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /runs
VOLUME ["/data", "/runs", "/models"]
ENTRYPOINT ["digits", "train"]
CMD ["--data-dir", "/data", "--out-dir", "/runs/latest", "--model-out", "/models/lenet5.onnx"]

# ---------------------------------------------------------------------------------------------------
# runtime: python + the venv + the bundled model; runs as an unprivileged user, read-only friendly.
# /models is the mount point for a model volume (compose, components/model-volume in deploy/k8s);
# owned by the server's user so that a fresh named volume mounted there is writable by the train job.
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 digits \
    && useradd --system --uid 10001 --gid digits --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin digits \
    && install -d -o digits -g digits /models
COPY --from=build /opt/venv /opt/venv
COPY models/lenet5.onnx /opt/digits/models/lenet5.onnx
# Containers must listen on every interface (the server's own default is 127.0.0.1). The grace period
# (8 s) stays under `docker stop`'s default 10 s between SIGTERM and SIGKILL, so a drain completes;
# Kubernetes and compose set their own, longer, pairs (deploy/).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DIGITS_MODEL=/opt/digits/models/lenet5.onnx \
    DIGITS_HOST=0.0.0.0 \
    DIGITS_PORT=50051 \
    DIGITS_METRICS_PORT=8002 \
    DIGITS_HTTP_PORT=8000 \
    DIGITS_DEVICE=cpu \
    DIGITS_GRACE_PERIOD_S=8 \
    DIGITS_LOG_FORMAT=json
USER 10001:10001
WORKDIR /opt/digits
# gRPC (DigitRecognizer, health, reflection), Prometheus /metrics, HTTP/REST.
EXPOSE 50051 8002 8000
# SIGTERM starts the server's drain: health NOT_SERVING, in-flight calls get DIGITS_GRACE_PERIOD_S.
STOPSIGNAL SIGTERM
# The gRPC health service answers SERVING only once the model is loaded and warm.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "exec digits health --server \"127.0.0.1:${DIGITS_PORT}\" --timeout 4"]
ENTRYPOINT ["digits", "serve"]
