"""Reading the deployment manifests (deploy/k8s/*.yaml, deploy/ray/cluster.yaml)
for the tests in tests/deploy/test_manifests_*.py: the documents, their pods
and containers, each container's command line parsed by the real argument
parser of the module it runs, and the pools of a scaling config as nodes."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.config import ClusterConfig, Pool

ROOT = Path(__file__).resolve().parents[1]
GRPC = ROOT / "deploy" / "k8s" / "grpc.yaml"
RAYSERVICE = ROOT / "deploy" / "k8s" / "rayservice.yaml"
CLUSTER = ROOT / "deploy" / "ray" / "cluster.yaml"
# The sizes the gRPC manifest mirrors (its header says so).
GPU_EXAMPLE = ROOT / "deploy" / "examples" / "gpu.yaml"

GPU = "nvidia.com/gpu"
WORKER_POOLS = {"prefill_worker": "prefill", "decode_worker": "decode"}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# -- documents -----------------------------------------------------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"
    return docs


def named(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


# -- pods and containers -------------------------------------------------------


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod a document describes."""
    name = doc["metadata"]["name"]
    if doc["kind"] == "Deployment":
        yield name, doc["spec"]["template"]
    elif doc["kind"] == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        yield f"{name}/head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{name}/{group['groupName']}", group["template"]


def all_pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        yield from pod_templates(doc)


def container_of(template: dict[str, Any]) -> dict[str, Any]:
    (container,) = template["spec"]["containers"]
    return container


def ports_of(container: dict[str, Any]) -> dict[str | int, int]:
    """containerPort by name and by number."""
    out: dict[str | int, int] = {}
    for p in container.get("ports", []):
        out[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            out[p["name"]] = p["containerPort"]
    return out


def resolve_port(port: str | int, container: dict[str, Any], where: str) -> int:
    ports = ports_of(container)
    assert port in ports, (
        f"{where}: port {port!r} is not a containerPort of {container['name']} "
        f"(declared: {sorted(map(str, ports))})"
    )
    return ports[port]


def command_of(container: dict[str, Any]) -> tuple[str, list[str]]:
    """(module, its arguments) of `python -m MODULE ARGS...`."""
    argv = [*container.get("command", []), *container.get("args", [])]
    assert "-m" in argv, f"{container['name']}: expected `python -m MODULE`, got {argv}"
    i = argv.index("-m")
    return argv[i + 1], argv[i + 2 :]


def parser_for(module: str) -> argparse.ArgumentParser:
    if module == "prefill_worker":
        from prefill_worker.__main__ import parser as prefill_parser

        return prefill_parser()
    if module == "decode_worker":
        from decode_worker.__main__ import parser as decode_parser

        return decode_parser()
    if module == "router":
        from router.__main__ import _parser as router_parser

        return router_parser()
    raise AssertionError(f"no parser known for `python -m {module}`")


def parse_container(container: dict[str, Any]) -> tuple[str, argparse.Namespace]:
    module, argv = command_of(container)
    try:
        return module, parser_for(module).parse_args(argv)
    except SystemExit:  # argparse already printed why
        pytest.fail(f"{container['name']}: `python -m {module}` rejects {argv}")


def worker_deployments(docs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], str, Any]]:
    """Deployment name -> (deployment, module, parsed args), for worker pools."""
    out = {}
    for name, dep in named(docs, "Deployment").items():
        module, args = parse_container(container_of(dep["spec"]["template"]))
        if module in WORKER_POOLS:
            out[name] = (dep, module, args)
    return out


def quantity(value: str | int | float) -> float:
    """A Kubernetes CPU or count quantity ("8", "500m", 2) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def limits_of(container: dict[str, Any]) -> dict[str, Any]:
    return dict(container.get("resources", {}).get("limits", {}))


def secret_ref(container: dict[str, Any], variable: str) -> tuple[str, str] | None:
    """(Secret name, key) that the container's `variable` comes from, if any."""
    for env in container.get("env", []):
        if env["name"] == variable:
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            return (ref["name"], ref["key"]) if ref else None
    return None


# -- pools as nodes ------------------------------------------------------------


def pools_of(config: ClusterConfig) -> dict[str, Pool]:
    p = config.pools
    pools = (
        {"colocated": p.colocated} if p.colocated else {"prefill": p.prefill, "decode": p.decode}
    )
    return {name: pool for name, pool in pools.items() if pool is not None}


def nodes_needed(
    config: ClusterConfig, cpus: float, gpus: float, count: Any
) -> tuple[int, list[str]]:
    """Nodes of (cpus, gpus) that hold `count(pool)` replicas of every pool,
    packing each pool on its own nodes (an upper bound on what Ray needs),
    and the pools whose single replica fits no such node."""
    nodes, misfits = 0, []
    for name, pool in pools_of(config).items():
        c, g = pool.resources.num_cpus, pool.resources.num_gpus
        per_node = min(cpus // c if c else math.inf, gpus // g if g else math.inf)
        if per_node < 1:
            misfits.append(name)
            continue
        nodes += math.ceil(count(pool) / per_node)
    return nodes, misfits


def least_replicas(pool: Pool) -> int:
    return pool.min_replicas if pool.min_replicas is not None else pool.replicas


def most_replicas(pool: Pool) -> int:
    return pool.max_replicas if pool.max_replicas is not None else pool.replicas
