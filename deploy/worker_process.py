"""One worker as a child process of `splitserve serve`'s launcher: started
so that it never outlives the launcher and keeps out of the terminal's
Ctrl-C, and, once it exits, why (its exit code in words, the end of its log).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtransfer.security import SECRET_ENV

log = logging.getLogger("splitserve")


@dataclass
class WorkerProcess:
    role: str  # "prefill" | "decode" | "colocated"
    index: int
    proc: subprocess.Popen[bytes]  # the current process; replaced on a restart
    ready_file: Path
    log_file: Path  # every run of this worker appends to it
    address: str = ""
    metrics_port: int = 0
    # Supervision (changed only under LocalCluster._lock):
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0  # times it was started again after exiting
    backoff_s: float = 0.0  # the delay before the last restart (0: none yet)
    restart_at: float | None = None  # exited: when it is started again
    ready: bool = False  # the current process wrote its ready file

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


def spawn(cmd: Sequence[str], secret: str, log_file: Path, name: str) -> subprocess.Popen[bytes]:
    """Start `cmd` with its output appended to `log_file`."""
    env = dict(os.environ)
    env[SECRET_ENV] = secret  # not on the command line, which `ps` shows
    # Each role sets its own OpenMP wait policy (worker/omp_wait.py).
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent,
            # Its own session: Ctrl-C in the terminal reaches only the
            # launcher, which stops the workers itself (a worker that a
            # terminal's SIGINT stopped first would look like a crash).
            start_new_session=True,
        )
    log.info("started %s (pid %d), log %s", name, proc.pid, log_file)
    return proc


def _pdeathsig() -> Any:
    """libc's prctl, looked up once here: restarts fork from a process whose
    gRPC and router threads run, and a lookup (dlsym) in the forked child
    could wait forever for a lock one of them held."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _pdeathsig()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the launcher dies, even by
    SIGKILL, so no worker outlives its cluster (Linux; elsewhere a no-op)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def describe_exit(code: int) -> str:
    """70 -> "70 (its engine died)", -9 -> "-9 (SIGKILL)"."""
    from worker.process import EXIT_ENGINE_DIED

    if code == EXIT_ENGINE_DIED:
        return f"{code} (its engine died)"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
