"""The `openai` client of a test cluster."""

from __future__ import annotations

import openai

from tests.cluster import ServeCluster


def client(cluster: ServeCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)


def model_name(cluster: ServeCluster) -> str:
    return client(cluster).models.list().data[0].id
