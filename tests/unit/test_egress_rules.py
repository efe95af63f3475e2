"""The egress ruleset is rendered from the config alone (golden files), the
overlay is never NATed, and the gwbridge subnet never overlaps anything;
for each address family, by the same functions."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from overlayd.config import build_agent_config
from overlayd.errors import ConfigError
from overlayd.model import IPV4, IPV6, IPNetwork
from overlayd.plan.egress import (
    GWBRIDGE_CANDIDATES6,
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


def test_the_service_network_is_no_gwbridge_candidate_and_a_configured_overlap_is_refused() -> None:
    services: list[IPNetwork] = [IPv4Network("172.18.0.0/16"), IPv6Network("fd00:96::/108")]
    assert choose_gwbridge_subnet(None, CLUSTER, [], service_networks=services) == IPv4Network(
        "172.19.0.0/16"
    )
    with pytest.raises(ConfigError) as caught:
        choose_gwbridge_subnet(IPv4Network("172.18.4.0/24"), CLUSTER, [], service_networks=services)
    assert caught.value.field == "gwbridge-subnet"
    assert "overlaps the service network 172.18.0.0/16" in str(caught.value)
    # Control: the same subnet without that service network is used as given.
    assert choose_gwbridge_subnet(IPv4Network("172.18.4.0/24"), CLUSTER, []) == IPv4Network(
        "172.18.4.0/24"
    )


def test_a_free_configured_subnet_is_used() -> None:
    wanted = IPv4Network("192.168.50.0/24")
    assert choose_gwbridge_subnet(wanted, CLUSTER, [IPv4Network("192.0.2.0/24")]) == wanted


# --- IPv6 ---------------------------------------------------------------------

CLUSTER6 = IPv6Network("fd00:10:244::/48")
GW6 = IPv6Network("fd4a:4eae:8d08::/64")


def spec6(mode: str) -> EgressSpec:
    return replace(
        spec(mode), cluster6=CLUSTER6, gwbridge_subnet6=GW6 if mode == "gwbridge" else None
    )


@pytest.mark.parametrize("mode", ["gwbridge", "masquerade"])
def test_the_ipv6_table_matches_its_golden_file_and_the_ipv4_one_is_unchanged(mode: str) -> None:
    assert render_table(spec6(mode), IPV6) == (GOLDEN / f"{mode}6.nft").read_text()
    assert render_table(spec6(mode), IPV4) == (GOLDEN / f"{mode}.nft").read_text()


def test_without_ipv6_there_are_no_ipv6_rules() -> None:
    for mode in ("gwbridge", "masquerade", "none"):
        assert render_table(spec(mode), IPV6) is None
        assert forward_accept_rules(spec(mode), IPV6) == []
    assert spec("gwbridge").families == (IPV4,)
    assert spec6("gwbridge").families == (IPV4, IPV6)


def test_both_tables_are_replaced_in_one_transaction_and_never_deleted() -> None:
    both = render_transaction(spec6("masquerade"), (IPV4, IPV6))
    assert both == (
        REPLACE_CHAINS
        + (render_table(spec6("masquerade"), IPV4) or "")
        + REPLACE_CHAINS.replace(" ip overlayd", " ip6 overlayd")
        + (render_table(spec6("masquerade"), IPV6) or "")
    )
    assert "delete table" not in both and "flush" not in both
    # Mode none empties both tables' egress chains, in the same one script.
    assert render_transaction(spec6("none"), (IPV4, IPV6)) == REPLACE_CHAINS + (
        REPLACE_CHAINS.replace(" ip overlayd", " ip6 overlayd")
    )


def test_ipv6_masquerade_leaves_the_overlay_multicast_and_link_local_alone() -> None:
    rules = [line.strip() for line in (render_table(spec6("masquerade"), IPV6) or "").splitlines()]
    masq = rules.index("ip6 saddr fd00:10:244::/48 masquerade fully-random")
    for dst in ("fd00:10:244::/48", "ff00::/8", "fe80::/10"):
        assert rules.index(next(r for r in rules if f"ip6 daddr {dst} return" in r)) < masq
    # Nothing of IPv4 leaks into the IPv6 table and back.
    assert " ip " not in " ".join(rules) and "10.244" not in " ".join(rules)
    assert "ip6" not in (render_table(spec6("masquerade"), IPV4) or "")


def test_ipv6_gwbridge_masquerades_only_its_subnet_and_isolates_like_ipv4() -> None:
    six = render_table(spec6("gwbridge"), IPV6) or ""
    four = render_table(spec6("gwbridge"), IPV4) or ""
    assert [line.strip() for line in six.splitlines() if "masquerade" in line] == [
        'ip6 saddr fd4a:4eae:8d08::/64 oifname != "ovl_gwbridge" masquerade fully-random'
    ]
    # The same forward chain, but for the family's addresses.
    forward6 = six.split("chain postrouting")[0]
    assert (
        forward6.replace("ip6 ", "ip ").replace(str(CLUSTER6), str(CLUSTER))
        == (four.split("chain postrouting")[0])
    )


def test_a_family_the_cluster_gained_after_start_gets_isolation_but_no_way_out() -> None:
    late = replace(spec("gwbridge"), cluster6=CLUSTER6)  # no gwbridge subnet6 chosen
    six = render_table(late, IPV6) or ""
    assert "masquerade" not in six
    assert f"ct state new ip6 daddr {CLUSTER6} ip6 saddr != {CLUSTER6} drop" in six


def test_ipv6_forward_exceptions_name_the_ipv6_network() -> None:
    assert forward_accept_rules(spec6("gwbridge"), IPV6) == [
        "-A OVERLAYD-FORWARD -s fd00:10:244::/48 -j ACCEPT",
        "-A OVERLAYD-FORWARD -d fd00:10:244::/48 -j ACCEPT",
        "-A OVERLAYD-FORWARD -i ovl_gwbridge -j ACCEPT",
        "-A OVERLAYD-FORWARD -o ovl_gwbridge -j ACCEPT",
    ]


def test_the_default_ipv6_gwbridge_subnet_is_a_ula_64_that_overlaps_nothing() -> None:
    first = choose_gwbridge_subnet(None, CLUSTER6, [], IPV6)
    assert first == IPv6Network("fd4a:4eae:8d08::/64") == GWBRIDGE_CANDIDATES6[0]
    assert first.is_private and first.prefixlen == 64
    assert all(c.subnet_of(IPv6Network("fc00::/7")) for c in GWBRIDGE_CANDIDATES6)
    # The same on every call: a restart picks it again.
    assert choose_gwbridge_subnet(None, CLUSTER6, [], IPV6) == first
    # A host route over it, a default route, a link-local route, and IPv4
    # routes: only the first one counts.
    routes: list[IPv4Network | IPv6Network] = [
        IPv6Network("fd4a:4eae:8d08::/62"),
        IPv6Network("::/0"),
        IPv6Network("fe80::/64"),
        IPv4Network("172.18.0.0/16"),
    ]
    assert choose_gwbridge_subnet(None, CLUSTER6, routes, IPV6) == IPv6Network(
        "fd4a:4eae:8d08:4::/64"
    )
    # A cluster network covering the whole ULA /48 leaves no candidate.
    with pytest.raises(ConfigError) as caught:
        choose_gwbridge_subnet(None, IPv6Network("fd4a::/16"), [], IPV6)
    assert caught.value.field == "gwbridge-subnet6"
    assert "fd4a:4eae:8d08::/64 to fd4a:4eae:8d08:f::/64" in str(caught.value)


@pytest.mark.parametrize(
    ("configured", "routes", "words"),
    [
        ("fd00:10:244:8000::/64", [], "overlaps the cluster network fd00:10:244::/48"),
        ("2001:db8:5::/64", ["2001:db8::/32"], "overlaps the host's route to 2001:db8::/32"),
    ],
)
def test_a_configured_ipv6_subnet_that_overlaps_is_refused_naming_the_setting(
    configured: str, routes: list[str], words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        choose_gwbridge_subnet(
            IPv6Network(configured), CLUSTER6, [IPv6Network(r) for r in routes], IPV6
        )
    assert caught.value.field == "gwbridge-subnet6"
    assert words in str(caught.value)
    # Positive control: a free one is taken as it is.
    free = IPv6Network("fd99::/64")
    assert choose_gwbridge_subnet(free, CLUSTER6, [IPv6Network(r) for r in routes], IPV6) == free


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("fd00:1::1/64", "has host bits set"),
        ("10.0.0.0/8", "is not an IPv6 network"),
        ("fe80::/64", "is not a unicast network"),
        ("ff02::/16", "is not a unicast network"),
        ("::1/128", "too small"),
        ("fd00::/127", "is too small (at most /126)"),
        ("nonsense", "is not an IPv6 network"),
    ],
)
def test_the_gwbridge_subnet6_setting_is_validated_naming_it(value: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_agent_config(flags={"gwbridge-subnet6": value}, env={})
    assert caught.value.field == "gwbridge-subnet6"
    assert words in str(caught.value)


def test_the_gwbridge_subnet6_setting_comes_from_flag_environment_or_file() -> None:
    assert build_agent_config(flags={}, env={}).gwbridge_subnet6 is None
    env = {"OVERLAYD_GWBRIDGE_SUBNET6": "fd00:aa::/64"}
    assert build_agent_config(flags={}, env=env).gwbridge_subnet6 == IPv6Network("fd00:aa::/64")
    from_file = build_agent_config(flags={}, file={"gwbridge-subnet6": "fd00:bb::/80"}, env=env)
    assert from_file.gwbridge_subnet6 == IPv6Network("fd00:aa::/64")  # environment beats file
    flags = {"gwbridge-subnet6": "fd00:cc::/64"}
    assert build_agent_config(flags=flags, env=env).gwbridge_subnet6 == IPv6Network("fd00:cc::/64")
