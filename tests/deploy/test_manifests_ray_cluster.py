"""deploy/ray/cluster.yaml, the Ray cluster launcher file: valid against
Ray's own schema, a CPU head and GPU workers, the dashboard on the head's
loopback only, splitserve and a pinned torch on every node, and usage
comments whose `splitserve up` config fits the nodes."""

from __future__ import annotations

import json
import shlex
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from deploy.config import load_config
from tests.manifests import CLUSTER, LOOPBACK, ROOT, load_docs, most_replicas, nodes_needed


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    (doc,) = load_docs(CLUSTER)
    return doc


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
    needed, misfits = nodes_needed(
        config, best["resources"]["CPU"], best["resources"]["GPU"], most_replicas
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
