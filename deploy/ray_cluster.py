"""`splitserve up` and `splitserve down`: the Serve application of
deploy/ray_app.py on an embedded local Ray, or on a Ray cluster it joins.

`up` runs in the foreground: it deploys, prints where to send requests,
reports every change in a pool's size as it happens, and on Ctrl-C or
SIGTERM (which `down` sends) deletes the application (each replica drains)
and stops the local Ray it started. It records its PID and address in a
state file so `down` can find it.

Workers let in only the cluster: `up` makes a secret for this launch (or
takes $SPLITSERVE_CLUSTER_SECRET) and hands it to every replica through the
job's runtime_env, never on a command line; replicas and the router ingress
read it from their environment (kvtransfer/security.py).

An embedded Ray listens on 127.0.0.1 only: Ray otherwise picks the machine's
other interface, and Serve replicas bind their internal gRPC server to all
interfaces; the setup hook below rebinds it (docs/ray.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from deploy.config import ClusterConfig

# Read by Ray when it starts: loopback node address, no usage stats, and no
# auth token written to ~/.ray (a later cluster would then refuse us).
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
SETUP_HOOK = "deploy.ray_cluster.bind_serve_to_loopback"

POOL_DEPLOYMENTS = {"Prefill": "prefill", "Decode": "decode", "Colocated": "colocated"}


def bind_serve_to_loopback() -> None:
    """worker_process_setup_hook for an embedded Ray: Serve replicas open
    their inter-deployment gRPC server on [::]:0; make it 127.0.0.1:0."""
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "_splitserve_loopback", False):
        return

    def bind_loopback(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.removeprefix("[::]:")
        return bind(server, address)

    bind_loopback._splitserve_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bind_loopback


def _is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rpartition(":")[0] or address
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")


def start_ray(
    address: str | None, num_cpus: int | None, env_vars: Mapping[str, str] | None = None
) -> bool:
    """Connect to `address`, or start a local Ray on loopback; True when
    this process started it (and so stops it). A cluster on 127.0.0.1 gets
    the loopback setup hook too. `env_vars` reach every replica this job
    deploys (Serve's deployments inherit the job's runtime_env)."""
    local = address is None or _is_loopback(address)
    if local:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    import ray

    runtime_env: dict[str, Any] = {"worker_process_setup_hook": SETUP_HOOK} if local else {}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    if address is not None:
        ray.init(
            address=address,
            namespace="splitserve",
            log_to_driver=False,
            runtime_env=runtime_env or None,
        )
        return False
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        namespace="splitserve",
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
    )
    return True


def check_fits(config: ClusterConfig) -> None:
    """Refuse a config whose minimum pools cannot be placed on this Ray
    cluster (Serve would otherwise wait for resources forever)."""
    import ray

    have = ray.cluster_resources()
    need_cpu = need_gpu = 0.0
    for name, pool in _pools(config).items():
        lo = pool.min_replicas if pool.min_replicas is not None else pool.replicas
        n = max(lo, pool.replicas)
        need_cpu += n * pool.resources.num_cpus
        need_gpu += n * pool.resources.num_gpus
        del name
    if need_cpu > have.get("CPU", 0) + 1e-9 or need_gpu > have.get("GPU", 0) + 1e-9:
        raise RuntimeError(
            f"the pools' starting replicas need {need_cpu:g} CPUs and {need_gpu:g} GPUs; this "
            f"Ray cluster has {have.get('CPU', 0):g} and {have.get('GPU', 0):g}. Lower "
            "pools.*.replicas or pools.*.resources, or add nodes"
        )


def _pools(config: ClusterConfig) -> dict[str, Any]:
    p = config.pools
    pools = (
        {"colocated": p.colocated} if p.colocated else {"prefill": p.prefill, "decode": p.decode}
    )
    return {k: v for k, v in pools.items() if v is not None}


def pool_sizes() -> dict[str, tuple[int, int]]:
    """Per pool of the application, now: (replicas running, replicas wanted:
    running plus starting). Draining replicas count in neither."""
    from ray import serve
    from ray.serve._private.common import ReplicaState

    from deploy.ray_app import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return {}
    sizes = {}
    for name, dep in app.deployments.items():
        if name in POOL_DEPLOYMENTS:
            states = dep.replica_states
            running = int(states.get(ReplicaState.RUNNING, 0))
            starting = int(states.get(ReplicaState.STARTING, 0))
            sizes[POOL_DEPLOYMENTS[name]] = (running, running + starting)
    return sizes


def _clock() -> str:
    now = time.time()
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


def up(
    config: ClusterConfig,
    address: str | None,
    num_cpus: int | None,
    state_file: Path,
    out: Callable[[str], None] = print,
) -> int:
    """Deploy and serve until interrupted or the application is deleted."""
    stop = serving = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True
        if not serving:  # still deploying: unwind now, through the `finally`
            raise KeyboardInterrupt

    from kvtransfer.security import SECRET_ENV, launch_secret

    started_here = start_ray(address, num_cpus, env_vars={SECRET_ENV: launch_secret()})
    # After ray.init, which installs its own SIGTERM handler (one that exits
    # at once, before the replicas could drain).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        from ray import serve

        from deploy.ray_app import APP_NAME, build_app

        check_fits(config)
        host, port = config.router.host, config.router.port
        serve.start(http_options={"host": host, "port": port})
        out(f"deploying {APP_NAME} on Ray (this takes a minute: every replica loads the model)")
        t0 = time.monotonic()
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        url = f"http://{host}:{port}"
        _wait_healthy(url, timeout_s=300)
        out(f"ready in {time.monotonic() - t0:.1f}s: {url}  (KV over {config.kv_transport})")
        import ray

        gcs = ray.get_runtime_context().gcs_address
        _write_state(
            state_file, {"pid": os.getpid(), "address": address, "gcs_address": gcs, "url": url}
        )
        out(try_command(config, url))
        out("stop with Ctrl-C or `splitserve down`")
        serving = True
        sizes = pool_sizes()
        out("pools: " + ", ".join(f"{k} {v[0]}" for k, v in sizes.items()))
        while not stop:
            time.sleep(0.25)
            now = pool_sizes()
            if not now:
                out(f"the application {APP_NAME} was deleted; exiting")
                break
            for pool, (running, wanted) in now.items():
                was_running, was_wanted = sizes.get(pool, (0, 0))
                if wanted > was_wanted:
                    out(f"{_clock()} {pool}: scaling up to {wanted} (replica starting)")
                if running != was_running:
                    out(f"{_clock()} {pool}: {was_running} -> {running} replicas running")
            sizes = now
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # one clean shutdown, not two
        _shutdown(started_here, out)
        with contextlib.suppress(OSError):
            if json.loads(state_file.read_text()).get("pid") == os.getpid():
                state_file.unlink()


def try_command(config: ClusterConfig, url: str) -> str:
    """The curl line `up` prints: never with the API key itself, since the
    line ends up in terminals and logs; the variable or the config field
    that holds it instead."""
    key = (
        f"${config.router.api_key_env}"
        if config.router.api_key_env
        else "<router.api_key>"
        if config.router.api_key
        else None
    )
    auth = f' -H "Authorization: Bearer {key}"' if key else ""
    return (
        f"try: curl -s {url}/v1/completions -H 'Content-Type: application/json'{auth} "
        """-d '{"prompt": "Hello", "max_tokens": 16}'"""
    )


def _shutdown(started_here: bool, out: Callable[[str], None]) -> None:
    import ray
    from ray import serve

    from deploy.ray_app import APP_NAME

    out("stopping: replicas drain their requests first")
    with contextlib.suppress(Exception):
        serve.delete(APP_NAME)
    if started_here:
        with contextlib.suppress(Exception):
            serve.shutdown()
    ray.shutdown()
    out("stopped")


def _wait_healthy(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the router at {url} reported no healthy decode worker in {timeout_s:g}s")


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def down(state_file: Path, address: str | None, timeout_s: float = 180.0) -> int:
    """Stop the `up` recorded in the state file (SIGTERM to its PID, then
    wait); with `address`, delete the application on that cluster."""
    path = state_file.expanduser()
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(path.read_text())
    pid = state.get("pid")
    if isinstance(pid, int) and _alive(pid):
        print(f"stopping splitserve up (pid {pid}); replicas drain first")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            raise RuntimeError(f"splitserve up (pid {pid}) did not stop within {timeout_s:g}s")
        print("stopped")
        return 0
    if address is not None:
        start_ray(address, None)
        from ray import serve

        from deploy.ray_app import APP_NAME

        serve.delete(APP_NAME)
        print(f"deleted {APP_NAME} on {address}")
        return 0
    print("nothing to stop: no running `splitserve up` recorded in " + str(path), file=sys.stderr)
    return 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True
