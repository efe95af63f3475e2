"""`overlayctl events`: every host's MQTT status and event stream, live."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import aiomqtt

from overlayd.cli.common import settings_from
from overlayd.errors import ConfigError, OverlaydError
from overlayd.surfaces.mqtt import broker_address


def render_event(topic: str, payload: dict[str, Any]) -> str:
    """One line per message: time, host, what, and the rest as key=value."""
    stamp = time.strftime("%H:%M:%S", time.localtime(payload.get("ts", time.time())))
    host = payload.get("host", topic.split("/")[-2])
    if topic.endswith("/status"):
        what = "online" if payload.get("online") else f"OFFLINE ({payload.get('reason')})"
        rest = {k: payload.get(k) for k in ("subnet", "peers", "ready")}
        kind = f"status {what}"
    else:
        kind = str(payload.get("event"))
        rest = {k: v for k, v in payload.items() if k not in ("event", "host", "ts")}
    fields = " ".join(f"{k}={v}" for k, v in rest.items() if v is not None)
    return f"{stamp}  {host:<15}  {kind:<16}  {fields}".rstrip()


async def _events(url: str, prefix: str, count: int | None, as_json: bool) -> int:
    host, port = broker_address(url)
    seen = 0
    async with aiomqtt.Client(host, port, timeout=5) as client:
        await client.subscribe(f"{prefix}/+/status", qos=1)
        await client.subscribe(f"{prefix}/+/events", qos=1)
        async for message in client.messages:
            try:
                payload = json.loads(bytes(message.payload))
            except (TypeError, ValueError):
                continue
            topic = str(message.topic)
            if as_json:
                print(json.dumps({"topic": topic, **payload}), flush=True)
            else:
                print(render_event(topic, payload), flush=True)
            seen += 1
            if count is not None and seen >= count:
                break
    return seen


def cmd_events(args: argparse.Namespace) -> int:
    s = settings_from(args)
    url = args.mqtt_url or s.mqtt_url
    if url is None:
        raise ConfigError("mqtt-url", "no broker: pass --mqtt-url or set it in the config")
    try:
        asyncio.run(_events(url, s.mqtt_topic, args.count, args.json))
    except aiomqtt.MqttError as exc:
        raise OverlaydError(f"MQTT broker {url}: {exc}") from exc
    except KeyboardInterrupt:
        pass
    return 0
