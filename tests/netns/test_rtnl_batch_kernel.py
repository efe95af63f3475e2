"""One batch of entry writes in a real namespace: every message is answered
by sequence, a failed one does not stop the ones after it, and the entries
land as `ip` and `bridge` show them."""

from __future__ import annotations

import asyncio
import json
from ipaddress import ip_address, ip_network

from overlayd.dataplane.rtnl_batch import Devices, EntryWriter
from overlayd.lab import netns as ns_tools
from overlayd.model import BridgeFdb, Change, Neighbour, Op, Route, TunnelFdb
from tests.conftest import needs_root

pytestmark = needs_root

MAC = "02:00:00:0a:0b:01"


def index(ns: str, name: str) -> int:
    return int(json.loads(ns_tools.ip(ns, "-j", "link", "show", name))[0]["ifindex"])


def test_a_failed_write_in_a_batch_does_not_stop_the_others(netns: str) -> None:
    ns_tools.ip(netns, "link", "add", "br0", "type", "bridge")
    ns_tools.ip(
        netns, "link", "add", "vx0", "type", "vxlan", "id", "1", "dstport", "4789", "nolearning"
    )
    ns_tools.ip(netns, "link", "set", "vx0", "master", "br0")
    for name in ("br0", "vx0"):
        ns_tools.ip(netns, "link", "set", name, "up")
    dev = Devices(bridge=index(netns, "br0"), vtep=index(netns, "vx0"), underlay=0)
    hop = ip_address("10.244.7.0")
    good = [
        Change(Op.REPLACE, Neighbour(hop, MAC)),
        Change(Op.REPLACE, TunnelFdb(MAC, ip_address("198.51.100.7"))),
        Change(Op.REPLACE, BridgeFdb(MAC)),
        Change(Op.REPLACE, Route(ip_network("10.244.7.0/24"), hop)),
    ]
    # A route through a device that does not exist (index 0 is none).
    bad = Change(Op.REPLACE, Route(ip_network("10.244.8.0/24"), ip_address("10.244.8.0"), True))
    absent = Change(Op.DELETE, Route(ip_network("10.244.9.0/24"), ip_address("10.244.9.0")))

    async def run() -> tuple[list[int], list[int]]:
        writer = EntryWriter(netns)
        try:
            first = await writer.write([good[0], bad, *good[1:], absent], dev)
            again = await writer.write(good, dev)  # replaces: idempotent
            return first, again
        finally:
            writer.close()

    first, again = asyncio.run(run())
    assert first[0] == 0 and first[2:5] == [0, 0, 0]
    assert first[1] != 0  # the bad route was refused ...
    assert first[5] in (2, 3)  # ... and the absent one was not there (ENOENT, ESRCH)
    assert again == [0, 0, 0, 0]
    routes = ns_tools.ip(netns, "route", "show", "proto", "77")
    assert "10.244.7.0/24 via 10.244.7.0 dev br0" in routes and "onlink" in routes
    assert "10.244.8.0" not in routes
    assert f"10.244.7.0 dev br0 lladdr {MAC} PERMANENT" in ns_tools.ip(netns, "neigh", "show")
    fdb = ns_tools.sh(["bridge", "-n", netns, "fdb", "show", "dev", "vx0"])
    assert f"{MAC} dst 198.51.100.7 self permanent" in fdb
    assert f"{MAC} master br0 static" in fdb
    # Deletes in one batch take everything away again.
    asyncio.run(_delete(netns, dev, good))
    assert ns_tools.ip(netns, "route", "show", "proto", "77").strip() == ""
    assert MAC not in ns_tools.sh(["bridge", "-n", netns, "fdb", "show", "dev", "vx0"])


async def _delete(ns: str, dev: Devices, changes: list[Change]) -> None:
    writer = EntryWriter(ns)
    try:
        deleted = await writer.write([Change(Op.DELETE, c.entry) for c in reversed(changes)], dev)
        assert deleted == [0, 0, 0, 0]
    finally:
        writer.close()
