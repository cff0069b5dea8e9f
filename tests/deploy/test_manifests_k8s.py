"""What Kubernetes itself demands of every document in deploy/k8s/grpc.yaml
and deploy/k8s/rayservice.yaml (read with yaml.safe_load_all; no cluster is
needed): known kinds with valid names, strings where the API server wants
strings, declared volumes and probe ports, defined variables, GPU requests
equal to limits, and secrets only from Secrets."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from deploy.config import ClusterConfig
from tests.manifests import (
    GPU,
    GRPC,
    RAYSERVICE,
    all_pods,
    container_of,
    limits_of,
    load_docs,
    pod_templates,
    resolve_port,
)

KINDS = {
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("ray.io/v1", "RayService"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
K8S_FILES = [GRPC, RAYSERVICE]

# Environment variables whose value must come from a Secret, never a literal.
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD")
# Flags that would put a secret on a command line (`ps`, the manifest itself).
SECRET_FLAGS = ("--api-key", "--cluster-secret")


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_documents_are_known_kinds_with_valid_unique_names(path: Path) -> None:
    seen: Counter[tuple[str, str]] = Counter()
    for doc in load_docs(path):
        kind = (doc.get("apiVersion"), doc.get("kind"))
        assert kind in KINDS, f"{path.name}: unexpected apiVersion/kind {kind}"
        name = doc.get("metadata", {}).get("name")
        assert isinstance(name, str) and DNS_LABEL.match(name) and len(name) <= 63, (
            f"{path.name}: {kind[1]} has no valid metadata.name ({name!r})"
        )
        seen[(doc["kind"], name)] += 1
    assert not [k for k, n in seen.items() if n > 1], f"{path.name}: duplicate names"


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_fields_kubernetes_wants_as_strings_are_strings(path: Path) -> None:
    """Unquoted numbers in args, env, labels or annotations are rejected by
    the API server (`"50051"`, not `50051`)."""
    for doc in load_docs(path):
        where = f"{path.name}: {doc['kind']} {doc['metadata']['name']}"
        for key in ("labels", "annotations"):
            for k, v in doc["metadata"].get(key, {}).items():
                assert isinstance(v, str), f"{where}: metadata.{key}.{k} must be a string"
        if doc["kind"] == "ConfigMap":
            assert all(isinstance(v, str) for v in doc["data"].values()), where
        if doc["kind"] == "ScaledObject":
            for trigger in doc["spec"]["triggers"]:
                for k, v in trigger["metadata"].items():
                    assert isinstance(v, str), f"{where}: trigger metadata {k} must be a string"
        for pod_where, template in pod_templates(doc):
            meta = template.get("metadata", {})
            for key in ("labels", "annotations"):
                for k, v in meta.get(key, {}).items():
                    assert isinstance(v, str), f"{pod_where}: pod {key}.{k} must be a string"
            for c in template["spec"]["containers"]:
                for arg in [*c.get("command", []), *c.get("args", [])]:
                    assert isinstance(arg, str), f"{pod_where}: {c['name']} argument {arg!r}"
                for env in c.get("env", []):
                    assert isinstance(env.get("value", ""), str), f"{pod_where}: env {env}"


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_pods_mount_declared_volumes_and_probe_declared_ports(path: Path) -> None:
    for where, template in all_pods(load_docs(path)):
        spec = template["spec"]
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            names = [p.get("name") for p in c.get("ports", []) if "name" in p]
            assert len(names) == len(set(names)), f"{where}: duplicate port names"
            for n in names:
                assert PORT_NAME.match(n) and len(n) <= 15, f"{where}: bad port name {n!r}"
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: mounts undeclared {mount['name']}"
            for probe_kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(probe_kind)
                if probe is None:
                    continue
                action = probe.get("tcpSocket") or probe.get("httpGet") or probe.get("grpc")
                assert action is not None, f"{where}: {probe_kind} has no tcpSocket/httpGet/grpc"
                resolve_port(action["port"], c, f"{where} {probe_kind}")


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_variables_in_args_are_defined_in_their_container(path: Path) -> None:
    # Kubernetes leaves an undefined $(VAR) in args as literal text.
    for where, template in all_pods(load_docs(path)):
        for c in template["spec"]["containers"]:
            defined = {e["name"] for e in c.get("env", [])}
            for arg in [*c.get("command", []), *c.get("args", [])]:
                for var in re.findall(r"\$\((\w+)\)", str(arg)):
                    assert var in defined, f"{where}: $({var}) is used but not in env"


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_gpu_requests_equal_limits(path: Path) -> None:
    """Kubernetes refuses a GPU request that differs from its limit."""
    for where, template in all_pods(load_docs(path)):
        c = container_of(template)
        requests = c.get("resources", {}).get("requests", {})
        if GPU in requests:
            assert limits_of(c).get(GPU) == requests[GPU], f"{where}: GPU request != limit"


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_secrets_come_from_secrets_never_from_literals_or_flags(path: Path) -> None:
    for where, template in all_pods(load_docs(path)):
        for c in template["spec"]["containers"]:
            for env in c.get("env", []):
                if any(word in env["name"].upper() for word in SECRET_WORDS):
                    assert "value" not in env, f"{where}: {env['name']} is a literal"
                    assert "secretKeyRef" in env.get("valueFrom", {}), (
                        f"{where}: {env['name']} must come from a Secret (secretKeyRef)"
                    )
            for arg in [*c.get("command", []), *c.get("args", [])]:
                assert not str(arg).startswith(SECRET_FLAGS), (
                    f"{where}: {arg} puts a secret on the command line; use the environment"
                )
    for doc in load_docs(path):
        if doc["kind"] != "ConfigMap":
            continue
        for name, text in doc["data"].items():
            raw = yaml.safe_load(text)
            if isinstance(raw, dict) and "pools" in raw:
                config = ClusterConfig.model_validate(raw)
                assert config.router.api_key is None, f"ConfigMap {name}: a literal api_key"
