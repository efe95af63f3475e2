"""Network policy on the real kernel, in throwaway namespaces: the rendered
table loads with `nft -f`, and real TCP and UDP connections, between
containers on one bridge and routed from another host, pass or not as the
Kubernetes recipes say. Every refusal has a connection that passes beside
it. Also: replies pass, neighbour discovery passes, IPv6 link-local
traffic between containers of one bridge is judged by the endpoints' MACs
(it used to pass unjudged), an endpoint joining a set opens its
connections without a rule changing, the counters count, a transaction
refused half-way leaves the previous ruleset whole, and the big cases
(10,000 ports; 10,000 endpoints with 500 policies) load.

The namespaces, all made here (only host A has policies):

    db    10.244.1.2  fd00:10:244:1::2  app=db              ┐
    web   10.244.1.3  fd00:10:244:1::3  app=web role=frontend ├ ovl0 ─ host A ─ eth0 192.0.2.11
    api   10.244.1.4  fd00:10:244:1::4  app=api             │            2001:db8::11
    other 10.244.1.5  fd00:10:244:1::5  (not registered)    ┘              ║ routed
    rweb  10.244.2.2  fd00:10:244:2::2  app=web role=frontend ┐            ║
    rjob  10.244.2.3  fd00:10:244:2::3  app=batch             ┴ ovl0 ─ host B ─ eth0 .12

Host A has bridge-nf-call-iptables and -ip6tables on, set by overlayd's own
sysctl code, as the daemon keeps them while policies exist.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network, ip_address

import pytest

from overlayd.dataplane import sysctl
from overlayd.dataplane.nft import Nft
from overlayd.lab import echo
from overlayd.lab import netns as lab_netns
from overlayd.plan.policy_model import (
    Direction,
    Endpoint,
    IpBlock,
    LabelSelector,
    MacAddress,
    Policy,
    PortRange,
    Protocol,
    Rule,
    SelectorPeer,
)
from overlayd.plan.policy_rules import (
    BASE,
    TABLE,
    Chain,
    LocalSubnets,
    PolicyRuleset,
    element_repairs,
    listed_counters,
    listed_counts,
    listed_elements,
    listed_ports,
    policy_counter_names,
    policy_ruleset,
    policy_transaction,
    render_ruleset,
    script,
    terse_listing,
    unordered_sets,
    with_endpoints,
)
from tests.conftest import needs_root, unique_name, wait_until

pytestmark = [needs_root, pytest.mark.root]

LOCAL = LocalSubnets(IPv4Network("10.244.1.0/24"), IPv6Network("fd00:10:244:1::/64"))
INGRESS, EGRESS = Direction.INGRESS, Direction.EGRESS
PORTS = (80, 8000, 8080, 8081)
WAIT = 1.5  # seconds a refused probe waits for an answer


@dataclass(frozen=True)
class Box:
    """A container: its namespace, addresses and labels."""

    ns: str
    name: str
    v4: str
    v6: str
    host: int
    labels: tuple[tuple[str, str], ...] = ()
    mac: str = ""  # eth0's

    def endpoint(self, **more: str) -> Endpoint:
        return Endpoint(
            key=f"/overlayd/endpoints/10.244.{self.host}.0-24/{self.name}",
            id=self.name,
            host=f"10.244.{self.host}.0-24",
            name=self.name,
            addresses=(ip_address(self.v4), ip_address(self.v6)),
            labels={**dict(self.labels), **more},
            # As host A reads registrations: its own endpoints' MACs only.
            macs=(MacAddress.parse(self.mac),) if self.host == 1 else (),
        )

    def link_local(self) -> str:
        """eth0's fe80:: address once usable (not tentative), with its scope."""
        found: list[str] = []

        def usable() -> bool:
            (link,) = json.loads(lab_netns.ip(self.ns, "-j", "-6", "addr", "show", "dev", "eth0"))
            found[:] = [
                a["local"]
                for a in link["addr_info"]
                if a["local"].startswith("fe80:") and not a.get("tentative")
            ]
            return bool(found)

        wait_until(usable)
        return f"{found[0]}%eth0"


@dataclass
class Site:
    a: str = ""
    b: str = ""
    boxes: dict[str, Box] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def add(self, kind: str) -> str:
        ns = unique_name(kind)
        lab_netns.add_namespace(ns)
        self.namespaces.append(ns)
        return ns

    def box(self, name: str, host: int, index: int, **labels: str) -> None:
        ns, host_ns = self.add("c"), (self.a if host == 1 else self.b)
        v4, v6 = f"10.244.{host}.{index}", f"fd00:10:244:{host}::{index}"
        port = f"v{name}"
        lab_netns.veth(host_ns, port, ns, "eth0")
        lab_netns.ip(host_ns, "link", "set", port, "master", "ovl0", "up")
        lab_netns.ip(ns, "addr", "add", f"{v4}/24", "dev", "eth0")
        lab_netns.ip(ns, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
        lab_netns.ip(ns, "link", "set", "eth0", "up")
        lab_netns.ip(ns, "route", "add", "default", "via", f"10.244.{host}.1")
        lab_netns.ip(ns, "-6", "route", "add", "default", "via", f"fd00:10:244:{host}::1")
        # TCP and UDP on every port of PORTS, both families; answers with
        # the address it sees the client as.
        self.servers.append(echo.serve_in(ns, PORTS))
        (link,) = json.loads(lab_netns.ip(ns, "-j", "link", "show", "dev", "eth0"))
        labelled = tuple(sorted(labels.items()))
        self.boxes[name] = Box(ns, name, v4, v6, host, labelled, link["address"])

    def endpoints(self, *names: str) -> list[Endpoint]:
        """The registered endpoints: every box but `other`, unless named."""
        chosen = names or tuple(n for n in self.boxes if n != "other")
        return [self.boxes[n].endpoint() for n in chosen]


def host(ns: str, n: int, other: int) -> None:
    lab_netns.ip(ns, "addr", "add", f"192.0.2.1{n}/24", "dev", "eth0")
    lab_netns.ip(ns, "addr", "add", f"2001:db8::1{n}/64", "dev", "eth0", "nodad")
    lab_netns.ip(ns, "link", "set", "eth0", "up")
    lab_netns.ip(ns, "link", "add", "ovl0", "type", "bridge")
    lab_netns.ip(ns, "addr", "add", f"10.244.{n}.1/24", "dev", "ovl0")
    lab_netns.ip(ns, "addr", "add", f"fd00:10:244:{n}::1/64", "dev", "ovl0", "nodad")
    lab_netns.ip(ns, "link", "set", "ovl0", "up")
    lab_netns.ip(ns, "route", "add", f"10.244.{other}.0/24", "via", f"192.0.2.1{other}")
    lab_netns.ip(
        ns, "-6", "route", "add", f"fd00:10:244:{other}::/64", "via", f"2001:db8::1{other}"
    )
    lab_netns.in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    lab_netns.in_ns(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    try:
        s.a, s.b = s.add("ha"), s.add("hb")
        lab_netns.veth(s.a, "eth0", s.b, "eth0")
        host(s.a, 1, 2)
        host(s.b, 2, 1)
        # As the daemon sets them (bridged frames through the inet forward hook).
        asyncio.run(sysctl.ensure_bridge_netfilter(netns=s.a, ipv6=True))
        for key in ("iptables", "ip6tables"):
            assert lab_netns.in_ns(s.a, "sysctl", "-n", f"net.bridge.bridge-nf-call-{key}") == "1\n"
        s.box("db", 1, 2, app="db")
        s.box("web", 1, 3, app="web", role="frontend")
        s.box("api", 1, 4, app="api")
        s.box("other", 1, 5)
        s.box("rweb", 2, 2, app="web", role="frontend")
        s.box("rjob", 2, 3, app="batch")
        # Everyone reaches everyone before any policy (servers, neighbours, routes).
        wait_until(lambda: reach(s, "web", "tcp", "db") == s.boxes["web"].v4)
        wait_until(lambda: reach(s, "rweb", "tcp", "db") == s.boxes["rweb"].v4)
        yield s
    finally:
        for server in s.servers:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
        for ns in s.namespaces:
            lab_netns.delete_namespace(ns)


def reach(
    site: Site, src: str, proto: str, dst: str, port: int = 80, v6: bool = False
) -> str | None:
    """What `dst`'s server answered `src` (the address it saw), or None."""
    box = site.boxes[dst]
    return reach_at(site, src, proto, box.v6 if v6 else box.v4, port)


def reach_at(site: Site, src: str, proto: str, address: str, port: int = 80) -> str | None:
    """What the server at `address` answered `src`, or None."""
    return echo.probe_from(site.boxes[src].ns, WAIT, [(proto, address, port)])[0]


def opens(site: Site, src: str, dst: str, port: int = 80, v6: bool = False) -> bool:
    """Both TCP and UDP from src reach dst's port, seen as src's own address."""
    me = site.boxes[src].v6 if v6 else site.boxes[src].v4
    return all(reach(site, src, p, dst, port, v6) == me for p in ("tcp", "udp"))


def shut(site: Site, src: str, dst: str, port: int = 80, v6: bool = False) -> bool:
    """Neither TCP nor UDP from src gets an answer from dst's port."""
    return all(reach(site, src, p, dst, port, v6) is None for p in ("tcp", "udp"))


def nft(ns: str, *args: str, check: bool = True) -> str:
    return lab_netns.in_ns(ns, "nft", *args, check=check)


def load(ns: str, statements: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"],
        input=script(statements),
        capture_output=True,
        text=True,
        check=False,
    )


def apply(ns: str, before: PolicyRuleset | None, after: PolicyRuleset) -> None:
    done = load(ns, policy_transaction(before, after))
    assert done.returncode == 0, done.stderr


def chains_with_handles(ns: str, ruleset: PolicyRuleset) -> str:
    """Every chain with its rules' handles: a rule written again gets a new one."""
    return "".join(nft(ns, "-a", "list", "chain", "inet", TABLE, name) for name in ruleset.chains)


def counts(site: Site) -> dict[str, int]:
    return listed_counters(nft(site.a, "-j", "list", "counters", "table", "inet", TABLE))


@pytest.fixture
def clean(site: Site) -> Iterator[Site]:
    """The site, with our table removed after the test whatever happened."""
    try:
        yield site
    finally:
        nft(site.a, "delete", "table", "inet", TABLE, check=False)


def sel(**labels: str) -> LabelSelector:
    return LabelSelector(tuple(sorted(labels.items())))


def test_deny_all_ingress_blocks_same_host_and_routed_but_not_replies(clean: Site) -> None:
    s = clean
    deny = Policy("deny-db", sel(app="db"), frozenset({INGRESS}))
    ruleset = policy_ruleset([deny], s.endpoints(), LOCAL)
    apply(s.a, None, ruleset)
    listed = nft(s.a, "-t", "list", "table", "inet", TABLE)
    assert terse_listing(listed) == render_ruleset(ruleset, elements=False)
    # Same host (bridged) and from host B (routed): refused, both families.
    assert shut(s, "web", "db")
    assert shut(s, "rweb", "db")
    assert shut(s, "web", "db", v6=True)
    assert shut(s, "rweb", "db", v6=True)
    # Unselected: open, the same ways (the positive controls).
    assert opens(s, "web", "api")
    assert opens(s, "rweb", "api")
    assert opens(s, "web", "api", v6=True)
    # db's own connections are not isolated, and their replies come back in.
    assert opens(s, "db", "web")
    assert opens(s, "db", "rweb")
    assert opens(s, "db", "web", v6=True)
    # The drops were counted on the policy's deny counter, nothing allowed.
    owners = policy_counter_names(ruleset)
    counted = counts(s)
    assert set(counted) == set(owners)
    (drop,) = [n for n, o in owners.items() if o.verdict == "deny"]
    assert counted[drop] >= 8  # 8 refused probes, retransmissions aside


def test_neighbour_discovery_passes_for_an_isolated_endpoint(clean: Site) -> None:
    """db is isolated for ingress; to talk to web over IPv6 it must learn
    web's link address, and web's advertisement is a unicast packet to db
    that conntrack calls invalid. Without the ND rule (the negative
    control) db cannot reach web; with it, it can."""
    s = clean
    deny = Policy("deny-db", sel(app="db"), frozenset({INGRESS}))
    ruleset = policy_ruleset([deny], s.endpoints(), LOCAL)
    chains = dict(ruleset.chains)
    chains[BASE] = Chain(
        tuple(r for r in chains[BASE].rules if "nd-neighbor" not in r), hook=chains[BASE].hook
    )
    without_nd = replace(ruleset, chains=chains)

    def forget_neighbours() -> None:
        for name in ("db", "web"):
            lab_netns.ip(s.boxes[name].ns, "-6", "neigh", "flush", "all")

    apply(s.a, None, without_nd)
    forget_neighbours()
    assert reach(s, "db", "tcp", "web", v6=True) is None
    apply(s.a, without_nd, ruleset)
    forget_neighbours()
    assert opens(s, "db", "web", v6=True)


def link_local_answers(site: Site, src: str, dst: str, port: int = 80) -> dict[str, bool]:
    """Whether dst's server answered src over TCP and UDP to dst's link-local
    address (seen as src's own link-local address)."""
    address, me = site.boxes[dst].link_local(), site.boxes[src].link_local()
    return {
        proto: reach_at(site, src, proto, address, port) == me.split("%")[0]
        for proto in ("tcp", "udp")
    }


def test_link_local_traffic_is_judged_by_the_endpoints_mac(clean: Site) -> None:
    """Containers of one bridge can talk by fe80:: addresses, which no
    subnet holds: without the link-local chains an isolated endpoint
    answers anyone who knows its link-local address (the negative control,
    the base chains of before). With them: refused to an isolated
    endpoint, allowed to an open one and where a policy allows any peer;
    neighbour discovery and global traffic work as before."""
    s = clean
    everyone = {"tcp": True, "udp": True}
    nobody = {"tcp": False, "udp": False}
    deny = Policy("deny-db", sel(app="db"), frozenset({INGRESS}))
    ruleset = policy_ruleset([deny], s.endpoints(), LOCAL)
    # The table as it was before link-local was judged: no jump to it.
    chains = {
        name: Chain(tuple(r for r in c.rules if "fe80::/10" not in r), c.comment, c.hook)
        for name, c in ruleset.chains.items()
    }
    before = replace(ruleset, chains=chains)
    apply(s.a, None, before)
    assert link_local_answers(s, "web", "db") == everyone  # the gap, as it was
    assert shut(s, "web", "db", v6=True)  # while the global address was refused

    apply(s.a, before, ruleset)
    assert link_local_answers(s, "web", "db") == nobody
    assert link_local_answers(s, "api", "db") == nobody
    # Open endpoints answer by link-local, isolated db's own connections too.
    assert link_local_answers(s, "web", "api") == everyone
    assert link_local_answers(s, "db", "web") == everyone
    # Neighbour discovery still works (db learns web's link address again),
    # and the global addresses are judged as ever.
    for name in ("db", "web", "api"):
        lab_netns.ip(s.boxes[name].ns, "-6", "neigh", "flush", "all")
    assert opens(s, "db", "web", v6=True) and opens(s, "web", "api", v6=True)
    assert shut(s, "web", "db", v6=True)
    counted = counts(s)
    (drop,) = [n for n, o in policy_counter_names(ruleset).items() if o.verdict == "deny"]
    assert counted[drop] >= 4  # the link-local refusals are the policy's drops

    # A policy allowing any peer on 8080: link-local meets the same chain.
    port = Policy(
        "db-8080",
        sel(app="db"),
        frozenset({INGRESS}),
        ingress=(Rule(ports=(PortRange(Protocol.TCP, 8080, 8080),)),),
    )
    both = policy_ruleset([deny, port], s.endpoints(), LOCAL)
    apply(s.a, ruleset, both)
    assert link_local_answers(s, "web", "db", 8080)["tcp"]
    assert link_local_answers(s, "web", "db", 8081) == nobody

    # Egress: web may only reach 10.0.0.0/8; by link-local it reaches nobody,
    # and api (not isolated for egress) still reaches web.
    out = Policy(
        "web-out",
        sel(app="web"),
        frozenset({EGRESS}),
        egress=(Rule(peers=(IpBlock(IPv4Network("10.0.0.0/8")),)),),
    )
    egress = policy_ruleset([out], s.endpoints(), LOCAL)
    apply(s.a, both, egress)
    assert link_local_answers(s, "web", "api") == nobody
    assert link_local_answers(s, "api", "web") == everyone
    assert opens(s, "web", "api")  # IPv4, in the block


# A UDP datagram to port 80 of a link-local address in a frame to `mac`,
# sent by scapy from the namespace it runs in; prints whether the server
# answered. (UDP: TCP itself drops a segment that came in a group frame.)
GROUP_FRAME_UDP = """
import sys
from scapy.all import UDP, Ether, IPv6, Raw, conf, srp1
conf.verb = 0
src, dst, mac, sport = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
frame = Ether(dst=mac) / IPv6(src=src, dst=dst) / UDP(sport=sport, dport=80) / Raw(b"?")
answer = srp1(frame, iface="eth0", timeout=1.5)
print("answered" if answer is not None and UDP in answer else "none")
"""


def test_a_link_local_destination_in_a_broadcast_frame_is_dropped(clean: Site) -> None:
    """A frame to the broadcast MAC names no endpoint's MAC, yet a unicast
    fe80:: destination in it is taken by that endpoint's stack (UDP; TCP
    drops it itself): without the group-frame rule (the negative control)
    isolated db answers it."""
    s = clean
    web = s.boxes["web"]
    src = web.link_local().split("%")[0]
    ports = iter(range(40001, 40100))  # a new flow each time

    def send(mac: str, to: str = "db") -> str:
        dst = s.boxes[to].link_local().split("%")[0]
        argv = ["ip", "netns", "exec", web.ns, sys.executable, "-c", GROUP_FRAME_UDP]
        argv += [src, dst, mac, str(next(ports))]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()

    ruleset = policy_ruleset(
        [Policy("deny-db", sel(app="db"), frozenset({INGRESS}))], s.endpoints(), LOCAL
    )
    chains = dict(ruleset.chains)
    link = chains["ingress_link_local"]
    chains["ingress_link_local"] = link._replace(rules=link.rules[1:])
    without = replace(ruleset, chains=chains)
    apply(s.a, None, without)
    assert send("ff:ff:ff:ff:ff:ff") == "answered"  # the hole the rule closes
    apply(s.a, without, ruleset)
    assert send("ff:ff:ff:ff:ff:ff") == "none"
    assert send("33:33:00:00:00:01") == "none"
    # In a frame to db's own MAC it is judged (refused); to open api's MAC,
    # answered (the positive control of the sender); and to the broadcast
    # MAC with no policy at all, answered (the rule exists only with policies).
    assert send(s.boxes["db"].mac) == "none"
    assert send(s.boxes["api"].mac, to="api") == "answered"
    apply(s.a, ruleset, policy_ruleset([], s.endpoints(), LOCAL))
    assert send("ff:ff:ff:ff:ff:ff") == "answered"


def test_on_an_ipv4_only_host_link_local_on_the_gwbridge_is_judged_by_eth1s_mac(
    netns: str,
) -> None:
    """A host without IPv6 in the cluster has no IPv6 egress table, so
    nothing isolates containers on the gwbridge from each other for IPv6,
    and their eth1 have fe80:: addresses: policy judges that by eth1's MAC
    (overlay-cni registers both interfaces'). Without it (eth0's MAC only,
    the negative control) isolated db answers; open api answers either way."""
    host, boxes = netns, {}
    lab_netns.ip(host, "link", "add", "gwb", "type", "bridge")
    lab_netns.ip(host, "addr", "add", "172.18.0.1/16", "dev", "gwb")
    lab_netns.ip(host, "link", "set", "gwb", "up")
    asyncio.run(sysctl.ensure_bridge_netfilter(netns=host, ipv6=True))
    servers: list[subprocess.Popen[bytes]] = []
    made: list[str] = []
    try:
        for index, name in enumerate(("db", "api", "web"), start=2):
            ns = unique_name("g")
            lab_netns.add_namespace(ns)
            made.append(ns)
            lab_netns.veth(host, f"g{name}", ns, "eth1")
            lab_netns.ip(host, "link", "set", f"g{name}", "master", "gwb", "up")
            lab_netns.ip(ns, "addr", "add", f"172.18.0.{index}/16", "dev", "eth1")
            lab_netns.ip(ns, "link", "set", "eth1", "up")
            servers.append(echo.serve_in(ns, [80]))
            (link,) = json.loads(lab_netns.ip(ns, "-j", "link", "show", "dev", "eth1"))
            labels = {"app": name}
            boxes[name] = (ns, index, link["address"], labels)

        def link_local(ns: str) -> str:
            found: list[str] = []

            def usable() -> bool:
                (link,) = json.loads(lab_netns.ip(ns, "-j", "-6", "addr", "show", "dev", "eth1"))
                found[:] = [
                    a["local"]
                    for a in link["addr_info"]
                    if a["local"].startswith("fe80:") and not a.get("tentative")
                ]
                return bool(found)

            wait_until(usable)
            return f"{found[0]}%eth1"

        def answered(dst: str) -> bool:
            # web's own link-local address must be past DAD too: a tentative
            # one is no source, and the connection fails before any policy.
            link_local(boxes["web"][0])
            probe = ("tcp", link_local(boxes[dst][0]), 80)
            return echo.probe_from(boxes["web"][0], WAIT, [probe])[0] is not None

        def endpoints(with_eth1: bool) -> list[Endpoint]:
            return [
                Endpoint(
                    key=f"/overlayd/endpoints/10.244.1.0-24/{name}",
                    id=name,
                    host="10.244.1.0-24",
                    name=name,
                    addresses=(ip_address(f"10.244.1.{index}"),),
                    labels=labels,
                    gwbridge_addresses=(ip_address(f"172.18.0.{index}"),),
                    # eth0's MAC (no eth0 here), and eth1's.
                    macs=(MacAddress(0x0A580AF40100 + index),)
                    + ((MacAddress.parse(mac),) if with_eth1 else ()),
                )
                for name, (_, index, mac, labels) in boxes.items()
            ]

        local = LocalSubnets(IPv4Network("10.244.1.0/24"), gwbridge=(IPv4Network("172.18.0.0/16"),))
        deny = [Policy("deny-db", sel(app="db"), frozenset({INGRESS}))]
        without = policy_ruleset(deny, endpoints(with_eth1=False), local)
        apply(host, None, without)
        assert answered("db") and answered("api")
        judged = policy_ruleset(deny, endpoints(with_eth1=True), local)
        apply(host, without, judged)
        assert not answered("db")
        assert answered("api")
    finally:
        for server in servers:
            server.kill()
            server.wait()
        for ns in made:
            lab_netns.delete_namespace(ns)


def test_allow_from_a_label_and_an_endpoint_joining_the_set(clean: Site) -> None:
    s = clean
    policy = Policy(
        "db-from-frontend",
        sel(app="db"),
        frozenset({INGRESS}),
        ingress=(Rule(peers=(SelectorPeer(sel(role="frontend")),)),),
    )
    before = policy_ruleset([policy], s.endpoints(), LOCAL)
    apply(s.a, None, before)
    # Labelled frontend: in, from this host and from host B, both families.
    assert opens(s, "web", "db")
    assert opens(s, "rweb", "db")
    assert opens(s, "web", "db", v6=True)
    # Not labelled: out.
    assert shut(s, "api", "db")
    assert shut(s, "rjob", "db")
    assert shut(s, "other", "db")
    owners = policy_counter_names(before)
    counted = counts(s)
    by_verdict = {o.verdict: counted[n] for n, o in owners.items()}
    assert by_verdict["allow"] >= 6 and by_verdict["deny"] >= 6

    # `other` registers as a frontend: set elements change, no rule does.
    after = policy_ruleset(
        [policy], [*s.endpoints(), s.boxes["other"].endpoint(role="frontend")], LOCAL
    )
    statements = policy_transaction(before, after)
    assert statements and all(x.startswith("add element ") for x in statements)
    rules_before = chains_with_handles(s.a, before)
    elements_before = listed_elements(nft(s.a, "-j", "list", "table", "inet", TABLE))

    # First the same change with a bogus statement at its end: nft refuses
    # the whole transaction, and the ruleset in force is the previous one.
    refused = load(s.a, [*statements, f"add rule inet {TABLE} no_such_chain accept"])
    assert refused.returncode != 0
    assert listed_elements(nft(s.a, "-j", "list", "table", "inet", TABLE)) == elements_before
    assert shut(s, "other", "db")
    assert opens(s, "web", "db")

    # The transaction itself: other is let in, the rules are untouched.
    apply(s.a, before, after)
    assert opens(s, "other", "db")
    assert opens(s, "other", "db", v6=True)
    assert chains_with_handles(s.a, after) == rules_before  # not written again
    assert shut(s, "api", "db")  # still out
    wanted = {name: st.elements for name, st in after.sets.items()}
    assert listed_elements(nft(s.a, "-j", "list", "table", "inet", TABLE)) == wanted


def test_a_port_range_allows_8000_to_8080_and_not_8081(clean: Site) -> None:
    s = clean
    policy = Policy(
        "api-ports",
        sel(app="api"),
        frozenset({INGRESS}),
        ingress=(
            Rule(ports=(PortRange(Protocol.TCP, 8000, 8080), PortRange(Protocol.UDP, 8000, 8080))),
        ),
    )
    apply(s.a, None, policy_ruleset([policy], s.endpoints(), LOCAL))
    for port in (8000, 8080):
        assert opens(s, "web", "api", port)
        assert opens(s, "rjob", "api", port)
    assert opens(s, "web", "api", 8080, v6=True)
    for port in (80, 8081):
        assert shut(s, "web", "api", port)
        assert shut(s, "rjob", "api", port)
    assert shut(s, "web", "api", 8081, v6=True)
    assert opens(s, "web", "db", 8081)  # unselected: every port


def test_egress_to_an_ip_block_only(clean: Site) -> None:
    s = clean
    policy = Policy(
        "web-egress",
        sel(app="web"),
        frozenset({EGRESS}),
        egress=(
            Rule(peers=(IpBlock(IPv4Network("10.244.0.0/16"), (IPv4Network("10.244.1.0/24"),)),)),
        ),
    )
    ruleset = policy_ruleset([policy], s.endpoints(), LOCAL)
    apply(s.a, None, ruleset)
    assert "ingress" not in ruleset.chains  # no ingress chain: ingress untouched
    assert ruleset.chains[BASE].rules[-1] == "jump egress"
    assert opens(s, "web", "rweb")  # in the block: out to host B
    assert shut(s, "web", "db")  # excepted: this host's subnet
    assert shut(s, "web", "rweb", v6=True)  # no IPv6 block: nothing over IPv6
    assert opens(s, "api", "rweb", v6=True)  # unselected
    assert opens(s, "api", "db")
    # Connections to web are not egress: web's replies go out.
    assert opens(s, "db", "web")
    assert opens(s, "rjob", "web", v6=True)


def test_removing_the_last_policy_deletes_the_table_and_opens_everything(clean: Site) -> None:
    s = clean
    deny = Policy("deny-db", sel(app="db"), frozenset({INGRESS}))
    ruleset = policy_ruleset([deny], s.endpoints(), LOCAL)
    apply(s.a, None, ruleset)
    assert shut(s, "web", "db")
    empty = policy_ruleset([], s.endpoints(), LOCAL)
    apply(s.a, ruleset, empty)
    assert nft(s.a, "list", "table", "inet", TABLE, check=False) == ""
    assert opens(s, "web", "db")


# --- big cases -------------------------------------------------------------


def many_endpoints(n: int) -> list[Endpoint]:
    found = []
    for i in range(n):
        h, j = 1 + i // 250, 2 + i % 250
        found.append(
            Endpoint(
                key=f"/overlayd/endpoints/10.244.{h}.0-24/c{i}",
                id=f"c{i}",
                host=f"10.244.{h}.0-24",
                name=f"c{i}",
                addresses=(ip_address(f"10.244.{h}.{j}"), ip_address(f"fd00:10:244:{h:x}::{j:x}")),
                labels={"app": f"a{i % 500}", "role": f"r{i % 10}"},
            )
        )
    return found


def many_policies(n: int) -> list[Policy]:
    return [
        Policy(
            f"p{i}",
            sel(app=f"a{i}"),
            frozenset({INGRESS, EGRESS}) if i % 5 == 0 else frozenset({INGRESS}),
            ingress=(
                Rule(
                    peers=(SelectorPeer(sel(role=f"r{i % 10}")),),
                    ports=(PortRange(Protocol.TCP, 8000 + i, 8000 + i), PortRange(Protocol.UDP)),
                ),
            ),
            egress=(Rule(peers=(IpBlock(IPv4Network("10.0.0.0/8")),)),),
        )
        for i in range(n)
    ]


def test_big_rulesets_load_and_changes_stay_small(netns: str) -> None:
    try:
        # A policy of 10,000 ports: one rule, which nft takes.
        ports = tuple(PortRange(Protocol.TCP, p, p) for p in range(1, 20_001, 2))
        big = Policy("big", sel(app="a1"), frozenset({INGRESS}), ingress=(Rule(ports=ports),))
        started = time.perf_counter()
        ruleset = policy_ruleset([big], many_endpoints(100), LOCAL)
        statements = policy_transaction(None, ruleset)
        rendered = time.perf_counter() - started
        checked = subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "-c", "-f", "-"],
            input=script(statements),
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stderr
        apply(netns, None, ruleset)
        print(f"10,000 ports: ruleset and transaction made in {rendered * 1000:.1f} ms")
        # The listing layout is nft input too (diagnose can show and load it).
        relisted = subprocess.run(
            ["ip", "netns", "exec", netns, "nft", "-c", "-f", "-"],
            input=f"table inet {TABLE}\ndelete table inet {TABLE}\n" + render_ruleset(ruleset),
            capture_output=True,
            text=True,
            check=False,
        )
        assert relisted.returncode == 0, relisted.stderr

        # Cold start: 10,000 endpoints and 500 policies.
        endpoints, policies = many_endpoints(10_000), many_policies(500)
        started = time.perf_counter()
        cold = policy_ruleset(policies, endpoints, LOCAL)
        statements = policy_transaction(None, cold)
        planned = time.perf_counter()
        apply(netns, None, cold)
        loaded = time.perf_counter()
        print(
            f"cold start, 10,000 endpoints x 500 policies: {len(statements)} statements,"
            f" planned in {(planned - started) * 1000:.0f} ms,"
            f" loaded by nft in {(loaded - planned) * 1000:.0f} ms"
        )
        wanted = {name: st.elements for name, st in cold.sets.items()}
        assert listed_elements(nft(netns, "-j", "list", "table", "inet", TABLE)) == wanted

        # One endpoint more: four add element statements, which nft takes.
        newcomer = replace(
            endpoints[0],
            key="/overlayd/endpoints/10.244.1.0-24/new",
            id="new",
            name="new",
            addresses=(ip_address("10.244.1.253"), ip_address("fd00:10:244:1::fd")),
        )
        started = time.perf_counter()
        plus = with_endpoints(cold, [], [newcomer])  # what a daemon does per event
        statements = policy_transaction(cold, plus)
        planned = time.perf_counter()
        assert plus == policy_ruleset(policies, [*endpoints, newcomer], LOCAL)
        assert len(statements) == 4 and all(x.startswith("add element") for x in statements)
        apply(netns, cold, plus)
        loaded = time.perf_counter()
        print(
            f"one endpoint more: {len(statements)} statements, planned in"
            f" {(planned - started) * 1000:.0f} ms, loaded in {(loaded - planned) * 1000:.0f} ms"
        )
        # One policy more: new objects and the dispatch and deny chains again.
        more = policy_ruleset([*policies, *many_policies(501)[500:]], [*endpoints, newcomer], LOCAL)
        statements = policy_transaction(plus, more)
        started = time.perf_counter()
        apply(netns, plus, more)
        print(
            f"one policy more: {len(statements)} statements, loaded in"
            f" {(time.perf_counter() - started) * 1000:.0f} ms"
        )
        wanted = {name: st.elements for name, st in more.sets.items()}
        assert listed_elements(nft(netns, "-j", "list", "table", "inet", TABLE)) == wanted
    finally:
        nft(netns, "delete", "table", "inet", TABLE, check=False)


def test_a_table_made_afresh_carries_its_counters_values(clean: Site) -> None:
    """A drift or a failed pass makes the table again: the counters keep
    counting from where they were (read with the daemon's own listing)."""
    s = clean
    deny = Policy("deny-db", sel(app="db"), frozenset({INGRESS}))
    ruleset = policy_ruleset([deny], s.endpoints(), LOCAL)
    apply(s.a, None, ruleset)
    assert shut(s, "web", "db")
    assert opens(s, "web", "api")  # positive control: the probes work
    (drop,) = [n for n, o in policy_counter_names(ruleset).items() if o.verdict == "deny"]
    listing = asyncio.run(Nft(s.a).counters_json(f"inet {TABLE}"))
    assert listing is not None
    held = listed_counts(listing)
    assert held[drop].packets >= 2 and held[drop].bytes > 0
    made = policy_transaction(None, ruleset, held)
    assert any(f"add counter inet {TABLE} {drop} {{ packets " in line for line in made)
    done = load(s.a, made)
    assert done.returncode == 0, done.stderr
    assert listed_counts(nft(s.a, "-j", "list", "counters", "table", "inet", TABLE)) == held
    # And they go on counting from there.
    assert shut(s, "web", "db")
    assert counts(s)[drop] >= held[drop].packets + 2
    # Control: the table really is made again, since without the values
    # its counters start from 0.
    apply(s.a, None, ruleset)
    assert counts(s)[drop] == 0
    assert asyncio.run(Nft(s.a).counters_json("inet no_such_table")) is None


def test_listing_json_is_what_the_reader_expects(netns: str) -> None:
    """listed_elements and listed_counters against nft's own JSON, and the
    terse listing against the rendering without elements."""
    try:
        endpoints = many_endpoints(20)
        ruleset = policy_ruleset(many_policies(3), endpoints, LOCAL)
        apply(netns, None, ruleset)
        listing = json.loads(nft(netns, "-j", "list", "table", "inet", TABLE))
        assert listed_elements(listing) == {n: st.elements for n, st in ruleset.sets.items()}
        assert listed_ports(listing) == {
            n: frozenset(p.elements) for n, p in ruleset.port_sets.items()
        }
        assert listed_counters(listing) == dict.fromkeys(ruleset.counters, 0)
        # What a check pass reads (sets and counters alone, two listings at
        # once) says the same as the whole table.
        checked = asyncio.run(Nft(netns).sets_and_counters_json(f"inet {TABLE}"))
        assert checked is not None
        assert listed_elements(checked) == listed_elements(listing)
        assert listed_ports(checked) == listed_ports(listing)
        assert listed_counters(checked) == listed_counters(listing)
        assert asyncio.run(Nft(netns).sets_and_counters_json("inet no_such_table")) is None
        # The rules as the kernel lists them are the rules as rendered.
        terse = nft(netns, "-t", "list", "table", "inet", TABLE)
        assert terse_listing(terse) == render_ruleset(ruleset, elements=False)
        assert terse_listing(terse) != terse  # positive control: there were values to strip
    finally:
        nft(netns, "delete", "table", "inet", TABLE, check=False)


def test_a_port_list_is_a_shared_set_the_checks_read_back_in_any_order(netns: str) -> None:
    """A rule's port list is a named set that every rule with the same list
    shares (here two policies'). listed_ports reads it back from nft's JSON
    as a set of the render's texts, whatever the order nft lists them in
    (it listed an anonymous TCP and UDP port set's in an order of its own),
    so a check pass finds nothing to repair, and the rules as the kernel
    lists them are the rules as rendered. An element taken out of the set
    behind our back is found, and only a new table puts it back."""
    try:
        labels = (("app", "web"),)
        web = Box("web", "web", "10.244.1.3", "fd00:10:244:1::3", 1, labels, "0a:58:0a:f4:01:03")
        ports = (PortRange(Protocol.TCP, 6379, 6379), PortRange(Protocol.UDP, 53, 53))
        cache = Policy("cache", sel(app="web"), frozenset({INGRESS}), ingress=(Rule(ports=ports),))
        other = replace(cache, name="cache-too", selector=sel(role="frontend"))
        ruleset = policy_ruleset([cache, other], [web.endpoint(role="frontend")], LOCAL)
        [(name, port_set)] = ruleset.port_sets.items()
        assert port_set.elements == ("tcp . 6379", "udp . 53")
        apply(netns, None, ruleset)
        listing = json.loads(nft(netns, "-j", "list", "sets", "table", "inet", TABLE))
        [listed] = [
            i["set"]["elem"] for i in listing["nftables"] if i.get("set", {}).get("name") == name
        ]
        print(f"nft lists {name} as {listed}")
        assert listed_ports(listing) == {name: frozenset(port_set.elements)}
        assert element_repairs(ruleset, listed_elements(listing), listed_ports(listing)) == []
        terse = nft(netns, "-t", "list", "table", "inet", TABLE)
        assert unordered_sets(terse_listing(terse)) == unordered_sets(
            render_ruleset(ruleset, elements=False)
        )
        assert terse.count(f"dport @{name} ") == 2  # one set, two rules
        nft(netns, "delete", "element", "inet", TABLE, name, "{ udp . 53 }")
        listing = json.loads(nft(netns, "-j", "list", "sets", "table", "inet", TABLE))
        assert listed_ports(listing) == {name: frozenset({"tcp . 6379"})}
        assert element_repairs(ruleset, listed_elements(listing), listed_ports(listing)) is None
        apply(netns, None, ruleset)
        listing = json.loads(nft(netns, "-j", "list", "sets", "table", "inet", TABLE))
        assert listed_ports(listing) == {name: frozenset(port_set.elements)}
    finally:
        nft(netns, "delete", "table", "inet", TABLE, check=False)


def base_chains(ns: str) -> list[tuple[str, str]]:
    """(hook, name) of every base chain of our table, as the kernel lists it."""
    listing = json.loads(nft(ns, "-j", "list", "table", "inet", TABLE))
    chains = (item["chain"] for item in listing["nftables"] if "chain" in item)
    return [(c["hook"], c["name"]) for c in chains if "hook" in c]


def test_one_base_chain_judges_both_directions_and_egress_allowed_still_meets_ingress(
    clean: Site,
) -> None:
    """Both directions isolated on host A: one base chain on the forward
    hook, through which an established flow passes (many packets after the
    first) while the policies count only its first packet. web -> db on
    one host is judged by egress (web's) and then ingress (db's): allowed
    both ways it passes; allowed by web's egress but refused by db's
    ingress (on a port only web's egress allows) it is dropped, counted by
    db's ingress deny: an egress allow does not end the judgement."""
    s = clean
    web_out = Policy(
        "web-out",
        sel(app="web"),
        frozenset({EGRESS}),
        egress=(Rule(peers=(SelectorPeer(sel(app="db")),)),),  # to db, every port
    )
    db_in = Policy(
        "db-in",
        sel(app="db"),
        frozenset({INGRESS}),
        ingress=(
            Rule(
                peers=(SelectorPeer(sel(app="web")),),
                ports=(PortRange(Protocol.TCP, 80), PortRange(Protocol.UDP, 80)),
            ),
        ),
    )
    ruleset = policy_ruleset([web_out, db_in], s.endpoints(), LOCAL)
    apply(s.a, None, ruleset)
    assert base_chains(s.a) == [("forward", BASE)]
    assert unordered_sets(terse_listing(nft(s.a, "-t", "list", "table", "inet", TABLE))) == (
        unordered_sets(render_ruleset(ruleset, elements=False))
    )
    owners = policy_counter_names(ruleset)
    name = {(o.policy, o.direction, o.verdict): n for n, o in owners.items()}
    # Allowed by web's egress and db's ingress: passes, both families.
    assert opens(s, "web", "db")
    assert opens(s, "web", "db", v6=True)
    # Allowed by web's egress, refused by db's ingress: dropped.
    before = counts(s)
    assert shut(s, "web", "db", 8080)
    assert shut(s, "web", "db", 8080, v6=True)
    after = counts(s)
    assert after[name["db-in", INGRESS, "deny"]] - before[name["db-in", INGRESS, "deny"]] >= 4
    assert after[name["web-out", EGRESS, "allow"]] - before[name["web-out", EGRESS, "allow"]] >= 4
    # Refused by web's egress (api is no peer of it): dropped there.
    assert shut(s, "web", "api")
    assert counts(s)[name["web-out", EGRESS, "deny"]] >= 2
    # An established flow: one UDP socket's 20 datagrams to db, each
    # answered, pass; the allow counters count its first packet only (the
    # rest pass by the base chain's first rule).
    before = counts(s)
    db = s.boxes["db"]
    answered = lab_netns.in_ns(
        s.boxes["web"].ns,
        sys.executable,
        "-c",
        "import socket\n"
        "c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "c.settimeout(2)\n"
        f"c.connect(({db.v4!r}, 80))\n"
        "n = 0\n"
        "for _ in range(20):\n"
        "    c.send(b'x')\n"
        "    n += c.recv(100) == b'10.244.1.3'\n"
        "print(n)\n",
    )
    assert answered.strip() == "20"
    after = counts(s)
    for key in (("web-out", EGRESS, "allow"), ("db-in", INGRESS, "allow")):
        assert after[name[key]] - before[name[key]] == 1, key
