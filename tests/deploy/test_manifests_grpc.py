"""deploy/k8s/grpc.yaml against the code it starts: every container's
command line parsed with the workers' and the router's real argument parsers,
every port a Service, probe, annotation or router flag names resolved to a
declared containerPort, the pools as deploy/examples/gpu.yaml sizes them,
and one cluster secret that every process really reads. Its autoscaling is
checked in test_manifests_keda.py."""

from __future__ import annotations

import argparse
import inspect
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from deploy.config import ClusterConfig, pool_engine_args
from tests.manifests import (
    GPU,
    WORKER_POOLS,
    command_of,
    container_of,
    limits_of,
    named,
    parse_container,
    parser_for,
    ports_of,
    quantity,
    resolve_port,
    secret_ref,
    worker_deployments,
)

SCRAPE = "prometheus.io/"


def _router(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], argparse.Namespace]:
    routers = []
    for dep in named(docs, "Deployment").values():
        module, args = parse_container(container_of(dep["spec"]["template"]))
        if module == "router":
            routers.append((dep, args))
    assert len(routers) == 1, f"expected one router Deployment, found {len(routers)}"
    return routers[0]


def _selects(service: dict[str, Any], template: dict[str, Any]) -> bool:
    """Whether the Service's selector picks pods of this template."""
    selector = service["spec"]["selector"]
    return bool(selector) and selector.items() <= template["metadata"]["labels"].items()


def test_grpc_file_has_each_pool_its_services_and_scalers(grpc_docs: list[dict[str, Any]]) -> None:
    kinds = Counter(d["kind"] for d in grpc_docs)
    assert kinds == {"Deployment": 3, "Service": 3, "ScaledObject": 2}, kinds
    modules = sorted(
        command_of(container_of(d["spec"]["template"]))[0]
        for d in grpc_docs
        if d["kind"] == "Deployment"
    )
    assert modules == ["decode_worker", "prefill_worker", "router"]


def test_deployment_selectors_match_their_pod_labels(grpc_docs: list[dict[str, Any]]) -> None:
    for name, dep in named(grpc_docs, "Deployment").items():
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector and selector.items() <= labels.items(), (
            f"Deployment {name}: selector {selector} does not match its pod labels {labels}"
        )


def test_services_select_one_deployment_and_target_its_ports(
    grpc_docs: list[dict[str, Any]],
) -> None:
    deployments = named(grpc_docs, "Deployment")
    for name, svc in named(grpc_docs, "Service").items():
        chosen = [d for d in deployments.values() if _selects(svc, d["spec"]["template"])]
        assert len(chosen) == 1, f"Service {name} selects {len(chosen)} Deployments, not one"
        container = container_of(chosen[0]["spec"]["template"])
        for port in svc["spec"]["ports"]:
            target = resolve_port(
                port.get("targetPort", port["port"]), container, f"Service {name}"
            )
            if svc["spec"].get("clusterIP") == "None":
                # Headless: clients dial the pod IPs, so no port mapping happens.
                assert port["port"] == target, (
                    f"headless Service {name}: port {port['port']} != containerPort {target}"
                )


def test_workers_args_parse_and_agree_with_ports_and_annotations(
    grpc_docs: list[dict[str, Any]],
) -> None:
    workers = worker_deployments(grpc_docs)
    assert sorted(m for _, m, _ in workers.values()) == ["decode_worker", "prefill_worker"]
    for name, (dep, _, args) in workers.items():
        template = dep["spec"]["template"]
        c = container_of(template)
        declared = set(ports_of(c).values())
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
            assert quantity(limits_of(c).get(GPU, 0)) >= 1, f"{name}: --device cuda, no GPU limit"


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
    for name, (dep, module, args) in worker_deployments(grpc_docs).items():
        c = container_of(dep["spec"]["template"])
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
    for name, (dep, module, args) in worker_deployments(grpc_docs).items():
        role = WORKER_POOLS[module]
        pool = getattr(config.pools, role)
        expected = parser_for(module).parse_args(pool_engine_args(config, pool, role))
        for key in keys:
            have, want = getattr(args, key, None), getattr(expected, key, None)
            assert have == want, (
                f"{name}: --{key.replace('_', '-')} {have!r} but gpu.yaml's {role} pool "
                f"gives {want!r}"
            )
        limits = limits_of(container_of(dep["spec"]["template"]))
        assert quantity(limits.get("cpu", 0)) == pool.resources.num_cpus, name
        assert quantity(limits.get(GPU, 0)) == pool.resources.num_gpus, name


def test_model_directory_is_mounted_where_each_process_reads_it(
    grpc_docs: list[dict[str, Any]],
) -> None:
    for name, dep in named(grpc_docs, "Deployment").items():
        template = dep["spec"]["template"]
        c = container_of(template)
        _, args = parse_container(c)
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
    c = container_of(template)
    assert args.host == "0.0.0.0"
    assert args.port in ports_of(c).values(), f"router --port {args.port} is not a containerPort"
    annotations = template["metadata"].get("annotations", {})
    if annotations.get(SCRAPE + "scrape") == "true":
        assert annotations.get(SCRAPE + "port") == str(args.port), (
            "router serves /metrics on --port"
        )
    assert not args.decode and not args.prefill, "use the DNS names, not fixed addresses"

    services = named(grpc_docs, "Service")
    workers = worker_deployments(grpc_docs)
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
    c = container_of(template)
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health"
    assert '@app.get("/health")' in inspect.getsource(router.server), "router lost /health"
    assert resolve_port(probe["port"], c, "router readinessProbe") == args.port
    assert "httpGet" not in c.get("livenessProbe", {}), (
        "a liveness probe on /health restarts the router whenever no decode worker is up"
    )
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if pre_stop[:1] == ["sleep"]:
        assert template["spec"].get("terminationGracePeriodSeconds", 30) > float(pre_stop[1])
    front = [
        s
        for s in named(grpc_docs, "Service").values()
        if s["spec"].get("clusterIP") != "None" and _selects(s, template)
    ]
    assert len(front) == 1, "one ClusterIP Service in front of the router"
    for port in front[0]["spec"]["ports"]:
        assert resolve_port(port["targetPort"], c, "router Service") == args.port


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
    for name, dep in named(grpc_docs, "Deployment").items():
        c = container_of(dep["spec"]["template"])
        ref = secret_ref(c, SECRET_ENV)
        assert ref is not None, f"{name}: no {SECRET_ENV} from a Secret: its calls are refused"
        refs[name] = ref
        _, args = parse_container(c)
        assert ClusterSecurity.from_args(args).secret == secret, f"{name} ignores {SECRET_ENV}"
    assert len(set(refs.values())) == 1, f"router and workers use different secrets: {refs}"

    dep, _ = _router(grpc_docs)
    c = container_of(dep["spec"]["template"])
    key_env = "SPLITSERVE_API_KEY"
    assert secret_ref(c, key_env) is not None, "the router's API key must come from a Secret"
    monkeypatch.setenv(key_env, "the-api-key-as-the-pod-sees-it")
    _, args = parse_container(c)  # the parser reads the variable when it is built
    assert args.api_key == "the-api-key-as-the-pod-sees-it", f"the router ignores ${key_env}"


def test_decode_workers_dial_only_the_prefill_pool_the_router_names(
    grpc_docs: list[dict[str, Any]],
) -> None:
    from kvtransfer.peers import known_prefill_from_args

    _, router_args = _router(grpc_docs)
    decode = [
        args
        for _, module, args in worker_deployments(grpc_docs).values()
        if module == "decode_worker"
    ]
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
