"""Bringing a cluster up as local processes: workers as children, the router
in this process.

Every worker is started with a ready file; the launcher waits for all of them
(a worker that exits while loading fails the start with the end of its log),
then serves the router until Ctrl-C or SIGTERM, then stops every child it
started, by PID: SIGTERM, then SIGKILL after a grace period. A worker that
dies while serving is logged here; the router marks it unhealthy at its next
poll and routes around it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("splitserve")


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
    policy: str = "least_loaded"  # how the router picks a decode worker
    ready_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.colocated < 0 or self.prefill < 0 or self.decode < 0:
            raise ValueError("worker counts must be >= 0")
        if self.colocated == 0 and (self.prefill < 1 or self.decode < 1):
            raise ValueError("need at least one prefill and one decode worker (or --colocated K)")


@dataclass
class WorkerProcess:
    role: str  # "prefill" | "decode" | "colocated"
    index: int
    proc: subprocess.Popen[bytes]
    ready_file: Path
    log_file: Path
    address: str = ""
    metrics_port: int = 0

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


@dataclass
class LocalCluster:
    spec: ClusterSpec
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="splitserve-")))
    workers: list[WorkerProcess] = field(default_factory=list)
    _stopping: bool = False

    # -- workers ------------------------------------------------------------------

    def start_workers(self) -> None:
        spec = self.spec
        if spec.colocated:
            plan = [("colocated", i) for i in range(spec.colocated)]
        else:
            plan = [("prefill", i) for i in range(spec.prefill)]
            plan += [("decode", i) for i in range(spec.decode)]
        try:
            for role, i in plan:
                self.workers.append(self._spawn(role, i))
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self._watch, name="worker-watch", daemon=True).start()

    def _spawn(self, role: str, index: int) -> WorkerProcess:
        module = "prefill_worker" if role == "prefill" else "decode_worker"
        ready = self.workdir / f"{role}-{index}.ready"
        log_file = self.workdir / f"{role}-{index}.log"
        cmd = [sys.executable, "-m", module, "--model", self.spec.model]
        cmd += ["--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready)]
        cmd += list(self.spec.worker_args)
        cmd += list(self.spec.prefill_args if role == "prefill" else self.spec.decode_args)
        if role == "colocated":
            cmd.append("--colocated")
        env = dict(os.environ)
        # Idle OpenMP threads spin by default, stealing the cores a busy
        # neighbour worker needs; make them sleep.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        with open(log_file, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
            )
        log.info("started %s-%d (pid %d), log %s", role, index, proc.pid, log_file)
        return WorkerProcess(role, index, proc, ready, log_file)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.spec.ready_timeout_s
        pending = list(self.workers)
        while pending:
            for w in list(pending):
                if w.ready_file.exists():
                    info = json.loads(w.ready_file.read_text())
                    w.address, w.metrics_port = info["address"], info["metrics_port"]
                    log.info("%s ready on %s (pid %d)", w.name, w.address, w.proc.pid)
                    pending.remove(w)
                elif w.proc.poll() is not None:
                    raise RuntimeError(
                        f"{w.name} exited with code {w.proc.returncode} while starting:\n"
                        + _tail(w.log_file)
                    )
            if time.monotonic() > deadline:
                names = ", ".join(w.name for w in pending)
                waited = self.spec.ready_timeout_s
                raise RuntimeError(f"workers not ready after {waited:.0f}s: {names}")
            time.sleep(0.1)

    def _watch(self) -> None:
        reported: set[int] = set()
        while not self._stopping:
            for w in self.workers:
                code = w.proc.poll()
                if code is not None and w.proc.pid not in reported and not self._stopping:
                    reported.add(w.proc.pid)
                    log.error(
                        "%s (pid %d, %s) exited with code %s; the router routes around it. "
                        "Its log: %s",
                        w.name,
                        w.proc.pid,
                        w.address,
                        code,
                        w.log_file,
                    )
            time.sleep(0.5)

    def addresses(self, *roles: str) -> tuple[str, ...]:
        return tuple(w.address for w in self.workers if w.role in roles)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every worker this launcher started (by PID; nothing else)."""
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
        from router.server import RouterConfig, serve

        # uvicorn re-raises SIGTERM after its own shutdown; as an exception
        # (not the default action, which kills at once) it reaches `finally`
        # below, and the workers are stopped.
        signal.signal(signal.SIGTERM, _raise_system_exit)
        self.start_workers()
        spec = self.spec
        config = RouterConfig(
            model=spec.model,
            served_model_name=spec.served_model_name,
            decode_addresses=self.addresses("decode", "colocated"),
            prefill_addresses=self.addresses("prefill"),
            host=spec.host,
            port=spec.port,
            api_key=spec.api_key,
            policy=spec.policy,  # type: ignore[arg-type]  # checked by the config or the CLI
        )
        url = f"http://{spec.host}:{spec.port}"
        name = spec.served_model_name or Path(spec.model).name
        print(_banner(url, name, self.workers, bool(spec.api_key)), flush=True)
        try:
            serve(config)
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


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the launcher dies, even by
    SIGKILL, so no worker outlives its cluster (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
