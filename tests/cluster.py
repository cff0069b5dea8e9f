"""A real cluster for end-to-end tests: `splitserve serve` as a child process
(router in it, workers as its children) on 127.0.0.1.

The cluster's secret is the test's own (SPLITSERVE_CLUSTER_SECRET in the
child's environment, which `splitserve serve` then uses instead of making
one), so a test can talk to the workers directly: `cluster.channel(address)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx

from kvtransfer.security import SECRET_ENV, ClusterSecurity, secure_channel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition, timeout: float, what: str, poll_s: float = 0.1) -> None:
    """Poll `condition()` until it holds; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(poll_s)


class ServeCluster:
    def __init__(
        self, model: Path, log_path: Path, *serve_args: str, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "deploy.cli", "serve", "--model", str(model)]
        cmd += ["--port", str(self.port), *serve_args]
        self.secret = secrets.token_urlsafe(24)  # the workers refuse calls without it
        self.security = ClusterSecurity(secret=self.secret)
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, SECRET_ENV: self.secret},
        )
        self.worker_pids: list[int] = []
        try:
            self._wait_healthy(timeout=180)
        except BaseException:
            self.stop()
            raise
        self.worker_pids = [w["pid"] for w in self.cluster()["workers"]]

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{self.url}/health", timeout=2)
                # Healthy once every worker has answered a poll.
                if r.status_code == 200 and all(w["healthy"] for w in self.cluster()["workers"]):
                    return
            time.sleep(0.3)
        raise RuntimeError(f"cluster not healthy after {timeout}s:\n{self.log()}")

    def channel(self, address: str) -> grpc.aio.Channel:
        """A channel to one of the cluster's workers, carrying its secret."""
        return secure_channel(address, self.security)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def cluster(self) -> dict:
        r = httpx.get(f"{self.url}/cluster", timeout=10)
        r.raise_for_status()
        return r.json()

    def workers(self, role: str) -> list[dict]:
        return [w for w in self.cluster()["workers"] if w["role"] == role]

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Wait until every healthy worker has every block free and nothing
        queued; returns the last /cluster answer (asserting is the caller's)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.cluster()
            live = [w for w in state["workers"] if w["healthy"]]
            if all(_idle(w) for w in live) or time.monotonic() > deadline:
                return state
            time.sleep(0.2)

    def stop(self) -> list[int]:
        """SIGTERM the serve process, which must stop its workers. Returns the
        workers still alive 15 s later (killed then: a leak to report)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 15
        while any(map(_alive, self.worker_pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        leaked = [pid for pid in self.worker_pids if _alive(pid)]
        for pid in leaked:  # only the workers this cluster started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()
        return leaked


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by init counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return "\nState:\tZ" not in status


def _idle(w: dict) -> bool:
    return (
        w["kv_blocks_free"] == w["kv_blocks_total"]
        and w["running"] == 0
        and w["waiting"] == 0
        and w.get("awaiting_kv", 0) == 0
        and w.get("held", 0) == 0
    )


def assert_all_blocks_free(state: dict) -> None:
    for w in state["workers"]:
        if not w["healthy"]:
            continue
        assert _idle(w), f"{w['role']} worker {w['address']} is not idle: {w}"


class WorkerProcess:
    """One worker process a test starts by itself (python -m MODULE) on
    127.0.0.1, ready once its ready file exists, stopped by its own pid.
    `secret`: the cluster secret, handed over in the environment as the
    launchers do (never in argv); None: an open port."""

    def __init__(
        self,
        module: str,
        model: Path,
        tmp: Path,
        *extra: str,
        name: str | None = None,
        secret: str | None = None,
    ) -> None:
        name = name or module
        ready = tmp / f"{name}.ready.json"
        self.log_path = tmp / f"{name}.log"
        cmd = [sys.executable, "-m", module, "--model", str(model), "--host", "127.0.0.1"]
        cmd += ["--port", str(free_port()), "--ready-file", str(ready), *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITSERVE_")}
        if secret is not None:
            env[SECRET_ENV] = secret
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start:\n{self.log()}")
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        self.address: str = info["address"]
        self.metrics_port: int = info["metrics_port"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:]

    def metric(self, name: str) -> float:
        """The sum of a metric's samples whose name (with labels, if given) starts a line."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and line[len(name)] in " {"
        )

    def stop(self) -> None:
        """Only this test's own process, by its pid (woken first if frozen)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert not _alive(self.proc.pid)


def role_metric(cluster: ServeCluster, role: str, name: str) -> float:
    """Sum of a metric's samples on the workers of a role, from their /metrics."""
    total = 0.0
    for w in cluster.workers(role):
        text = httpx.get(f"http://127.0.0.1:{w['metrics_port']}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name):
                total += float(line.rsplit(" ", 1)[1])
    return total
