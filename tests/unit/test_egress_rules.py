"""The egress ruleset is rendered from the config alone (golden files), the
overlay is never NATed, and the gwbridge subnet never overlaps anything."""

from __future__ import annotations

from ipaddress import IPv4Network
from pathlib import Path

import pytest

from overlayd.errors import ConfigError
from overlayd.plan.egress import (
    EgressSpec,
    choose_gwbridge_subnet,
    forward_accept_rules,
    render_table,
    render_transaction,
)

GOLDEN = Path(__file__).parent / "golden"
CLUSTER = IPv4Network("10.244.0.0/16")
GW = IPv4Network("172.18.0.0/16")


def spec(mode: str, gw: IPv4Network | None = GW) -> EgressSpec:
    return EgressSpec(mode, CLUSTER, "ovl0", "ovl_gwbridge", gw if mode == "gwbridge" else None)


@pytest.mark.parametrize("mode", ["gwbridge", "masquerade"])
def test_the_table_matches_its_golden_file(mode: str) -> None:
    assert render_table(spec(mode)) == (GOLDEN / f"{mode}.nft").read_text()


REPLACE_CHAINS = (
    "table ip overlayd\n"
    "add chain ip overlayd forward\ndelete chain ip overlayd forward\n"
    "add chain ip overlayd postrouting\ndelete chain ip overlayd postrouting\n"
)


def test_mode_none_removes_the_egress_chains_and_writes_no_rule() -> None:
    assert render_table(spec("none")) is None
    assert render_transaction(spec("none")) == REPLACE_CHAINS
    assert forward_accept_rules(spec("none")) == []


@pytest.mark.parametrize("mode", ["gwbridge", "masquerade"])
def test_the_egress_chains_and_only_they_are_replaced_in_one_transaction(mode: str) -> None:
    script = render_transaction(spec(mode))
    # The table itself is never deleted: it also holds the VXLAN allow-list,
    # whose set and counter must survive a change of egress rules.
    assert script == REPLACE_CHAINS + (render_table(spec(mode)) or "")
    assert "delete table" not in script and "flush" not in script


def test_masquerade_mode_never_nats_the_overlay_or_multicast() -> None:
    rules = render_table(spec("masquerade")) or ""
    masq = rules.index("masquerade")
    assert rules.index("ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return") < masq
    assert rules.index("ip saddr 10.244.0.0/16 ip daddr 224.0.0.0/4 return") < masq


def test_gwbridge_mode_only_nats_the_gwbridge_subnet() -> None:
    rules = render_table(spec("gwbridge")) or ""
    assert [line.strip() for line in rules.splitlines() if "masquerade" in line] == [
        'ip saddr 172.18.0.0/16 oifname != "ovl_gwbridge" masquerade fully-random'
    ]


def test_forward_exceptions_cover_cluster_and_gwbridge() -> None:
    assert forward_accept_rules(spec("gwbridge")) == [
        "-A OVERLAYD-FORWARD -s 10.244.0.0/16 -j ACCEPT",
        "-A OVERLAYD-FORWARD -d 10.244.0.0/16 -j ACCEPT",
        "-A OVERLAYD-FORWARD -i ovl_gwbridge -j ACCEPT",
        "-A OVERLAYD-FORWARD -o ovl_gwbridge -j ACCEPT",
    ]


def test_default_gwbridge_subnet_is_the_first_free_candidate() -> None:
    assert choose_gwbridge_subnet(None, CLUSTER, []) == IPv4Network("172.18.0.0/16")
    busy = [IPv4Network("172.18.5.0/24"), IPv4Network("0.0.0.0/0")]  # default route ignored
    assert choose_gwbridge_subnet(None, CLUSTER, busy) == IPv4Network("172.19.0.0/16")


def test_a_cluster_network_covering_all_candidates_needs_an_explicit_subnet() -> None:
    with pytest.raises(ConfigError) as caught:
        choose_gwbridge_subnet(None, IPv4Network("172.16.0.0/12"), [])
    assert caught.value.field == "gwbridge-subnet"


@pytest.mark.parametrize(
    ("configured", "routes", "words"),
    [
        ("10.244.128.0/24", [], "overlaps the cluster network 10.244.0.0/16"),
        ("192.168.0.0/16", ["192.168.1.0/24"], "overlaps the host's route to 192.168.1.0/24"),
    ],
)
def test_a_configured_subnet_that_overlaps_is_refused(
    configured: str, routes: list[str], words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        choose_gwbridge_subnet(IPv4Network(configured), CLUSTER, [IPv4Network(r) for r in routes])
    assert caught.value.field == "gwbridge-subnet"
    assert words in str(caught.value)


def test_a_free_configured_subnet_is_used() -> None:
    wanted = IPv4Network("192.168.50.0/24")
    assert choose_gwbridge_subnet(wanted, CLUSTER, [IPv4Network("192.0.2.0/24")]) == wanted
