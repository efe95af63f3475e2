"""Routed mode (host-gw) and DirectRouting in the lab: the same hosts and
containers, reached without a tunnel where the underlay allows it; host-gw
for both families (the lab's underlay has both on its link), node ports
included (a backend on another host is reached over the underlay)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from functools import partial
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from overlayd.lab import netns
from overlayd.lab.lab import PREFIX, Lab, LabSettings
from overlayd.lab.policycheck import OWN_PREFIX, label_endpoint
from overlayd.model import IPV4, IPV6, Family
from overlayd.plan.service import parse_service
from overlayd.store.etcd import EtcdStore
from overlayd.store.services import create_service
from tests.conftest import CONVERGE, SESSION_TAG, capture, needs_root, wait_until
from tests.lab.fakes import fake_subnet6, lab_network
from tests.lab.families import FAMILIES

pytestmark = [needs_root, pytest.mark.lab]


def our_routes(lab: Lab, host: int, family: Family = IPV4) -> dict[str, str]:
    out = netns.ip(lab.host_ns(host), "-j", family.iproute2_flag, "route", "show", "proto", "77")
    return {r["dst"]: f"{r.get('gateway')} {r['dev']}" for r in json.loads(out or "[]")}


def subnet_of(lab: Lab, host: int, family: Family) -> str:
    return str(lab.subnet6(host) if family.version == 6 else lab.subnet(host))


def put(lab: Lab, key: str, value: dict[str, object]) -> None:
    async def write(store: object) -> None:
        await store.put(key, json.dumps(value))  # type: ignore[attr-defined]

    lab.etcd(write)


@pytest.fixture(scope="module")
def host_gw() -> Iterator[Lab]:
    lab = Lab(f"{SESSION_TAG}g")
    try:
        config = lab_network(
            backend="host-gw",
            service_network=IPv4Network("10.96.0.0/16"),
            service_network6=IPv6Network("fd00:10:96::/112"),
        )
        lab.up(3, config=config, settings=LabSettings())
        yield lab
    finally:
        lab.down()


@FAMILIES
def test_host_gw_routes_every_peer_via_its_public_ip_without_a_tunnel(
    host_gw: Lab, family: Family
) -> None:
    assert all(r.ok for r in host_gw.check(timeout=CONVERGE, family=family))
    routes = our_routes(host_gw, 1, family)
    for peer in (2, 3):
        public = Lab.public_address(peer, family)
        assert routes[subnet_of(host_gw, peer, family)] == f"{public} eth0"
    assert "ovl." not in netns.ip(host_gw.host_ns(1), "-o", "link")
    assert "ovl-v6." not in netns.ip(host_gw.host_ns(1), "-o", "link")
    assert "FLANNEL_MTU=1500" in host_gw.subnet_file(1).read_text()


@FAMILIES
def test_host_gw_traffic_on_the_wire_is_plain_ip_between_containers(
    host_gw: Lab, tmp_path: Path, family: Family
) -> None:
    from scapy.all import (  # type: ignore[attr-defined]
        ICMP,
        IP,
        UDP,
        ICMPv6EchoReply,
        ICMPv6EchoRequest,
        IPv6,
        rdpcap,
    )

    src, dst = host_gw.container(1), host_gw.container(2)
    pcap = tmp_path / "wire.pcap"

    def ping() -> None:
        assert Lab.ping(src, dst, count=2, wait=1, family=family).ok

    if family.version == 6:
        # Echo requests and replies only: neighbour discovery between the
        # hosts is ICMPv6 too, and must not use up the packet count.
        bpf, ip_layer = "icmp6 and (ip6[40] == 128 or ip6[40] == 129)", IPv6
        echo: tuple[type, ...] = (ICMPv6EchoRequest, ICMPv6EchoReply)
    else:
        bpf, ip_layer, echo = "icmp", IP, (ICMP,)
    capture(host_gw.switch_ns, "br0", bpf, 2, pcap, ping)
    packets = rdpcap(str(pcap))
    assert packets and all(UDP not in p for p in packets)
    assert any(
        str(p[ip_layer].src) == str(src.address_of(family))
        and str(p[ip_layer].dst) == str(dst.address_of(family))
        and any(e in p for e in echo)
        for p in packets
    )


def fake_key(octet: int) -> str:
    """A dual-stack lease key of a host that does not exist (tests/lab/fakes.py)."""
    return f"{PREFIX}/subnets/10.244.{octet}.0-24&{fake_subnet6(octet).replace('/', '-')}"


def count(lab: Lab, host: int, text: str) -> int:
    return lab.daemon_log(host).read_text().count(text)


def logged_once(lab: Lab, host: int, text: str) -> bool:
    return count(lab, host, text) == 1


async def delete(key: str, store: EtcdStore) -> bool:
    return await store.delete(key)


def test_host_gw_gives_an_off_link_peer_no_route_and_one_warning_per_family(
    host_gw: Lab,
) -> None:
    """A peer whose public addresses are both off the underlay's link gets
    no route in either family and one warning per family; a peer on the
    IPv4 link but off the IPv6 one gets its IPv4 route only."""
    off, half = fake_key(250), fake_key(251)
    try:
        put(
            host_gw,
            off,
            {
                "PublicIP": "198.51.100.50",
                "PublicIPv6": "2001:db8:ffff::50",
                "BackendType": "host-gw",
                "BackendData": None,
            },
        )
        for event in ("lease_skipped", "lease_ipv6_skipped"):
            wait_until(partial(logged_once, host_gw, 1, f"event={event} key={off} "))
        # A second peer makes the daemon run another pass, which must not
        # repeat the first one's warnings; its IPv4 route shows the pass ran.
        put(
            host_gw,
            half,
            {
                "PublicIP": "192.0.2.51",
                "PublicIPv6": "2001:db8:ffff::51",
                "BackendType": "host-gw",
                "BackendData": None,
            },
        )
        wait_until(lambda: our_routes(host_gw, 1).get("10.244.251.0/24") == "192.0.2.51 eth0")
        wait_until(partial(logged_once, host_gw, 1, f"event=lease_ipv6_skipped key={half} "))
        assert "10.244.250.0/24" not in our_routes(host_gw, 1)
        v6_routes = our_routes(host_gw, 1, IPV6)
        assert not {fake_subnet6(250), fake_subnet6(251)} & set(v6_routes)
        assert str(host_gw.subnet6(2)) in v6_routes  # the real peers keep theirs
        assert count(host_gw, 1, f"event=lease_skipped key={off} ") == 1
        assert count(host_gw, 1, f"event=lease_ipv6_skipped key={off} ") == 1
        assert count(host_gw, 1, f"key={half} ") == 1  # its IPv6 warning alone
        assert "not on eth0's link" in host_gw.daemon_log(1).read_text()
    finally:
        for key in (off, half):
            host_gw.etcd(partial(delete, key))


NODE_PORT, BACKEND_PORT = 30090, 8080


@pytest.fixture(scope="module")
def node_port(host_gw: Lab) -> Iterator[Lab]:
    """A service with a Cluster node port whose one backend is h2's
    container (tests/netns/svc_whoami.py's server: it answers with the
    client address it saw)."""
    backend = host_gw.container(2)
    server = subprocess.Popen(
        netns.module_argv(backend.ns, "tests.netns.svc_whoami", "serve", str(BACKEND_PORT)),
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        host_gw.etcd(partial(label_endpoint, address=backend.address, labels={"app": "np"}))
        config = host_gw.network_config()
        assert config is not None
        document = {
            "name": "np",
            "selector": {"matchLabels": {"app": "np"}},
            "ports": [{"port": 80, "targetPort": BACKEND_PORT, "nodePort": NODE_PORT}],
        }
        service = parse_service(document, service_networks=config.service_networks)
        host_gw.etcd(
            lambda store: create_service(store, OWN_PREFIX, service, config.service_networks)
        )
        yield host_gw
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


@FAMILIES
def test_host_gw_a_node_port_reaches_a_backend_on_another_host_from_the_bridge_address(
    node_port: Lab, family: Family
) -> None:
    """From the outside to h1's node port, on to h2's container over the
    underlay (no tunnel): h2 lets a connection to its container in only
    from a cluster address, so h1 hands it on from its bridge address,
    where h2 routes the answer back; from h1's underlay address (what a
    plain masquerade picks for that route) it was dropped."""
    lab = node_port
    subnet = lab.subnet6(1) if family.version == 6 else lab.subnet(1)
    assert subnet is not None
    entry = str(Lab.public_address(1, family))
    got: list[str] = []

    def answered() -> bool:
        argv = netns.module_argv(
            lab.outside_ns, "tests.netns.svc_whoami", "connect", entry, str(NODE_PORT), "3", "2"
        )
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
        got[:] = [str(answer) for answer, _ in json.loads(out.stdout)]
        return all(" " in answer for answer in got)

    wait_until(answered, timeout=CONVERGE, step=0.5)
    backend = lab.container(2).address_of(family)
    assert set(got) == {f"{backend} {subnet.network_address + 1}"}, got


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
