"""deploy/kubernetes/: valid against the Kubernetes and KEDA schemas, and consistent with the code.

Each check (tests/unit/deploy_checks.py) passes on the manifests as committed, and the
mutations below, each a mistake a user would only meet in a cluster, show that it fails.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.unit import deploy_checks as checks

MANIFESTS = checks.load()


@pytest.mark.parametrize(
    "check",
    [
        checks.schema_problems,
        checks.env_problems,
        checks.stream_problems,
        checks.probe_problems,
        checks.secret_problems,
        checks.image_problems,
        checks.kustomize_problems,
    ],
)
def test_the_manifests_pass(check: Callable[[checks.Manifests], list[str]]) -> None:
    assert check(MANIFESTS) == []


def test_every_role_is_deployed_and_scaled_and_the_gateway_served() -> None:
    roles = {role for role, _, _ in checks.deployments(MANIFESTS)}
    assert roles == set(checks.ROLE_SETTINGS)
    scaled = {o["spec"]["scaleTargetRef"]["name"] for o in MANIFESTS.of_kind("ScaledObject")}
    assert scaled == {"tokenizer", "engine", "detokenizer"}
    (redis,) = MANIFESTS.of_kind("StatefulSet")
    assert "--appendonly yes" in " ".join(redis["spec"]["template"]["spec"]["containers"][0]["command"])
    assert redis["spec"]["volumeClaimTemplates"]
    gateway = MANIFESTS.get("Service", "gateway")
    assert gateway is not None and gateway["spec"]["ports"][0]["targetPort"] == "http"


def test_the_stored_keda_schemas_name_their_source_and_license() -> None:
    for kind in ("ScaledObject", "TriggerAuthentication"):
        header = (checks.KEDA_CRDS / f"keda.sh_{kind.lower()}s.yaml").read_text()[:600]
        assert "github.com/kedacore/keda/blob/v2.20.2/" in header and "Apache License, Version 2.0" in header
        assert checks.keda_schema(kind)["properties"]["spec"]["additionalProperties"] is False


def test_the_gateway_get_routes_are_read_from_the_app() -> None:
    assert {"/health", "/ready", "/version", "/metrics", "/v1/models"} <= checks.gateway_get_paths()


def _container(m: checks.Manifests, role: str) -> dict[str, Any]:
    return next(c for r, _, c in checks.deployments(m) if r == role)


def _scaled(m: checks.Manifests, name: str) -> dict[str, Any]:
    scaled = m.get("ScaledObject", name)
    assert scaled is not None
    return scaled


def _set_config(m: checks.Manifests, key: str, value: str) -> None:
    (configmap,) = m.of_kind("ConfigMap")
    configmap["data"][key] = value


def _trigger(m: checks.Manifests, name: str, index: int = 0) -> dict[str, Any]:
    return _scaled(m, name)["spec"]["triggers"][index]["metadata"]  # type: ignore[no-any-return]


def _gateway_readiness(m: checks.Manifests) -> dict[str, Any]:
    return _container(m, "gateway")["readinessProbe"]  # type: ignore[no-any-return]


def _pod_of(m: checks.Manifests, role: str) -> dict[str, Any]:
    return next(d for r, d, _ in checks.deployments(m) if r == role)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _secret(m: checks.Manifests, name: str) -> dict[str, str]:
    secret = m.get("Secret", name)
    assert secret is not None
    return secret["stringData"]  # type: ignore[no-any-return]


MUTATIONS: dict[str, tuple[Callable[[checks.Manifests], object], str]] = {
    "a misspelt Deployment field": (
        lambda m: _pod_of(m, "engine").update(terminationGracePeriod=40),
        "Additional properties are not allowed ('terminationGracePeriod'",
    ),
    "a wrong type in a Kubernetes object": (
        lambda m: _container(m, "gateway")["ports"].append({"containerPort": "8000"}),
        "'8000' is not of type 'integer'",
    ),
    "a misspelt ScaledObject field": (
        lambda m: _scaled(m, "engine")["spec"].update(maxReplicas=4),
        "Additional properties are not allowed ('maxReplicas'",
    ),
    "a TriggerAuthentication without its key": (
        lambda m: m.get("TriggerAuthentication", "redis-auth")["spec"]["secretTargetRef"][0].pop("key"),  # type: ignore[index]
        "'key' is a required property",
    ),
    "a misspelt stream": (
        lambda m: _trigger(m, "tokenizer").update(stream="scalellm:request"),
        "tokenizer: scaled on [('scalellm:request', 'tokenizers')]",
    ),
    "the wrong consumer group": (
        lambda m: _trigger(m, "engine").update(consumerGroup="engine"),
        "engine: scaled on [('scalellm:tokenized', 'engine')]",
    ),
    "a stream prefix the ScaledObjects do not follow": (
        lambda m: _set_config(m, "SCALELLM_STREAM_PREFIX", "prod"),
        "but it reads [('prod:requests', 'tokenizers')]",
    ),
    "a shard without a trigger": (
        lambda m: _set_config(m, "SCALELLM_DETOKENIZER_SHARDS", "8"),
        "('scalellm:generated:7', 'detokenizers')",
    ),
    "a misspelt trigger key": (
        lambda m: _trigger(m, "detokenizer", 2).update(lagcount="64"),
        "unknown redis-streams metadata 'lagcount'",
    ),
    "a Redis address outside the namespace": (
        lambda m: _trigger(m, "engine").update(address="redis:6379"),
        "address 'redis:6379' is not the Redis Service",
    ),
    "a misspelt setting in the ConfigMap": (
        lambda m: _set_config(m, "SCALELLM_MODLE", "x"),
        "ConfigMap: SCALELLM_MODLE is no setting of any role",
    ),
    "a bad setting value": (
        lambda m: _set_config(m, "SCALELLM_DTYPE", "bf16"),
        "engine: would not start: invalid settings:\n  SCALELLM_DTYPE",
    ),
    "another role's setting on a Deployment": (
        lambda m: _container(m, "tokenizer")["env"].append({"name": "SCALELLM_GATEWAY_PORT", "value": "1"}),
        "tokenizer: SCALELLM_GATEWAY_PORT is no setting of TokenizerSettings",
    ),
    "a readiness path the gateway does not serve": (
        lambda m: _gateway_readiness(m)["httpGet"].update(path="/readyz"),
        "gateway: readinessProbe GETs /readyz, which the gateway does not serve",
    ),
    "readiness on the liveness path": (
        lambda m: _gateway_readiness(m)["httpGet"].update(path="/health"),
        "gateway: readinessProbe GETs /health; readiness is /ready, liveness /health",
    ),
    "liveness on the readiness path": (
        lambda m: _container(m, "gateway")["livenessProbe"]["httpGet"].update(path="/ready"),
        "gateway: livenessProbe GETs /ready; readiness is /ready, liveness /health",
    ),
    "a probe on another port": (
        lambda m: _gateway_readiness(m)["httpGet"].update(port=8080),
        "gateway: readinessProbe port 8080 is not SCALELLM_GATEWAY_PORT",
    ),
    "a health check of another role": (
        lambda m: _container(m, "detokenizer")["livenessProbe"]["exec"].update(
            command=["scalellm", "health", "engine"]
        ),
        "detokenizer: livenessProbe is not `scalellm health detokenizer`",
    ),
    "the one-second default timeout on an exec probe": (
        lambda m: _container(m, "engine")["startupProbe"].pop("timeoutSeconds"),
        "engine: startupProbe: a Python start-up needs more than 1 s",
    ),
    "root": (lambda m: _pod_of(m, "engine")["securityContext"].update(runAsUser=0), "engine: not run as"),
    "no writable model cache": (
        lambda m: _container(m, "tokenizer")["volumeMounts"].pop(0),
        "tokenizer: nothing writable mounted at ['/cache']",
    ),
    "two different Redis passwords": (
        lambda m: _secret(m, "redis-auth").update(password="other"),
        "the password in SCALELLM_REDIS_URL is not the redis-auth password",
    ),
    "a missing secret key": (
        lambda m: _secret(m, "scalellm-secrets").pop("SCALELLM_REDIS_URL"),
        "engine: SCALELLM_REDIS_URL refers to a missing secret key",
    ),
}


@pytest.mark.parametrize("mistake", list(MUTATIONS))
def test_each_check_catches_its_mistake(mistake: str) -> None:
    mutate, expected = MUTATIONS[mistake]
    broken = checks.mutated(MANIFESTS)
    mutate(broken)
    problems = checks.all_problems(broken)
    assert any(expected in problem for problem in problems), problems
