"""The MQTT event stream (optional): a retained status message per host, a
last will that marks the host offline when its daemon dies, and one message
per event (lease acquired, renewed, lost; peer added, changed, removed;
drift repaired).

Topics, with PREFIX = the mqtt-topic setting and HOST = the host's public IP:

    PREFIX/HOST/status   retained  {"host", "online", "reason", "subnet", ...}
    PREFIX/HOST/events             {"event", "host", "ts", ...event fields}

The daemon never waits for the broker: events go into a bounded queue that
a separate task drains (dropping the oldest and counting the drops when the
broker is out of reach), and that task reconnects with jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from overlayd.backoff import sleep_backoff
from overlayd.surfaces.telemetry import Telemetry

log = logging.getLogger(__name__)

DEFAULT_PORT = 1883
QUEUE_MAX = 1000
KEEPALIVE_SECONDS = 15  # how soon the broker notices a silent death
STATUS_REFRESH_SECONDS = 60.0


def broker_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None  # validated in config
    return parts.hostname, parts.port or DEFAULT_PORT


def status_topic(prefix: str, host: str) -> str:
    return f"{prefix}/{host}/status"


def events_topic(prefix: str, host: str) -> str:
    return f"{prefix}/{host}/events"


class MqttPublisher:
    def __init__(self, url: str, prefix: str, host: str, telemetry: Telemetry) -> None:
        self._address = broker_address(url)
        self._prefix = prefix
        self.host = host
        self._telemetry = telemetry
        self._queue: deque[dict[str, Any]] = deque()
        self._wakeup = asyncio.Event()
        self.connected = False
        telemetry.listeners.append(self.on_event)

    def on_event(self, kind: str, payload: dict[str, Any]) -> None:
        """Called by the daemon; never blocks."""
        if len(self._queue) >= QUEUE_MAX:
            self._queue.popleft()
            self._telemetry.m_mqtt_dropped.inc()
        self._queue.append({"event": kind, "host": self.host, "ts": time.time(), **payload})
        self._wakeup.set()

    def _will(self) -> bytes:
        """Fixed when the connection is made, so it says only what stays true."""
        return json.dumps(
            {"host": self.host, "online": False, "reason": "connection lost", "ready": False}
        ).encode()

    def _status(self, *, online: bool, reason: str) -> bytes:
        t = self._telemetry
        lease = t.lease
        ready, _ = t.ready()
        return json.dumps(
            {
                "host": self.host,
                "online": online,
                "reason": reason,
                "ts": time.time(),
                "subnet": str(lease.subnet) if lease else None,
                "public_ip": str(lease.public_ip) if lease else None,
                "vtep_mac": lease.vtep_mac if lease else None,
                "peers": len(t.peers),
                "ready": ready and online,
            }
        ).encode()

    async def run(self) -> None:
        host, port = self._address
        attempt = 0
        while True:
            will = aiomqtt.Will(
                status_topic(self._prefix, self.host),
                self._will(),
                qos=1,
                retain=True,
            )
            try:
                async with aiomqtt.Client(
                    host,
                    port,
                    identifier=f"overlayd-{self.host}",
                    will=will,
                    keepalive=KEEPALIVE_SECONDS,
                    timeout=5,
                ) as client:
                    self.connected = True
                    log.info("event=mqtt_connected broker=%s:%d", host, port)
                    attempt = 0
                    try:
                        await self._publish_loop(client)
                    except asyncio.CancelledError:
                        with contextlib.suppress(Exception):
                            async with asyncio.timeout(2):
                                await self._publish_status(client, online=False, reason="stopped")
                        raise
            except aiomqtt.MqttError as exc:
                if self.connected or attempt == 0:
                    log.warning(
                        "event=mqtt_unavailable broker=%s:%d error=%r queued=%d",
                        host,
                        port,
                        str(exc),
                        len(self._queue),
                    )
            finally:
                self.connected = False
            await sleep_backoff(attempt, base=0.5, cap=30.0)
            attempt += 1

    async def _publish_status(self, client: aiomqtt.Client, *, online: bool, reason: str) -> None:
        await client.publish(
            status_topic(self._prefix, self.host),
            self._status(online=online, reason=reason),
            qos=1,
            retain=True,
        )

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        topic = events_topic(self._prefix, self.host)
        await self._publish_status(client, online=True, reason="running")
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STATUS_REFRESH_SECONDS):
                    await self._wakeup.wait()
            self._wakeup.clear()
            sent = 0
            while self._queue:
                # Removed only once the broker took it: a broken connection
                # keeps the event for the next one.
                await client.publish(topic, json.dumps(self._queue[0]).encode(), qos=1)
                self._queue.popleft()
                sent += 1
            await self._publish_status(client, online=True, reason="running")
