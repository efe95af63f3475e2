"""systemd's notify protocol: READY=1 once the first reconcile succeeded,
STATUS= lines, and WATCHDOG=1 while the daemon's loops are healthy, so that
systemd restarts a daemon that hangs as well as one that dies. sdnotify
does the socket work and does nothing when NOTIFY_SOCKET is not set."""

from __future__ import annotations

import asyncio
import logging
import os

import sdnotify

from overlayd.surfaces.telemetry import Telemetry

log = logging.getLogger(__name__)


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Half of systemd's WatchdogSec, as sd_watchdog_enabled() advises; None
    when no watchdog is asked for (or it is meant for another process)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 1e6 / 2)
    except ValueError:
        return None


class Notifier:
    def __init__(self) -> None:
        self._notifier = sdnotify.SystemdNotifier()

    def ready(self, status: str) -> None:
        self._notifier.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._notifier.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self._notifier.notify("STOPPING=1")

    async def feed_watchdog(self, telemetry: Telemetry) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        log.info("event=watchdog interval=%.1f", interval)
        while True:
            healthy, why = telemetry.healthy()
            if healthy:
                self._notifier.notify("WATCHDOG=1")
            else:
                # Starving the watchdog is the point: systemd restarts us.
                log.error("event=watchdog_starved reason=%r", why)
            await asyncio.sleep(interval)
