"""diagnose's services table check against the real kernel, in a throwaway
namespace: the table rendered for every kind of service (random and
affinity-pinned backends, node ports Cluster and Local, no backends,
dual-stack, hairpin), loaded with `nft -f` and listed the way diagnose
lists it (`nft -j list maps|sets`, `nft -t list table`), compares equal to
the render; then one map element deleted and one chain's rule deleted by
hand are each named, and nothing else is."""

from __future__ import annotations

import asyncio
import json

import pytest

from overlayd.cli.diagnose_services import table_listing
from overlayd.dataplane.nft import Nft
from overlayd.lab import netns as lab_netns
from overlayd.plan.service_check import table_differences
from overlayd.plan.service_rules import (
    SHARD_TABLES,
    chain_label,
    script,
    service_ruleset,
    service_transaction,
)
from tests.conftest import needs_root
from tests.unit.test_service_rules import CLUSTER, LOCAL, small_cluster

pytestmark = [needs_root, pytest.mark.root]


def test_the_listed_table_equals_the_render_and_each_hand_edit_is_named(netns: str) -> None:
    services, backends = small_cluster()
    ruleset = service_ruleset(services, backends, LOCAL, CLUSTER)
    nft = Nft(netns)
    assert asyncio.run(table_listing(nft)) == (None, None)  # no table yet
    asyncio.run(nft.apply(script(service_transaction(None, ruleset))))
    elements, chains = asyncio.run(table_listing(nft))
    assert elements is not None and chains is not None
    assert sum(len(e) for e in elements.values()) > 10 and len(chains) > 10  # something listed
    assert table_differences(ruleset, elements, chains) == []

    # One VIP's element deleted by hand: exactly that one is named.
    maps = ruleset.maps()
    vips = next(at for at in sorted(maps) if at[1] == "vips_v4" and maps[at])
    key, verdict = sorted(maps[vips].items())[0]
    whose = next(n for n, r in ruleset.services.items() if key in r.elements.get("vips_v4", {}))
    lab_netns.in_ns(netns, "nft", "delete", "element", "inet", *vips, "{", key, "}")
    # One rule deleted from a service's chain (the last: its last backend).
    owner, rules = next((n, r) for n, r in sorted(ruleset.services.items()) if r.chains)
    chain, wanted = next(iter(rules.chains.items()))
    shard = SHARD_TABLES[rules.shard]
    listed = json.loads(
        lab_netns.in_ns(netns, "nft", "-j", "-a", "list", "chain", "inet", shard, chain)
    )
    handles = [item["rule"]["handle"] for item in listed["nftables"] if "rule" in item]
    assert len(handles) == len(wanted.rules)
    lab_netns.in_ns(
        netns, "nft", "delete", "rule", "inet", shard, chain, "handle", str(handles[-1])
    )
    elements, chains = asyncio.run(table_listing(nft))
    assert table_differences(ruleset, elements, chains) == [
        f"map vips_v4 of table {vips[0]}: no element for {key} (service {whose}), which must"
        f" {verdict}",
        f"chain {chain_label(shard, chain)} (service {owner}): rule {len(wanted.rules)}"
        f" `{wanted.rules[-1]}` is"
        f" missing ({len(wanted.rules) - 1} of {len(wanted.rules)} rules)",
    ]
