"""Our nftables table on the real kernel: nft accepts the rendered ruleset and
lists it back exactly as rendered; rewrites happen only when needed."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest

from overlayd.dataplane.nft import NftTable
from overlayd.lab import netns as lab_netns
from overlayd.plan.egress import EgressSpec, render_table
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.root]

CLUSTER = IPv4Network("10.244.0.0/16")


@pytest.mark.parametrize("mode", ["gwbridge", "masquerade"])
async def test_the_kernel_lists_our_table_as_we_render_it(netns: str, mode: str) -> None:
    spec = EgressSpec(
        mode,
        CLUSTER,
        "ovl0",
        "ovl_gwbridge",
        IPv4Network("172.18.0.0/16") if mode == "gwbridge" else None,
    )
    table = NftTable(netns)
    assert (
        await table.ensure(spec) == "replaced the egress chains of table ip overlayd (first write)"
    )
    assert await table.listing() == render_table(spec)
    assert await table.ensure(spec) is None  # nothing changed, nothing written


async def test_changing_mode_replaces_and_none_removes_the_table(netns: str) -> None:
    table = NftTable(netns)
    masq = EgressSpec("masquerade", CLUSTER, "ovl0", "ovl_gwbridge")
    await table.ensure(masq)
    gw = EgressSpec("gwbridge", CLUSTER, "ovl0", "ovl_gwbridge", IPv4Network("172.18.0.0/16"))
    assert await table.ensure(gw) == (
        "replaced the egress chains of table ip overlayd (rules changed)"
    )
    assert "ovl_gwbridge" in await table.listing()
    lab_netns.in_ns(netns, "nft", "add", "rule", "ip", "overlayd", "forward", "accept")
    assert await table.ensure(gw) == (
        "replaced the egress chains of table ip overlayd (altered or deleted by hand)"
    )
    assert await table.ensure(EgressSpec("none", CLUSTER, "ovl0", "ovl_gwbridge")) is not None
    assert await table.listing() == ""
    # Nothing else of ours was in it: the table went too.
    assert not lab_netns.in_ns(netns, "nft", "list", "tables").strip()
