"""Services on the real kernel, in throwaway namespaces, in both address
families: the rendered table loads with `nft -f`, incremental transactions
load on top of it, and real TCP connects through it land where Kubernetes
says: a VIP on every backend, a ClientIP service on one, a service without
backends refused at once, a container reaching its own service (hairpin),
node ports from an outside machine (Cluster: masqueraded, any backend;
Local: the client's address kept, local backends only, dropped where there
is none), and a removed backend out of the rotation. Every refusal has a
connection that passes beside it.

Every service is dual-stack (one VIP per family, as the daemon allocates
one per service network) and every box has an address of each family;
the tests that prove a behaviour of the data path run once per family
(`@FAMILIES`, ids ipv4/ipv6) on one shared site.

The namespaces, all made here (only host A has the services table):

    a1     10.244.1.2 fd00:10:244:1::2 ┐
    a2     10.244.1.3 fd00:10:244:1::3 ├ ovl0 ─ host A ═ routed ═ host B ─ ovl0 ─ b1
    client 10.244.1.4 fd00:10:244:1::4 ┘          │                          10.244.2.2
                                                  │                          fd00:10:244:2::2
                                                  └ ext0 ── outside

    underlay A─B   192.0.2.11, 192.0.2.12; 2001:db8::11, 2001:db8::12
    ext0─outside   203.0.113.1, 203.0.113.2; 2001:db8:113::1, 2001:db8:113::2
                   (host A's default routes go to outside)
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address

import pytest

from overlayd.dataplane import sysctl
from overlayd.dataplane.nft import Nft, NftTable
from overlayd.lab import netns as lab_netns
from overlayd.model import IPNetwork
from overlayd.plan.egress import EgressSpec
from overlayd.plan.policy_model import Endpoint, LabelSelector, Protocol
from overlayd.plan.policy_rules import LocalSubnets
from overlayd.plan.service_listing import believed_elements, listed_elements
from overlayd.plan.service_model import Affinity, Service, ServicePort, TrafficPolicy
from overlayd.plan.service_rules import (
    TABLE,
    WHERE,
    ServiceRuleset,
    map_name,
    script,
    service_ruleset,
    service_transaction,
    with_service,
)
from tests.conftest import needs_root, unique_name, wait_until

pytestmark = [needs_root, pytest.mark.root]

LOCAL = LocalSubnets(IPv4Network("10.244.1.0/24"), IPv6Network("fd00:10:244:1::/64"))
CLUSTER: tuple[IPNetwork, ...] = (IPv4Network("10.244.0.0/16"), IPv6Network("fd00:10:244::/48"))
PORT = 8080
# Per family (4, 6): host A's outside address (a node port's entry), the
# outside machine's, host A's bridge (a hairpin connection's source).
HOST_A = {4: "203.0.113.1", 6: "2001:db8:113::1"}
OUTSIDE = {4: "203.0.113.2", 6: "2001:db8:113::2"}
BRIDGE_A = {4: "10.244.1.1", 6: "fd00:10:244:1::1"}
UNDERLAY = {"ha": ("192.0.2.11", "2001:db8::11"), "hb": ("192.0.2.12", "2001:db8::12")}
BOXES = {"a1": (1, 2), "a2": (1, 3), "client": (1, 4), "b1": (2, 2)}
FAMILIES = pytest.mark.parametrize("v", [pytest.param(4, id="ipv4"), pytest.param(6, id="ipv6")])


# Host B's egress rules (plan/egress.py), masquerade mode.
EGRESS_B = EgressSpec(
    "masquerade",
    IPv4Network("10.244.0.0/16"),
    "ovl0",
    "ovl_gwbridge",
    cluster6=IPv6Network("fd00:10:244::/48"),
)


def address(box: str, v: int = 4) -> str:
    host, index = BOXES[box]
    return f"10.244.{host}.{index}" if v == 4 else f"fd00:10:244:{host}::{index}"


def endpoint(box: str) -> Endpoint:
    host = BOXES[box][0]
    return Endpoint(
        key=f"/overlayd/endpoints/10.244.{host}.0-24/{box}",
        id=box,
        host=f"10.244.{host}.0-24",
        name=box,
        addresses=(ip_address(address(box, 4)), ip_address(address(box, 6))),
    )


def service(
    name: str,
    number: int,
    node_port: int | None = None,
    *,
    affinity: Affinity = Affinity.NONE,
    policy: TrafficPolicy = TrafficPolicy.CLUSTER,
) -> Service:
    """A service on port 80 to PORT; its VIPs are 10.96.0.<number> and
    fd00:10:96::<number> (in the ServiceNetwork and IPv6ServiceNetwork
    the config's examples name)."""
    return Service(
        name=name,
        selector=LabelSelector((("app", name),)),
        ports=(ServicePort("", Protocol.TCP, 80, PORT, node_port),),
        vips=(ip_address(f"10.96.0.{number}"), ip_address(f"fd00:10:96::{number}")),
        affinity=affinity,
        traffic_policy=policy,
    )


SERVICES = {
    s.name: s
    for s in (
        service("web", 10, 30080),
        service("sticky", 11, affinity=Affinity.CLIENT_IP),
        service("empty", 12, 30082),
        service("local", 13, 30081, policy=TrafficPolicy.LOCAL),
        service("away", 14, 30083, policy=TrafficPolicy.LOCAL),
    )
}
BACKENDS: Mapping[str, Sequence[str]] = {
    "web": ("a1", "a2", "b1"),
    "sticky": ("a1", "a2", "b1"),
    "empty": (),
    "local": ("a1", "b1"),
    "away": ("b1",),
}


def vip(name: str, v: int) -> str:
    found = SERVICES[name].vip(v)
    assert found is not None
    return str(found)


def backends(names: Sequence[str]) -> tuple[Endpoint, ...]:
    return tuple(endpoint(n) for n in names)


def full_ruleset() -> ServiceRuleset:
    return service_ruleset(SERVICES, {k: backends(v) for k, v in BACKENDS.items()}, LOCAL, CLUSTER)


@dataclass
class Site:
    namespaces: dict[str, str] = field(default_factory=dict)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ruleset: ServiceRuleset | None = None

    def add(self, role: str) -> str:
        ns = unique_name("s")
        lab_netns.add_namespace(ns)
        self.namespaces[role] = ns
        # Every IPv6 address usable at once: interfaces made here from now
        # on do no duplicate address detection (a tentative address is no
        # source, and a first connect would wait for it).
        lab_netns.in_ns(ns, "sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0")
        return ns

    def apply(self, after: ServiceRuleset) -> None:
        """The transaction from what the table holds now to `after`."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.namespaces["ha"], "nft", "-f", "-"],
            input=script(service_transaction(self.ruleset, after)),
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        self.ruleset = after

    def connects(
        self, role: str, host: str, port: int = 80, count: int = 30, wait: float = 3.0
    ) -> list[tuple[str, float]]:
        """What each of `count` connects from `role` to host:port got."""
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
        return [(str(a), float(t)) for a, t in json.loads(out.stdout)]


def answered(results: Sequence[tuple[str, float]]) -> list[tuple[str, str]]:
    """(server, client address it saw) of every answered connect; fails on
    any connect that got no answer."""
    found = []
    for answer, _ in results:
        assert " " in answer, f"a connect failed: {results}"
        server, seen = answer.split()
        found.append((server, seen))
    return found


def host(site: Site, role: str, n: int) -> str:
    ns = site.add(role)
    lab_netns.ip(ns, "link", "add", "ovl0", "type", "bridge")
    lab_netns.ip(ns, "addr", "add", f"10.244.{n}.1/24", "dev", "ovl0")
    lab_netns.ip(ns, "addr", "add", f"fd00:10:244:{n}::1/64", "dev", "ovl0", "nodad")
    lab_netns.ip(ns, "link", "set", "ovl0", "up")
    lab_netns.in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    lab_netns.in_ns(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
    return ns


def box(site: Site, name: str) -> None:
    n, _ = BOXES[name]
    host_ns, ns = site.namespaces["ha" if n == 1 else "hb"], site.add(name)
    lab_netns.veth(host_ns, f"v{name}", ns, "eth0")
    lab_netns.ip(host_ns, "link", "set", f"v{name}", "master", "ovl0", "up")
    # Bridge netfilter DNATs a frame in the bridge and sends it back out
    # its own port (hairpin), which the bridge refuses unless told.
    lab_netns.ip(host_ns, "link", "set", f"v{name}", "type", "bridge_slave", "hairpin", "on")
    lab_netns.ip(ns, "addr", "add", f"{address(name, 4)}/24", "dev", "eth0")
    lab_netns.ip(ns, "addr", "add", f"{address(name, 6)}/64", "dev", "eth0", "nodad")
    lab_netns.ip(ns, "link", "set", "eth0", "up")
    lab_netns.ip(ns, "route", "add", "default", "via", f"10.244.{n}.1")
    lab_netns.ip(ns, "-6", "route", "add", "default", "via", f"fd00:10:244:{n}::1")
    server = subprocess.Popen(
        lab_netns.module_argv(ns, "tests.netns.svc_whoami", "serve", str(PORT)),
        stdout=subprocess.PIPE,
    )
    site.servers.append(server)
    assert server.stdout is not None and server.stdout.readline() == b"ready\n"


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    try:
        a, b = host(s, "ha", 1), host(s, "hb", 2)
        # As the daemon keeps it while policies exist in a dual-stack
        # network: bridged frames of both families through the inet hooks
        # (the harder case for hairpin).
        asyncio.run(sysctl.ensure_bridge_netfilter(netns=a, ipv6=True))
        out = s.add("outside")
        lab_netns.veth(a, "eth0", b, "eth0")
        for ns, role in ((a, "ha"), (b, "hb")):
            four, six = UNDERLAY[role]
            lab_netns.ip(ns, "addr", "add", f"{four}/24", "dev", "eth0")
            lab_netns.ip(ns, "addr", "add", f"{six}/64", "dev", "eth0", "nodad")
        lab_netns.veth(a, "ext0", out, "eth0")
        for ns, dev, addresses in ((a, "ext0", HOST_A), (out, "eth0", OUTSIDE)):
            lab_netns.ip(ns, "addr", "add", f"{addresses[4]}/24", "dev", dev)
            lab_netns.ip(ns, "addr", "add", f"{addresses[6]}/64", "dev", dev, "nodad")
        for ns, dev in ((a, "eth0"), (a, "ext0"), (b, "eth0"), (out, "eth0")):
            lab_netns.ip(ns, "link", "set", dev, "up")
        lab_netns.ip(a, "route", "add", "10.244.2.0/24", "via", UNDERLAY["hb"][0])
        lab_netns.ip(b, "route", "add", "10.244.1.0/24", "via", UNDERLAY["ha"][0])
        lab_netns.ip(a, "-6", "route", "add", "fd00:10:244:2::/64", "via", UNDERLAY["hb"][1])
        lab_netns.ip(b, "-6", "route", "add", "fd00:10:244:1::/64", "via", UNDERLAY["ha"][1])
        # As a real host has them: a packet to a VIP nobody translated is
        # forwarded (and so meets the forward hook's reject).
        lab_netns.ip(a, "route", "add", "default", "via", OUTSIDE[4])
        lab_netns.ip(a, "-6", "route", "add", "default", "via", OUTSIDE[6])
        # Host B as the daemon keeps it: its egress rules, which let only
        # the cluster's addresses open connections to its containers.
        asyncio.run(NftTable(b).ensure(EGRESS_B))
        for name in BOXES:
            box(s, name)
        # Everyone reaches everyone directly before any service.
        for v in (4, 6):
            direct = address("b1", v)

            def reached(d: str = direct) -> bool:
                return s.connects("client", d, PORT, 1)[0][0].startswith(f"{d} ")

            wait_until(reached)
        s.apply(full_ruleset())
        listed = lab_netns.in_ns(a, "nft", "list", "ruleset", "inet")
        assert f"table inet {TABLE} " in listed
        assert "vips_v4" in listed and "vips_v6" in listed
        yield s
    finally:
        for server in s.servers:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
        for ns in s.namespaces.values():
            lab_netns.delete_namespace(ns)


@FAMILIES
def test_a_vip_reaches_every_backend_and_keeps_the_clients_address(site: Site, v: int) -> None:
    got = answered(site.connects("client", vip("web", v), count=60))
    assert {server for server, _ in got} == {address(b, v) for b in ("a1", "a2", "b1")}
    assert {seen for _, seen in got} == {address("client", v)}  # never masqueraded


@FAMILIES
def test_a_process_on_the_host_reaches_every_backend_from_the_bridges_address(
    site: Site, v: int
) -> None:
    """nat_output: a host process (its source host A's outside address, by
    the default route) reaches every backend, its source translated to A's
    bridge address: a cluster address, which host B's egress rules let
    open a connection to b1 (A's outside or underlay address would be
    dropped there), and to which b1's answer is routed back through A."""
    got = answered(site.connects("ha", vip("web", v), count=60))
    assert {server for server, _ in got} == {address(b, v) for b in ("a1", "a2", "b1")}
    assert {seen for _, seen in got} == {BRIDGE_A[v]}


@FAMILIES
def test_client_ip_affinity_pins_a_client_to_one_backend(site: Site, v: int) -> None:
    pinned = answered(site.connects("client", vip("sticky", v), count=30))
    assert len({server for server, _ in pinned}) == 1
    # Control: the same backends without affinity, from the same client, vary.
    spread = answered(site.connects("client", vip("web", v), count=30))
    assert len({server for server, _ in spread}) > 1


@FAMILIES
def test_a_service_without_backends_is_refused_at_once(site: Site, v: int) -> None:
    for answer, seconds in site.connects("client", vip("empty", v), count=5, wait=5.0):
        assert (answer, seconds < 1.0) == ("refused", True)
    for answer, seconds in site.connects("outside", HOST_A[v], 30082, count=3, wait=5.0):
        assert (answer, seconds < 1.0) == ("refused", True)
    # Control: a service with backends answers the same client on the same port.
    assert answered(site.connects("client", vip("web", v), count=3))


@FAMILIES
def test_a_container_reaches_its_own_service_and_lands_on_itself(site: Site, v: int) -> None:
    got = answered(site.connects("a1", vip("web", v), count=60))
    on_itself = {seen for server, seen in got if server == address("a1", v)}
    elsewhere = {seen for server, seen in got if server == address("a2", v)}
    # Hairpin: landing on itself works, seen from the bridge's address...
    assert on_itself == {BRIDGE_A[v]}
    # ...and only then: on another backend its own address survives.
    assert elsewhere == {address("a1", v)}


@FAMILIES
def test_hairpin_under_bridge_netfilter_needs_the_ports_hairpin_mode(site: Site, v: int) -> None:
    before = site.ruleset
    assert before is not None
    port = ("va1", "type", "bridge_slave", "hairpin")
    try:
        site.apply(with_service(before, "web", SERVICES["web"], backends(("a1",))))
        assert (
            answered(site.connects("a1", vip("web", v), count=3))
            == [(address("a1", v), BRIDGE_A[v])] * 3
        )
        lab_netns.ip(site.namespaces["ha"], "link", "set", *port, "off")
        assert site.connects("a1", vip("web", v), count=1, wait=1.5)[0][0] == "timeout"
    finally:
        lab_netns.ip(site.namespaces["ha"], "link", "set", *port, "on")
        site.apply(before)


@FAMILIES
def test_a_cluster_node_port_reaches_every_backend_from_the_bridges_address(
    site: Site, v: int
) -> None:
    """Host B is reached by a route over the underlay (as in host-gw mode or
    with DirectRouting), and its egress rules let only cluster addresses
    open connections to b1: the node port's connections arrive there from
    A's bridge address, not A's underlay address (a plain masquerade's
    pick for that route)."""
    got = answered(site.connects("outside", HOST_A[v], 30080, count=60))
    assert {server for server, _ in got} == {address(b, v) for b in ("a1", "a2", "b1")}
    assert {seen for _, seen in got} == {BRIDGE_A[v]}


@FAMILIES
def test_a_local_node_port_keeps_the_clients_address_and_drops_without_local_backends(
    site: Site, v: int
) -> None:
    got = answered(site.connects("outside", HOST_A[v], 30081, count=30))
    assert set(got) == {(address("a1", v), OUTSIDE[v])}  # b1 is on host B: never chosen
    # Backends only on another host: dropped (no answer), not refused.
    ((answer, seconds),) = site.connects("outside", HOST_A[v], 30083, count=1, wait=1.5)
    assert answer == "timeout" and seconds >= 1.0


@FAMILIES
def test_a_removed_backend_leaves_the_rotation(site: Site, v: int) -> None:
    before = site.ruleset
    assert before is not None
    try:
        site.apply(with_service(before, "web", SERVICES["web"], backends(("a1", "a2"))))
        got = answered(site.connects("client", vip("web", v), count=60))
        assert {server for server, _ in got} == {address("a1", v), address("a2", v)}
    finally:
        site.apply(before)
    # Control: back in the rotation once restored.
    got = answered(site.connects("client", vip("web", v), count=60))
    assert address("b1", v) in {server for server, _ in got}


@FAMILIES
def test_a_service_goes_and_comes_back_by_incremental_transactions(site: Site, v: int) -> None:
    before = site.ruleset
    assert before is not None
    try:
        site.apply(with_service(before, "web", None))
        gone = site.connects("client", vip("web", v), count=1, wait=1.5)
        assert gone[0][0] in ("timeout", "EHOSTUNREACH", "ENETUNREACH")  # no longer a service
        site.apply(with_service(site.ruleset or before, "web", SERVICES["web"], ()))
        assert site.connects("client", vip("web", v), count=1, wait=5.0)[0][0] == "refused"
    finally:
        site.apply(before)
    assert answered(site.connects("client", vip("web", v), count=3))  # control


@FAMILIES
def test_a_check_reads_back_exactly_the_elements_it_wrote_and_sees_one_deleted(
    site: Site, v: int
) -> None:
    """What the services manager's check pass compares: the kernel's maps
    and sets, as read back, equal the believed ruleset's (IPv6 keys and
    hairpin pairs in the render's spelling too); one element deleted by
    hand is a difference."""
    assert site.ruleset is not None
    nft = Nft(site.namespaces["ha"])
    listing = asyncio.run(nft.maps_and_sets_json(WHERE))
    assert listing is not None
    believed = believed_elements(site.ruleset)
    maps = site.ruleset.maps()
    # Positive control: there is something of this family to compare.
    vips_of_family = [elements for at, elements in maps.items() if at[1] == map_name("vips", v)]
    assert sum(map(len, vips_of_family)) > 3 and believed[TABLE, f"hairpin_v{v}"]
    assert listed_elements(listing) == believed
    vips = next(at for at in maps if at[1] == map_name("vips", v) and maps[at])
    victim = sorted(maps[vips])[0]
    lab_netns.in_ns(
        site.namespaces["ha"], "nft", "delete", "element", "inet", *vips, "{", victim, "}"
    )
    try:
        after = asyncio.run(nft.maps_and_sets_json(WHERE))
        assert after is not None and listed_elements(after) != believed
        assert listed_elements(after)[vips] == believed[vips] - {f"{victim} : {maps[vips][victim]}"}
    finally:
        site.ruleset = None  # unknown now: the next apply makes the table afresh
        site.apply(full_ruleset())
    assert asyncio.run(nft.maps_and_sets_json("inet no_such_table")) is None


CONNTRACK = "/proc/sys/net/netfilter"
ECHO_PORT = 9000


def test_an_idle_connection_through_a_vip_lives_as_long_as_its_conntrack_entry(
    site: Site,
) -> None:
    """Swarm's IPVS cuts an idle VIP connection after 900 s; here the DNAT
    is conntrack's, so an idle connection lasts as long as conntrack keeps
    its entry: nf_conntrack_tcp_timeout_established, 5 days by default
    (checked below). With that timeout shortened to 3 s on the client's
    host (and mid-stream pickup off, so an expired connection is not taken
    up again as new), a connection idle for 1 s goes on (the control) and
    one idle for 6 s is cut: the conntrack entry is the mechanism."""
    host = site.namespaces["ha"]
    server = subprocess.Popen(
        lab_netns.module_argv(site.namespaces["a2"], "tests.netns.svc_whoami", "echo", "9000"),
        stdout=subprocess.PIPE,
    )
    before = site.ruleset
    assert before is not None
    echo = Service(
        name="echo",
        selector=LabelSelector((("app", "echo"),)),
        ports=(ServicePort("", Protocol.TCP, 7000, ECHO_PORT),),
        vips=(ip_address("10.96.0.50"),),
    )
    saved = {
        key: lab_netns.in_ns(host, "cat", f"{CONNTRACK}/{key}").strip()
        for key in ("nf_conntrack_tcp_timeout_established", "nf_conntrack_tcp_loose")
    }
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        assert int(saved["nf_conntrack_tcp_timeout_established"]) >= 30 * 60
        site.apply(with_service(before, "echo", echo, backends(["a2"])))

        def hold(*pauses: float) -> list[str]:
            argv = lab_netns.module_argv(
                site.namespaces["client"],
                "tests.netns.svc_whoami",
                "hold",
                "10.96.0.50",
                "7000",
                *map(str, pauses),
            )
            out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
            return [str(x) for x in json.loads(out.stdout)]

        assert hold(1.0) == ["ok", "ok"]  # default timeout: idle is no problem
        for key, value in (
            ("nf_conntrack_tcp_timeout_established", "3"),
            ("nf_conntrack_tcp_loose", "0"),
        ):
            lab_netns.in_ns(host, "sh", "-c", f"echo {value} > {CONNTRACK}/{key}")
        shortened = hold(1.0, 6.0)
        assert shortened[:2] == ["ok", "ok"]  # control: 1 s idle, under the timeout
        assert shortened[2] != "ok"  # 6 s idle, past it: the connection is gone
    finally:
        for key, value in saved.items():
            lab_netns.in_ns(host, "sh", "-c", f"echo {value} > {CONNTRACK}/{key}")
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()
        site.apply(before)
