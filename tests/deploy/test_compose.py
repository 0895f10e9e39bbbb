"""deploy/compose/docker-compose.yml fits together: with no Docker engine here, the stack is checked by
reading it, and every file, port, name and setting it relies on is checked against the thing it names:
the Dockerfile's stages, the server's config, Prometheus' scrape config and Grafana's provisioning."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from service.cli import build_parser
from service.server import config as config_module
from tests.deploy.dockerfile import copy_sources, parse_dockerfile

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
CONFIG_ENV_NAMES = {config_module.env_name(f) for f in config_module.ServerConfig.__dataclass_fields__}
# The files the issue asks the stack to use, all owned by deploy/prometheus and deploy/grafana.
DOCKERFILE = parse_dockerfile((ROOT / "Dockerfile").read_text())
OBSERVABILITY_FILES = [
    "deploy/prometheus/prometheus.yml",
    "deploy/prometheus/alerts.yml",
    "deploy/grafana/dashboards/digits.json",
    "deploy/grafana/provisioning/datasources/prometheus.yml",
    "deploy/grafana/provisioning/dashboards/digits.yml",
]


def interpolate(text: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} with nothing set: the default."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", text)


def seconds(text: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


class Mount:
    """One short-syntax volume entry: bind mount (source is a path) or named volume."""

    def __init__(self, entry: str) -> None:
        self.raw = entry
        parts = entry.split(":")
        self.source, self.target = parts[0], parts[1]
        self.read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        self.operator_given = "${" in self.source  # a path the operator supplies, e.g. the MNIST dir

    @property
    def is_bind(self) -> bool:
        return self.source.startswith((".", "/", "$"))

    def host_path(self) -> Path:
        return (COMPOSE.parent / interpolate(self.source)).resolve()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict[str, Any]) -> list[Mount]:
    return [Mount(v) for v in service.get("volumes", [])]


def server_env(compose: dict[str, Any]) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in compose["services"]["digits"]["environment"].items()}


def published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    pairs = (str(p).split(":") for p in service.get("ports", []))
    return {int(container): int(host) for host, container in pairs}


def test_the_stack_is_the_server_prometheus_and_grafana(compose: dict[str, Any]) -> None:
    assert compose["name"] == "digits"
    assert {"digits", "prometheus", "grafana"} <= set(compose["services"])
    for name, service in compose["services"].items():
        assert "image" in service, f"{name}: pin an image (and tag) so that `up` is reproducible"
        assert not str(service["image"]).endswith(":latest"), name


def test_every_file_the_stack_references_exists(compose: dict[str, Any]) -> None:
    stages = [s.name for s in DOCKERFILE.stages]
    bound: set[Path] = set()
    for name, service in compose["services"].items():
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert context == ROOT, f"{name}: the build context is the repository root"
            assert (context / service["build"]["dockerfile"]).is_file()
            assert service["build"]["target"] in stages, f"{name}: no stage {service['build']['target']}"
        for mount in mounts(service):
            if mount.is_bind and not mount.operator_given:
                assert mount.host_path().exists(), f"{name}: {mount.raw}: no such file"
                bound.add(mount.host_path())
    for path in OBSERVABILITY_FILES:
        file = ROOT / path
        assert file.is_file(), f"{path} is missing"
        assert any(file == b or file.is_relative_to(b) for b in bound), f"{path} is not mounted"


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for mount in mounts(service):
            if not mount.is_bind:
                assert mount.source in compose["volumes"], f"{name}: volume {mount.source} is not declared"


def test_server_settings_are_the_servers_own(compose: dict[str, Any]) -> None:
    service = compose["services"]["digits"]
    env = server_env(compose)
    assert set(env) <= CONFIG_ENV_NAMES, f"not server settings: {set(env) - CONFIG_ENV_NAMES}"
    cfg = config_module.from_sources(environ=env)
    assert cfg.host == "0.0.0.0"
    assert published(service) == {cfg.port: cfg.port, cfg.metrics_port: cfg.metrics_port,
                                  cfg.http_port: cfg.http_port}
    assert cfg.threads == float(service["deploy"]["resources"]["limits"]["cpus"])
    # The default model is the image's own, at the path the Dockerfile copies it to.
    copy = next(i for i in DOCKERFILE.stage("runtime").all("COPY") if "models/lenet5.onnx" in i.args)
    assert PurePosixPath(str(cfg.model)) == PurePosixPath(copy_sources(copy)[2])


def test_stop_signal_and_grace_period_agree(compose: dict[str, Any]) -> None:
    service = compose["services"]["digits"]
    cfg = config_module.from_sources(environ=server_env(compose))
    assert service["stop_signal"] == DOCKERFILE.stage("runtime").one("STOPSIGNAL").args == "SIGTERM"
    assert seconds(service["stop_grace_period"]) > cfg.grace_period_s + 2  # + the batcher's drain


def test_healthcheck_asks_the_grpc_health_service(compose: dict[str, Any]) -> None:
    service = compose["services"]["digits"]
    cfg = config_module.from_sources(environ=server_env(compose))
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    args = build_parser().parse_args(test[2:])
    assert test[1] == "digits" and args.command == "health"
    assert args.server == f"127.0.0.1:{cfg.port}"
    assert args.timeout < seconds(service["healthcheck"]["timeout"])
    prometheus = compose["services"]["prometheus"]
    assert prometheus["depends_on"]["digits"]["condition"] == "service_healthy"


def test_server_is_locked_down(compose: dict[str, Any]) -> None:
    service = compose["services"]["digits"]
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert all(m.read_only for m in mounts(service))


def _container_file(service: dict[str, Any], repo_path: str) -> PurePosixPath:
    """Where `repo_path` appears inside the container, through a file or directory bind mount."""
    file = ROOT / repo_path
    for mount in mounts(service):
        if mount.is_bind and not mount.operator_given:
            host = mount.host_path()
            if file == host:
                return PurePosixPath(mount.target)
            if file.is_relative_to(host):
                return PurePosixPath(mount.target) / file.relative_to(host).as_posix()
    raise AssertionError(f"{repo_path} is not mounted")


def test_prometheus_scrapes_the_server_and_loads_the_alerts(compose: dict[str, Any]) -> None:
    service = compose["services"]["prometheus"]
    cfg = config_module.from_sources(environ=server_env(compose))
    config_in_container = _container_file(service, "deploy/prometheus/prometheus.yml")
    assert f"--config.file={config_in_container}" in service["command"]
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] if job["job_name"] == "digits"
               for static in job.get("static_configs", []) for t in static["targets"]]
    assert f"digits:{cfg.metrics_port}" in targets  # the compose service name and DIGITS_METRICS_PORT
    alerts_in_container = _container_file(service, "deploy/prometheus/alerts.yml")
    rule_files = [config_in_container.parent / r for r in scrape["rule_files"]]
    assert alerts_in_container in rule_files


def test_grafana_provisions_the_datasource_and_the_dashboard(compose: dict[str, Any]) -> None:
    service = compose["services"]["grafana"]
    prometheus_port = 9090  # prometheus' own default; the compose file publishes it unchanged
    assert prometheus_port in published(compose["services"]["prometheus"])
    for path, directory in (("deploy/grafana/provisioning/datasources/prometheus.yml", "datasources"),
                            ("deploy/grafana/provisioning/dashboards/digits.yml", "dashboards")):
        assert _container_file(service, path).parent == PurePosixPath("/etc/grafana/provisioning") / directory
    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    urls = {d["url"] for d in datasources["datasources"]}
    assert f"http://prometheus:{prometheus_port}" in urls
    providers = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/digits.yml").read_text())
    dashboard = _container_file(service, "deploy/grafana/dashboards/digits.json")
    assert any(dashboard.is_relative_to(p["options"]["path"]) for p in providers["providers"])
    uids = {d["uid"] for d in datasources["datasources"]}
    used = set(re.findall(r'"datasource":\s*\{[^}]*"uid":\s*"([^"$]+)"',
                          json.dumps(json.loads((ROOT / "deploy/grafana/dashboards/digits.json").read_text()))))
    assert used <= uids, f"the dashboard uses data sources nobody provisions: {used - uids}"


def test_train_service_publishes_where_the_server_can_read(compose: dict[str, Any]) -> None:
    train, server = compose["services"]["train"], compose["services"]["digits"]
    assert train["profiles"] == ["train"]  # `docker compose up` never retrains
    cmd = json.loads(DOCKERFILE.stage("train").one("CMD").args)
    args = build_parser().parse_args(["train", *train.get("command", cmd)])
    model_out = PurePosixPath(args.model_out)
    train_volume = next(m for m in mounts(train) if not m.is_bind and model_out.is_relative_to(m.target))
    server_volume = next(m for m in mounts(server) if m.source == train_volume.source)
    assert server_volume.read_only
    # DIGITS_MODEL=/models/lenet5.onnx (the header's recipe) is the file the train job writes.
    assert model_out.relative_to(train_volume.target) == PurePosixPath("lenet5.onnx")
    assert server_volume.target == train_volume.target
    recipe = next(line for line in COMPOSE.read_text().splitlines() if "DIGITS_MODEL=" in line)
    assert f"DIGITS_MODEL={PurePosixPath(server_volume.target) / 'lenet5.onnx'}" in shlex.split(recipe.lstrip("# "))
