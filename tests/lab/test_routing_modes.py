"""Routed mode (host-gw) and DirectRouting in the lab: the same hosts and
containers, reached without a tunnel where the underlay allows it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayd.lab import netns
from overlayd.lab.lab import PREFIX, Lab, LabSettings
from tests.conftest import CONVERGE, SESSION_TAG, capture, needs_root, wait_until
from tests.lab.fakes import lab_network

pytestmark = [needs_root, pytest.mark.lab]


def our_routes(lab: Lab, host: int) -> dict[str, str]:
    out = netns.ip(lab.host_ns(host), "-j", "route", "show", "proto", "77")
    return {r["dst"]: f"{r.get('gateway')} {r['dev']}" for r in json.loads(out or "[]")}


def put(lab: Lab, key: str, value: dict[str, object]) -> None:
    async def write(store: object) -> None:
        await store.put(key, json.dumps(value))  # type: ignore[attr-defined]

    lab.etcd(write)


@pytest.fixture(scope="module")
def host_gw() -> Iterator[Lab]:
    lab = Lab(f"{SESSION_TAG}g")
    try:
        lab.up(3, config=lab_network(backend="host-gw"), settings=LabSettings())
        yield lab
    finally:
        lab.down()


def test_host_gw_routes_every_peer_via_its_public_ip_without_a_tunnel(host_gw: Lab) -> None:
    assert all(r.ok for r in host_gw.check(timeout=CONVERGE))
    routes = our_routes(host_gw, 1)
    for peer in (2, 3):
        assert routes[str(host_gw.subnet(peer))] == f"{host_gw.host_address(peer)} eth0"
    assert "ovl." not in netns.ip(host_gw.host_ns(1), "-o", "link")
    assert "FLANNEL_MTU=1500" in host_gw.subnet_file(1).read_text()


def test_host_gw_traffic_on_the_wire_is_plain_ip_between_containers(
    host_gw: Lab, tmp_path: Path
) -> None:
    from scapy.all import ICMP, IP, UDP, rdpcap  # type: ignore[attr-defined]

    src, dst = (next(c for c in host_gw.containers() if c.host == h) for h in (1, 2))
    pcap = tmp_path / "wire.pcap"

    def ping() -> None:
        assert Lab.ping(src, dst, count=2, wait=1).ok

    capture(host_gw.switch_ns, "br0", "icmp", 2, pcap, ping)
    packets = rdpcap(str(pcap))
    assert packets and all(UDP not in p for p in packets)
    assert any(
        str(p[IP].src) == str(src.address) and str(p[IP].dst) == str(dst.address) and ICMP in p
        for p in packets
    )


def test_host_gw_gives_an_off_link_peer_no_route_and_one_warning(host_gw: Lab) -> None:
    put(
        host_gw,
        f"{PREFIX}/subnets/10.244.250.0-24",
        {"PublicIP": "198.51.100.50", "BackendType": "host-gw", "BackendData": None},
    )
    wait_until(lambda: "10.244.250.0-24" in host_gw.daemon_log(1).read_text())
    # A second off-link peer makes the daemon run another pass, which must not
    # repeat the first one's warning.
    put(
        host_gw,
        f"{PREFIX}/subnets/10.244.251.0-24",
        {"PublicIP": "198.51.100.51", "BackendType": "host-gw", "BackendData": None},
    )
    wait_until(lambda: "10.244.251.0-24" in host_gw.daemon_log(1).read_text())
    assert not {"10.244.250.0/24", "10.244.251.0/24"} & set(our_routes(host_gw, 1))
    log = host_gw.daemon_log(1).read_text()
    assert log.count("10.244.250.0-24") == 1 and "not on eth0's link" in log


@pytest.fixture(scope="module")
def direct() -> Iterator[Lab]:
    lab = Lab(f"{SESSION_TAG}d")
    try:
        lab.up(2, config=lab_network(direct_routing=True), settings=LabSettings())
        yield lab
    finally:
        lab.down()


def test_direct_routing_goes_straight_on_the_link_and_tunnels_the_rest(direct: Lab) -> None:
    assert all(r.ok for r in direct.check(timeout=CONVERGE))
    assert our_routes(direct, 1)[str(direct.subnet(2))] == "192.0.2.12 eth0"
    put(
        direct,
        f"{PREFIX}/subnets/10.244.251.0-24",
        {
            "PublicIP": "198.51.100.60",
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:02:51"},
        },
    )
    wait_until(lambda: our_routes(direct, 1).get("10.244.251.0/24") == "10.244.251.0 ovl0")
    fdb = netns.sh(["bridge", "-n", direct.host_ns(1), "fdb", "show", "dev", "ovl.1"])
    assert "02:00:00:00:02:51 dst 198.51.100.60" in fdb


def test_direct_routing_follows_the_underlay_as_it_changes(direct: Lab) -> None:
    ns = direct.host_ns(1)
    netns.ip(ns, "addr", "add", "198.51.100.1/24", "dev", "eth0")
    wait_until(lambda: our_routes(direct, 1).get("10.244.251.0/24") == "198.51.100.60 eth0")
    fdb = netns.sh(["bridge", "-n", ns, "fdb", "show", "dev", "ovl.1"])
    assert "02:00:00:00:02:51" not in fdb  # no tunnel entries left for a direct peer
    netns.ip(ns, "addr", "del", "198.51.100.1/24", "dev", "eth0")
    wait_until(lambda: our_routes(direct, 1).get("10.244.251.0/24") == "10.244.251.0 ovl0")
    assert all(r.ok for r in direct.check(timeout=CONVERGE))
