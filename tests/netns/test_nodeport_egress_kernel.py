"""Node ports through the egress rules, on the real kernel, in every egress
mode: an outside client's connection to host A's node port reaches a
container on host B through the VXLAN tunnel (masqueraded to A's bridge
address, so the reply comes back through A), or a container on A itself,
and the replies come back; a port that is not a node port is not
forwarded, and the egress rules still keep the outside from opening
connections to containers directly.

Everything a host of overlayd holds is loaded the way the daemon loads it,
with `nft -f`: the egress table (plan/egress.py, through NftTable; under a
FORWARD drop policy with its iptables exceptions, as on a Docker host, in
the modes that have rules), the VXLAN allow-list (plan/vxlan_filter.py)
and the services table (plan/service_rules.py) on both hosts, with bridge
netfilter on (as while policies or gwbridge isolation exist: the harder
case). The VTEP-on-bridge devices and per-peer entries are iproute2's
spelling of ARCHITECTURE.md's.

    outside 203.0.113.2 ── ext0 203.0.113.1 ─ host A ─ eth0 192.0.2.11 ══ 192.0.2.12 eth0 ─ host B
                                               │                                        │
                                    ovl0 10.244.1.1 + ovl.1 (VXLAN)      ovl0 10.244.2.1 + ovl.1
                                    a1 10.244.1.2                        b1 10.244.2.2
    gwbridge mode: ovl_gwbridge 172.18.0.1/16 on each host, the container's
    eth1 172.18.0.2 with its default route (eth0: the cluster route only).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address

import pytest

from overlayd.dataplane import sysctl
from overlayd.dataplane.iptables import ForwardAccept
from overlayd.dataplane.nft import Nft, NftTable, NftVxlanFilter
from overlayd.lab import netns as lab_netns
from overlayd.model import IPNetwork
from overlayd.plan.egress import EgressSpec
from overlayd.plan.policy_model import Endpoint, LabelSelector, Protocol
from overlayd.plan.policy_rules import LocalSubnets
from overlayd.plan.service_model import Service, ServicePort, TrafficPolicy
from overlayd.plan.service_rules import script, service_ruleset, service_transaction
from overlayd.plan.vxlan_filter import FilterSpec, element_changes
from tests.conftest import needs_root, unique_name, wait_until

pytestmark = [needs_root, pytest.mark.root]

CLUSTER = IPv4Network("10.244.0.0/16")
GWBRIDGE = IPv4Network("172.18.0.0/16")
PORT = 8080
VXLAN_PORT = 8472
HOST_A_OUTSIDE = "203.0.113.1"
OUTSIDE = "203.0.113.2"
UNDERLAY = {1: "192.0.2.11", 2: "192.0.2.12"}
BRIDGE_MAC = {1: "02:0f:00:00:01:01", 2: "02:0f:00:00:02:01"}
A1, B1 = "10.244.1.2", "10.244.2.2"
BRIDGE_A = "10.244.1.1"


def endpoint(name: str, host: int, address: str) -> Endpoint:
    return Endpoint(
        key=f"/overlayd/endpoints/10.244.{host}.0-24/{name}",
        id=name,
        host=f"10.244.{host}.0-24",
        name=name,
        addresses=(IPv4Address(address),),
    )


def service(name: str, vip: str, node_port: int, policy: TrafficPolicy) -> Service:
    return Service(
        name=name,
        selector=LabelSelector((("app", name),)),
        ports=(ServicePort("", Protocol.TCP, 80, PORT, node_port),),
        vips=(ip_address(vip),),
        traffic_policy=policy,
    )


SERVICES = {
    # Its one backend on host B: through the tunnel, masqueraded.
    "remote": service("remote", "10.96.0.10", 30080, TrafficPolicy.CLUSTER),
    # Backends on both hosts, Local: only A's, with the client's address.
    "local": service("local", "10.96.0.11", 30081, TrafficPolicy.LOCAL),
    # Its one backend on host A itself, Cluster: masqueraded.
    "here": service("here", "10.96.0.12", 30082, TrafficPolicy.CLUSTER),
}
BACKENDS = {
    "remote": (endpoint("b1", 2, B1),),
    "local": (endpoint("a1", 1, A1), endpoint("b1", 2, B1)),
    "here": (endpoint("a1", 1, A1),),
}


@dataclass
class Site:
    mode: str
    namespaces: dict[str, str] = field(default_factory=dict)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def add(self, role: str) -> str:
        ns = unique_name("n")
        lab_netns.add_namespace(ns)
        self.namespaces[role] = ns
        return ns

    def connects(
        self, role: str, host: str, port: int, count: int = 10, wait: float = 3.0
    ) -> list[str]:
        argv = lab_netns.module_argv(
            self.namespaces[role],
            "tests.netns.svc_whoami",
            "connect",
            host,
            str(port),
            str(count),
            str(wait),
        )
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300)
        return [str(answer) for answer, _ in json.loads(out.stdout)]


def answered(answers: Sequence[str]) -> set[tuple[str, str]]:
    """(server, client address it saw) of every answer; fails on any connect
    that got none."""
    assert all(" " in a for a in answers), f"a connect failed: {answers}"
    return {(a.split()[0], a.split()[1]) for a in answers}


def spec(mode: str) -> EgressSpec:
    return EgressSpec(
        mode, CLUSTER, "ovl0", "ovl_gwbridge", GWBRIDGE if mode == "gwbridge" else None
    )


def make_host(site: Site, n: int) -> str:
    """Host n's overlay bridge with its VTEP as a port, as the daemon makes them."""
    ns = site.add(f"h{n}")

    def ip(*args: str) -> str:
        return lab_netns.ip(ns, *args)

    ip("link", "add", "ovl0", "address", BRIDGE_MAC[n], "type", "bridge")
    ip("addr", "add", f"10.244.{n}.1/24", "dev", "ovl0")
    lab_netns.in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    return ns


def tunnel(site: Site, n: int, peer: int) -> None:
    """The VTEP on the bridge and the per-peer entries (ARCHITECTURE.md)."""
    ns = site.namespaces[f"h{n}"]

    def ip(*args: str) -> str:
        return lab_netns.ip(ns, *args)

    ip(
        "link", "add", "ovl.1", "type", "vxlan", "id", "1", "local", UNDERLAY[n],
        "dstport", str(VXLAN_PORT), "nolearning",
    )  # fmt: skip
    ip("link", "set", "ovl.1", "master", "ovl0", "mtu", "1450", "up")
    lab_netns.in_ns(ns, "bridge", "link", "set", "dev", "ovl.1", "learning", "off", "flood", "off")
    ip("link", "set", "ovl0", "up")
    subnet = f"10.244.{peer}.0"
    ip("route", "add", f"{subnet}/24", "via", subnet, "dev", "ovl0", "onlink")
    ip("neigh", "replace", subnet, "lladdr", BRIDGE_MAC[peer], "dev", "ovl0", "nud", "permanent")
    mac = BRIDGE_MAC[peer]
    lab_netns.in_ns(ns, "bridge", "fdb", "add", mac, "dev", "ovl.1", "master", "static")
    lab_netns.in_ns(
        ns,
        "bridge",
        "fdb",
        "append",
        mac,
        "dev",
        "ovl.1",
        "dst",
        UNDERLAY[peer],
        "self",
        "permanent",
    )


def container(site: Site, name: str, n: int, address: str) -> None:
    host_ns, ns = site.namespaces[f"h{n}"], site.add(name)
    lab_netns.veth(host_ns, f"v{name}", ns, "eth0", mtu=1450)
    lab_netns.ip(host_ns, "link", "set", f"v{name}", "master", "ovl0", "up")
    lab_netns.ip(host_ns, "link", "set", f"v{name}", "type", "bridge_slave", "hairpin", "on")
    lab_netns.ip(ns, "addr", "add", f"{address}/24", "dev", "eth0")
    lab_netns.ip(ns, "link", "set", "eth0", "up")
    gateway = f"10.244.{n}.1"
    if site.mode == "gwbridge":
        # As overlay-cni attaches it: the cluster route on eth0, the
        # default route on eth1 through the gwbridge.
        lab_netns.ip(ns, "route", "add", str(CLUSTER), "via", gateway)
        lab_netns.veth(host_ns, f"g{name}", ns, "eth1")
        lab_netns.ip(host_ns, "link", "set", f"g{name}", "master", "ovl_gwbridge", "up")
        lab_netns.ip(ns, "addr", "add", "172.18.0.2/16", "dev", "eth1")
        lab_netns.ip(ns, "link", "set", "eth1", "up")
        lab_netns.ip(ns, "route", "add", "default", "via", "172.18.0.1")
    else:
        lab_netns.ip(ns, "route", "add", "default", "via", gateway)
    server = subprocess.Popen(
        lab_netns.module_argv(ns, "tests.netns.svc_whoami", "serve", str(PORT)),
        stdout=subprocess.PIPE,
    )
    site.servers.append(server)
    assert server.stdout is not None and server.stdout.readline() == b"ready\n"


async def program(site: Site, n: int, peer: int) -> None:
    """What overlayd's managers write on host n: egress, VXLAN allow-list,
    services, bridge netfilter."""
    ns = site.namespaces[f"h{n}"]
    assert await sysctl.ensure_bridge_netfilter(netns=ns, ipv6=False) == []  # on already
    egress = spec(site.mode)
    await NftTable(ns).ensure(egress)
    if site.mode != "none":
        # A Docker host's FORWARD policy, and our exceptions to it.
        lab_netns.in_ns(ns, "iptables", "-P", "FORWARD", "DROP")
        await ForwardAccept(ns).ensure(egress)
    vxlan = FilterSpec(local_ip=IPv4Address(UNDERLAY[n]), port=VXLAN_PORT, vni=1)
    allow = NftVxlanFilter(Nft(ns))
    await allow.ensure(vxlan)
    await allow.update(
        vxlan, element_changes(frozenset({IPv4Address(UNDERLAY[peer])}), frozenset())
    )
    gwbridge: tuple[IPNetwork, ...] = (GWBRIDGE,) if site.mode == "gwbridge" else ()
    local = LocalSubnets(IPv4Network(f"10.244.{n}.0/24"), gwbridge=gwbridge)
    ruleset = service_ruleset(SERVICES, BACKENDS, local, (CLUSTER,))
    await Nft(ns).apply(script(service_transaction(None, ruleset)))


@pytest.fixture(scope="module", params=["none", "masquerade", "gwbridge"])
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    s = Site(str(request.param))
    try:
        a, b = make_host(s, 1), make_host(s, 2)
        out = s.add("outside")
        lab_netns.veth(a, "eth0", b, "eth0")
        lab_netns.ip(a, "addr", "add", f"{UNDERLAY[1]}/24", "dev", "eth0")
        lab_netns.ip(b, "addr", "add", f"{UNDERLAY[2]}/24", "dev", "eth0")
        lab_netns.veth(a, "ext0", out, "eth0")
        lab_netns.ip(a, "addr", "add", f"{HOST_A_OUTSIDE}/24", "dev", "ext0")
        lab_netns.ip(out, "addr", "add", f"{OUTSIDE}/24", "dev", "eth0")
        for ns, dev in ((a, "eth0"), (a, "ext0"), (b, "eth0"), (out, "eth0")):
            lab_netns.ip(ns, "link", "set", dev, "up")
        # As real hosts: A's default route leads outside; the outside knows
        # its way to the cluster through A (to show what egress stops).
        lab_netns.ip(a, "route", "add", "default", "via", OUTSIDE)
        lab_netns.ip(b, "route", "add", "default", "via", UNDERLAY[1])
        lab_netns.ip(out, "route", "add", str(CLUSTER), "via", HOST_A_OUTSIDE)
        if s.mode == "gwbridge":
            for ns in (a, b):
                lab_netns.ip(ns, "link", "add", "ovl_gwbridge", "type", "bridge")
                lab_netns.ip(ns, "addr", "add", "172.18.0.1/16", "dev", "ovl_gwbridge")
                lab_netns.ip(ns, "link", "set", "ovl_gwbridge", "up")
        tunnel(s, 1, 2)
        tunnel(s, 2, 1)
        container(s, "a1", 1, A1)
        container(s, "b1", 2, B1)
        # The overlay carries a1 to b1 before any rule (the tunnel works).
        wait_until(lambda: answered(s.connects("a1", B1, PORT, 1)) == {(B1, A1)})
        asyncio.run(program(s, 1, 2))
        asyncio.run(program(s, 2, 1))
        yield s
    finally:
        for server in s.servers:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
        for ns in s.namespaces.values():
            lab_netns.delete_namespace(ns)


def test_a_node_port_reaches_a_backend_on_another_host_through_the_tunnel(site: Site) -> None:
    # Masqueraded to A's bridge address: B's container answers A, and A
    # undoes both translations on the way back to the outside client.
    assert answered(site.connects("outside", HOST_A_OUTSIDE, 30080)) == {(B1, BRIDGE_A)}
    # Control: the overlay itself is still not NATed between containers.
    assert answered(site.connects("a1", B1, PORT, 1)) == {(B1, A1)}


def test_a_node_port_reaches_a_backend_on_the_host_itself(site: Site) -> None:
    assert answered(site.connects("outside", HOST_A_OUTSIDE, 30082)) == {(A1, BRIDGE_A)}


def test_a_local_node_port_keeps_the_outside_clients_address(site: Site) -> None:
    # The reply leaves the container to an outside address: in gwbridge
    # mode by eth1, and conntrack on A still undoes the DNAT.
    assert answered(site.connects("outside", HOST_A_OUTSIDE, 30081)) == {(A1, OUTSIDE)}


def test_a_port_that_is_no_node_port_is_not_forwarded(site: Site) -> None:
    # Neither another port in the range nor the backends' own port: A
    # itself answers (nothing listens there), no container does.
    assert site.connects("outside", HOST_A_OUTSIDE, 30099, count=1) == ["refused"]
    assert site.connects("outside", HOST_A_OUTSIDE, PORT, count=1) == ["refused"]
    # Control: the node port beside them is forwarded.
    assert answered(site.connects("outside", HOST_A_OUTSIDE, 30080, count=1)) == {(B1, BRIDGE_A)}


def test_the_outside_still_cannot_open_connections_to_containers_directly(site: Site) -> None:
    direct = site.connects("outside", B1, PORT, count=1, wait=1.5)
    if site.mode == "none":
        # No egress rules at all in mode none: nothing stops it.
        assert answered(direct) == {(B1, OUTSIDE)}
    else:
        assert direct == ["timeout"]
    # Control: the same container through its node port.
    assert answered(site.connects("outside", HOST_A_OUTSIDE, 30080, count=1)) == {(B1, BRIDGE_A)}


def test_the_egress_tables_dnat_accept_is_what_lets_node_ports_through(site: Site) -> None:
    """The egress forward chain's first rule (`ct status dnat accept`,
    "published ports") passes the services table's node-port DNAT as it
    passes portmap's: without it, the rule that lets only the cluster open
    connections to cluster addresses drops the outside client."""
    a = site.namespaces["h1"]
    if site.mode == "none":
        # No egress table to pass: nothing in the way (the tests above).
        assert "chain forward" not in lab_netns.in_ns(a, "nft", "list", "ruleset")
        return
    listed = json.loads(
        lab_netns.in_ns(a, "nft", "-j", "-a", "list", "chain", "ip", "overlayd", "forward")
    )
    (handle,) = [
        item["rule"]["handle"]
        for item in listed["nftables"]
        if "rule" in item and item["rule"].get("comment") == "published ports"
    ]
    lab_netns.in_ns(a, "nft", "delete", "rule", "ip", "overlayd", "forward", "handle", str(handle))
    try:
        assert site.connects("outside", HOST_A_OUTSIDE, 30080, count=1, wait=1.5) == ["timeout"]
    finally:
        # The egress manager's own repair puts the chain back whole.
        assert asyncio.run(NftTable(a).ensure(spec(site.mode))) is not None
    # Control: with the rule back, the node port passes again.
    assert answered(site.connects("outside", HOST_A_OUTSIDE, 30080, count=1)) == {(B1, BRIDGE_A)}
