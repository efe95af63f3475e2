"""Veth pairs for the Docker plugin's endpoints, through iproute2.

The pair is made in the daemon's own namespace: the host end becomes a port
of the overlay bridge, the other end is handed to Docker (Join's SrcName),
which moves it into the container's namespace and renames it eth*. Deleting
the host end deletes its peer too, wherever the peer is by then.
"""

from __future__ import annotations

from overlayd.dataplane.command import run
from overlayd.errors import OverlaydError


class VethError(OverlaydError):
    pass


async def _ip(*args: str) -> tuple[int, str]:
    code, _, err = await run(["ip", *args])
    return code, err.decode(errors="replace").strip()


async def exists(name: str) -> bool:
    code, _ = await _ip("link", "show", "dev", name)
    return code == 0


async def add_pair(host: str, peer: str, *, bridge: str, mtu: int, mac: str | None) -> None:
    """A veth pair with `host` on `bridge` (up) and `peer` down, both with
    `mtu`; a leftover pair of the same name (a crash between add and
    record) is replaced. On failure nothing is left behind."""
    await delete(host)
    args = ["link", "add", host, "mtu", str(mtu), "type", "veth", "peer", "name", peer]
    args += ["mtu", str(mtu)]
    if mac is not None:
        args += ["address", mac]
    code, err = await _ip(*args)
    if code != 0:
        raise VethError(f"ip link add {host}: {err}")
    for step in (
        ("link", "set", host, "master", bridge),
        ("link", "set", host, "up"),
    ):
        code, err = await _ip(*step)
        if code != 0:
            await delete(host)
            raise VethError(f"ip {' '.join(step)}: {err}")


async def delete(host: str) -> bool:
    """Delete the pair by its host end; False if there was none."""
    if not await exists(host):
        return False
    code, err = await _ip("link", "del", "dev", host)
    if code != 0 and await exists(host):
        raise VethError(f"ip link del {host}: {err}")
    return True
