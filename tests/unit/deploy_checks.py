"""Checks of deploy/kubernetes/ (used by test_deploy_manifests.py): each returns the problems it finds.

Schemas: the Kubernetes objects against the kubernetes-validate package's bundled schemas
(strict: an unknown field is an error, as `kubectl apply` rejects it), the KEDA objects against
the OpenAPI schema of KEDA's CRDs (tests/data/keda/), made strict the same way. Consistency:
what a user would only notice in a running cluster: stream and group names, probe paths and
commands, setting names and values, the secrets' agreement, the image's user.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import yaml

from services import cli
from shared.settings import (
    CommonSettings,
    DetokenizerSettings,
    EngineSettings,
    GatewaySettings,
    TokenizerSettings,
    load_settings,
)
from shared.transport import StreamNames

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
KEDA_CRDS = ROOT / "tests" / "data" / "keda"
# A release both KEDA 2.20 and kubernetes-validate 1.37 support.
KUBERNETES_VERSION = "1.34.0"
ROLE_SETTINGS: dict[str, type[CommonSettings]] = {
    "gateway": GatewaySettings,
    "tokenizer": TokenizerSettings,
    "engine": EngineSettings,
    "detokenizer": DetokenizerSettings,
}
# The trigger metadata KEDA 2.20's redis-streams scaler reads (pkg/scalers/redis_streams_scaler.go,
# redis_scaler.go); the CRD types metadata as any string map, so a misspelt key passes the schema.
REDIS_STREAMS_METADATA = frozenset(
    {"address", "host", "port", "stream", "consumerGroup", "lagCount", "activationLagCount"}
    | {"pendingEntriesCount", "streamLength", "databaseIndex", "enableTLS", "unsafeSsl", "username", "password"}
)


@dataclass
class Manifests:
    """Every object of a kustomization and the ones it includes."""

    objects: list[dict[str, Any]]
    namespaces: dict[str, str] = field(default_factory=dict)  # kustomization folder -> namespace
    images: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)

    def configmap_env(self) -> dict[str, str]:
        return {k: str(v) for c in self.of_kind("ConfigMap") for k, v in c.get("data", {}).items()}

    def namespace(self) -> str:
        """The namespace every kustomization puts its objects in ('' when they disagree)."""
        (namespace,) = set(self.namespaces.values()) if len(set(self.namespaces.values())) == 1 else {""}
        return namespace

    def secret_value(self, name: str, key: str) -> str | None:
        secret = self.get("Secret", name)
        return None if secret is None else secret.get("stringData", {}).get(key)


def load(folder: Path = KUBE / "keda") -> Manifests:
    found = Manifests([])
    _load_into(folder, found)
    return found


def _load_into(folder: Path, into: Manifests) -> None:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    into.files.append(folder / "kustomization.yaml")
    into.namespaces[folder.name] = kustomization.get("namespace", "")
    into.images += [image["name"] for image in kustomization.get("images", [])]
    for resource in kustomization["resources"]:
        path = (folder / resource).resolve()
        if path.is_dir():
            _load_into(path, into)
        else:
            into.files.append(path)
            into.objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def deployments(m: Manifests) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(role, Deployment, its container) for each pipeline role."""
    for deployment in m.of_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            command = container.get("command", [])
            if command[:1] == ["scalellm"]:
                yield command[1], deployment, container


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            if not schema.get("x-kubernetes-preserve-unknown-fields"):
                out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def keda_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((KEDA_CRDS / f"keda.sh_{kind.lower()}s.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return strict(version["schema"]["openAPIV3Schema"])  # type: ignore[no-any-return]


def schema_problems(m: Manifests) -> list[str]:
    problems = []
    for obj in m.objects:
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            if obj.get("apiVersion", "").startswith("keda.sh/"):
                jsonschema.Draft7Validator(keda_schema(obj["kind"])).validate(obj)
            else:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            problems.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{where}: {exc.message}")
    return problems


def settings_for(cls: type[CommonSettings], env: dict[str, str]) -> CommonSettings | str:
    """The settings a role gets from exactly ``env``, or the start-up error it would exit with."""
    with mock.patch.dict(os.environ, env, clear=True):
        try:
            return load_settings(cls)
        except SystemExit as exc:
            return str(exc)


def role_env(m: Manifests, container: dict[str, Any]) -> dict[str, str]:
    env = {}
    for source in container.get("envFrom", []):
        configmap = m.get("ConfigMap", source.get("configMapRef", {}).get("name", ""))
        env.update({k: str(v) for k, v in (configmap or {}).get("data", {}).items()})
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        value = var.get("value") if ref is None else m.secret_value(ref["name"], ref["key"])
        if value is not None:
            env[var["name"]] = str(value)
    return env


def env_problems(m: Manifests) -> list[str]:
    known = {f"SCALELLM_{name.upper()}" for cls in ROLE_SETTINGS.values() for name in cls.model_fields}
    problems = [f"ConfigMap: {k} is no setting of any role" for k in m.configmap_env() if k not in known]
    for role, _, container in deployments(m):
        cls = ROLE_SETTINGS[role]
        ours = {f"SCALELLM_{name.upper()}" for name in cls.model_fields}
        for var in container.get("env", []):
            if var["name"] not in ours:
                problems.append(f"{role}: {var['name']} is no setting of {cls.__name__}")
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional") and m.secret_value(ref["name"], ref["key"]) is None:
                problems.append(f"{role}: {var['name']} refers to a missing secret key {ref['name']}/{ref['key']}")
        for source in container.get("envFrom", []):
            if m.get("ConfigMap", source.get("configMapRef", {}).get("name", "")) is None:
                problems.append(f"{role}: envFrom names a ConfigMap that is not there: {source}")
        loaded = settings_for(cls, role_env(m, container))
        if isinstance(loaded, str):
            problems.append(f"{role}: would not start: {loaded}")
    return problems


def stream_problems(m: Manifests) -> list[str]:
    common = settings_for(CommonSettings, m.configmap_env())
    if isinstance(common, str):
        return [f"ConfigMap: {common}"]
    names = StreamNames(common.stream_prefix)
    expected = {
        "tokenizer": {(names.requests, StreamNames.tokenizer_group)},
        "engine": {(names.tokenized, StreamNames.engine_group)},
        "detokenizer": {
            (names.generated(shard), StreamNames.detokenizer_group) for shard in range(common.detokenizer_shards)
        },
    }
    roles = {deployment["metadata"]["name"]: role for role, deployment, _ in deployments(m)}
    scaled: dict[str, set[tuple[str, str]]] = {}
    problems = []
    for scaled_object in m.of_kind("ScaledObject"):
        name, spec = scaled_object["metadata"]["name"], scaled_object["spec"]
        role = roles.get(spec["scaleTargetRef"]["name"])
        if role is None or spec["scaleTargetRef"].get("kind", "Deployment") != "Deployment":
            problems.append(f"ScaledObject/{name} scales no pipeline Deployment")
            continue
        triggers = spec["triggers"]
        scaled[role] = {(t["metadata"].get("stream"), t["metadata"].get("consumerGroup")) for t in triggers}
        problems += [f"ScaledObject/{name}: {p}" for t in triggers for p in _trigger_problems(m, t)]
        if role == "detokenizer" and spec.get("maxReplicaCount", 100) > common.detokenizer_shards:
            problems.append(f"ScaledObject/{name}: more detokenizers than shards would idle")
    for role, streams in expected.items():
        if scaled.get(role) != streams:
            problems.append(f"{role}: scaled on {sorted(scaled.get(role, ()))}, but it reads {sorted(streams)}")
    return problems


def _trigger_problems(m: Manifests, trigger: dict[str, Any]) -> list[str]:
    meta = trigger["metadata"]
    problems = [f"unknown redis-streams metadata {k!r}" for k in meta if k not in REDIS_STREAMS_METADATA]
    if trigger["type"] != "redis-streams" or not str(meta.get("lagCount", "")).isdigit():
        problems.append("not a redis-streams trigger with a lagCount")
    service = m.get("Service", "redis")
    if service is not None:
        port = service["spec"]["ports"][0]["port"]
        address = f"redis.{m.namespace()}.svc.cluster.local:{port}"
        if meta.get("address") != address:
            problems.append(f"address {meta.get('address')!r} is not the Redis Service, {address!r}")
    auth = m.get("TriggerAuthentication", trigger.get("authenticationRef", {}).get("name", ""))
    refs = [] if auth is None else auth["spec"].get("secretTargetRef", [])
    if not any(r.get("parameter") == "password" and m.secret_value(r.get("name", ""), r.get("key", "")) for r in refs):
        problems.append("no TriggerAuthentication gives it the Redis password from a Secret")
    return problems


def gateway_get_paths() -> set[str]:
    from services.gateway.server import create_app
    from shared.transport import StreamTransport

    settings = GatewaySettings(redis_url="redis://localhost:6379/0")
    app = create_app(settings, StreamTransport("redis://localhost:6379/0", "p", "gateway-x"))
    return {getattr(route, "path", "") for route in app.routes if "GET" in (getattr(route, "methods", None) or ())}


def probe_problems(m: Manifests) -> list[str]:
    problems = []
    paths = gateway_get_paths()
    for role, _, container in deployments(m):
        if role not in cli.ROLES:
            problems.append(f"scalellm has no role {role!r}")
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container.get(kind)
            if probe is None:
                problems.append(f"{role}: no {kind}")
            elif "httpGet" in probe:
                get = probe["httpGet"]
                if get["path"] not in paths:
                    problems.append(f"{role}: {kind} GETs {get['path']}, which the gateway does not serve")
                # /ready fails while another stage is missing: a liveness or start-up probe on it would
                # restart every gateway for an engine's death; readiness on /health would send traffic
                # to a gateway that cannot serve it.
                elif (get["path"] == "/ready") != (kind == "readinessProbe"):
                    problems.append(f"{role}: {kind} GETs {get['path']}; readiness is /ready, liveness /health")
                port = ports.get(get["port"], get["port"])
                if str(port) != role_env(m, container).get("SCALELLM_GATEWAY_PORT"):
                    problems.append(f"{role}: {kind} port {port} is not SCALELLM_GATEWAY_PORT")
            elif probe.get("exec", {}).get("command") != ["scalellm", "health", role]:
                problems.append(f"{role}: {kind} is not `scalellm health {role}`")
            elif probe.get("timeoutSeconds", 1) < 3:
                problems.append(f"{role}: {kind}: a Python start-up needs more than {probe.get('timeoutSeconds', 1)} s")
    return problems


def secret_problems(m: Manifests) -> list[str]:
    url = urlsplit(m.secret_value("scalellm-secrets", "SCALELLM_REDIS_URL") or "")
    password = m.secret_value("redis-auth", "password")
    problems = []
    if url.password != password:
        problems.append("the password in SCALELLM_REDIS_URL is not the redis-auth password")
    if not re.fullmatch(r"[A-Za-z0-9._~-]+", password or ""):
        problems.append("the Redis password needs escaping in a URL or in redis.conf")
    service = m.get("Service", "redis")
    if service is not None and (url.hostname, url.port) != ("redis", service["spec"]["ports"][0]["port"]):
        problems.append(f"SCALELLM_REDIS_URL points at {url.hostname}:{url.port}, not the Redis Service")
    return problems


def image_problems(m: Manifests) -> list[str]:
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = int(re.search(r"--uid (\d+)", dockerfile).group(1))  # type: ignore[union-attr]
    image_env = dict(re.findall(r"(SCALELLM_\w+)=(\S+)", dockerfile))
    problems = []
    for role, deployment, container in deployments(m):
        pod = deployment["spec"]["template"]["spec"].get("securityContext", {})
        if (pod.get("runAsUser"), pod.get("runAsNonRoot")) != (uid, True):
            problems.append(f"{role}: not run as the image's non-root user {uid}")
        if container.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
            problems.append(f"{role}: privilege escalation allowed")
        if container["image"] not in m.images:
            problems.append(f"{role}: image {container['image']!r} is not the one kustomization.yaml sets")
        mounts = {v["mountPath"] for v in container.get("volumeMounts", [])}
        wanted = (
            {"/tmp", "/home/scalellm"} if container.get("securityContext", {}).get("readOnlyRootFilesystem") else set()
        )
        if role != "gateway":  # the gateway loads no model
            wanted |= {str(Path(image_env["SCALELLM_MODEL_CACHE_DIR"]).parent)}
        if not wanted <= mounts:
            problems.append(f"{role}: nothing writable mounted at {sorted(wanted - mounts)}")
    return problems


def kustomize_problems(m: Manifests) -> list[str]:
    problems = [f"{p} is listed but missing" for p in m.files if not p.is_file()]
    listed = {p.resolve() for p in m.files}
    problems += [f"{p} is in no kustomization" for p in KUBE.rglob("*.yaml") if p.resolve() not in listed]
    (namespace,) = m.of_kind("Namespace") or [{"metadata": {"name": None}}]
    if set(m.namespaces.values()) != {namespace["metadata"]["name"]}:
        problems.append(f"the kustomizations' namespaces {m.namespaces} are not the Namespace object's")
    return problems


def all_problems(m: Manifests) -> list[str]:
    checks = (schema_problems, env_problems, stream_problems, probe_problems, secret_problems, image_problems)
    return [p for check in (*checks, kustomize_problems) for p in check(m)]


def mutated(m: Manifests) -> Manifests:
    return copy.deepcopy(m)
