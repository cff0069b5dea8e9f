from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests.models import ARCH_VARIANTS
from tests.security_kit import Pki, make_pki

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
logging.getLogger("splitserve").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    from modelmaker import make_model

    root = tmp_path_factory.mktemp("models")
    return {
        name: make_model(root / name, preset="tiny", **spec) for name, spec in ARCH_VARIANTS.items()
    }


@pytest.fixture(scope="session")
def tiny_llama(model_dirs) -> Path:
    return model_dirs["llama3"]


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


LANES = ("unit", "e2e", "deploy", "gpu")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked with its lane, the folder it lives in: `-m unit`
    runs what needs no process of ours, `-m e2e` the local clusters, `-m
    deploy` Ray, the manifests and the dashboard, `-m gpu` the engine on CUDA
    (skipped, with the reason, where there is none)."""
    for item in items:
        lane = Path(item.fspath).parent.name
        assert lane in LANES, f"{item.nodeid}: tests live in tests/{{{','.join(LANES)}}}"
        item.add_marker(getattr(pytest.mark, lane))
