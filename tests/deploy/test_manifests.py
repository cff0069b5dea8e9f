"""The deployment manifests, checked against the code they start.

deploy/k8s/grpc.yaml, deploy/k8s/rayservice.yaml and deploy/ray/cluster.yaml
are read with yaml.safe_load_all; no cluster is needed. Beyond the shape of
each document, the tests parse every container's command line with the
workers' and the router's real argument parsers, resolve every port a
Service, probe, annotation or router flag names to a declared containerPort,
check every autoscaling query against the metrics the workers really export,
validate the scaling configs with deploy.config, build the Serve application
from the RayService's arguments, and check the Ray launcher file against
Ray's own schema.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import math
import re
import shlex
from collections import Counter
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

from deploy.config import (
    POOL_SIGNALS,
    UTILISATION_WORDS,
    ClusterConfig,
    Pool,
    load_config,
    pool_engine_args,
)

ROOT = Path(__file__).resolve().parents[2]
GRPC = ROOT / "deploy" / "k8s" / "grpc.yaml"
RAYSERVICE = ROOT / "deploy" / "k8s" / "rayservice.yaml"
CLUSTER = ROOT / "deploy" / "ray" / "cluster.yaml"
# The sizes the gRPC manifest mirrors (its header says so).
GPU_EXAMPLE = ROOT / "deploy" / "examples" / "gpu.yaml"

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
GPU = "nvidia.com/gpu"
SCRAPE = "prometheus.io/"

# What each config signal is called in Prometheus (deploy/config.py POOL_SIGNALS).
SIGNAL_METRICS = {
    "queued_prompt_tokens": "splitserve_waiting_prompt_tokens",
    "kv_cache_usage": "splitserve_kv_cache_usage_ratio",
    "waiting_requests": "splitserve_waiting_requests",
}
WORKER_POOLS = {"prefill_worker": "prefill", "decode_worker": "decode"}
# PromQL words that are not metric names.
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "stddev", "topk", "bottomk", "quantile",
    "rate", "irate", "increase", "delta", "avg_over_time", "max_over_time",
    "min_over_time", "sum_over_time", "histogram_quantile", "clamp_min", "clamp_max",
    "abs", "ceil", "floor", "round", "scalar", "vector", "and", "or", "unless", "bool",
    "offset",
}  # fmt: skip


# -- loading -------------------------------------------------------------------


def _load(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"
    return docs


@pytest.fixture(scope="module")
def grpc_docs() -> list[dict[str, Any]]:
    return _load(GRPC)


@pytest.fixture(scope="module")
def ray_docs() -> list[dict[str, Any]]:
    return _load(RAYSERVICE)


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    (doc,) = _load(CLUSTER)
    return doc


@pytest.fixture(scope="module")
def gpu_config() -> ClusterConfig:
    return load_config(GPU_EXAMPLE)


def _named(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = _named(docs, kind).values()
    return doc


# -- pods and containers -------------------------------------------------------


def _pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod a document describes."""
    name = doc["metadata"]["name"]
    if doc["kind"] == "Deployment":
        yield name, doc["spec"]["template"]
    elif doc["kind"] == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        yield f"{name}/head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{name}/{group['groupName']}", group["template"]


def _all_pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        yield from _pod_templates(doc)


def _container(template: dict[str, Any]) -> dict[str, Any]:
    (container,) = template["spec"]["containers"]
    return container


def _ports(container: dict[str, Any]) -> dict[str | int, int]:
    """containerPort by name and by number."""
    out: dict[str | int, int] = {}
    for p in container.get("ports", []):
        out[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            out[p["name"]] = p["containerPort"]
    return out


def _resolve(port: str | int, container: dict[str, Any], where: str) -> int:
    ports = _ports(container)
    assert port in ports, (
        f"{where}: port {port!r} is not a containerPort of {container['name']} "
        f"(declared: {sorted(map(str, ports))})"
    )
    return ports[port]


def _command(container: dict[str, Any]) -> tuple[str, list[str]]:
    """(module, its arguments) of `python -m MODULE ARGS...`."""
    argv = [*container.get("command", []), *container.get("args", [])]
    assert "-m" in argv, f"{container['name']}: expected `python -m MODULE`, got {argv}"
    i = argv.index("-m")
    return argv[i + 1], argv[i + 2 :]


def _parser(module: str) -> argparse.ArgumentParser:
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


def _parse(container: dict[str, Any]) -> tuple[str, argparse.Namespace]:
    module, argv = _command(container)
    try:
        return module, _parser(module).parse_args(argv)
    except SystemExit:  # argparse already printed why
        pytest.fail(f"{container['name']}: `python -m {module}` rejects {argv}")


def _workers(docs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], str, Any]]:
    """Deployment name -> (deployment, module, parsed args), for worker pools."""
    out = {}
    for name, dep in _named(docs, "Deployment").items():
        module, args = _parse(_container(dep["spec"]["template"]))
        if module in WORKER_POOLS:
            out[name] = (dep, module, args)
    return out


def _router(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], argparse.Namespace]:
    routers = []
    for dep in _named(docs, "Deployment").values():
        module, args = _parse(_container(dep["spec"]["template"]))
        if module == "router":
            routers.append((dep, args))
    assert len(routers) == 1, f"expected one router Deployment, found {len(routers)}"
    return routers[0]


def _selects(service: dict[str, Any], template: dict[str, Any]) -> bool:
    """Whether the Service's selector picks pods of this template."""
    selector = service["spec"]["selector"]
    return bool(selector) and selector.items() <= template["metadata"]["labels"].items()


def _quantity(value: str | int | float) -> float:
    """A Kubernetes CPU or count quantity ("8", "500m", 2) as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _limits(container: dict[str, Any]) -> dict[str, Any]:
    return dict(container.get("resources", {}).get("limits", {}))


def _pools(config: ClusterConfig) -> dict[str, Pool]:
    p = config.pools
    pools = (
        {"colocated": p.colocated} if p.colocated else {"prefill": p.prefill, "decode": p.decode}
    )
    return {name: pool for name, pool in pools.items() if pool is not None}


def _nodes_needed(
    config: ClusterConfig, cpus: float, gpus: float, count: Any
) -> tuple[int, list[str]]:
    """Nodes of (cpus, gpus) that hold `count(pool)` replicas of every pool,
    packing each pool on its own nodes (an upper bound on what Ray needs),
    and the pools whose single replica fits no such node."""
    nodes, misfits = 0, []
    for name, pool in _pools(config).items():
        c, g = pool.resources.num_cpus, pool.resources.num_gpus
        per_node = min(cpus // c if c else math.inf, gpus // g if g else math.inf)
        if per_node < 1:
            misfits.append(name)
            continue
        nodes += math.ceil(count(pool) / per_node)
    return nodes, misfits


def _min(pool: Pool) -> int:
    return pool.min_replicas if pool.min_replicas is not None else pool.replicas


def _max(pool: Pool) -> int:
    return pool.max_replicas if pool.max_replicas is not None else pool.replicas


# -- metrics -------------------------------------------------------------------


def _exported(module: str, args: argparse.Namespace) -> dict[str, list[dict[str, str]]]:
    """Every series name the worker's registry exports -> the label sets seen."""
    if module == "prefill_worker":
        from prefill_worker.metrics import PrefillMetrics

        registry = PrefillMetrics().registry
    else:
        from decode_worker.metrics import DecodeMetrics

        registry = DecodeMetrics("colocated" if args.colocated else "decode").registry
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
    }
    out: dict[str, list[dict[str, str]]] = {}
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            out.setdefault(family.name + suffix, [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def _selectors(query: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The series selectors of a PromQL expression: (metric, [(label, op, value)])."""
    q = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", query)
    q = re.sub(r"\[[^\]]*\]", " ", q)  # range and subquery durations
    q = re.sub(r"(?<![A-Za-z0-9_:])\d[\w.+-]*", " ", q)  # numbers
    out = []
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?", q):
        name, braces = m.group(1), m.group(2)
        if name in PROMQL_WORDS and braces is None:
            continue
        matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', braces or "")
        out.append((name, matchers))
    return out


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for label, op, value in matchers:
        have = labels.get(label, "")
        ok = {
            "=": have == value,
            "!=": have != value,
            "=~": re.fullmatch(value, have) is not None,
            "!~": re.fullmatch(value, have) is None,
        }[op]
        if not ok:
            return False
    return True


# == every Kubernetes file ======================================================

K8S_FILES = [GRPC, RAYSERVICE]


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_documents_are_known_kinds_with_valid_unique_names(path: Path) -> None:
    seen: Counter[tuple[str, str]] = Counter()
    for doc in _load(path):
        kind = (doc.get("apiVersion"), doc.get("kind"))
        assert kind in KINDS, f"{path.name}: unexpected apiVersion/kind {kind}"
        name = doc.get("metadata", {}).get("name")
        assert isinstance(name, str) and DNS_LABEL.match(name) and len(name) <= 63, (
            f"{path.name}: {kind[1]} has no valid metadata.name ({name!r})"
        )
        seen[(doc["kind"], name)] += 1
    assert not [k for k, n in seen.items() if n > 1], f"{path.name}: duplicate names"


def test_grpc_file_has_each_pool_its_services_and_scalers(grpc_docs: list[dict[str, Any]]) -> None:
    kinds = Counter(d["kind"] for d in grpc_docs)
    assert kinds == {"Deployment": 3, "Service": 3, "ScaledObject": 2}, kinds
    modules = sorted(
        _command(_container(d["spec"]["template"]))[0]
        for d in grpc_docs
        if d["kind"] == "Deployment"
    )
    assert modules == ["decode_worker", "prefill_worker", "router"]


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_fields_kubernetes_wants_as_strings_are_strings(path: Path) -> None:
    """Unquoted numbers in args, env, labels or annotations are rejected by
    the API server (`"50051"`, not `50051`)."""
    for doc in _load(path):
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
        for pod_where, template in _pod_templates(doc):
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
    for where, template in _all_pods(_load(path)):
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
                _resolve(action["port"], c, f"{where} {probe_kind}")


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_variables_in_args_are_defined_in_their_container(path: Path) -> None:
    # Kubernetes leaves an undefined $(VAR) in args as literal text.
    for where, template in _all_pods(_load(path)):
        for c in template["spec"]["containers"]:
            defined = {e["name"] for e in c.get("env", [])}
            for arg in [*c.get("command", []), *c.get("args", [])]:
                for var in re.findall(r"\$\((\w+)\)", str(arg)):
                    assert var in defined, f"{where}: $({var}) is used but not in env"


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_gpu_requests_equal_limits(path: Path) -> None:
    """Kubernetes refuses a GPU request that differs from its limit."""
    for where, template in _all_pods(_load(path)):
        c = _container(template)
        requests = c.get("resources", {}).get("requests", {})
        if GPU in requests:
            assert _limits(c).get(GPU) == requests[GPU], f"{where}: GPU request != limit"


# Environment variables whose value must come from a Secret, never a literal.
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD")
# Flags that would put a secret on a command line (`ps`, the manifest itself).
SECRET_FLAGS = ("--api-key", "--cluster-secret")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _secret_ref(container: dict[str, Any], variable: str) -> tuple[str, str] | None:
    """(Secret name, key) that the container's `variable` comes from, if any."""
    for env in container.get("env", []):
        if env["name"] == variable:
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            return (ref["name"], ref["key"]) if ref else None
    return None


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_secrets_come_from_secrets_never_from_literals_or_flags(path: Path) -> None:
    for where, template in _all_pods(_load(path)):
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
    for doc in _load(path):
        if doc["kind"] != "ConfigMap":
            continue
        for name, text in doc["data"].items():
            raw = yaml.safe_load(text)
            if isinstance(raw, dict) and "pools" in raw:
                config = ClusterConfig.model_validate(raw)
                assert config.router.api_key is None, f"ConfigMap {name}: a literal api_key"


# == deploy/k8s/grpc.yaml =======================================================


def test_deployment_selectors_match_their_pod_labels(grpc_docs: list[dict[str, Any]]) -> None:
    for name, dep in _named(grpc_docs, "Deployment").items():
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector and selector.items() <= labels.items(), (
            f"Deployment {name}: selector {selector} does not match its pod labels {labels}"
        )


def test_services_select_one_deployment_and_target_its_ports(
    grpc_docs: list[dict[str, Any]],
) -> None:
    deployments = _named(grpc_docs, "Deployment")
    for name, svc in _named(grpc_docs, "Service").items():
        chosen = [d for d in deployments.values() if _selects(svc, d["spec"]["template"])]
        assert len(chosen) == 1, f"Service {name} selects {len(chosen)} Deployments, not one"
        container = _container(chosen[0]["spec"]["template"])
        for port in svc["spec"]["ports"]:
            target = _resolve(port.get("targetPort", port["port"]), container, f"Service {name}")
            if svc["spec"].get("clusterIP") == "None":
                # Headless: clients dial the pod IPs, so no port mapping happens.
                assert port["port"] == target, (
                    f"headless Service {name}: port {port['port']} != containerPort {target}"
                )


def test_workers_args_parse_and_agree_with_ports_and_annotations(
    grpc_docs: list[dict[str, Any]],
) -> None:
    workers = _workers(grpc_docs)
    assert sorted(m for _, m, _ in workers.values()) == ["decode_worker", "prefill_worker"]
    for name, (dep, _, args) in workers.items():
        template = dep["spec"]["template"]
        c = _container(template)
        declared = set(_ports(c).values())
        assert args.host == "0.0.0.0", f"{name}: --host must be 0.0.0.0 in a pod"
        assert args.port in declared, f"{name}: --port {args.port} is not a containerPort"
        assert args.metrics_port in declared, f"{name}: --metrics-port is not a containerPort"
        assert args.port != args.metrics_port
        annotations = template["metadata"].get("annotations", {})
        assert annotations.get(SCRAPE + "scrape") == "true", f"{name}: not scraped"
        assert annotations.get(SCRAPE + "port") == str(args.metrics_port), (
            f"{name}: prometheus.io/port {annotations.get(SCRAPE + 'port')} != "
            f"--metrics-port {args.metrics_port}"
        )
        assert annotations.get(SCRAPE + "path", "/metrics") == "/metrics"
        assert not getattr(args, "colocated", False), (
            f"{name}: a disaggregated pool is not colocated"
        )
        # SIGTERM: drain for --drain-timeout, then the gRPC server's 1 s grace.
        grace = template["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace > args.drain_timeout + 1, (
            f"{name}: terminationGracePeriodSeconds {grace} would kill the worker before "
            f"its --drain-timeout {args.drain_timeout} ends"
        )
        if args.device.startswith("cuda"):
            assert _quantity(_limits(c).get(GPU, 0)) >= 1, f"{name}: --device cuda, no GPU limit"


def test_workers_have_grpc_health_probes_on_their_grpc_port(
    grpc_docs: list[dict[str, Any]],
) -> None:
    """Readiness and liveness are Kubernetes' native gRPC probes against the
    grpc.health.v1 service the worker really serves, on its --port."""
    from protos import splitserve_pb2 as pb
    from worker.process import LIVENESS_SERVICE

    services = {
        "prefill_worker": pb.DESCRIPTOR.services_by_name["PrefillWorker"].full_name,
        "decode_worker": pb.DESCRIPTOR.services_by_name["DecodeWorker"].full_name,
    }
    for name, (dep, module, args) in _workers(grpc_docs).items():
        c = _container(dep["spec"]["template"])
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = c.get(kind)
            if probe is None:
                assert kind == "startupProbe", f"{name}: no {kind}"
                continue
            action = probe.get("grpc")
            assert action is not None, f"{name}: {kind} must be a grpc probe, not {probe}"
            # Kubernetes takes only a number here, and the worker serves
            # grpc.health.v1 on its gRPC port.
            assert isinstance(action["port"], int), f"{name}: {kind} port must be a number"
            assert action["port"] == args.port, (
                f"{name}: {kind} probes port {action['port']}, the worker's --port is {args.port}"
            )
            service = action.get("service", "")
            if kind == "readinessProbe":
                assert service in ("", services[module]), (
                    f"{name}: readiness must ask the overall or the role's service, not {service!r}"
                )
            else:
                # Not the readiness service: that one fails while the worker
                # drains, and a restart would cut its streams.
                assert service == LIVENESS_SERVICE, (
                    f"{name}: {kind} must ask service {LIVENESS_SERVICE!r}, not {service!r}"
                )
        # Loading a model takes minutes: liveness (or the startup probe
        # before it) must not restart a worker that is still loading.
        first = c.get("startupProbe") or c["livenessProbe"]
        budget = first.get("initialDelaySeconds", 0) + first.get("periodSeconds", 10) * first.get(
            "failureThreshold", 3
        )
        assert budget >= 300, f"{name}: {budget}s to load the model before liveness restarts it"


def test_workers_run_the_gpu_example_pools(
    grpc_docs: list[dict[str, Any]], gpu_config: ClusterConfig
) -> None:
    """The same engine options the Ray deployment derives from gpu.yaml
    (deploy.config.pool_engine_args), and the same resources per replica."""
    keys = (
        "model",
        "kv_cache_mib",
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_model_len",
        "dtype",
        "threads",
        "drain_timeout",
        "colocated",
    )
    config = gpu_config.model_copy(update={"kv_transport": "grpc"})
    for name, (dep, module, args) in _workers(grpc_docs).items():
        role = WORKER_POOLS[module]
        pool = getattr(config.pools, role)
        expected = _parser(module).parse_args(pool_engine_args(config, pool, role))
        for key in keys:
            have, want = getattr(args, key, None), getattr(expected, key, None)
            assert have == want, (
                f"{name}: --{key.replace('_', '-')} {have!r} but gpu.yaml's {role} pool "
                f"gives {want!r}"
            )
        limits = _limits(_container(dep["spec"]["template"]))
        assert _quantity(limits.get("cpu", 0)) == pool.resources.num_cpus, name
        assert _quantity(limits.get(GPU, 0)) == pool.resources.num_gpus, name


def test_model_directory_is_mounted_where_each_process_reads_it(
    grpc_docs: list[dict[str, Any]],
) -> None:
    for name, dep in _named(grpc_docs, "Deployment").items():
        template = dep["spec"]["template"]
        c = _container(template)
        _, args = _parse(c)
        assert args.model, f"{name}: no --model (the built-in model would be built in the pod)"
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        mounts = [
            m for m in c.get("volumeMounts", []) if Path(args.model).is_relative_to(m["mountPath"])
        ]
        assert mounts, f"{name}: --model {args.model} is on no mounted volume"
        volume = volumes[mounts[-1]["name"]]
        assert "persistentVolumeClaim" in volume or "hostPath" in volume, (
            f"{name}: the model volume must be a PersistentVolumeClaim or hostPath"
        )


def test_router_finds_the_pools_through_their_headless_services(
    grpc_docs: list[dict[str, Any]],
) -> None:
    dep, args = _router(grpc_docs)
    template = dep["spec"]["template"]
    c = _container(template)
    assert args.host == "0.0.0.0"
    assert args.port in _ports(c).values(), f"router --port {args.port} is not a containerPort"
    annotations = template["metadata"].get("annotations", {})
    if annotations.get(SCRAPE + "scrape") == "true":
        assert annotations.get(SCRAPE + "port") == str(args.port), (
            "router serves /metrics on --port"
        )
    assert not args.decode and not args.prefill, "use the DNS names, not fixed addresses"

    services = _named(grpc_docs, "Service")
    workers = _workers(grpc_docs)
    for flag, module in (("decode_dns", "decode_worker"), ("prefill_dns", "prefill_worker")):
        target = getattr(args, flag)
        assert target, f"router: --{flag.replace('_', '-')} missing"
        host, _, port = target.rpartition(":")
        svc = services.get(host.split(".")[0])
        assert svc is not None, f"router --{flag}: no Service named {host}"
        assert svc["spec"].get("clusterIP") == "None", f"Service {host} must be headless"
        assert int(port) in [p["port"] for p in svc["spec"]["ports"]], (
            f"router --{flag} {target}: Service {host} has no port {port}"
        )
        selected = [
            (d, a)
            for d, m, a in workers.values()
            if m == module and _selects(svc, d["spec"]["template"])
        ]
        assert len(selected) == 1, f"Service {host} must select the {module} pods"
        assert int(port) == selected[0][1].port, f"router --{flag}: not the workers' --port"


def test_router_readiness_uses_health_and_its_service_reaches_it(
    grpc_docs: list[dict[str, Any]],
) -> None:
    import router.server

    dep, args = _router(grpc_docs)
    template = dep["spec"]["template"]
    c = _container(template)
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    assert '@app.get("/health")' in inspect.getsource(router.server), "router lost /health"
    assert _resolve(probe["port"], c, "router readinessProbe") == args.port
    assert "httpGet" not in c.get("livenessProbe", {}), (
        "a liveness probe on /health restarts the router whenever no decode worker is up"
    )
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if pre_stop[:1] == ["sleep"]:
        assert template["spec"].get("terminationGracePeriodSeconds", 30) > float(pre_stop[1])
    front = [
        s
        for s in _named(grpc_docs, "Service").values()
        if s["spec"].get("clusterIP") != "None" and _selects(s, template)
    ]
    assert len(front) == 1, "one ClusterIP Service in front of the router"
    for port in front[0]["spec"]["ports"]:
        assert _resolve(port["targetPort"], c, "router Service") == args.port


def test_router_and_workers_share_one_cluster_secret_and_read_it(
    grpc_docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every process takes SPLITSERVE_CLUSTER_SECRET from the same Secret,
    and really reads it (the variable the code reads, not a look-alike);
    the router's API key likewise."""
    from kvtransfer.security import SECRET_ENV, ClusterSecurity

    secret = "the-cluster-secret-as-the-pod-sees-it"
    monkeypatch.setenv(SECRET_ENV, secret)
    refs = {}
    for name, dep in _named(grpc_docs, "Deployment").items():
        c = _container(dep["spec"]["template"])
        ref = _secret_ref(c, SECRET_ENV)
        assert ref is not None, f"{name}: no {SECRET_ENV} from a Secret: its calls are refused"
        refs[name] = ref
        _, args = _parse(c)
        assert ClusterSecurity.from_args(args).secret == secret, f"{name} ignores {SECRET_ENV}"
    assert len(set(refs.values())) == 1, f"router and workers use different secrets: {refs}"

    dep, _ = _router(grpc_docs)
    c = _container(dep["spec"]["template"])
    key_env = "SPLITSERVE_API_KEY"
    assert _secret_ref(c, key_env) is not None, "the router's API key must come from a Secret"
    monkeypatch.setenv(key_env, "the-api-key-as-the-pod-sees-it")
    _, args = _parse(c)  # the parser reads the variable when it is built
    assert args.api_key == "the-api-key-as-the-pod-sees-it", f"the router ignores ${key_env}"


def test_decode_workers_dial_only_the_prefill_pool_the_router_names(
    grpc_docs: list[dict[str, Any]],
) -> None:
    from kvtransfer.peers import known_prefill_from_args

    _, router_args = _router(grpc_docs)
    decode = [args for _, module, args in _workers(grpc_docs).values() if module == "decode_worker"]
    assert decode
    for args in decode:
        # The same name as the router's: the addresses it passes are the ones
        # the decode worker resolves (a decode worker that knows none
        # prefills every prompt itself).
        assert args.prefill_dns == router_args.prefill_dns, (
            f"decode --prefill-dns {args.prefill_dns!r}, router {router_args.prefill_dns!r}"
        )
        assert not args.prefill_addresses, "fixed addresses go stale as the pool scales"
        assert known_prefill_from_args(args).configured


def test_each_worker_pool_is_autoscaled_by_keda_on_its_queue_signal(
    grpc_docs: list[dict[str, Any]], gpu_config: ClusterConfig
) -> None:
    workers = _workers(grpc_docs)
    scalers = _named(grpc_docs, "ScaledObject")
    targets = [s["spec"]["scaleTargetRef"]["name"] for s in scalers.values()]
    assert sorted(targets) == sorted(workers), "exactly one ScaledObject per worker Deployment"
    assert set(SIGNAL_METRICS) >= {s for signals in POOL_SIGNALS.values() for s in signals}

    for name, so in scalers.items():
        ref = so["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment" and ref["name"] in workers, name
        dep, module, args = workers[ref["name"]]
        assert "replicas" not in dep["spec"], (
            f"Deployment {ref['name']}: drop spec.replicas; KEDA's HPA owns it and "
            "`kubectl apply` would reset it"
        )
        pool = getattr(gpu_config.pools, WORKER_POOLS[module])
        assert pool.autoscaling is not None
        spec = so["spec"]
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (_min(pool), _max(pool)), (
            f"ScaledObject {name}: replica bounds differ from gpu.yaml's pool"
        )
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
        behavior = behavior.get("behavior", {})
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == pool.autoscaling.upscale_delay_s
        down = behavior["scaleDown"]["stabilizationWindowSeconds"]
        assert down == pool.autoscaling.downscale_delay_s, f"{name}: scale-down delay"

        exported = _exported(module, args)
        assert spec["triggers"], f"ScaledObject {name} has no trigger"
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus", (
                f"ScaledObject {name}: {trigger['type']} trigger; scale on queues, not utilisation"
            )
            meta = trigger["metadata"]
            query = meta["query"]
            assert not [w for w in UTILISATION_WORDS if w in query.lower()], (
                f"ScaledObject {name}: {query!r} looks at utilisation"
            )
            assert meta["serverAddress"].startswith(("http://", "https://"))
            selectors = _selectors(query)
            assert selectors, f"ScaledObject {name}: no metric in {query!r}"
            for metric, matchers in selectors:
                assert metric in exported, (
                    f"ScaledObject {name}: {metric} is not exported by {module} "
                    f"(it exports {sorted(exported)})"
                )
                if exported[metric]:
                    assert any(_matches(labels, matchers) for labels in exported[metric]), (
                        f"ScaledObject {name}: {metric}{matchers} matches no series of "
                        f"{module}: {exported[metric]}"
                    )
            # The configured signal and its per-replica target (AverageValue:
            # replicas = ceil(sum over pods / threshold)).
            assert [m for m, _ in selectors] == [SIGNAL_METRICS[pool.autoscaling.signal]], (
                f"ScaledObject {name}: gpu.yaml scales this pool on {pool.autoscaling.signal}"
            )
            assert float(meta["threshold"]) == pool.autoscaling.target
            aggregation = query.strip().split("(", 1)[0].strip()
            metric_type = trigger.get("metricType", meta.get("metricType", "AverageValue"))
            assert (aggregation, metric_type) in {("sum", "AverageValue"), ("avg", "Value")}, (
                f"ScaledObject {name}: a per-replica threshold needs sum() with AverageValue "
                f"or avg() with Value, not {aggregation}() with {metric_type}"
            )


# == deploy/k8s/rayservice.yaml =================================================


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
    pods = list(_all_pods(ray_docs))
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
            for m in _container(template).get("volumeMounts", [])
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
    assert http["port"] == _ports(_container(head["template"])).get("serve"), (
        "the head's `serve` containerPort must be Serve's HTTP port"
    )
    # The model directory: on a mounted volume in every Ray pod (the router
    # ingress may run on any of them).
    assert config.model_path is not None
    for where, template in _all_pods(ray_docs):
        mounts = [
            m["mountPath"]
            for m in _container(template).get("volumeMounts", [])
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
    for where, template in _all_pods(ray_docs):
        c = _container(template)
        for variable, seen in refs.items():
            ref = _secret_ref(c, variable)
            assert ref is not None, f"{where}: no {variable} from a Secret"
            seen.add(ref)
    for variable, seen in refs.items():
        assert len(seen) == 1, f"the Ray pods take {variable} from different Secrets: {seen}"


def _peer_is(peer: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = peer.get("podSelector", {}).get("matchLabels", {})
    return bool(selector) and selector.items() <= labels.items()


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
    container = _container(head["template"])
    dashboard = _resolve("dashboard", container, "ray head")
    serve_port = _serve_config(ray_docs)["http_options"]["port"]
    policies = [
        p
        for p in _named(ray_docs, "NetworkPolicy").values()
        if p["spec"]["podSelector"].get("matchLabels", {}).items() <= head_labels.items()
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    assert policies, f"the dashboard listens on {host} and no NetworkPolicy guards the head"
    ray_labels = [t["metadata"]["labels"] for _, t in _all_pods(ray_docs)]
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
    head = _container(spec["headGroupSpec"]["template"])
    assert _quantity(_limits(head).get(GPU, 0)) == 0, "the head is a CPU pod"

    images = {_container(t)["image"] for _, t in _all_pods(ray_docs)}
    assert len(images) == 1, f"every Ray pod must run the same image, not {images}"
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if _quantity(_limits(_container(g["template"])).get(GPU, 0)) > 0
    ]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in gpu_groups:
        c = _container(group["template"])
        # Ray advertises the container's CPU and GPU limits as the pod's resources.
        cpus = float(group["rayStartParams"].get("num-cpus", _quantity(_limits(c)["cpu"])))
        gpus = _quantity(_limits(c)[GPU])
        lo, n, hi = (
            group["minReplicas"],
            group.get("replicas", group["minReplicas"]),
            group["maxReplicas"],
        )
        assert lo <= n <= hi, f"group {group['groupName']}: replicas outside its bounds"
        needed, misfits = _nodes_needed(config, cpus, gpus, _max)
        assert not misfits, f"a replica of {misfits} fits no {group['groupName']} pod"
        assert needed <= hi, (
            f"the pools at max_replicas need {needed} {group['groupName']} pods, "
            f"more than maxReplicas {hi}"
        )
        # A pod removed while a replica drains must outlive Serve's wait.
        grace = group["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        for name, pool in _pools(config).items():
            wait = deployment_options(pool, name)["graceful_shutdown_timeout_s"]
            assert grace > wait, f"group {group['groupName']}: grace {grace}s < {name}'s {wait}s"


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


# == deploy/ray/cluster.yaml ====================================================


def _usage(path: Path) -> list[list[str]]:
    """The `ray ...` commands in the file's comments, split like a shell."""
    out = []
    for line in path.read_text().splitlines():
        text = line.strip().removeprefix("#").strip()
        if line.lstrip().startswith("#") and text.startswith("ray "):
            out.append(shlex.split(text, comments=True))
    return out


def _remote(cmd: str) -> list[list[str]]:
    return [shlex.split(part) for part in cmd.split("&&")]


def _home(path: str) -> str:
    return path.replace("$HOME/", "~/").rstrip("/")


def test_cluster_yaml_matches_rays_schema(cluster: dict[str, Any]) -> None:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_cluster_has_a_cpu_head_and_gpu_workers(cluster: dict[str, Any]) -> None:
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    assert head in types, f"head_node_type {head!r} is not an available node type"
    assert types[head]["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    workers = {k: t for k, t in types.items() if k != head}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu, "no worker node type declares GPU resources"
    for t in gpu:
        assert t["resources"].get("CPU", 0) > 0
    for name, t in workers.items():
        assert t.get("min_workers", 0) <= t.get("max_workers", 0) <= cluster["max_workers"], name


def test_ray_start_commands_agree_on_the_head_port(cluster: dict[str, Any]) -> None:
    def starts(commands: list[str]) -> list[list[str]]:
        argvs = [shlex.split(part) for cmd in commands for part in cmd.split(";")]
        return [a for a in argvs if a[:2] == ["ray", "start"]]

    (head,) = starts(cluster["head_start_ray_commands"])
    assert "--head" in head
    assert any(a.startswith("--autoscaling-config=") for a in head), "the head runs the autoscaler"
    port = next(a.split("=", 1)[1] for a in head if a.startswith("--port="))
    (worker,) = starts(cluster["worker_start_ray_commands"])
    address = next(a.split("=", 1)[1] for a in worker if a.startswith("--address="))
    assert address == f"$RAY_HEAD_IP:{port}", f"workers join {address}, the head listens on {port}"


def test_the_ray_dashboard_listens_on_the_heads_loopback_only(cluster: dict[str, Any]) -> None:
    """Whoever reaches the dashboard can run code on the cluster: reach it
    through SSH (`ray dashboard`), never over the network."""
    argvs = [
        shlex.split(part) for cmd in cluster["head_start_ray_commands"] for part in cmd.split(";")
    ]
    (head,) = [a for a in argvs if a[:2] == ["ray", "start"]]
    hosts = [a.split("=", 1)[1] for a in head if a.startswith("--dashboard-host=")]
    assert hosts and all(h in LOOPBACK for h in hosts), f"--dashboard-host {hosts}"
    assert ["ray", "dashboard", str(CLUSTER.relative_to(ROOT))] in _usage(CLUSTER), (
        "show how to reach it"
    )


def test_every_node_gets_splitserve_and_a_pinned_torch(cluster: dict[str, Any]) -> None:
    mounts = {_home(remote): local for remote, local in cluster["file_mounts"].items()}
    repo = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert len(repo) == 1, "file_mounts must copy the repository (local path '.')"
    installs = [shlex.split(part) for cmd in cluster["setup_commands"] for part in cmd.split("&&")]
    installs = [a for a in installs if len(a) > 2 and a[0].endswith("pip") and a[1] == "install"]
    editable = [_home(a[a.index("-e") + 1].split("[")[0]) for a in installs if "-e" in a]
    assert repo[0] in editable, f"no `pip install -e {repo[0]}` in setup_commands"
    assert all(_home(a[0]).startswith(repo[0] + "/") for a in installs), (
        "install into the venv inside the copied repository"
    )
    torch = [Requirement(x) for a in installs for x in a[2:] if x.startswith("torch")]
    assert torch, "torch must be installed (pinned) before splitserve"
    spec = torch[0].specifier
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), "torch needs an upper bound"
    assert version("torch").split("+")[0] in spec, "the pin excludes the torch the tests run on"


def test_usage_starts_splitserve_up_on_the_cluster_with_a_config_that_fits(
    cluster: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from deploy.cli import build_parser as cli_parser
    from deploy.ray_cluster import check_fits

    usage = _usage(CLUSTER)
    rel = str(CLUSTER.relative_to(ROOT))
    assert ["ray", "up", rel] in usage, f"usage must start with `ray up {rel}`"
    remote = []
    for argv in usage:
        positional = [a for a in argv[2:] if not a.startswith("-")]
        assert positional[0] == rel, f"`{shlex.join(argv)}` names another file"
        if argv[1] == "exec":
            remote += _remote(positional[1])
    commands = {}
    cwd = "~"
    for argv in remote:
        if argv[0] == "cd":
            cwd = _home(argv[1])
        if argv[0] == "splitserve":
            commands[argv[1]] = (cwd, cli_parser().parse_args(argv[1:]))
    assert {"up", "down"} <= set(commands), "usage must show `splitserve up` and `splitserve down`"
    cwd, up = commands["up"]
    assert up.address == "auto", "`splitserve up` joins the cluster's Ray with --address auto"
    mounts = {_home(remote): local for remote, local in cluster["file_mounts"].items()}
    assert mounts.get(cwd) == ".", f"`splitserve up` runs in {cwd}, which is not the repository"
    config = load_config(ROOT / up.config)

    # `splitserve up` refuses to deploy unless the starting replicas fit the
    # nodes already up: the head and min_workers of each worker type.
    types = cluster["available_node_types"]
    have: dict[str, float] = {}
    for name, t in types.items():
        count = 1 if name == cluster["head_node_type"] else t.get("min_workers", 0)
        for key, value in t["resources"].items():
            have[key] = have.get(key, 0) + count * value
    monkeypatch.setattr(ray, "cluster_resources", lambda: have)
    check_fits(config)

    # And every pool at max_replicas fits max_workers GPU nodes.
    gpu_types = [t for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    best = max(gpu_types, key=lambda t: t["resources"]["GPU"])
    needed, misfits = _nodes_needed(
        config, best["resources"]["CPU"], best["resources"]["GPU"], _max
    )
    assert not misfits, f"a replica of {misfits} fits no GPU node"
    assert needed <= min(best["max_workers"], cluster["max_workers"]), (
        f"the pools at max_replicas need {needed} GPU nodes"
    )

    # The model directory the config names exists on every node: copied by
    # file_mounts and linked into place by setup_commands.
    assert config.model_path is not None
    links = [shlex.split(part) for cmd in cluster["setup_commands"] for part in cmd.split("&&")]
    links = [a for a in links if "ln" in a[:2]]
    sources = {_home(a[-2]) for a in links if a[-1] == config.model_path}
    assert sources & set(mounts), f"{config.model_path} is neither copied nor linked on the nodes"
