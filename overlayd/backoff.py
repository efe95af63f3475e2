"""Retry pacing shared by every part that talks to something that may be
away for a while (etcd, the MQTT broker)."""

from __future__ import annotations

import asyncio
import random


async def sleep_backoff(attempt: int, *, base: float = 0.2, cap: float = 5.0) -> None:
    """Exponential backoff with full jitter, so that hosts do not retry in step."""
    await asyncio.sleep(random.uniform(0, min(cap, base * 2**attempt)))
