"""Where the app caches what it downloads or converts: ``$FLATLORA_CACHE``, else ``<repo>/.cache``."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ENV = "FLATLORA_CACHE"


def cache_root() -> Path:
    """Root of the project's cache: ``$FLATLORA_CACHE`` if set, else ``<repo>/.cache``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / ".cache"
