"""The HTTP front door: an OpenAI-compatible API over the decode workers.

It tokenizes and validates requests, picks a decode worker (and ranks the
prefill workers it should ask), streams the tokens back as text, retries
requests that a worker could not take, and reports health, metrics and the
cluster's state. `python -m router --help` runs it.
"""

from __future__ import annotations

from router.server import RouterConfig, build_app, serve

__all__ = ["RouterConfig", "build_app", "serve"]
