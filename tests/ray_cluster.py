"""`splitserve up` as a child process, for the deploy tests: RayUp starts it
with a config, reads its pools, and stops only what it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import yaml

from engine import LLM, SamplingParams
from tests.cluster import free_port
from tests.procs import alive, descendants

DECODE_DOWNSCALE_DELAY_S = 6.0


EXAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "examples"


def example_config(name: str, model: Path) -> dict:
    """A shipped example config on the test model, in float32 (greedy output
    compared exactly)."""
    config = yaml.safe_load((EXAMPLES / name).read_text())
    config["model"] = str(model)
    for pool in config["pools"].values():
        pool.setdefault("engine", {})["dtype"] = "float32"
    return config


def _config(model: Path, port: int) -> dict:
    """ray-laptop.yaml (KV through the object store) as shipped but for sizes
    and timings the autoscaling tests need: small KV caches and low targets a
    test load crosses, delays of seconds, one thread per replica, and a decode
    pool that starts at 2 replicas."""
    config = example_config("ray-laptop.yaml", model)
    config["router"]["port"] = port
    sizes = {
        "prefill": dict(kv_mib=16, target=256, down_s=5.0),
        "decode": dict(kv_mib=128, target=0.9, down_s=DECODE_DOWNSCALE_DELAY_S),
    }
    for name, s in sizes.items():
        pool = config["pools"][name]
        pool["engine"].update(kv_cache_mib=s["kv_mib"], max_num_batched_tokens=1024, threads=1)
        pool["autoscaling"].update(
            target=s["target"], upscale_delay_s=0.5, downscale_delay_s=s["down_s"]
        )
        pool["drain_timeout_s"] = 90
    config["pools"]["decode"]["replicas"] = 2
    return config


class RayUp:
    """A `splitserve up` child process and what it started."""

    def __init__(
        self, tmp: Path, model: Path, config: dict | None = None, address: str | None = None
    ) -> None:
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp / "ray.yaml"
        config = config if config is not None else _config(model, self.port)
        config["router"]["port"] = self.port
        self.config_path.write_text(yaml.safe_dump(config))
        self.state_file = tmp / "up.json"
        self.log_path = tmp / "up.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "deploy.cli", "up", "--config", str(self.config_path)]
        cmd += ["--state-file", str(self.state_file)]
        cmd += ["--address", address] if address else ["--num-cpus", "2"]
        # Ray keeps values under 100 KiB out of the object store, and the
        # tiny model's KV is smaller than that: lower the bar to 32 KiB so the
        # burst's KV (~77 KiB per layer) takes the path a real model's does,
        # while Ray's and Serve's own small messages stay as they are.
        env = {**os.environ, "RAY_max_direct_call_object_size": str(32 << 10)}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.pids: set[int] = set()
        deadline = time.monotonic() + 300
        while "pools:" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"splitserve up did not come up:\n{self.log()[-4000:]}")
            time.sleep(0.3)
        self.record_pids()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def record_pids(self) -> None:
        self.pids |= descendants(self.proc.pid)

    def pools(self) -> dict[str, list[dict]]:
        workers = httpx.get(f"{self.url}/cluster", timeout=10).json()["workers"]
        out: dict[str, list[dict]] = {"prefill": [], "decode": []}
        for w in workers:
            out.setdefault(w["role"], []).append(w)
        return out

    def down(self) -> int:
        cmd = [sys.executable, "-m", "deploy.cli", "down", "--state-file", str(self.state_file)]
        return subprocess.run(cmd, capture_output=True, timeout=240).returncode

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.down()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.pids:  # only what this cluster started
            if alive(pid):
                with_kill(pid)
        self._log.close()


def with_kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def assert_greedy_equals_offline(ray_up: RayUp) -> dict:
    """Completions, plain and streamed, equal the offline engine's; returns
    the splitserve_timings of one more request."""
    client = openai.OpenAI(base_url=f"{ray_up.url}/v1", api_key="unused", max_retries=0)
    model_name = client.models.list().data[0].id
    prompts = ["The quick brown fox", "Once upon a time", "a b c d e f g h i j k l m n o p"]
    llm = LLM(str(ray_up.model), dtype="float32", kv_cache_bytes=8 << 20)
    expected = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False
    )
    for prompt, ref in zip(prompts, expected, strict=True):
        out = client.completions.create(
            model=model_name,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert out.choices[0].text == ref.text
        # Streaming gives the same text, chunk by chunk.
        chunks = client.completions.create(
            model=model_name,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    timings: dict = httpx.post(
        f"{ray_up.url}/v1/completions",
        json={"prompt": prompts[0], "max_tokens": 4, "temperature": 0},
        timeout=60,
    ).json()["splitserve_timings"]
    assert timings["kv_transfer_bytes"] > 0  # the prompt's KV came from the prefill pool
    return timings


def assert_served_greedy_by_its_prefill_pool(cluster: RayUp) -> None:
    timings = assert_greedy_equals_offline(cluster)
    # The answer names the prefill worker that computed the prompt.
    prefill = [w["address"] for w in cluster.pools()["prefill"]]
    assert timings["prefill_worker"] in prefill, (timings, prefill)
