"""Dual-stack in the pure core and the daemon's loop: flannel's IPv6 config
fields, its dual-stack lease keys and values, which IPv6 halves of peer
leases are used, the IPv6 entries, the lease that holds both subnets, and
the IPv6 entry manager beside the IPv4 one."""

from __future__ import annotations

import json
import logging
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlayd.config import parse_network_config, render_network_config
from overlayd.daemon.leasing import SubnetLeaser, own_lease
from overlayd.daemon.loop import Knowledge, Reconciler
from overlayd.errors import ConfigError, LeaseError
from overlayd.model import (
    IPV6,
    BridgeFdb,
    Lease,
    Neighbour,
    Observed,
    Route,
    TunnelFdb,
    Underlay,
)
from overlayd.plan.cluster import cluster_plan
from overlayd.plan.desired import device_spec
from overlayd.plan.egress import EgressSpec
from overlayd.plan.host import check_mtu, host_plan, lease_fits
from overlayd.plan.leases import (
    lease_key,
    parse_lease_key,
    read_lease,
    render_lease,
    subnet_key,
    subnet_key_range,
)
from overlayd.plan.selection import select_peers
from overlayd.surfaces.subnetfile import SubnetFileWriter, read_dns, subnet_file_for
from tests.unit.fake_store import FakeStore
from tests.unit.test_loop import FakeDataplane

PREFIX = "/coreos.com/network"
DUAL_JSON = {
    "Network": "10.244.0.0/16",
    "EnableIPv6": True,
    "IPv6Network": "fd00:10:244::/56",
    "Backend": {"Type": "vxlan", "VNI": 1},
}
CONFIG = parse_network_config(json.dumps(DUAL_JSON))
UNDERLAY = Underlay("eth0", 2, 1500, IPv4Address("192.0.2.11"), IPv6Address("2001:db8::11"))
OWN = own_lease(
    CONFIG,
    IPv4Network("10.244.1.0/24"),
    UNDERLAY.address,
    IPv6Network("fd00:10:244:1::/64"),
    UNDERLAY.address6,
)


def peer(n: int, *, v6: bool = True) -> Lease:
    return own_lease(
        CONFIG,
        IPv4Network(f"10.244.{n}.0/24"),
        IPv4Address(f"192.0.2.{10 + n}"),
        IPv6Network(f"fd00:10:244:{n:x}::/64") if v6 else None,
        IPv6Address(f"2001:db8::{10 + n}") if v6 else None,
    )


def raw(*leases: Lease) -> dict[str, bytes]:
    return {lease_key(PREFIX, lease): render_lease(lease).encode() for lease in leases}


# --- the network config ---------------------------------------------------


def test_the_ipv6_fields_take_flannels_defaults_and_round_trip() -> None:
    assert CONFIG.ipv6 is not None
    assert CONFIG.ipv6.subnet_len == 64
    assert CONFIG.ipv6.subnet_min == IPv6Address("fd00:10:244:1::")
    assert CONFIG.ipv6.subnet_max == IPv6Address("fd00:10:244:ff::")
    assert parse_network_config(render_network_config(CONFIG)) == CONFIG
    assert parse_network_config('{"Network": "10.244.0.0/16"}').ipv6 is None


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"EnableIPv6": "yes"}, "EnableIPv6"),
        ({"EnableIPv4": False}, "EnableIPv4"),
        ({"IPv6Network": None}, "IPv6Network"),
        ({"IPv6Network": "10.0.0.0/8"}, "IPv6Network"),
        ({"IPv6Network": "fd00:10:244::1/56"}, "IPv6Network"),
        ({"IPv6Network": "ff00::/8"}, "IPv6Network"),
        ({"IPv6Network": "fd00:10:244::/63"}, "IPv6Network"),
        ({"IPv6SubnetLen": 127}, "IPv6SubnetLen"),
        ({"IPv6SubnetLen": 57}, "IPv6SubnetLen"),
        ({"IPv6SubnetLen": "64"}, "IPv6SubnetLen"),
        ({"IPv6SubnetMin": "fd00:10:245::"}, "IPv6SubnetMin"),
        ({"IPv6SubnetMin": "fd00:10:244:1::1"}, "IPv6SubnetMin"),
        ({"IPv6SubnetMax": 5}, "IPv6SubnetMax"),
        ({"IPv6SubnetMin": "fd00:10:244:9::", "IPv6SubnetMax": "fd00:10:244:8::"}, "IPv6SubnetMin"),
    ],
)
def test_a_bad_ipv6_field_is_refused_with_its_name(extra: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_network_config(json.dumps(DUAL_JSON | extra))
    assert caught.value.field == field


def test_ipv6_only_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ConfigError, match="IPv6-only"):
        parse_network_config(json.dumps(DUAL_JSON | {"EnableIPv4": False}))


# --- keys and values --------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "subnet", "subnet6"),
    [
        ("10.244.1.0-24", "10.244.1.0/24", None),
        ("10.244.1.0-24&fd00:10:244:1::-64", "10.244.1.0/24", "fd00:10:244:1::/64"),
        ("10.5.0.0-16&fc00:0:0:5::-64", "10.5.0.0/16", "fc00:0:0:5::/64"),
        ("10.244.3.0-24&2001:db8:0:300::-56", "10.244.3.0/24", "2001:db8:0:300::/56"),
    ],
)
def test_flannels_dual_stack_keys_parse_and_format_back_exactly(
    key: str, subnet: str, subnet6: str | None
) -> None:
    full = f"{PREFIX}/subnets/{key}"
    v4, v6 = parse_lease_key(full, PREFIX)
    assert v4 == IPv4Network(subnet) and v6 == (IPv6Network(subnet6) if subnet6 else None)
    # Go prints "fc00:0:0:5::", as Python does: the key comes back the same.
    assert subnet_key(PREFIX, v4, v6) == full


@pytest.mark.parametrize(
    "key",
    [
        "10.244.1.0-24&",
        "10.244.1.0-24&fd00:10:244:1::",
        "10.244.1.0-24&FD00:10:244:1::-64",  # flannel's pattern is lower-case
        "10.244.1.0-24&fd00:10:244:1::1-64",  # host bits
        "10.244.1.0-24&fd00:10:244:1::-129",
        "10.244.1.0-24&10.0.0.0-8",
        "10.244.1.0-24&fd00::-64&fd01::-64",
    ],
)
def test_a_malformed_dual_stack_key_is_refused(key: str) -> None:
    with pytest.raises(LeaseError):
        parse_lease_key(f"{PREFIX}/subnets/{key}", PREFIX)


def test_a_dual_stack_value_is_flannels_and_reads_back() -> None:
    rendered = json.loads(render_lease(OWN))
    assert list(rendered) == [
        "PublicIP",
        "PublicIPv6",
        "BackendType",
        "BackendData",
        "BackendV6Data",
    ]
    assert rendered["PublicIPv6"] == "2001:db8::11"
    assert rendered["BackendV6Data"] == {"VNI": 1, "VtepMAC": OWN.vtep_mac_v6}
    assert OWN.vtep_mac_v6 != OWN.vtep_mac
    assert read_lease(OWN.subnet, OWN.ipv6_subnet, render_lease(OWN)) == (OWN, None)


def test_a_value_as_flannel_writes_it_is_read() -> None:
    value = (
        '{"PublicIP":"192.0.2.13","PublicIPv6":"2001:db8::13","BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"6a:1f:3c:00:00:01"},'
        '"BackendV6Data":{"VNI":1,"VtepMAC":"6a:1f:3c:00:00:02"}}'
    )
    lease, why = read_lease(IPv4Network("10.244.3.0/24"), IPv6Network("fd00:10:244:3::/64"), value)
    assert why is None and lease.has_ipv6
    assert lease.public_ipv6 == IPv6Address("2001:db8::13")
    assert lease.vtep_mac_v6 == "6a:1f:3c:00:00:02"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"PublicIPv6": "not-an-address"}, "not an IPv6 address"),
        ({"PublicIPv6": "ff02::1"}, "cannot be a tunnel endpoint"),
        ({"PublicIPv6": "fe80::1"}, "cannot be a tunnel endpoint"),
        ({"PublicIPv6": "::ffff:192.0.2.1"}, "cannot be a tunnel endpoint"),
        ({"PublicIPv6": 6}, "not a string"),
        ({"PublicIPv6": None}, "no PublicIPv6"),
        ({"BackendV6Data": None}, "BackendV6Data is missing"),
        ({"BackendV6Data": {"VNI": 2, "VtepMAC": "02:00:00:00:00:09"}}, "differs"),
        ({"BackendV6Data": {"VNI": 1, "VtepMAC": "01:00:00:00:00:09"}}, "multicast"),
    ],
)
def test_a_bad_ipv6_half_costs_the_peer_its_ipv6_only(
    change: dict[str, object], reason: str
) -> None:
    good = peer(3)
    value = json.dumps(json.loads(render_lease(good)) | change)
    lease, why = read_lease(good.subnet, good.ipv6_subnet, value)
    assert why is not None and reason in why
    assert lease.subnet == good.subnet and not lease.has_ipv6


def test_the_same_mac_for_both_vteps_is_refused() -> None:
    good = peer(3)
    value = json.loads(render_lease(good))
    value["BackendV6Data"]["VtepMAC"] = good.vtep_mac
    _, why = read_lease(good.subnet, good.ipv6_subnet, json.dumps(value))
    assert why is not None and "same as the IPv4 VtepMAC" in why


# --- which IPv6 halves are used --------------------------------------------


def test_usable_ipv6_halves_become_ipv6_peers_and_v4_only_peers_are_listed() -> None:
    old = peer(4, v6=False)
    selection = select_peers(CONFIG, OWN, raw(OWN, peer(2), peer(3), old), PREFIX)
    assert [p.subnet for p in selection.peers] == [
        IPv4Network("10.244.2.0/24"),
        IPv4Network("10.244.3.0/24"),
        IPv4Network("10.244.4.0/24"),
    ]
    assert [p.subnet for p in selection.peers6] == [
        IPv6Network("fd00:10:244:2::/64"),
        IPv6Network("fd00:10:244:3::/64"),
    ]
    assert selection.without_ipv6 == (lease_key(PREFIX, old),)
    assert selection.rejected6 == ()


def _with_ipv6(n: int, subnet6: str, public6: str, mac6: str | None = None) -> Lease:
    base = peer(n)
    return Lease(
        base.subnet,
        base.public_ip,
        base.vni,
        base.vtep_mac,
        ipv6_subnet=IPv6Network(subnet6),
        public_ipv6=IPv6Address(public6),
        vtep_mac_v6=mac6 or base.vtep_mac_v6,
    )


@pytest.mark.parametrize(
    ("bad", "reason", "kept"),
    [
        (_with_ipv6(5, "fd00:10:245:5::/64", "2001:db8::15"), "outside IPv6Network", 1),
        (_with_ipv6(5, "fd00:10:244:1::/64", "2001:db8::15"), "overlaps this host's", 1),
        (_with_ipv6(5, "fd00:10:244:5::/64", "2001:db8::11"), "this host's own address", 1),
        (_with_ipv6(5, "fd00:10:244:5::/64", "2001:db8::15", OWN.vtep_mac), "another VTEP's", 1),
        # A shorter prefix would capture other hosts' subnets (peer 2's here).
        (_with_ipv6(5, "fd00:10:244::/57", "2001:db8::15"), "is not a /64", 1),
        # Two claims of one subnet: neither host gets it, peer 2 included.
        (_with_ipv6(5, "fd00:10:244:2::/64", "2001:db8::15"), "claimed by 2 leases", 0),
    ],
)
def test_a_bad_ipv6_half_is_skipped_and_never_programmed(
    bad: Lease, reason: str, kept: int
) -> None:
    plan6 = cluster_plan(CONFIG, OWN, raw(OWN, peer(2), bad), PREFIX, [], family=IPV6)
    plan4 = cluster_plan(CONFIG, OWN, raw(OWN, peer(2), bad), PREFIX, [])
    key = lease_key(PREFIX, bad)
    assert reason in plan6.rejected[key]
    assert bad.vtep_mac_v6 not in plan6.desired.tunnel_fdb
    assert all(f.remote != bad.public_ipv6 for f in plan6.desired.tunnel_fdb.values())
    assert len(plan6.desired.routes) == kept  # peer 2's, the control
    # The peer stays reachable over IPv4.
    assert bad.subnet in {r.dst for r in plan4.desired.routes.values()}


def test_a_host_without_ipv6_gets_no_ipv6_peers() -> None:
    v4_only = own_lease(CONFIG, OWN.subnet, OWN.public_ip)
    selection = select_peers(CONFIG, v4_only, raw(v4_only, peer(2)), PREFIX)
    assert selection.peers6 == () and len(selection.peers) == 1


@given(
    public6=st.one_of(
        st.text(max_size=45), st.integers(), st.none(), st.ip_addresses(v=6).map(str)
    ),
    mac6=st.one_of(st.text(max_size=20), st.none(), st.integers()),
    vni6=st.one_of(st.integers(-2, 1 << 25), st.text(max_size=3), st.booleans()),
    key6=st.one_of(
        st.text(alphabet="0123456789abcdef:-/&", max_size=30), st.just("fd00:10:244:7::-64")
    ),
)
def test_fuzzed_ipv6_fields_never_crash_selection_or_yield_bad_entries(
    public6: object, mac6: object, vni6: object, key6: str
) -> None:
    base = peer(7)
    value = json.loads(render_lease(base))
    value["PublicIPv6"] = public6
    value["BackendV6Data"] = {"VNI": vni6, "VtepMAC": mac6}
    leases = raw(OWN, peer(2))
    leases[f"{PREFIX}/subnets/10.244.7.0-24&{key6}"] = json.dumps(value).encode()
    plan = cluster_plan(CONFIG, OWN, leases, PREFIX, [], family=IPV6)
    assert CONFIG.ipv6 is not None
    for route in plan.desired.routes.values():
        assert route.dst.subnet_of(CONFIG.ipv6.network)  # type: ignore[arg-type]
        assert not route.dst.overlaps(OWN.ipv6_subnet)  # type: ignore[arg-type]
    for fdb in plan.desired.tunnel_fdb.values():
        assert isinstance(fdb.remote, IPv6Address)
        assert not (fdb.remote.is_multicast or fdb.remote.is_link_local)
        assert not int(fdb.mac[:2], 16) & 1


# --- entries and devices ----------------------------------------------------


def test_a_tunneled_ipv6_peer_gets_route_neighbour_and_both_fdb_entries() -> None:
    two = peer(2)
    plan = cluster_plan(CONFIG, OWN, raw(OWN, two), PREFIX, [], family=IPV6)
    hop = IPv6Address("fd00:10:244:2::")
    assert list(plan.desired.routes.values()) == [Route(IPv6Network("fd00:10:244:2::/64"), hop)]
    assert list(plan.desired.neighbours.values()) == [Neighbour(hop, two.vtep_mac_v6)]
    assert list(plan.desired.tunnel_fdb.values()) == [
        TunnelFdb(two.vtep_mac_v6, IPv6Address("2001:db8::12"))
    ]
    assert list(plan.desired.bridge_fdb.values()) == [BridgeFdb(two.vtep_mac_v6)]


def test_host_gw_routes_ipv6_via_the_peers_public_ipv6_when_on_link() -> None:
    config = parse_network_config(json.dumps(DUAL_JSON | {"Backend": {"Type": "host-gw"}}))
    own = own_lease(config, OWN.subnet, OWN.public_ip, OWN.ipv6_subnet, OWN.public_ipv6)
    near = own_lease(
        config,
        IPv4Network("10.244.2.0/24"),
        IPv4Address("192.0.2.12"),
        IPv6Network("fd00:10:244:2::/64"),
        IPv6Address("2001:db8::12"),
    )
    far = own_lease(
        config,
        IPv4Network("10.244.3.0/24"),
        IPv4Address("192.0.2.13"),
        IPv6Network("fd00:10:244:3::/64"),
        IPv6Address("2001:db8:1::13"),
    )
    plan = cluster_plan(
        config, own, raw(own, near, far), PREFIX, [IPv6Network("2001:db8::/64")], family=IPV6
    )
    assert list(plan.desired.routes.values()) == [
        Route(IPv6Network("fd00:10:244:2::/64"), IPv6Address("2001:db8::12"), direct=True)
    ]
    assert "PublicIPv6 2001:db8:1::13 is not on" in plan.rejected[lease_key(PREFIX, far)]


def test_the_device_spec_has_the_second_vtep_and_an_mtu_that_fits_both_tunnels() -> None:
    spec = device_spec(config=CONFIG, own=OWN, bridge="ovl0", underlay_ifindex=2, underlay_mtu=1500)
    assert spec.vtep == "ovl.1" and spec.vtep6 == "ovl-v6.1"
    assert spec.vtep6_mac == OWN.vtep_mac_v6 and spec.local_ip6 == IPv6Address("2001:db8::11")
    assert str(spec.gateway6) == "fd00:10:244:1::1/64"
    assert spec.mtu == 1430  # 1500 - 70: the IPv6 tunnel's overhead, not flannel's 50
    v4_only = own_lease(CONFIG, OWN.subnet, OWN.public_ip)
    spec4 = device_spec(
        config=CONFIG, own=v4_only, bridge="ovl0", underlay_ifindex=2, underlay_mtu=1500
    )
    assert spec4.vtep6 == "" and spec4.gateway6 is None and spec4.mtu == 1450


def test_a_configured_mtu_must_fit_the_ipv6_tunnel_too() -> None:
    config = parse_network_config(json.dumps(DUAL_JSON | {"Backend": {"MTU": 1440}}))
    with pytest.raises(ConfigError, match="minus 70"):
        check_mtu(config, UNDERLAY)
    assert check_mtu(config, Underlay("eth0", 2, 1500, IPv4Address("192.0.2.11"))) == 1440


def test_the_subnet_file_names_both_subnets_as_flannel_does() -> None:
    egress = EgressSpec("masquerade", CONFIG.network, "ovl0", "ovl_gwbridge")
    host = host_plan(CONFIG, OWN, UNDERLAY, bridge="ovl0", egress=egress)
    text = subnet_file_for(host).render()
    assert "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n" in text
    assert "FLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\n" in text
    assert "FLANNEL_IPV6_MASQ=true\n" in text
    assert host.egress.cluster6 == IPv6Network("fd00:10:244::/56")


def test_the_subnet_file_names_the_dns_responder_on_both_gateways_when_given(
    tmp_path: Path,
) -> None:
    egress = EgressSpec("masquerade", CONFIG.network, "ovl0", "ovl_gwbridge")
    host = host_plan(CONFIG, OWN, UNDERLAY, bridge="ovl0", egress=egress)
    gateways = (IPv4Address("10.244.1.1"), IPv6Address("fd00:10:244:1::1"))
    text = subnet_file_for(host, dns_servers=gateways, dns_domain="overlay.internal").render()
    assert (
        "OVERLAYD_DNS=10.244.1.1,fd00:10:244:1::1\nOVERLAYD_DNS_DOMAIN=overlay.internal\n" in text
    )
    # The writer passes them through; control: without them, no DNS line.
    writer = SubnetFileWriter(tmp_path / "subnet.env")
    assert writer.programmed(host, dns_servers=gateways, dns_domain="overlay.internal")
    assert read_dns(writer.path) == (gateways, "overlay.internal")
    assert writer.programmed(host)
    assert read_dns(writer.path) == ((), None)
    assert "OVERLAYD_DNS" not in subnet_file_for(host).render()


def test_a_lease_fits_only_with_the_ipv6_half_the_network_and_host_call_for() -> None:
    v4_only = own_lease(CONFIG, OWN.subnet, OWN.public_ip)
    assert lease_fits(CONFIG, OWN, ipv6_capable=True)
    assert not lease_fits(CONFIG, v4_only, ipv6_capable=True)  # lease again, with IPv6
    assert lease_fits(CONFIG, v4_only, ipv6_capable=False)  # no IPv6 here: v4 is right
    plain = parse_network_config('{"Network": "10.244.0.0/16"}')
    assert not lease_fits(plain, OWN, ipv6_capable=True)  # IPv6 switched off
    narrower = parse_network_config(json.dumps(DUAL_JSON | {"IPv6Network": "fd00:10:245::/56"}))
    assert not lease_fits(narrower, OWN, ipv6_capable=True)


# --- leasing -----------------------------------------------------------------


async def test_both_subnets_are_leased_in_one_key_and_taken_back_after_a_restart() -> None:
    store = FakeStore()
    leaser = SubnetLeaser(
        store,
        etcd_prefix=PREFIX,
        public_ip=UNDERLAY.address,
        ttl=30,
        public_ipv6=UNDERLAY.address6,
    )
    held = await leaser.acquire(CONFIG)
    assert held.lease.has_ipv6 and held.key == lease_key(PREFIX, held.lease)
    assert "&fd00:10:244:" in held.key
    assert len(store.values) == 1
    again = await leaser.acquire(CONFIG)  # a restart: the same public IP
    assert again.key == held.key and again.lease == held.lease
    assert len(store.values) == 1


async def test_a_v4_lease_becomes_dual_stack_in_one_transaction_keeping_its_subnet() -> None:
    store = FakeStore()
    plain = parse_network_config('{"Network": "10.244.0.0/16"}')
    leaser = SubnetLeaser(
        store, etcd_prefix=PREFIX, public_ip=UNDERLAY.address, ttl=30, public_ipv6=UNDERLAY.address6
    )
    before = await leaser.acquire(plain)
    assert not before.lease.has_ipv6
    after = await leaser.acquire(CONFIG, hints6=(IPv6Network("fd00:10:244:9::/64"),))
    assert after.lease.subnet == before.lease.subnet
    assert after.lease.ipv6_subnet == IPv6Network("fd00:10:244:9::/64")
    assert list(store.values) == [after.key]  # the old key went in the same transaction


async def test_a_new_lease_avoids_ipv6_subnets_other_keys_name() -> None:
    store = FakeStore()
    for n in range(1, 5):
        await store.put(lease_key(PREFIX, peer(n)), render_lease(peer(n)))
    leaser = SubnetLeaser(
        store,
        etcd_prefix=PREFIX,
        public_ip=IPv4Address("192.0.2.99"),
        ttl=30,
        public_ipv6=IPv6Address("2001:db8::99"),
    )
    held = await leaser.acquire(CONFIG)
    assert held.lease.ipv6_subnet not in {peer(n).ipv6_subnet for n in range(1, 5)}
    assert held.lease.subnet not in {peer(n).subnet for n in range(1, 5)}


async def test_a_v4_only_key_of_the_same_subnet_blocks_the_dual_stack_one() -> None:
    store = FakeStore()
    v4_only = own_lease(CONFIG, IPv4Network("10.244.1.0/24"), IPv4Address("192.0.2.50"))
    v4_key = subnet_key(PREFIX, v4_only.subnet)
    lease_id = await store.grant(30)
    created = await store.create(
        subnet_key(PREFIX, OWN.subnet, OWN.ipv6_subnet),
        render_lease(OWN),
        lease_id,
        absent=subnet_key_range(PREFIX, OWN.subnet),
    )
    assert created  # the control: nothing holds the subnet yet
    store2 = FakeStore()
    await store2.put(v4_key, render_lease(v4_only))
    blocked = await store2.create(
        subnet_key(PREFIX, OWN.subnet, OWN.ipv6_subnet),
        render_lease(OWN),
        await store2.grant(30),
        absent=subnet_key_range(PREFIX, OWN.subnet),
    )
    assert not blocked


# --- the loop: an IPv6 manager beside the IPv4 one --------------------------


def dual_knowledge(*peers: Lease) -> Knowledge:
    egress = EgressSpec("masquerade", CONFIG.network, "ovl0", "ovl_gwbridge")
    host = host_plan(CONFIG, OWN, UNDERLAY, bridge="ovl0", egress=egress)
    return Knowledge(
        config=CONFIG,
        own=OWN,
        spec=host.spec,
        egress=host.egress,
        etcd_prefix=PREFIX,
        raw_leases=raw(OWN, *peers),
    )


async def test_a_pass_programs_ipv6_entries_and_repairs_and_removes_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dataplane = FakeDataplane()
    knowledge = dual_knowledge(peer(2), peer(3, v6=False))
    loop = Reconciler(knowledge, dataplane)
    caplog.set_level(logging.WARNING)
    assert (await loop.reconcile_once()).ok
    assert len(dataplane.kernel) == 8 and len(dataplane.kernel6) == 4
    # A v4-only peer: IPv4 entries, no IPv6 ones, one warning (not one per pass).
    assert (await loop.reconcile_once()).ok
    warnings = [r for r in caplog.records if "peer_without_ipv6" in r.getMessage()]
    assert len(warnings) == 1 and "10.244.3.0-24" in warnings[0].getMessage()
    # Drift: an IPv6 route deleted behind our back comes back on a full pass.
    route6 = next(iter(dataplane.kernel6.routes.values()))
    dataplane.kernel6 = type(dataplane.kernel6).of(
        e
        for table in (
            dataplane.kernel6.neighbours,
            dataplane.kernel6.tunnel_fdb,
            dataplane.kernel6.bridge_fdb,
        )
        for e in table.values()
    )
    assert (await loop.reconcile_once(full=True)).ok
    assert route6 in dataplane.kernel6.routes.values()
    # The peer leaves: its IPv6 entries go, and only its.
    knowledge.raw_leases = raw(OWN, peer(3, v6=False))
    assert (await loop.reconcile_once(full=False)).ok
    assert len(dataplane.kernel6) == 0 and len(dataplane.kernel) == 4


async def test_an_ipv4_event_is_never_excused_by_the_ipv6_manager() -> None:
    dataplane = FakeDataplane()
    loop = Reconciler(dual_knowledge(peer(2)), dataplane)
    await loop.reconcile_once()
    route4 = next(iter(dataplane.kernel.routes.values()))
    route6 = next(iter(dataplane.kernel6.routes.values()))
    # Our own writes coming back are echoes (the control) ...
    loop.note_drift(Observed(True, route4, "route"))
    loop.note_drift(Observed(True, route6, "route"))
    assert loop.drift_events == 0
    # ... but the deletion of either family's entry is drift, though the
    # other family's manager holds nothing there.
    loop.note_drift(Observed(False, route4, "route"))
    assert loop.drift_events == 1
    loop.note_drift(Observed(False, route6, "route"))
    assert loop.drift_events == 2
    mac6 = peer(2).vtep_mac_v6
    loop.note_drift(Observed(False, BridgeFdb(mac6), "fdb", family=6))
    assert loop.drift_events == 3
    # The same bridge FDB event on the IPv4 VTEP is for the IPv4 manager,
    # which holds no such MAC: nothing of its own went.
    loop.note_drift(Observed(False, BridgeFdb(mac6), "fdb", family=4))
    assert loop.drift_events == 3


# --- what the review found -----------------------------------------------------


@pytest.mark.parametrize("public6", ["2001:db8::11%eth0", "::c000:201", "fe80::1", "ff02::1"])
def test_a_scoped_or_non_unicast_public_ipv6_is_refused(public6: str) -> None:
    good = peer(3)
    value = json.dumps(json.loads(render_lease(good)) | {"PublicIPv6": public6})
    lease, why = read_lease(good.subnet, good.ipv6_subnet, value)
    assert why is not None and not lease.has_ipv6
    # The control: the lease's own address is fine.
    assert read_lease(good.subnet, good.ipv6_subnet, render_lease(good))[1] is None


def test_an_ipv4_lease_with_one_of_our_vtep_macs_is_refused() -> None:
    for mac in (OWN.vtep_mac, OWN.vtep_mac_v6):
        thief = Lease(IPv4Network("10.244.6.0/24"), IPv4Address("192.0.2.16"), 1, mac)
        selection = select_peers(CONFIG, OWN, raw(OWN, peer(2), thief), PREFIX)
        assert [p.subnet for p in selection.peers] == [peer(2).subnet]  # the control stays
        assert "one of this host's VTEPs'" in selection.rejected[0].reason


def test_a_network_holding_link_local_addresses_is_refused() -> None:
    with pytest.raises(ConfigError, match="IPv6Network"):
        parse_network_config(json.dumps(DUAL_JSON | {"IPv6Network": "fe00::/7"}))


def test_an_mtu_below_ipv6s_minimum_is_refused_only_with_ipv6() -> None:
    small = Underlay("eth0", 2, 1340, IPv4Address("192.0.2.11"), IPv6Address("2001:db8::11"))
    with pytest.raises(ConfigError, match="below IPv6's minimum"):
        check_mtu(CONFIG, small)
    v4_only = Underlay("eth0", 2, 1340, IPv4Address("192.0.2.11"))
    assert check_mtu(CONFIG, v4_only) == 1290


async def _leaser(store: FakeStore, n: int, *, v6: bool = True) -> SubnetLeaser:
    return SubnetLeaser(
        store,
        etcd_prefix=PREFIX,
        public_ip=IPv4Address(f"192.0.2.{100 + n}"),
        ttl=30,
        public_ipv6=IPv6Address(f"2001:db8::{100 + n}") if v6 else None,
    )


@pytest.mark.parametrize("first_v6", [True, False])
@pytest.mark.parametrize("second_v6", [True, False])
async def test_two_spellings_of_one_ipv4_subnet_never_both_get_created(
    first_v6: bool, second_v6: bool
) -> None:
    store = FakeStore()
    one = await (await _leaser(store, 1, v6=first_v6)).acquire(
        CONFIG, hints=(IPv4Network("10.244.7.0/24"),)
    )
    assert one.lease.subnet == IPv4Network("10.244.7.0/24")  # the control
    # Another host built its key for the same IPv4 subnet before it saw ours
    # (the race): the create of any spelling fails.
    other = own_lease(
        CONFIG,
        IPv4Network("10.244.7.0/24"),
        IPv4Address("192.0.2.102"),
        IPv6Network("fd00:10:244:77::/64") if second_v6 else None,
        IPv6Address("2001:db8::102") if second_v6 else None,
    )
    created = await store.create(
        lease_key(PREFIX, other),
        render_lease(other),
        await store.grant(30),
        absent=subnet_key_range(PREFIX, other.subnet),
    )
    assert not created and list(store.values) == [one.key]


async def test_ipv6_subnets_pair_with_the_ipv4_ones_so_overlayd_hosts_never_share_one() -> None:
    store = FakeStore()
    held = [await (await _leaser(store, n)).acquire(CONFIG) for n in range(12)]
    for h in held:
        assert h.lease.ipv6_subnet is not None
        v4_index = int(h.lease.subnet.network_address) - int(CONFIG.subnet_min)
        v6_index = int(h.lease.ipv6_subnet.network_address) - int(
            CONFIG.ipv6.subnet_min  # type: ignore[union-attr]
        )
        assert v4_index >> 8 == v6_index >> 64
    assert len({h.lease.ipv6_subnet for h in held}) == 12


async def test_with_ipv6_subnets_exhausted_a_host_leases_ipv4_only_and_stays() -> None:
    small = parse_network_config(json.dumps(DUAL_JSON | {"IPv6Network": "fd00:10:244::/62"}))
    store = FakeStore()
    held = [await (await _leaser(store, n)).acquire(small) for n in range(3)]
    assert all(h.lease.has_ipv6 for h in held)  # three /64s: the control
    leaser = await _leaser(store, 3)
    fourth = await leaser.acquire(small)
    assert not fourth.lease.has_ipv6 and leaser.ipv6_exhausted
    # The keeper must not lease again and again for an IPv6 half it cannot get.
    capable = leaser.public_ipv6 is not None and not leaser.ipv6_exhausted
    assert lease_fits(small, fourth.lease, ipv6_capable=capable)


async def test_both_families_allow_list_changes_go_in_one_nft_run() -> None:
    dataplane = FakeDataplane()
    knowledge = dual_knowledge(peer(2))
    loop = Reconciler(knowledge, dataplane)
    assert (await loop.reconcile_once()).ok
    assert dataplane.filter_batches == [2]  # peer 2's IPv4 and IPv6 addresses, one run
    knowledge.raw_leases = raw(OWN)
    assert (await loop.reconcile_once(full=False)).ok
    assert dataplane.filter_batches == [2, 2]  # and their removal
