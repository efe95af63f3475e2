"""The kernel settings overlayd needs in its network namespace.

Async throughout: for another namespace the values go through `ip netns
exec ... sysctl` processes, which must not block the event loop."""

from __future__ import annotations

import logging
from pathlib import Path

from overlayd.dataplane.command import run
from overlayd.errors import OverlaydError

log = logging.getLogger(__name__)

PROC = Path("/proc/sys/net/ipv4")
PROC6 = Path("/proc/sys/net/ipv6")


class SysctlError(OverlaydError):
    pass


class _CommandFailed(SysctlError):
    pass


async def _sysctl(netns: str, *args: str) -> str:
    code, out, err = await run(["ip", "netns", "exec", netns, "sysctl", *args])
    if code != 0:
        raise _CommandFailed(err.decode(errors="replace").strip())
    return out.decode().strip()


def _read_proc(path: Path) -> str:
    return path.read_text().strip()  # kernel memory, as below


def _swap_proc(path: Path, value: str) -> bool:
    # procfs reads and writes are kernel memory operations, not disk I/O:
    # they do not block the loop the way a process start does.
    if path.read_text().strip() == value:
        return False
    path.write_text(value + "\n")
    return True


async def read_sysctl(path: Path, netns: str | None) -> str:
    if netns is None:
        return _read_proc(path)
    return await _sysctl(netns, "-n", ".".join(path.relative_to("/proc/sys").parts))


async def set_sysctl(path: Path, value: str, netns: str | None) -> bool:
    """Write the value if it differs; True when something changed.

    /proc/sys/net shows the namespace of the process that reads it, so for
    another namespace the write goes through `ip netns exec ... sysctl`.
    A missing key raises FileNotFoundError (here) or SysctlError (there).
    """
    if netns is None:
        return _swap_proc(path, value)
    key = ".".join(path.relative_to("/proc/sys").parts)
    if await _sysctl(netns, "-n", key) == value:
        return False
    await _sysctl(netns, "-q", "-w", f"{key}={value}")
    return True


async def ensure_forwarding_and_redirects(
    bridge: str, *, netns: str | None = None, ipv6: bool = False, underlay: str = ""
) -> list[str]:
    """IPv4 forwarding on (hosts route between bridge and tunnel); ICMP
    redirects off for the bridge, where containers and the tunnel share one
    link and a redirect would send a container to a next hop it cannot use.
    The kernel sends redirects if either `all` or the device says so, so
    both are cleared.

    Dual-stack (`ipv6`): IPv6 forwarding on as well. Only `all` will do: the
    kernel forwards IPv6 only when net.ipv6.conf.all.forwarding is 1 (and
    writing it sets every link's own value and the default). IPv6 has no
    redirect switch, and needs none here: Linux sends an IPv6 redirect only
    when the better next hop is link-local or the destination itself, and
    overlayd's next hops (a peer subnet's first address) are neither.

    Forwarding turns a link's router advertisement processing off where
    accept_ra is 1 (the default): the host stops configuring itself from
    RAs. overlayd itself relies on none (the underlay's address and routes
    are the host's business, containers get static addresses and routes),
    but a host that takes its own IPv6 default route from RAs needs
    accept_ra=2 on that link; the change says so when it turns forwarding on.
    """
    changed = []
    if await set_sysctl(PROC / "ip_forward", "1", netns):
        changed.append("enabled IPv4 forwarding (net.ipv4.ip_forward=1)")
    for scope in ("all", bridge):
        path = PROC / "conf" / scope / "send_redirects"
        if await set_sysctl(path, "0", netns):
            changed.append(f"disabled ICMP redirects (net.ipv4.conf.{scope}.send_redirects=0)")
    if ipv6 and await set_sysctl(PROC6 / "conf" / "all" / "forwarding", "1", netns):
        note = ""
        if underlay and await read_sysctl(PROC6 / "conf" / underlay / "accept_ra", netns) == "1":
            note = (
                f"; {underlay} now ignores router advertisements"
                f" (net.ipv6.conf.{underlay}.accept_ra=2 if the host needs them)"
            )
        changed.append(f"enabled IPv6 forwarding (net.ipv6.conf.all.forwarding=1){note}")
    return changed


BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
BRIDGE_NF6 = Path("/proc/sys/net/bridge/bridge-nf-call-ip6tables")


async def ensure_bridge_netfilter(*, netns: str | None = None, ipv6: bool = False) -> list[str]:
    """Bridged frames must pass the forward hook of their family, or the
    rule that stops containers talking to each other through the gwbridge
    never sees them. The settings exist only while br_netfilter is loaded."""
    changed = []
    for path in (BRIDGE_NF, BRIDGE_NF6) if ipv6 else (BRIDGE_NF,):
        key = ".".join(path.relative_to("/proc/sys").parts)
        try:
            if await set_sysctl(path, "1", netns):
                changed.append(f"enabled {key}=1 (gwbridge isolation)")
        except (FileNotFoundError, SysctlError) as exc:
            raise SysctlError(
                f"{key} is missing: load br_netfilter"
                " (modprobe br_netfilter) so that the gwbridge can isolate containers"
            ) from exc
    return changed
