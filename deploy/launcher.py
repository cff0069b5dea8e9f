"""Bringing a cluster up as local processes: workers as children, the router
in this process.

Every worker is started with a ready file; the launcher waits for all of them
(a worker that exits while loading fails the start with the end of its log),
then serves the router until Ctrl-C or SIGTERM, then stops every child it
started, by PID: SIGTERM, then SIGKILL after a grace period.

Prefill workers start first: each decode worker is told their addresses
(--prefill-addresses), the only prefill workers it will ever dial. Every
worker and the router share a secret made for this launch (or
$SPLITSERVE_CLUSTER_SECRET when set), which reaches the workers through
their environment, never their command line; a gRPC call without it is
refused (kvtransfer/security.py).

The launcher is the workers' supervisor: a worker that exits while serving
(killed, or its engine died: EXIT_ENGINE_DIED) is logged with its exit code
and the end of its log, and started again on the same address after a
backoff (RESTART_BACKOFF_S, doubling while it keeps dying). Meanwhile the
router marks it unhealthy at its next poll and routes around it; it finds it
again at the same address. The router shows each worker's restarts on
/cluster and counts them in splitserve_worker_restarts_total.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploy.worker_process import WorkerProcess, describe_exit, log_tail, spawn
from kvtransfer.peers import write_address_file
from kvtransfer.security import launch_secret
from router.selection import DEFAULT_LOCAL_PREFILL_THRESHOLD

log = logging.getLogger("splitserve")

# A worker that exits is started again after the first delay, doubled at each
# exit up to the second, and back to the first once a worker has stayed up
# RESTART_RESET_S (a crash loop backs off; a rare crash costs one second).
RESTART_BACKOFF_S = (1.0, 30.0)
RESTART_RESET_S = 60.0
WATCH_INTERVAL_S = 0.2


@dataclass(frozen=True)
class ClusterSpec:
    """What `splitserve serve` starts."""

    model: str
    prefill: int = 1
    decode: int = 1
    colocated: int = 0  # > 0: this many colocated workers instead of prefill + decode
    host: str = "127.0.0.1"
    port: int = 8000
    # Forwarded to every worker: engine options (see engine/args.py).
    worker_args: tuple[str, ...] = ()
    # Forwarded to prefill workers only (their engine limits).
    prefill_args: tuple[str, ...] = ()
    # Forwarded to decode and colocated workers only (e.g. --kv-reservation-ttl).
    decode_args: tuple[str, ...] = ()
    served_model_name: str | None = None
    api_key: str | None = None  # the router then requires it on /v1/
    policy: str = "cache_aware"  # how the router picks workers (router/selection.py)
    migration_limit: int = 3  # times a request may move off a failed decode worker
    # Prompt tokens a decode worker may prefill itself (router/selection.py).
    local_prefill_threshold: int = DEFAULT_LOCAL_PREFILL_THRESHOLD
    tool_call_parser: str = "hermes"  # how the router reads tool calls (router/tools.py)
    request_timeout_s: float | None = None  # the router's end-to-end limit per request
    ready_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.colocated < 0 or self.prefill < 0 or self.decode < 0:
            raise ValueError("worker counts must be >= 0")
        if self.colocated == 0 and (self.prefill < 1 or self.decode < 1):
            raise ValueError("need at least one prefill and one decode worker (or --colocated K)")


@dataclass
class LocalCluster:
    spec: ClusterSpec
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="splitserve-")))
    workers: list[WorkerProcess] = field(default_factory=list)
    _stopping: bool = False
    # Orders restarts against stop(): once stop() set _stopping under it, no
    # worker is started again, and stop() sees every process ever started.
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # The cluster's shared secret, for this launch only (never printed).
    secret: str = field(default_factory=launch_secret, repr=False)

    @property
    def prefill_listing(self) -> Path:
        """The file naming the prefill workers, for the decode workers."""
        return self.workdir / "prefill-addresses"

    # -- workers ------------------------------------------------------------------

    def start_workers(self) -> None:
        spec = self.spec
        if spec.colocated:
            self._start([("colocated", i) for i in range(spec.colocated)])
        else:
            # Both pools at once: the decode workers read the prefill workers'
            # addresses from a file written once those are known, before the
            # router sends a first request (a restarted decode worker reads it too).
            plan = [("prefill", i) for i in range(spec.prefill)]
            self._start(plan + [("decode", i) for i in range(spec.decode)])
            write_address_file(self.prefill_listing, self.addresses("prefill"))
        # This thread restarts workers, and a child that `spawn` started gets
        # SIGTERM when the *thread* that started it ends: it runs until
        # stop(), and survives any error (see _watch).
        threading.Thread(target=self._watch, name="worker-watch", daemon=True).start()

    def _start(self, plan: Iterable[tuple[str, int]]) -> None:
        """Start these workers and wait until they are all ready (on an
        error, stop every worker started so far and raise)."""
        started = []
        try:
            for role, i in plan:
                ready = self.workdir / f"{role}-{i}.ready"
                log_file = self.workdir / f"{role}-{i}.log"
                proc = self._spawn(role, i, ready, log_file, port=0)
                started.append(WorkerProcess(role, i, proc, ready, log_file))
                self.workers.append(started[-1])
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise

    def _spawn(
        self, role: str, index: int, ready: Path, log_file: Path, port: int
    ) -> subprocess.Popen[bytes]:
        module = "prefill_worker" if role == "prefill" else "decode_worker"
        cmd = [sys.executable, "-m", module, "--model", self.spec.model]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--ready-file", str(ready)]
        cmd += list(self.spec.worker_args)
        cmd += list(self.spec.prefill_args if role == "prefill" else self.spec.decode_args)
        if role == "colocated":
            cmd.append("--colocated")
        if role == "decode":  # the only prefill workers it may dial
            cmd += ["--prefill-addresses-file", str(self.prefill_listing)]
        return spawn(cmd, self.secret, log_file, f"{role}-{index}")

    def _wait_ready(self, workers: Sequence[WorkerProcess]) -> None:
        deadline = time.monotonic() + self.spec.ready_timeout_s
        pending = list(workers)
        while pending:
            for w in list(pending):
                if w.ready_file.exists():
                    info = json.loads(w.ready_file.read_text())
                    w.address, w.metrics_port = info["address"], info["metrics_port"]
                    w.ready = True
                    log.info("%s ready on %s (pid %d)", w.name, w.address, w.proc.pid)
                    pending.remove(w)
                elif w.proc.poll() is not None:
                    raise RuntimeError(
                        f"{w.name} exited with code {w.proc.returncode} while starting:\n"
                        + log_tail(w.log_file)
                    )
            if time.monotonic() > deadline:
                names = ", ".join(w.name for w in pending)
                waited = self.spec.ready_timeout_s
                raise RuntimeError(f"workers not ready after {waited:.0f}s: {names}")
            time.sleep(0.1)

    def _watch(self) -> None:
        while not self._stopping:
            try:
                with self._lock:
                    if self._stopping:
                        return
                    for w in self.workers:
                        self._supervise(w, time.monotonic())
            except Exception:  # this thread must live as long as the workers it started
                log.exception("supervising the workers failed")
            time.sleep(WATCH_INTERVAL_S)

    def _supervise(self, w: WorkerProcess, now: float) -> None:
        """One look at one worker (under the lock): restart it when its
        backoff is over, note when it is ready, or schedule its restart."""
        if w.restart_at is not None:
            if now >= w.restart_at:
                self._restart(w, now)
            return
        code = w.proc.poll()
        if code is None:
            if not w.ready and w.ready_file.exists():
                self._restarted_ready(w)
            return
        up_s = now - w.started_at
        first, most = RESTART_BACKOFF_S
        fresh = up_s >= RESTART_RESET_S or not w.backoff_s
        w.backoff_s = first if fresh else min(most, 2 * w.backoff_s)
        w.restart_at = now + w.backoff_s
        log.error(
            "%s (pid %d, %s) exited with code %s after %.1fs; restarting it in %.0fs "
            "(restart %d). The end of its log (%s):\n%s",
            w.name, w.proc.pid, w.address, describe_exit(code), up_s, w.backoff_s, w.restarts + 1,
            w.log_file, log_tail(w.log_file),
        )  # fmt: skip

    def _restart(self, w: WorkerProcess, now: float) -> None:
        """Start the worker again on its address, so the router finds it there."""
        w.ready_file.unlink(missing_ok=True)
        with open(w.log_file, "ab") as out:
            out.write(f"--- restart {w.restarts + 1} of {w.name} by the launcher ---\n".encode())
        w.restarts += 1
        w.restart_at = None
        w.ready = False
        w.started_at = now
        try:
            w.proc = self._spawn(w.role, w.index, w.ready_file, w.log_file, port=w.port)
        except OSError as e:  # counted as a run that failed at once: backoff grows
            log.error("could not start %s again: %s", w.name, e)
            w.restart_at = now + min(RESTART_BACKOFF_S[1], 2 * max(w.backoff_s, 0.5))

    def _restarted_ready(self, w: WorkerProcess) -> None:
        try:
            info = json.loads(w.ready_file.read_text())
        except (OSError, ValueError):  # written atomically; gone if it exited since
            return
        w.ready = True
        w.metrics_port = info["metrics_port"]
        if info["address"] != w.address:  # cannot happen with a fixed --port; say so if it does
            log.error("%s came back on %s, not %s", w.name, info["address"], w.address)
        log.info(
            "%s is back on %s (pid %d, restart %d, metrics on :%d)",
            w.name, w.address, w.proc.pid, w.restarts, w.metrics_port,
        )  # fmt: skip

    def restart_counts(self) -> dict[str, tuple[str, int]]:
        """address -> (role, times restarted), for the router's /cluster and
        metrics (read from its thread; each value is one attribute read)."""
        return {w.address: (w.role, w.restarts) for w in self.workers}

    def addresses(self, *roles: str) -> tuple[str, ...]:
        return tuple(w.address for w in self.workers if w.role in roles)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every worker this launcher started (by PID; nothing else)."""
        with self._lock:  # no restart after this
            self._stopping = True
        live = [w for w in self.workers if w.proc.poll() is None]
        for w in live:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for w in live:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop; killing it", w.name, w.proc.pid)
                w.proc.kill()
                w.proc.wait()

    # -- the whole thing ------------------------------------------------------------

    def serve(self) -> None:
        """Start the workers, serve the router until interrupted, stop the workers."""
        from concurrent.futures import ThreadPoolExecutor

        from kvtransfer.security import ClusterSecurity
        from router.server import RouterConfig, bind_listener, load_served_model, serve

        # uvicorn re-raises SIGTERM after its own shutdown; as an exception
        # (not the default action, which kills at once) it reaches `finally`
        # below, and the workers are stopped.
        signal.signal(signal.SIGTERM, _raise_system_exit)
        spec = self.spec
        # Bound first: a taken port fails before any worker loads a model.
        listener = bind_listener(spec.host, spec.port)
        # The router's tokenizer loads (seconds, most of it importing
        # transformers) while the workers load their models.
        with ThreadPoolExecutor(1, thread_name_prefix="router-load") as pool:
            served = pool.submit(
                load_served_model,
                RouterConfig(model=spec.model, served_model_name=spec.served_model_name),
            )
            self.start_workers()
            served_model = served.result()
        config = RouterConfig(
            model=spec.model,
            served_model_name=spec.served_model_name,
            decode_addresses=self.addresses("decode", "colocated"),
            prefill_addresses=self.addresses("prefill"),
            host=spec.host,
            port=spec.port,
            api_key=spec.api_key,
            policy=spec.policy,  # type: ignore[arg-type]  # checked by the config or the CLI
            migration_limit=spec.migration_limit,
            local_prefill_threshold=spec.local_prefill_threshold,
            tool_call_parser=spec.tool_call_parser,
            request_timeout_s=spec.request_timeout_s,
            restarts=self.restart_counts,
            security=ClusterSecurity(secret=self.secret),
        )
        url = f"http://{spec.host}:{spec.port}"
        name = spec.served_model_name or Path(spec.model).name
        banner = _banner(url, name, self.workers, bool(spec.api_key))
        try:
            # Printed once the port is bound, so its curl line works at once.
            serve(config, listener, lambda: print(banner, flush=True), served_model)
        finally:
            self.stop()


def _banner(url: str, model: str, workers: Sequence[WorkerProcess], api_key: bool) -> str:
    lines = [f"splitserve is up: {url}  (model {model!r})"]
    for w in workers:
        lines.append(f"  {w.name:<12} pid {w.proc.pid:<8} {w.address}  metrics :{w.metrics_port}")
    body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 32})
    lines.append("Try:")
    lines.append(f"  curl -s {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'")
    lines.append(f"Cluster state: curl -s {url}/cluster   Ctrl-C stops everything.")
    return "\n".join(lines)


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
