"""Is the Hugging Face hub reachable? Asked once, in a few seconds at most, before any hub download.

huggingface_hub retries an unreachable host for about a minute; a user with no network should
instead get one clear line at once.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


def offline_mode() -> bool:
    """HF_HUB_OFFLINE=1: the user asked for cached files only."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
