"""Running programs on a host the way a container runtime does: inside a
named network namespace (`ip netns exec`), and CNI plugins with their config
on stdin and CNI_* in the environment; plus reading ping's summary.

Shared by overlay-cni (which calls the standard plugins), `overlayctl check`
(which attaches a probe and pings from it) and the lab (which attaches its
containers and pings between them), so that none of them imports another's
entry point. Imports nothing of overlayd.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any


def netns_argv(ns: str, *argv: str) -> list[str]:
    """The command line that runs `argv` inside the named namespace."""
    return ["ip", "netns", "exec", ns, *argv]


def ping_rtt_ms(output: str) -> float | None:
    """The average round trip in ms from ping's summary line
    ("rtt min/avg/max/mdev = 0.05/0.07/0.09/0.01 ms"); None when no reply
    came back and ping printed no such line."""
    for line in output.splitlines():
        if "min/avg/max" in line:
            return float(line.split("=")[1].split("/")[1])
    return None


def call_plugin(
    argv: Sequence[str], conf: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[bool, dict[str, Any] | None, str]:
    """Run a CNI plugin as a runtime does: config on stdin, CNI_* in the
    environment. Returns (succeeded, the parsed result or error, raw text)."""
    proc = subprocess.run(
        list(argv),
        input=json.dumps(conf).encode(),
        capture_output=True,
        env=dict(env),
        timeout=60,
        check=False,
    )
    out = proc.stdout.decode().strip()
    try:
        parsed = json.loads(out) if out else None
    except ValueError:
        parsed = None
    return proc.returncode == 0, parsed, out or proc.stderr.decode().strip()


def runtime_env(
    command: str, netns_name: str, cni_path: str, base: Mapping[str, str]
) -> dict[str, str]:
    """The variables a runtime sets for a container whose network namespace
    is the named one in /run/netns (and whose ID is that name)."""
    return {
        **base,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": netns_name,
        "CNI_NETNS": f"/run/netns/{netns_name}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": cni_path,
    }
