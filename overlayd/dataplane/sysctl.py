"""The kernel settings overlayd needs in its network namespace."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc/sys/net/ipv4")


def _set(path: Path, value: str) -> bool:
    """Write the value if it differs; True when something changed."""
    if path.read_text().strip() == value:
        return False
    path.write_text(value + "\n")
    return True


def ensure_forwarding_and_redirects(bridge: str) -> list[str]:
    """IPv4 forwarding on (hosts route between bridge and tunnel); ICMP
    redirects off for the bridge, where containers and the tunnel share one
    link and a redirect would send a container to a next hop it cannot use.
    The kernel sends redirects if either `all` or the device says so, so
    both are cleared."""
    changed = []
    if _set(PROC / "ip_forward", "1"):
        changed.append("enabled IPv4 forwarding (net.ipv4.ip_forward=1)")
    for scope in ("all", bridge):
        path = PROC / "conf" / scope / "send_redirects"
        if path.exists() and _set(path, "0"):
            changed.append(f"disabled ICMP redirects (net.ipv4.conf.{scope}.send_redirects=0)")
    return changed
