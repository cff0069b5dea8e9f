"""Fixtures that several modules of tests/deploy read: the manifests', the
scaling config's and the dashboard's files, loaded once per module, and the
series the processes export."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deploy.config import ClusterConfig, load_config
from tests.dashboard import DASHBOARD, Dashboard
from tests.dashboard_series import Exported, exported_series
from tests.manifests import GPU_EXAMPLE, GRPC, load_docs


@pytest.fixture(scope="module")
def grpc_docs() -> list[dict[str, Any]]:
    return load_docs(GRPC)


@pytest.fixture(scope="module")
def gpu_config() -> ClusterConfig:
    return load_config(GPU_EXAMPLE)


@pytest.fixture(scope="module")
def exported() -> Exported:
    return exported_series()


@pytest.fixture(scope="module")
def dashboard() -> Dashboard:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict), "the dashboard is a JSON object"
    return loaded
