"""deploy/k8s/rayservice.yaml: its serveConfigV2 imports the real app
builder, which builds the Serve application from the ConfigMap's scaling
config (deploy/examples/gpu.yaml less its API key); every Ray pod mounts the
config and the model, takes the secrets from Secrets, and the GPU worker
group holds the pools at their largest."""

from __future__ import annotations

import contextlib
import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

from deploy.config import ClusterConfig, load_config
from tests.manifests import (
    GPU,
    LOOPBACK,
    RAYSERVICE,
    ROOT,
    all_pods,
    container_of,
    limits_of,
    load_docs,
    most_replicas,
    named,
    nodes_needed,
    pools_of,
    ports_of,
    quantity,
    resolve_port,
    secret_ref,
)


@pytest.fixture(scope="module")
def ray_docs() -> list[dict[str, Any]]:
    return load_docs(RAYSERVICE)


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = named(docs, kind).values()
    return doc


def _serve_config(ray_docs: list[dict[str, Any]]) -> dict[str, Any]:
    text = _one(ray_docs, "RayService")["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is a YAML string, not a mapping"
    parsed = yaml.safe_load(text)
    assert isinstance(parsed, dict)
    return parsed


def _ray_config(ray_docs: list[dict[str, Any]], tmp_path: Path) -> tuple[Path, ClusterConfig]:
    """The scaling config as app_builder reads it: the ConfigMap's file."""
    (app,) = _serve_config(ray_docs)["applications"]
    path = Path(app["args"]["config"])
    data = _one(ray_docs, "ConfigMap")["data"]
    assert path.name in data, f"ConfigMap has no key {path.name} (args.config is {path})"
    local = tmp_path / path.name
    local.write_text(data[path.name])
    return local, load_config(local)


def _peer_is(peer: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = peer.get("podSelector", {}).get("matchLabels", {})
    return bool(selector) and selector.items() <= labels.items()


def _pyproject_requirement(name: str) -> Requirement:
    """pyproject.toml's requirement on `name` (read from the file: an editable
    install's metadata can be older than it)."""
    text = (ROOT / "pyproject.toml").read_text()
    for quoted in re.findall(r'^\s*"([^"]+)",?\s*(?:#.*)?$', text, flags=re.M):
        with contextlib.suppress(InvalidRequirement):
            req = Requirement(quoted)
            if req.name == name and req.marker is None:
                return req
    raise AssertionError(f"pyproject.toml does not require {name}")


def test_serve_config_imports_the_real_app_builder(ray_docs: list[dict[str, Any]]) -> None:
    from ray.serve.schema import ServeDeploySchema

    import deploy.ray_app

    serve_config = _serve_config(ray_docs)
    ServeDeploySchema.model_validate(serve_config)  # Ray's own check of the format
    (app,) = serve_config["applications"]
    assert app["name"] == deploy.ray_app.APP_NAME
    assert app["route_prefix"] == "/"
    module, _, attr = app["import_path"].partition(":")
    assert getattr(importlib.import_module(module), attr) is deploy.ray_app.app_builder
    assert set(app["args"]) >= {"config"}


def test_config_map_is_mounted_where_args_config_points_in_every_ray_pod(
    ray_docs: list[dict[str, Any]],
) -> None:
    (app,) = _serve_config(ray_docs)["applications"]
    path = Path(app["args"]["config"])
    config_map = _one(ray_docs, "ConfigMap")["metadata"]["name"]
    pods = list(all_pods(ray_docs))
    assert len(pods) >= 2, "a head and at least one worker group"
    # Serve builds the application in a task that may run on any node.
    for where, template in pods:
        volumes = {
            v["name"]: v
            for v in template["spec"].get("volumes", [])
            if v.get("configMap", {}).get("name") == config_map
        }
        mounts = [
            m
            for m in container_of(template).get("volumeMounts", [])
            if m["name"] in volumes and Path(m["mountPath"]) == path.parent
        ]
        assert mounts, f"{where}: ConfigMap {config_map} is not mounted at {path.parent}"
        items = volumes[mounts[0]["name"]]["configMap"].get("items")
        if items:
            assert any(i["path"] == path.name for i in items), f"{where}: no {path.name} item"


def test_config_map_validates_and_app_builder_builds_it(
    ray_docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    from ray.serve import Application

    from deploy.ray_app import app_builder

    local, config = _ray_config(ray_docs, tmp_path)
    assert config.kv_transport == "ray"
    (app,) = _serve_config(ray_docs)["applications"]
    built = app_builder({**app["args"], "config": str(local)})
    assert isinstance(built, Application)

    http = _serve_config(ray_docs)["http_options"]
    assert http["host"] == "0.0.0.0"
    assert (config.router.host, config.router.port) == (http["host"], http["port"]), (
        "the config's router address and serveConfigV2's http_options differ"
    )
    head = _one(ray_docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert http["port"] == ports_of(container_of(head["template"])).get("serve"), (
        "the head's `serve` containerPort must be Serve's HTTP port"
    )
    # The model directory: on a mounted volume in every Ray pod (the router
    # ingress may run on any of them).
    assert config.model_path is not None
    for where, template in all_pods(ray_docs):
        mounts = [
            m["mountPath"]
            for m in container_of(template).get("volumeMounts", [])
            if Path(config.model_path).is_relative_to(m["mountPath"])
        ]
        assert mounts, f"{where}: the model {config.model_path} is on no mounted volume"


def test_every_ray_pod_has_the_cluster_secret_and_the_routers_key_from_secrets(
    ray_docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Replicas and the router ingress read both from their environment,
    and Serve may place the router on any Ray pod."""
    from kvtransfer.security import SECRET_ENV

    _, config = _ray_config(ray_docs, tmp_path)
    key_env = config.router.api_key_env
    assert config.router.api_key is None and key_env, "router.api_key_env, from a Secret"
    refs: dict[str, set[tuple[str, str] | None]] = {SECRET_ENV: set(), key_env: set()}
    for where, template in all_pods(ray_docs):
        c = container_of(template)
        for variable, seen in refs.items():
            ref = secret_ref(c, variable)
            assert ref is not None, f"{where}: no {variable} from a Secret"
            seen.add(ref)
    for variable, seen in refs.items():
        assert len(seen) == 1, f"the Ray pods take {variable} from different Secrets: {seen}"


def test_the_ray_dashboard_answers_only_the_operator_and_the_ray_pods(
    ray_docs: list[dict[str, Any]],
) -> None:
    """KubeRay's operator talks to the dashboard over the head's Service, so
    it cannot listen on loopback here; a NetworkPolicy must then keep
    everyone else off the head's Ray ports, while Serve's HTTP port stays
    open to clients."""
    cluster = _one(ray_docs, "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    host = head.get("rayStartParams", {}).get("dashboard-host", "0.0.0.0")  # KubeRay's default
    if host in LOOPBACK:
        return
    head_labels = head["template"]["metadata"]["labels"]
    container = container_of(head["template"])
    dashboard = resolve_port("dashboard", container, "ray head")
    serve_port = _serve_config(ray_docs)["http_options"]["port"]
    policies = [
        p
        for p in named(ray_docs, "NetworkPolicy").values()
        if p["spec"]["podSelector"].get("matchLabels", {}).items() <= head_labels.items()
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    assert policies, f"the dashboard listens on {host} and no NetworkPolicy guards the head"
    ray_labels = [t["metadata"]["labels"] for _, t in all_pods(ray_docs)]
    open_to_clients = False
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            peers = rule.get("from", [])
            if not peers:  # anyone: only Serve's HTTP port
                assert ports and ports <= {serve_port, "serve"}, (
                    f"NetworkPolicy {policy['metadata']['name']} opens {ports or 'every port'} "
                    "to anyone"
                )
                open_to_clients = True
                continue
            for peer in peers:
                assert "ipBlock" not in peer, "address ranges say nothing about who is calling"
                ray_pods = "namespaceSelector" not in peer and all(
                    _peer_is(peer, labels) for labels in ray_labels
                )
                operator = _peer_is(peer, {"app.kubernetes.io/name": "kuberay-operator"})
                assert ray_pods or (operator and ports <= {dashboard, "dashboard"}), (
                    f"NetworkPolicy {policy['metadata']['name']}: {peer} may reach {ports or 'all'}"
                )
    assert open_to_clients, f"no NetworkPolicy rule lets clients reach Serve on {serve_port}"


def test_config_map_serves_the_gpu_example(
    ray_docs: list[dict[str, Any]], tmp_path: Path, gpu_config: ClusterConfig
) -> None:
    """The ConfigMap is deploy/examples/gpu.yaml less its API key: same model,
    transport and pools."""
    _, config = _ray_config(ray_docs, tmp_path)
    for field in ("model", "kv_transport", "pools"):
        assert getattr(config, field) == getattr(gpu_config, field), (
            f"the ConfigMap's {field} differs from deploy/examples/gpu.yaml"
        )


def test_gpu_worker_group_fits_the_pools_and_autoscales(
    ray_docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    from deploy.ray_app import deployment_options

    _, config = _ray_config(ray_docs, tmp_path)
    spec = _one(ray_docs, "RayService")["spec"]["rayClusterConfig"]
    assert spec.get("enableInTreeAutoscaling") is True, "Ray must add pods for new replicas"
    ray_req = _pyproject_requirement("ray")
    assert Version(spec["rayVersion"]) in ray_req.specifier, (
        f"rayVersion {spec['rayVersion']} is outside splitserve's {ray_req}"
    )
    head = container_of(spec["headGroupSpec"]["template"])
    assert quantity(limits_of(head).get(GPU, 0)) == 0, "the head is a CPU pod"

    images = {container_of(t)["image"] for _, t in all_pods(ray_docs)}
    assert len(images) == 1, f"every Ray pod must run the same image, not {images}"
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if quantity(limits_of(container_of(g["template"])).get(GPU, 0)) > 0
    ]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in gpu_groups:
        c = container_of(group["template"])
        # Ray advertises the container's CPU and GPU limits as the pod's resources.
        cpus = float(group["rayStartParams"].get("num-cpus", quantity(limits_of(c)["cpu"])))
        gpus = quantity(limits_of(c)[GPU])
        lo, n, hi = (
            group["minReplicas"],
            group.get("replicas", group["minReplicas"]),
            group["maxReplicas"],
        )
        assert lo <= n <= hi, f"group {group['groupName']}: replicas outside its bounds"
        needed, misfits = nodes_needed(config, cpus, gpus, most_replicas)
        assert not misfits, f"a replica of {misfits} fits no {group['groupName']} pod"
        assert needed <= hi, (
            f"the pools at max_replicas need {needed} {group['groupName']} pods, "
            f"more than maxReplicas {hi}"
        )
        # A pod removed while a replica drains must outlive Serve's wait.
        grace = group["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        for name, pool in pools_of(config).items():
            wait = deployment_options(pool, name)["graceful_shutdown_timeout_s"]
            assert grace > wait, f"group {group['groupName']}: grace {grace}s < {name}'s {wait}s"
