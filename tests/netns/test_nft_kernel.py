"""Our nftables tables on the real kernel: nft accepts the rendered rulesets
(IPv4 and IPv6) and lists them back exactly as rendered; rewrites happen
only when needed, and both tables change in one transaction."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network

import pytest

from overlayd.dataplane.nft import Nft, NftError, NftTable
from overlayd.lab import netns as lab_netns
from overlayd.model import IPV4, IPV6
from overlayd.plan.egress import EgressSpec, render_table, render_transaction
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


# --- dual-stack: the ip6 table beside the ip one, one transaction ---------------

CLUSTER6 = IPv6Network("fd00:10:244::/48")
GW6 = IPv6Network("fd4a:4eae:8d08::/64")


class CountedNft(Nft):
    """The real nft command, keeping every script it was given."""

    def __init__(self, netns: str) -> None:
        super().__init__(netns)
        self.scripts: list[str] = []

    async def apply(self, script: str) -> None:
        self.scripts.append(script)
        await super().apply(script)


def dual(mode: str) -> EgressSpec:
    gw = mode == "gwbridge"
    return EgressSpec(
        mode,
        CLUSTER,
        "ovl0",
        "ovl_gwbridge",
        IPv4Network("172.18.0.0/16") if gw else None,
        cluster6=CLUSTER6,
        gwbridge_subnet6=GW6 if gw else None,
    )


@pytest.mark.parametrize("mode", ["gwbridge", "masquerade"])
async def test_the_kernel_lists_both_tables_as_we_render_them_after_one_transaction(
    netns: str, mode: str
) -> None:
    # An upgraded host: the IPv4 table as an earlier daemon left it.
    await NftTable(netns).ensure(replace(dual(mode), cluster6=None, gwbridge_subnet6=None))
    before = lab_netns.in_ns(netns, "nft", "list", "table", "ip", "overlayd")
    nft = CountedNft(netns)
    table = NftTable(nft=nft)
    assert await table.ensure(dual(mode)) == (
        "replaced the egress chains of table ip overlayd (first write);"
        " replaced the egress chains of table ip6 overlayd (first write)"
    )
    assert len(nft.scripts) == 1  # both tables, one transaction
    assert await table.listing(IPV4) == render_table(dual(mode), IPV4)
    assert await table.listing(IPV6) == render_table(dual(mode), IPV6)
    # The IPv4 table is exactly what it was before IPv6 came.
    assert lab_netns.in_ns(netns, "nft", "list", "table", "ip", "overlayd") == before
    assert await table.ensure(dual(mode)) is None  # nothing changed, nothing written
    assert len(nft.scripts) == 1


async def test_only_the_table_that_changed_is_written_and_a_mode_change_writes_both_at_once(
    netns: str,
) -> None:
    nft = CountedNft(netns)
    table = NftTable(nft=nft)
    await table.ensure(dual("masquerade"))
    # Somebody edits the IPv6 table only: only it is written again.
    lab_netns.in_ns(netns, "nft", "add", "rule", "ip6", "overlayd", "forward", "accept")
    assert await table.ensure(dual("masquerade")) == (
        "replaced the egress chains of table ip6 overlayd (altered or deleted by hand)"
    )
    assert "table ip overlayd" not in nft.scripts[-1] and "table ip6 overlayd" in nft.scripts[-1]
    assert await table.listing(IPV6) == render_table(dual("masquerade"), IPV6)
    # A new mode changes both tables: one script.
    count = len(nft.scripts)
    assert await table.ensure(dual("gwbridge")) == (
        "replaced the egress chains of table ip overlayd (rules changed);"
        " replaced the egress chains of table ip6 overlayd (rules changed)"
    )
    assert len(nft.scripts) == count + 1
    assert await table.listing(IPV4) == render_table(dual("gwbridge"), IPV4)
    assert await table.listing(IPV6) == render_table(dual("gwbridge"), IPV6)


async def test_a_refused_transaction_leaves_both_tables_as_they_were(netns: str) -> None:
    """What the one transaction buys: the kernel takes both tables' new
    chains or neither (here a bad last line spoils the whole script)."""
    table = NftTable(netns)
    await table.ensure(dual("masquerade"))
    old4, old6 = await table.listing(IPV4), await table.listing(IPV6)
    script = render_transaction(dual("gwbridge"), (IPV4, IPV6))
    with pytest.raises(NftError):
        await table.nft.apply(script + "add rule ip6 overlayd no_such_chain accept\n")
    assert (await table.listing(IPV4), await table.listing(IPV6)) == (old4, old6)
    # Positive control: the same script without the bad line is taken whole.
    await table.nft.apply(script)
    assert await table.listing(IPV4) == render_table(dual("gwbridge"), IPV4)
    assert await table.listing(IPV6) == render_table(dual("gwbridge"), IPV6)


async def test_a_cluster_without_ipv6_any_more_loses_the_ip6_table_only(netns: str) -> None:
    nft = CountedNft(netns)
    table = NftTable(nft=nft)
    await table.ensure(dual("gwbridge"))
    v4_only = replace(dual("gwbridge"), cluster6=None, gwbridge_subnet6=None)
    assert await table.ensure(v4_only) == (
        "removed the egress chains of table ip6 overlayd (rules changed)"
    )
    assert "table ip overlayd" not in nft.scripts[-1]
    assert lab_netns.in_ns(netns, "nft", "list", "tables").split() == ["table", "ip", "overlayd"]
    assert await table.listing(IPV4) == render_table(v4_only, IPV4)
    # A v4-only host never writes an ip6 table at all.
    fresh = CountedNft(netns)
    assert await NftTable(nft=fresh).ensure(v4_only) is not None
    assert "ip6" not in "".join(fresh.scripts)
    # Teardown takes both tables, and the policy and services tables.
    await table.ensure(dual("gwbridge"))
    others = ["overlayd_policy", "overlayd_services", "overlayd_services_2"]
    for name in others:
        lab_netns.in_ns(netns, "nft", "add", "table", "inet", name)
    lab_netns.in_ns(netns, "nft", "add", "table", "inet", "othertool")  # not ours
    assert await table.delete() == ["ip overlayd", "ip6 overlayd"] + [f"inet {n}" for n in others]
    assert lab_netns.in_ns(netns, "nft", "list", "tables").split() == ["table", "inet", "othertool"]
