"""`overlayd`: the per-host daemon. Flags use flannel's spelling where flannel
has one; `--config FILE` (TOML) holds the same settings; flags win over the
environment (OVERLAYD_<SETTING>), which wins over the file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from overlayd import __version__
from overlayd.cli.common import add_etcd_access_flags
from overlayd.config import (
    AGENT_SETTINGS,
    DEFAULT_BRIDGE,
    DEFAULT_CNI_DATA_DIR,
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_DNS_DOMAIN,
    DEFAULT_DOCKER_PLUGIN_SOCKET,
    DEFAULT_EGRESS,
    DEFAULT_FULL_RESYNC_SECONDS,
    DEFAULT_GWBRIDGE,
    DEFAULT_LEASE_TTL,
    DEFAULT_METRICS_ADDRESS,
    DEFAULT_MQTT_TOPIC,
    DEFAULT_OVERLAYD_PREFIX,
    DEFAULT_PREFIX,
    DEFAULT_RESYNC_SECONDS,
    DEFAULT_SUBNET_FILE,
    EGRESS_MODES,
    LOG_FORMATS,
    ON_OFF,
    VXLAN_FILTER_VALUES,
    AgentConfig,
    build_agent_config,
    read_toml,
)
from overlayd.daemon.agent import Agent
from overlayd.errors import OverlaydError
from overlayd.surfaces.logs import setup_logging

log = logging.getLogger("overlayd")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="overlayd",
        description="VXLAN overlay agent: leases this host's subnet from etcd and keeps "
        "the VTEP, routes, neighbour and FDB entries of every peer host in step.",
    )
    p.add_argument("--config", type=Path, help="TOML file with the settings below")
    add_etcd_access_flags(p)
    p.add_argument("--etcd-prefix", help=f"etcd key prefix (default {DEFAULT_PREFIX})")
    p.add_argument(
        "--overlayd-prefix",
        help=f"etcd key prefix of overlayd's own keys (default {DEFAULT_OVERLAYD_PREFIX})",
    )
    p.add_argument(
        "--iface",
        help="underlay interface, by name or address (default: the default route's interface)",
    )
    p.add_argument(
        "--public-ip", help="address peers send tunnel traffic to (default: the iface's)"
    )
    p.add_argument(
        "--public-ipv6",
        help="IPv6 address peers send IPv6 tunnel traffic to, in a dual-stack network"
        " (default: the iface's first global IPv6 address)",
    )
    p.add_argument(
        "--subnet-file", help=f"flannel-style subnet file (default {DEFAULT_SUBNET_FILE})"
    )
    p.add_argument("--bridge", help=f"container bridge name (default {DEFAULT_BRIDGE})")
    p.add_argument(
        "--lease-ttl",
        type=int,
        help=f"seconds a dead host's lease outlives it (default {DEFAULT_LEASE_TTL})",
    )
    p.add_argument(
        "--resync-seconds",
        type=float,
        help="period of the check of devices, sysctls and rules"
        f" (default {DEFAULT_RESYNC_SECONDS:g})",
    )
    p.add_argument(
        "--full-resync-seconds",
        type=float,
        help="period of the re-read of every kernel entry when nothing cast doubt on them"
        f" (default {DEFAULT_FULL_RESYNC_SECONDS:g})",
    )
    p.add_argument("--log-level", help="debug, info, warning or error (default info)")
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="one event per line, as key=value pairs or JSON (default kv)",
    )
    p.add_argument(
        "--control-socket",
        help=f"Unix socket for overlayctl, root only (default {DEFAULT_CONTROL_SOCKET})",
    )
    p.add_argument(
        "--metrics-address",
        help=f"IP:PORT for /metrics, /healthz, /readyz, or off (default {DEFAULT_METRICS_ADDRESS})",
    )
    p.add_argument(
        "--mqtt-url",
        help="publish status and events to this broker, mqtt://HOST[:PORT] (default off)",
    )
    p.add_argument("--mqtt-topic", help=f"MQTT topic prefix (default {DEFAULT_MQTT_TOPIC})")
    p.add_argument(
        "--egress",
        choices=EGRESS_MODES,
        help=f"how containers reach the outside world (default {DEFAULT_EGRESS})",
    )
    p.add_argument(
        "--gwbridge", help=f"egress bridge in gwbridge mode (default {DEFAULT_GWBRIDGE})"
    )
    p.add_argument(
        "--gwbridge-subnet",
        help="subnet of the egress bridge (default: the first of 172.18-31.0.0/16 that is free)",
    )
    p.add_argument(
        "--gwbridge-subnet6",
        help="IPv6 subnet of the egress bridge, when the network has IPv6 (default: the first"
        " free /64 of the ULA fd4a:4eae:8d08::/48)",
    )
    p.add_argument(
        "--vxlan-filter",
        choices=VXLAN_FILTER_VALUES,
        help="accept VXLAN only from current peers (default on); off for hosts whose"
        " firewall does it",
    )
    p.add_argument(
        "--docker-plugin",
        choices=ON_OFF,
        help="serve Docker's network and IPAM plugin (`docker network create -d overlayd"
        " --ipam-driver overlayd NAME`; default off)",
    )
    p.add_argument(
        "--docker-plugin-socket",
        help=f"the plugin's socket, where dockerd looks (default {DEFAULT_DOCKER_PLUGIN_SOCKET})",
    )
    p.add_argument(
        "--cni-data-dir",
        help="overlay-cni's dataDir: the Docker plugin takes addresses from its host-local"
        f" store (default {DEFAULT_CNI_DATA_DIR})",
    )
    p.add_argument(
        "--dns",
        choices=ON_OFF,
        help="answer service and container names (and forward the rest) on the bridge's"
        " gateway addresses, port 53, while the network config has a ServiceNetwork"
        " (default on)",
    )
    p.add_argument(
        "--dns-domain",
        help=f"the domain those names are under (default {DEFAULT_DNS_DOMAIN})",
    )
    p.add_argument(
        "--dns-upstreams",
        help="comma-separated nameservers other names are forwarded to (default: those of"
        " /etc/resolv.conf; empty: none)",
    )
    p.add_argument(
        "--teardown",
        action="store_true",
        help="remove everything overlayd created on this host (devices, rules, subnet file,"
        " lease) and exit; a plain stop leaves the data plane in place",
    )
    p.add_argument("--version", action="version", version=f"overlayd {__version__}")
    return p


def load_settings(argv: list[str] | None = None) -> AgentConfig:
    args = parser().parse_args(argv)
    flags = {name: getattr(args, name.replace("-", "_")) for name in AGENT_SETTINGS}
    file = read_toml(args.config) if args.config else None
    return build_agent_config(flags=flags, file=file)


async def _teardown(settings: AgentConfig) -> None:
    agent = Agent(settings)
    try:
        for what in await agent.teardown():
            log.info("event=teardown what=%r", what)
            print(what)
    finally:
        await agent.close()


async def _serve(settings: AgentConfig) -> None:
    agent = Agent(settings)
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await agent.run()
    except asyncio.CancelledError:
        agent.notifier.stopping()
        log.info("event=stopping data_plane=kept")
    finally:
        with contextlib.suppress(Exception):
            await agent.close()


def _overlayd_errors(exc: BaseException) -> list[OverlaydError]:
    """The user-facing errors in an exception or a TaskGroup's group of them."""
    if isinstance(exc, OverlaydError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        return [e for sub in exc.exceptions for e in _overlayd_errors(sub)]
    return []


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        teardown = parser().parse_args(argv).teardown
    except OverlaydError as exc:
        print(f"overlayd: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(_teardown(settings) if teardown else _serve(settings))
    except (OverlaydError, ExceptionGroup) as exc:
        fatal = _overlayd_errors(exc)
        if not fatal:
            raise
        for error in fatal:
            log.error("event=fatal error=%r", str(error))
            print(f"overlayd: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
