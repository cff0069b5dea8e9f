"""The folders' arrows (docs/architecture.md), read from every import
statement in the product, and the router's freedom from torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "modelmaker",
    "engine",
    "worker",
    "prefill_worker",
    "decode_worker",
    "kvtransfer",
    "router",
    "protos",
    "deploy",
    "bench",
)
# package -> the packages of ours it must never import
FORBIDDEN = {
    "protos": set(PACKAGES) - {"protos"},
    "modelmaker": set(PACKAGES) - {"modelmaker"},
    # The engine's only use of modelmaker: building the default model when none is named.
    "engine": set(PACKAGES) - {"engine", "modelmaker"},
    "worker": {"prefill_worker", "decode_worker", "router", "deploy", "bench"},
    "prefill_worker": {"decode_worker", "router", "deploy", "bench"},
    "decode_worker": {"prefill_worker", "router", "deploy", "bench"},
    "kvtransfer": {"worker", "prefill_worker", "decode_worker", "router", "deploy", "bench"},
    # modelmaker imports torch, which the router must not.
    "router": {"modelmaker", "prefill_worker", "decode_worker", "deploy", "bench"},
    "deploy": {"bench"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    """Top-level packages of ours that each module of `package` imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if "_pb2" in path.name:
            continue  # generated
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in PACKAGES and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_arrows_point_one_way(package):
    wrong = {dep: files for dep, files in imports_of(package).items() if dep in FORBIDDEN[package]}
    assert not wrong, f"{package} must not import {sorted(wrong)}: {wrong}"


def test_the_scan_sees_imports():
    # The scan itself: the workers do import the engine (else the test above proves nothing).
    assert "engine" in imports_of("decode_worker")
    assert "protos" in imports_of("router")


def test_importing_the_router_does_not_import_torch():
    code = (
        "import sys, router.server, router.__main__, router.endpoints, router.dispatch\n"
        "heavy = [m for m in ('torch', 'engine.llm', 'kvtransfer.base') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "", f"the router imported {out.stdout.strip()}"
