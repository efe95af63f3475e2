"""Finding the underlay as flannel's --iface does: by name, by address, or
the interface of the default route."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from overlayd.dataplane.netlink import DeviceError, Netlink
from overlayd.lab import netns as lab_netns
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.root]


@pytest.fixture
def two_links(netns: str) -> str:
    for name, address in (("up0", "192.0.2.10/24"), ("up1", "198.51.100.10/24")):
        lab_netns.ip(netns, "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        lab_netns.ip(netns, "addr", "add", address, "dev", name)
        lab_netns.ip(netns, "link", "set", name, "up")
        lab_netns.ip(netns, "link", "set", f"{name}p", "up")
    return netns


async def test_the_underlay_is_found_by_name_address_or_default_route(two_links: str) -> None:
    nl = Netlink(two_links)
    try:
        by_name = await nl.find_underlay("up1", None)
        assert (by_name.name, by_name.address) == ("up1", IPv4Address("198.51.100.10"))
        by_address = await nl.find_underlay("192.0.2.10", None)
        assert by_address.name == "up0"
        with pytest.raises(DeviceError, match="no default route"):
            await nl.find_underlay(None, None)
        lab_netns.ip(two_links, "route", "add", "default", "via", "198.51.100.1")
        assert (await nl.find_underlay(None, None)).name == "up1"
        chosen = await nl.find_underlay("up0", IPv4Address("192.0.2.99"))
        assert chosen.address == IPv4Address("192.0.2.99")  # --public-ip wins
        with pytest.raises(DeviceError, match="no such interface"):
            await nl.find_underlay("nope0", None)
    finally:
        await nl.close()
