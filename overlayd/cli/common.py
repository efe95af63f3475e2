"""What every `overlayctl` command module shares: the daemon's settings,
read the way the daemon reads them, and the table and JSON output."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from overlayd.config import AGENT_SETTINGS, AgentConfig, build_agent_config, read_toml

DEFAULT_CONFIG_FILE = Path("/etc/overlayd/overlayd.toml")


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def add_etcd_access_flags(p: argparse.ArgumentParser) -> None:
    """How to reach etcd, in flannel's spelling; overlayd and overlayctl share them."""
    p.add_argument(
        "--etcd-endpoints",
        help="comma-separated etcd URLs, http(s)://IP:PORT or unix:///PATH"
        " (default http://127.0.0.1:2379)",
    )
    p.add_argument("--etcd-cafile", help="CA certificate(s) that sign etcd's server certificate")
    p.add_argument("--etcd-certfile", help="client certificate for mutual TLS with etcd")
    p.add_argument("--etcd-keyfile", help="the client certificate's private key")
    p.add_argument("--etcd-username", help="etcd user (when etcd authentication is on)")
    p.add_argument(
        "--etcd-password",
        help="the etcd user's password (visible in ps: prefer --etcd-password-file)",
    )
    p.add_argument("--etcd-password-file", help="file holding the etcd user's password")


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    """The daemon's settings that overlayctl needs, read the way the daemon
    reads them: flags, then OVERLAYD_* variables, then the config file."""
    p.add_argument(
        "--config",
        type=Path,
        help=f"the daemon's TOML settings (default {DEFAULT_CONFIG_FILE} if it exists)",
    )
    add_etcd_access_flags(p)
    p.add_argument("--etcd-prefix", help="etcd key prefix")
    p.add_argument(
        "--overlayd-prefix",
        help="overlayd's own etcd prefix (endpoints, policies, status; default /overlayd)",
    )
    p.add_argument("--control-socket", help="the daemon's control socket")
    p.add_argument("--subnet-file", help="the daemon's subnet file")
    p.add_argument("--iface", help="the daemon's underlay interface (name or address)")
    p.add_argument("--bridge", help="the daemon's container bridge")


def settings_from(args: argparse.Namespace) -> AgentConfig:
    flags = {
        name: getattr(args, name.replace("-", "_"), None)
        for name in AGENT_SETTINGS
        if hasattr(args, name.replace("-", "_"))
    }
    path = args.config
    if path is None and DEFAULT_CONFIG_FILE.exists():
        path = DEFAULT_CONFIG_FILE
    return build_agent_config(flags=flags, file=read_toml(path) if path else None)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
