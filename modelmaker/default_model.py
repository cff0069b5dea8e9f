"""The default model: built once into a per-user cache, then reused."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from modelmaker.model import make_model
from modelmaker.special_tokens import CHAT_TEMPLATE

logger = logging.getLogger("splitserve")

DEFAULT_PRESET = "small"
DEFAULT_ARCH = "llama"
DEFAULT_SEED = 0


def default_model_dir() -> Path:
    """Where the default model lives: $SPLITSERVE_CACHE or ~/.cache/splitserve."""
    root = os.environ.get("SPLITSERVE_CACHE") or Path.home() / ".cache" / "splitserve"
    return Path(root) / "models" / f"{DEFAULT_PRESET}-{DEFAULT_ARCH}-seed{DEFAULT_SEED}"


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def ensure_default_model() -> Path:
    """Return the default model directory, building it on first use.

    The model is written to a temp dir beside the target and renamed into place, so a crash
    mid-write never leaves a half model where loaders look, and concurrent builders race safely.
    """
    path = default_model_dir()
    if _is_complete(path):
        _refresh_chat_template(path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        # Not produced by the rename below (that only moves finished models): discard it.
        logger.warning("removing incomplete model directory %s", path)
        shutil.rmtree(path)
    logger.info("building default model (%s/%s) at %s", DEFAULT_PRESET, DEFAULT_ARCH, path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        make_model(tmp, preset=DEFAULT_PRESET, arch=DEFAULT_ARCH, seed=DEFAULT_SEED)
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process finished first; its model is identical, so keep it.
            if not _is_complete(path):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _refresh_chat_template(path: Path) -> None:
    """A model built by an earlier version keeps its weights (the same seed
    gives the same ones) but gets today's chat template (tools came later)."""
    template = path / "chat_template.jinja"
    if template.is_file() and template.read_text() != CHAT_TEMPLATE:
        logger.info("updating the chat template of %s", path)
        tmp = template.with_suffix(".jinja.tmp")
        tmp.write_text(CHAT_TEMPLATE)
        os.replace(tmp, template)
