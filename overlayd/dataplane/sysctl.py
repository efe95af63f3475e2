"""The kernel settings overlayd needs in its network namespace.

Async throughout: for another namespace the values go through `ip netns
exec ... sysctl` processes, which must not block the event loop."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from overlayd.dataplane.command import run
from overlayd.errors import OverlaydError
from overlayd.model import IPV4, Family

log = logging.getLogger(__name__)

PROC = Path("/proc/sys/net/ipv4")


class _CommandFailed(Exception):
    pass


async def _sysctl(netns: str, *args: str) -> str:
    code, out, err = await run(["ip", "netns", "exec", netns, "sysctl", *args])
    if code != 0:
        raise _CommandFailed(err.decode(errors="replace").strip())
    return out.decode().strip()


def _swap_proc(path: Path, value: str) -> bool:
    # procfs reads and writes are kernel memory operations, not disk I/O:
    # they do not block the loop the way a process start does.
    if path.read_text().strip() == value:
        return False
    path.write_text(value + "\n")
    return True


async def _set(path: Path, value: str, netns: str | None) -> bool:
    """Write the value if it differs; True when something changed.

    /proc/sys/net shows the namespace of the process that reads it, so for
    another namespace the write goes through `ip netns exec ... sysctl`.
    """
    if netns is None:
        return _swap_proc(path, value)
    key = ".".join(path.relative_to("/proc/sys").parts)
    if await _sysctl(netns, "-n", key) == value:
        return False
    await _sysctl(netns, "-q", "-w", f"{key}={value}")
    return True


async def ensure_forwarding_and_redirects(bridge: str, *, netns: str | None = None) -> list[str]:
    """IPv4 forwarding on (hosts route between bridge and tunnel); ICMP
    redirects off for the bridge, where containers and the tunnel share one
    link and a redirect would send a container to a next hop it cannot use.
    The kernel sends redirects if either `all` or the device says so, so
    both are cleared."""
    changed = []
    if await _set(PROC / "ip_forward", "1", netns):
        changed.append("enabled IPv4 forwarding (net.ipv4.ip_forward=1)")
    for scope in ("all", bridge):
        path = PROC / "conf" / scope / "send_redirects"
        if await _set(path, "0", netns):
            changed.append(f"disabled ICMP redirects (net.ipv4.conf.{scope}.send_redirects=0)")
    return changed


BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
# The same for IPv6, which has its own switch.
BRIDGE_NF6 = Path("/proc/sys/net/bridge/bridge-nf-call-ip6tables")


async def ensure_bridge_netfilter(
    families: Sequence[Family] = (IPV4,), *, netns: str | None = None
) -> list[str]:
    """Bridged frames of each family must pass that family's forward hook,
    or the rule that stops containers talking to each other through the
    gwbridge never sees them. The settings exist only while br_netfilter
    is loaded."""
    changed = []
    for family in families:
        path = BRIDGE_NF6 if family.version == 6 else BRIDGE_NF
        key = f"net.bridge.{path.name}"
        try:
            if await _set(path, "1", netns):
                changed.append(f"enabled {key}=1 (gwbridge isolation)")
        except (FileNotFoundError, _CommandFailed) as exc:
            raise SysctlError(
                f"{key} is missing: load br_netfilter"
                " (modprobe br_netfilter) so that the gwbridge can isolate containers"
            ) from exc
    return changed


class SysctlError(OverlaydError):
    pass
