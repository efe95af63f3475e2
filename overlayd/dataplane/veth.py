"""Veth pairs for the Docker plugin's endpoints, through iproute2.

The pair is made in the daemon's own namespace: the host end becomes a port
of the overlay bridge, the other end is handed to Docker (Join's SrcName),
which moves it into the container's namespace and renames it eth*. Deleting
the host end deletes its peer too, wherever the peer is by then.

Through iproute2 rather than the Netlink adapter: a pair is made or deleted
once per container start or stop, not per reconcile pass, `ip link add ...
type veth peer ...` sets both ends' MTU and the peer's MAC in one call, and
the Netlink adapter stays about the devices the reconciler owns (and its
drift monitor watches). The agent builds one `VethPairs` and hands it to the
plugin, which sees it only as a port (surfaces/docker_plugin.VethPort).
"""

from __future__ import annotations

import json

from overlayd.dataplane.command import run
from overlayd.errors import OverlaydError


class VethError(OverlaydError):
    pass


async def _ip(*args: str) -> tuple[int, str, str]:
    code, out, err = await run(["ip", *args])
    return code, out.decode(errors="replace"), err.decode(errors="replace").strip()


class VethPairs:
    """The plugin's veth pairs in the current network namespace."""

    async def exists(self, name: str) -> bool:
        code, _, _ = await _ip("link", "show", "dev", name)
        return code == 0

    async def add_pair(
        self, host: str, peer: str, *, bridge: str, mtu: int, mac: str | None
    ) -> None:
        """A veth pair with `host` on `bridge` (up, hairpin mode on) and
        `peer` down, both with `mtu`. Fails if `host` exists (the caller decides what a leftover is:
        deleting one blindly could pull eth0 out of a running container). On
        failure nothing is left behind."""
        args = ["link", "add", host, "mtu", str(mtu), "type", "veth", "peer", "name", peer]
        args += ["mtu", str(mtu)]
        if mac is not None:
            args += ["address", mac]
        code, _, err = await _ip(*args)
        if code != 0:
            raise VethError(f"ip link add {host}: {err}")
        for step in (
            ("link", "set", host, "master", bridge),
            # Hairpin mode on the bridge port, always (as Docker's bridge
            # driver and CNI's bridge plugin do when asked): a container
            # reaching a service VIP may be DNATed to itself, and with
            # bridge netfilter on (policies, gwbridge isolation) that DNAT
            # happens inside the bridge, which then sends the frame back
            # out the port it came in by, and drops it unless the port
            # allows hairpin (plan/service_rules.py, "hairpin").
            ("link", "set", host, "type", "bridge_slave", "hairpin", "on"),
            ("link", "set", host, "up"),
        ):
            code, _, err = await _ip(*step)
            if code != 0:
                await self.delete(host)
                raise VethError(f"ip {' '.join(step)}: {err}")

    async def delete(self, host: str) -> bool:
        """Delete the pair by its host end; False if there was none."""
        if not await self.exists(host):
            return False
        code, _, err = await _ip("link", "del", "dev", host)
        if code != 0 and await self.exists(host):
            raise VethError(f"ip link del {host}: {err}")
        return True

    async def bridge_ports(self, bridge: str, prefix: str) -> list[str]:
        """The names of `bridge`'s ports that start with `prefix`; none if
        the bridge does not exist."""
        code, out, err = await _ip("-j", "link", "show", "master", bridge)
        if code != 0:
            if not await self.exists(bridge):
                return []
            raise VethError(f"ip link show master {bridge}: {err}")
        try:
            links = json.loads(out) if out.strip() else []
        except ValueError:
            raise VethError(f"ip -j link show master {bridge} printed no JSON") from None
        names = [str(link.get("ifname", "")) for link in links if isinstance(link, dict)]
        return sorted(name for name in names if name.startswith(prefix))
