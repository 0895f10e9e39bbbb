"""deploy/kserve: the ServingRuntime and the InferenceService validate offline against KServe's published CRD
schemas, and keep the promises the server and KServe rely on.

The schemas are KServe's own CustomResourceDefinitions, unmodified, in ../shared/kserve (see its README);
they are read from there, never copied into the project. Validation is strict, as `kubectl apply
--validate=strict` is: a field the schema does not know is an error, not silently pruned. Without
../shared the validation skips, except in CI (CI=true), where it fails.

Then the contract: the runtime's container, as KServe renders it ({{.Name}} -> the InferenceService's name),
configures a server that listens where KServe expects (REST 8080, gRPC 9000), reads /mnt/models and serves the
model under the InferenceService's name, with the Deployment's resources and security; and a real server
started from those settings answers /v2/models/<name>/infer with a token from the mounted Secret.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from service.cli import build_parser
from service.server import config as config_module
from tests.deploy.test_k8s import K8S, container, kustomize, one
from tests.harness import SHIPPED_MODEL, ServerThread, fixture_digits, free_port

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "kserve"
CRDS = ROOT.parent / "shared" / "kserve"
CRD_FILES = {"ServingRuntime": "serving.kserve.io_servingruntimes.yaml",
             "InferenceService": "serving.kserve.io_inferenceservices.yaml"}
# What KServe requires of an InferenceService name (its webhook): a DNS-1035 label.
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")

Schema = dict[str, Any]


def _crds_or_skip() -> Path:
    if (CRDS / CRD_FILES["ServingRuntime"]).is_file() and (CRDS / CRD_FILES["InferenceService"]).is_file():
        return CRDS
    message = f"KServe's CRDs are not at {CRDS} (the shared folder beside the repository: see its README)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; in CI they must be there")
    pytest.skip(message)


def strict(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema that refuses unknown fields, as the API server's strict
    field validation does: every object with `properties` and no `additionalProperties` gets
    `additionalProperties: false`, unless it preserves unknown fields (`x-kubernetes-preserve-unknown-fields`)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string") and "type" not in schema:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@functools.cache
def _crd(kind: str) -> dict[str, Any]:
    # The InferenceService CRD is 2 MB of YAML: libyaml's loader where PyYAML has it, and once per session.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return dict(yaml.load((_crds_or_skip() / CRD_FILES[kind]).read_text(), Loader=loader))


def crd_schema(kind: str) -> tuple[str, Schema]:
    """(apiVersion, strict schema) of the CRD's served storage version."""
    crd = _crd(kind)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    return f"{crd['spec']['group']}/{version['name']}", strict(version["schema"]["openAPIV3Schema"])


def errors(obj: dict[str, Any], schema: Schema) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return sorted(f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj))


def manifest(name: str) -> dict[str, Any]:
    (obj,) = [o for o in yaml.safe_load_all((KSERVE / name).read_text()) if o]
    return obj


@pytest.fixture(scope="module")
def runtime() -> dict[str, Any]:
    return manifest("servingruntime.yaml")


@pytest.fixture(scope="module")
def isvc() -> dict[str, Any]:
    return manifest("inferenceservice.yaml")


def test_without_the_crds_it_skips_except_in_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(f"{__name__}.CRDS", tmp_path)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        _crds_or_skip()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="in CI they must be there"):
        _crds_or_skip()


@pytest.mark.parametrize(("kind", "name"), [("ServingRuntime", "servingruntime.yaml"),
                                            ("InferenceService", "inferenceservice.yaml")])
def test_manifest_validates_against_kserves_crd_schema(kind: str, name: str) -> None:
    api_version, schema = crd_schema(kind)
    obj = manifest(name)
    assert obj["apiVersion"] == api_version and obj["kind"] == kind
    assert not errors(obj, schema), "\n".join(errors(obj, schema))
    assert DNS_1035.fullmatch(obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 63


def test_the_validation_is_strict_enough_to_catch_mistakes(runtime: dict[str, Any], isvc: dict[str, Any]) -> None:
    """The checks above would fail for the mistakes people make: a misspelt field, a wrong type."""
    _, runtime_schema = crd_schema("ServingRuntime")
    _, isvc_schema = crd_schema("InferenceService")
    typo = copy.deepcopy(isvc)
    typo["spec"]["predictor"]["model"]["storageURI"] = typo["spec"]["predictor"]["model"].pop("storageUri")
    assert any("storageURI" in e for e in errors(typo, isvc_schema))
    wrong_type = copy.deepcopy(runtime)
    wrong_type["spec"]["supportedModelFormats"][0]["autoSelect"] = "yes"
    assert any("autoSelect" in e for e in errors(wrong_type, runtime_schema))
    no_name = copy.deepcopy(runtime)
    del no_name["spec"]["containers"][0]["name"]
    assert errors(no_name, runtime_schema)


def rendered_container(runtime: dict[str, Any], isvc: dict[str, Any]) -> dict[str, Any]:
    """The runtime's container as KServe fills it in for this InferenceService ({{.Name}} and friends)."""
    (server,) = runtime["spec"]["containers"]
    text = json.dumps(server).replace("{{.Name}}", isvc["metadata"]["name"])
    assert "{{" not in text, "a template KServe does not fill in"
    return dict(json.loads(text))


def runtime_config(runtime: dict[str, Any], isvc: dict[str, Any]) -> config_module.ServerConfig:
    server = rendered_container(runtime, isvc)
    environ = {e["name"]: e["value"] for e in server["env"] if "value" in e}
    assert set(environ) | {"DIGITS_THREADS"} <= {config_module.env_name(f)
                                                   for f in config_module.ServerConfig.__dataclass_fields__}
    args = build_parser().parse_args(["serve", *server.get("args", [])])
    return config_module.from_sources(args, environ=environ)


def test_runtime_serves_onnx_over_both_v2_protocols_on_kserves_ports(runtime: dict[str, Any],
                                                                     isvc: dict[str, Any]) -> None:
    spec = runtime["spec"]
    assert {"name": "onnx", "version": "1", "autoSelect": True} in spec["supportedModelFormats"]
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    (server,) = spec["containers"]
    assert server["name"] == "kserve-container"  # the name KServe merges the predictor's overrides into
    cfg = runtime_config(runtime, isvc)
    assert (cfg.host, cfg.http_port, cfg.port) == ("0.0.0.0", 8080, 9000)
    assert cfg.model == Path("/mnt/models")  # KServe's mount of the storageUri
    assert cfg.model_name == isvc["metadata"]["name"]  # KServe routes /v2/models/<isvc name>/...
    assert spec["annotations"] == {"prometheus.kserve.io/port": str(cfg.metrics_port),
                                   "prometheus.kserve.io/path": "/metrics"}
    # No declared ports: Knative (Serverless mode) routes one, 8080 by default; see the file's comment.
    assert "ports" not in server


def test_runtime_has_the_deployments_resources_security_and_threads(runtime: dict[str, Any]) -> None:
    deployment = kustomize(K8S / "overlays" / "cpu")
    server, pod = container(deployment), one(deployment, "Deployment")["spec"]["template"]["spec"]
    (kserve,) = runtime["spec"]["containers"]
    assert kserve["resources"] == server["resources"]
    pod_level = {k: v for k, v in pod["securityContext"].items() if k != "fsGroup"}  # no pod context here
    assert kserve["securityContext"] == {**pod_level, **server["securityContext"]}
    threads = next(e for e in kserve["env"] if e["name"] == "DIGITS_THREADS")["valueFrom"]["resourceFieldRef"]
    assert threads == {"containerName": "kserve-container", "resource": "limits.cpu", "divisor": "1"}
    mounts = {m["mountPath"]: m for m in kserve["volumeMounts"]}
    volumes = {v["name"]: v for v in runtime["spec"]["volumes"]}
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"] == pod["volumes"][0]["emptyDir"]


def test_tokens_come_from_a_secret_the_server_can_read(runtime: dict[str, Any], isvc: dict[str, Any]) -> None:
    cfg = runtime_config(runtime, isvc)
    assert cfg.auth_token_file is not None
    (kserve,) = runtime["spec"]["containers"]
    path = PurePosixPath(str(cfg.auth_token_file))
    mount = next(m for m in kserve["volumeMounts"] if path.is_relative_to(m["mountPath"]))
    volume = next(v for v in runtime["spec"]["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == "digits-auth-tokens"
    assert path.relative_to(mount["mountPath"]) == PurePosixPath("tokens")  # the Secret's key
    # The pod's user (10001, not the files' owner) must be able to read it: no fsGroup in a ServingRuntime.
    assert volume["secret"]["defaultMode"] & 0o004


def test_inference_service_uses_the_runtime_and_the_models_claim(runtime: dict[str, Any],
                                                                 isvc: dict[str, Any]) -> None:
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert isvc["metadata"]["namespace"] == runtime["metadata"]["namespace"]  # a ServingRuntime is namespaced
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    match = re.fullmatch(r"pvc://([^/]+)/(.*)", model["storageUri"])
    assert match, model["storageUri"]
    claim, path = match[1], match[2]
    base = kustomize(K8S / "overlays" / "cpu")
    assert one(base, "PersistentVolumeClaim", claim)["metadata"]["namespace"] == isvc["metadata"]["namespace"]
    # The whole claim (a directory): a subPath naming one file would never see the Job's atomic replace.
    assert path == ""


def test_a_server_with_the_runtimes_settings_serves_kserves_layout(runtime: dict[str, Any], isvc: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    """/mnt/models as the training Job's claim holds it; the runtime's settings, on free loopback ports."""
    models = tmp_path / "mnt-models"
    (models / "runs" / "20260101T000000Z").mkdir(parents=True)
    shutil.copy(SHIPPED_MODEL, models / "lenet5.onnx")
    shutil.copy(SHIPPED_MODEL, models / "runs" / "20260101T000000Z" / "lenet5.onnx")
    (models / "lenet5.json").write_text("{}")
    tokens = tmp_path / "tokens"
    tokens.write_text("kserve-test-token\n")
    cfg = runtime_config(runtime, isvc).replace(
        model=models, auth_token_file=tokens, host="127.0.0.1", port=0, http_port=free_port(), metrics_port=0,
        threads=1)
    images, labels = fixture_digits()
    name = isvc["metadata"]["name"]
    body = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28],
                                   "data": images[0].reshape(-1).tolist()}]}).encode()
    with ServerThread(cfg) as running:
        url = f"http://127.0.0.1:{running.server.http_port}/v2/models/{name}/infer"
        request = urllib.request.Request(url, body, {"Content-Type": "application/json",
                                                     "Authorization": "Bearer kserve-test-token"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            answer = json.loads(reply.read())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}),
                                   timeout=30)
    assert answer["model_name"] == name
    probabilities = next(o for o in answer["outputs"] if o["name"] == "probabilities")["data"]
    assert max(range(10), key=probabilities.__getitem__) == labels[0]
    assert refused.value.code == 401


def test_the_grpc_variant_in_the_docs_validates_and_routes_the_grpc_port(runtime: dict[str, Any],
                                                                         isvc: dict[str, Any]) -> None:
    """docs/deploy.md's gRPC InferenceService (Serverless mode routes one port): valid, and it names the port
    the runtime's server listens on for gRPC, under the name Knative needs."""
    _, schema = crd_schema("InferenceService")
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "InferenceService" in b]
    (grpc_isvc,) = blocks
    assert not errors(grpc_isvc, schema), "\n".join(errors(grpc_isvc, schema))
    model = grpc_isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "grpc-v2"
    assert model["storageUri"] == isvc["spec"]["predictor"]["model"]["storageUri"]
    (port,) = model["ports"]
    assert port == {"name": "h2c", "containerPort": runtime_config(runtime, grpc_isvc).port, "protocol": "TCP"}
