"""The `splitserve` command line, run as a subprocess the way a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    env = dict(os.environ)
    env.update(
        SPLITSERVE_CACHE=str(root / "cache"),
        HOME=str(root / "home"),  # anything written to ~/.cache would land here
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    env.pop("CC", None)
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def model_dir(cli_env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_model") / "tiny"
    proc = run_cli(cli_env, "make-model", str(out), "--preset", "tiny")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"wrote tiny llama model to {out}" in proc.stdout
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    return out


def test_generate_prints_completion_and_throughput(cli_env, model_dir):
    # `--kv-cache-mib 8`: the default 512 MiB takes seconds just to zero.
    proc = run_cli(
        cli_env,
        "generate",
        "--model",
        str(model_dir),
        "hello world",
        "--max-tokens",
        "8",
        "--kv-cache-mib",
        "8",
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "--- prompt: 'hello world'" in out
    m = re.search(r"^--- (\d+) tokens, finish_reason=(\w+), ttft=\d+ ms$", out, re.M)
    assert m, out
    assert int(m.group(1)) <= 8 and m.group(2) in ("length", "stop")
    if m.group(2) == "length":
        assert int(m.group(1)) == 8
    assert re.search(r"^\d+ tokens in \d+\.\d+s \(\d+ tok/s\)$", out, re.M), out

    # The completion is the engine's, in the dtype the CLI's default (auto) picks here.
    from engine import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="auto", kv_cache_bytes=2**20)
    want = llm.generate(
        "hello world", SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False
    )[0]
    assert f"--- prompt: 'hello world'\n{want.text}\n--- {len(want.token_ids)} tokens" in out

    # Caches went where SPLITSERVE_CACHE points, never under the home directory.
    from engine import cpu_kernels

    if cpu_kernels.available():
        assert list((Path(cli_env["SPLITSERVE_CACHE"]) / "kernels").glob("*.so"))
    assert not (Path(cli_env["HOME"]) / ".cache" / "splitserve").exists()


@pytest.mark.parametrize(
    "sub, options",
    [
        (None, ["make-model", "generate", "--verbose"]),
        ("make-model", ["--preset", "tiny", "small", "--arch", "--seed"]),
        (
            "generate",
            [
                "--model",
                "--max-tokens",
                "--temperature",
                "--top-p",
                "--top-k",
                "--seed",
                "--stop",
                "--ignore-eos",
                "--dtype",
                "--kv-cache-mib",
                "--max-num-seqs",
                "--max-num-batched-tokens",
            ],
        ),
    ],
)
def test_help(cli_env, sub, options):
    proc = run_cli(cli_env, *([sub] if sub else []), "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: splitserve")
    for opt in options:
        assert opt in proc.stdout, opt


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("splitserve generate: error:"), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_model_directory_is_a_clean_error(cli_env):
    proc = run_cli(cli_env, "generate", "--model", "/nonexistent", "x")
    assert_one_line_error(proc, "/nonexistent", "config.json")


def test_bad_max_tokens_is_a_clean_error(cli_env, model_dir):
    proc = run_cli(cli_env, "generate", "--model", str(model_dir), "x", "--max-tokens", "0")
    assert_one_line_error(proc, "max_tokens", "0")


def test_usage_errors_exit_2(cli_env):
    proc = run_cli(cli_env, "generate", "--model", "/m", timeout=60)  # no prompt
    assert proc.returncode == 2 and "usage:" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(cli_env, "make-model", "/tmp/x", "--preset", "huge", timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_serve_help_and_bad_arguments():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "serve", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "--colocated" in r.stdout and "--prefill" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "serve", "--prefill", "0", "--model", "/nonexistent"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "prefill" in r.stderr


def test_worker_with_a_missing_model_fails_cleanly(tmp_path):
    import subprocess
    import sys

    for module in ("prefill_worker", "decode_worker"):
        r = subprocess.run(
            [sys.executable, "-m", module, "--model", str(tmp_path / "nope")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and "nope" in r.stderr


def test_serve_on_a_taken_port_fails_before_starting_workers(cli_env, model_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli(
            cli_env, "serve", "--model", str(model_dir), "--colocated", "1", "--port", str(port)
        )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "started colocated-0" not in proc.stderr + proc.stdout  # no worker was started


def test_serve_answers_as_soon_as_it_says_it_is_up(cli_env, model_dir):
    """The banner's curl works the moment the banner appears."""
    import signal
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "deploy.cli", "serve", "--model", str(model_dir)]
    cmd += ["--colocated", "1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends (EOF) if serve dies
            if line.startswith("splitserve is up:"):
                break
        else:
            pytest.fail(f"serve exited with {proc.wait()} before saying it was up")
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=60)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
