"""The Ray Serve application's ingress: the same FastAPI router as
`splitserve serve`, behind Serve's HTTP proxy, finding the workers in the
Directory at every poll."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deploy.config import ClusterConfig
from deploy.ray_replicas import wait_uncancelled


@serve.ingress()
class RouterIngress:
    """The HTTP API; finds the workers in the Directory at every poll."""

    def __init__(
        self, config: ClusterConfig, directory: DeploymentHandle, pools: list[DeploymentHandle]
    ) -> None:
        self.config = config
        self.directory = directory
        self.pools = pools  # held only so the pools belong to this application

    async def _discover(self) -> tuple[list[str], list[str]]:
        workers = await wait_uncancelled(self.directory.workers.remote(), 2.0)
        decode = sorted(a for a, role in workers.items() if role in ("decode", "colocated"))
        prefill = sorted(a for a, role in workers.items() if role == "prefill")
        return decode, prefill

    def __serve_build_asgi_app__(self) -> Any:
        from kvtransfer.security import ClusterSecurity
        from router.server import RouterConfig, build_app

        model = self.config.model_path
        if model is None:
            from modelmaker import ensure_default_model

            model = str(ensure_default_model())
        return build_app(
            RouterConfig(
                model=model,
                api_key=self.config.router.resolved_api_key,
                policy=self.config.router.policy,
                request_timeout_s=self.config.router.request_timeout_s,
                migration_limit=self.config.router.migration_limit,
                local_prefill_threshold=self.config.router.local_prefill_threshold,
                tool_call_parser=self.config.router.tool_call_parser,
                max_model_len=_max_model_len(self.config),
                discover=self._discover,
                security=ClusterSecurity.from_env(),
            )
        )


def _max_model_len(config: ClusterConfig) -> int | None:
    pools = [p for p in (config.pools.prefill, config.pools.decode, config.pools.colocated) if p]
    lengths = [p.engine.max_model_len for p in pools if p.engine.max_model_len is not None]
    return min(lengths) if lengths else None
