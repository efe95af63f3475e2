"""Peer leases are untrusted: bad ones are rejected with a reason, never used."""

from __future__ import annotations

import contextlib
import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlayd.config import parse_network_config
from overlayd.errors import LeaseError
from overlayd.model import Lease
from overlayd.plan.leases import (
    parse_lease,
    parse_subnet_key,
    render_lease,
    subnet_key,
)
from overlayd.plan.selection import select_peers

PREFIX = "/coreos.com/network"
CONFIG = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"VNI": 1}}')
OWN = Lease(IPv4Network("10.244.1.0/24"), IPv4Address("192.0.2.11"), 1, "02:00:00:00:00:01")


def value(
    public_ip: object = "192.0.2.12",
    mac: object = "02:00:00:00:00:02",
    vni: object = 1,
    **extra: object,
) -> bytes:
    raw = {
        "PublicIP": public_ip,
        "BackendType": "vxlan",
        "BackendData": {"VNI": vni, "VtepMAC": mac},
        **extra,
    }
    return json.dumps(raw).encode()


def key(subnet: str) -> str:
    return subnet_key(PREFIX, IPv4Network(subnet))


def test_key_uses_flannels_spelling() -> None:
    assert key("10.244.3.0/24") == "/coreos.com/network/subnets/10.244.3.0-24"
    assert parse_subnet_key("/coreos.com/network/subnets/10.244.3.0-24", PREFIX) == IPv4Network(
        "10.244.3.0/24"
    )


@pytest.mark.parametrize(
    "bad_key",
    [
        "/coreos.com/network/subnets/10.244.3.1-24",
        "/coreos.com/network/subnets/10.244.3.0-33",
        "/coreos.com/network/subnets/hello",
        "/coreos.com/network/subnets/10.244.3.0-24/extra",
        "/other/subnets/10.244.3.0-24",
    ],
)
def test_malformed_keys_are_refused(bad_key: str) -> None:
    with pytest.raises(LeaseError):
        parse_subnet_key(bad_key, PREFIX)


def test_render_and_parse_round_trip_in_flannels_format() -> None:
    lease = Lease(IPv4Network("10.244.2.0/24"), IPv4Address("192.0.2.12"), 1, "0a:00:00:00:00:02")
    text = render_lease(lease)
    assert json.loads(text)["BackendData"] == {"VNI": 1, "VtepMAC": "0a:00:00:00:00:02"}
    assert parse_lease(lease.subnet, text) == lease


def test_mac_is_normalised_to_lower_case() -> None:
    lease = parse_lease(IPv4Network("10.244.2.0/24"), value(mac="0A:BB:CC:DD:EE:FF"))
    assert lease.vtep_mac == "0a:bb:cc:dd:ee:ff"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{not json", "not valid JSON"),
        # 3 KB of brackets (under the size limit) raised RecursionError before.
        (b"[" * 3000, "nested too deeply"),
        (b"[]", "not a JSON object"),
        (value(public_ip=None), "PublicIP"),
        (value(public_ip="127.0.0.1"), "cannot be a tunnel endpoint"),
        (value(public_ip="224.0.0.1"), "cannot be a tunnel endpoint"),
        (value(public_ip="0.0.0.0"), "cannot be a tunnel endpoint"),
        (value(public_ip="300.1.1.1"), "not an IPv4 address"),
        (value(mac="01:00:5e:00:00:01"), "multicast"),
        (value(mac="ff:ff:ff:ff:ff:ff"), "multicast"),
        (value(mac="00:00:00:00:00:00"), "all zeros"),
        (value(mac="02:00:00:00:00"), "not a MAC"),
        (value(mac=12), "not a string"),
        (value(vni="1"), "not a VNI"),
        (value(vni=True), "not a VNI"),
        (value(vni=1 << 40), "not a VNI"),
        (json.dumps({"PublicIP": "192.0.2.12", "BackendType": "udp"}).encode(), "not vxlan"),
        (json.dumps({"PublicIP": "192.0.2.12", "BackendType": "vxlan"}).encode(), "BackendData"),
        (value(padding="x" * 5000), "bytes"),
    ],
)
def test_malformed_values_are_refused_with_a_reason(raw: bytes, words: str) -> None:
    with pytest.raises(LeaseError, match=words):
        parse_lease(IPv4Network("10.244.2.0/24"), raw)


def test_select_peers_keeps_good_leases_and_explains_every_rejection() -> None:
    raw = {
        key("10.244.1.0/24"): value(public_ip="192.0.2.11", mac="02:00:00:00:00:01"),  # own
        key("10.244.2.0/24"): value(),
        key("10.244.3.0/24"): b"garbage",
        key("10.245.0.0/24"): value(public_ip="192.0.2.13"),
        key("10.244.1.0/25"): value(public_ip="192.0.2.14"),
        key("10.244.4.0/24"): value(public_ip="192.0.2.15", vni=2),
        key("10.244.5.0/24"): value(public_ip="192.0.2.11"),
        key("10.244.6.0/23"): value(public_ip="192.0.2.16"),
        key("10.244.7.0/24"): value(public_ip="192.0.2.17"),
        f"{PREFIX}/subnets/unexpected": value(),
    }
    selection = select_peers(CONFIG, OWN, raw, PREFIX)
    assert [p.subnet for p in selection.peers] == [
        IPv4Network("10.244.2.0/24"),
        IPv4Network("10.244.6.0/23"),
    ]
    reasons = {r.key.rsplit("/", 1)[1]: r.reason for r in selection.rejected}
    assert "not valid JSON" in reasons["10.244.3.0-24"]
    assert "outside Network" in reasons["10.245.0.0-24"]
    assert "overlaps this host" in reasons["10.244.1.0-25"]
    assert "VNI 2 differs" in reasons["10.244.4.0-24"]
    assert "this host's own address" in reasons["10.244.5.0-24"]
    assert "overlaps the lease for 10.244.6.0/23" in reasons["10.244.7.0-24"]
    assert "not of the form" in reasons["unexpected"]


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_anything_but_lease_error(raw: bytes) -> None:
    with contextlib.suppress(LeaseError):
        parse_lease(IPv4Network("10.244.2.0/24"), raw)


ANY_SCALAR = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
MAYBE_IP = st.ip_addresses(v=4).map(str) | ANY_SCALAR
MAYBE_MAC = (
    st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b)) | ANY_SCALAR
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "PublicIP": MAYBE_IP,
            "BackendType": st.sampled_from(["vxlan", "host-gw"]) | ANY_SCALAR,
            "BackendData": st.fixed_dictionaries(
                {}, optional={"VNI": st.integers(-2, 1 << 25) | ANY_SCALAR, "VtepMAC": MAYBE_MAC}
            )
            | ANY_SCALAR,
        },
    )
)
def test_arbitrary_lease_shapes_are_either_valid_or_lease_error(raw: dict[str, object]) -> None:
    try:
        lease = parse_lease(IPv4Network("10.244.2.0/24"), json.dumps(raw))
    except LeaseError:
        return
    assert not lease.public_ip.is_loopback and not lease.public_ip.is_multicast
    if lease.backend_type == "vxlan":  # host-gw leases carry no MAC
        assert not int(lease.vtep_mac[:2], 16) & 1
    else:
        assert lease.backend_type == "host-gw" and lease.vtep_mac == ""
