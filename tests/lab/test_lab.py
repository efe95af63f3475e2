"""The multi-host lab end to end: a real etcd, one real overlayd per host,
containers in namespaces, traffic across a namespaced underlay switch. The
lab is dual-stack: what holds for IPv4 is proven for IPv6 on the same hosts."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from functools import partial
from ipaddress import ip_address
from pathlib import Path

import pytest

from overlayd.lab import netns
from overlayd.lab.containers import Container
from overlayd.lab.flannel_style import add_flannel_style_host, parse_flannel_lease
from overlayd.lab.lab import PREFIX, Lab, LabSettings
from overlayd.model import IPV4, IPV6, Family
from overlayd.plan.desired import vtep6_name
from overlayd.store.etcd import EtcdStore
from tests.conftest import CONVERGE, SESSION_TAG, capture, needs_root, wait_until
from tests.lab.fakes import fake_subnet6, lab_network
from tests.lab.families import FAMILIES
from tests.lab.probes import run_daemon_once

pytestmark = [needs_root, pytest.mark.lab]

VNI = 42
PORT = 8472


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(f"{SESSION_TAG}a")
    try:
        lab.up(3, config=lab_network(vni=VNI, port=PORT), settings=LabSettings(lease_ttl=30))
        yield lab
    finally:
        lab.down()


def owned_routes(lab: Lab, host: int, family: Family = IPV4) -> set[str]:
    out = netns.ip(lab.host_ns(host), "-j", family.iproute2_flag, "route", "show", "proto", "77")
    return {r["dst"] for r in json.loads(out or "[]")}


def vtep6_fdb(lab: Lab, host: int) -> list[dict[str, str]]:
    """The FDB entries on the host's IPv6 VTEP."""
    out = netns.sh(["bridge", "-n", lab.host_ns(host), "-j", "fdb", "show", "dev", vtep6_name(VNI)])
    return list(json.loads(out or "[]"))


def kernel_mentions(lab: Lab, host: int, needle: str) -> bool:
    ns = lab.host_ns(host)
    text = (
        netns.ip(ns, "route", "show", "proto", "77")
        + netns.ip(ns, "-6", "route", "show", "proto", "77")
        + netns.ip(ns, "neigh", "show", "dev", "ovl0", "nud", "permanent")
        + netns.sh(["bridge", "-n", ns, "fdb", "show", "dev", f"ovl.{VNI}"])
        + netns.sh(["bridge", "-n", ns, "fdb", "show", "dev", vtep6_name(VNI)], check=False)
    )
    return needle in text


def lease_json(lab: Lab, host: int) -> dict[str, object]:
    return dict(json.loads(lab.leases()[lab.lease_key(host)]))


def v6_mac(lab: Lab, host: int) -> str:
    data = lease_json(lab, host)["BackendV6Data"]
    assert isinstance(data, dict)
    return str(data["VtepMAC"])


async def delete(key: str, store: EtcdStore) -> bool:
    return await store.delete(key)


async def put(key: str, value: str, store: EtcdStore) -> None:
    await store.put(key, value)


def logged(lab: Lab, host: int, text: str) -> bool:
    return text in lab.daemon_log(host).read_text()


def has_route(lab: Lab, host: int, family: Family, dst: str) -> bool:
    return dst in owned_routes(lab, host, family)


def both_ways(a: Container, b: Container, family: Family) -> None:
    wait_until(lambda: Lab.ping(a, b, wait=1, family=family).ok)
    wait_until(lambda: Lab.ping(b, a, wait=1, family=family).ok)


@FAMILIES
def test_every_container_reaches_every_other_hosts_containers(lab: Lab, family: Family) -> None:
    assert lab.dual_stack
    for c in lab.containers():  # each has its address of the family, in its host's subnet
        address = c.address_of(family)
        subnet = lab.subnet6(c.host) if family.version == 6 else lab.subnet(c.host)
        assert address is not None and subnet is not None and address in subnet, c
    results = lab.check(timeout=CONVERGE, family=family)
    assert len(results) == 6
    assert all(r.ok for r in results), [f"{r.src.ns}->{r.dst.ns}" for r in results if not r.ok]


@FAMILIES
def test_underlay_carries_vxlan_with_the_configured_vni_and_port_and_no_nat(
    lab: Lab, tmp_path: Path, family: Family
) -> None:
    """The tunnel runs over the underlay of the inner packet's family: IPv4
    in IPv4, IPv6 in IPv6 (flannel's flannel-v6 device), between the hosts'
    public addresses of that family, with the configured VNI and port; and
    the inner addresses are the containers' own (no NAT between them)."""
    from scapy.all import (  # type: ignore[attr-defined]
        ICMP,
        IP,
        UDP,
        VXLAN,
        ICMPv6EchoRequest,
        IPv6,
        bind_layers,
        rdpcap,
    )

    bind_layers(UDP, VXLAN, dport=PORT)
    outer_ip, echo = (IPv6, ICMPv6EchoRequest) if family.version == 6 else (IP, ICMP)
    src, dst = lab.container(1), lab.container(2)
    pcap = tmp_path / "underlay.pcap"

    def ping() -> None:
        assert Lab.ping(src, dst, count=3, wait=1, family=family).ok

    bpf = f"{'ip6' if family.version == 6 else 'ip'} and udp"
    capture(lab.switch_ns, "br0", bpf, 4, pcap, ping)
    packets = [p for p in rdpcap(str(pcap)) if VXLAN in p]
    assert packets, "no VXLAN packet seen on the underlay"
    first = packets[0]
    assert outer_ip in first and first[UDP].dport == PORT
    assert first[VXLAN].vni == VNI
    # p[outer_ip] is the first header of that class: the outer one.
    outer = {(str(p[outer_ip].src), str(p[outer_ip].dst)) for p in packets}
    assert (str(Lab.public_address(1, family)), str(Lab.public_address(2, family))) in outer
    inner = [p[VXLAN][outer_ip] for p in packets if echo in p[VXLAN]]
    assert any(
        ip_address(i.src) == src.address_of(family) and ip_address(i.dst) == dst.address_of(family)
        for i in inner
    ), inner


def test_a_restarted_daemon_keeps_both_subnets_and_macs(lab: Lab) -> None:
    subnet, subnet6 = lab.subnet(1), lab.subnet6(1)
    assert subnet6 is not None
    leases_before = lab.leases()
    lab.stop_daemon(1)
    lab.start_daemon(1)
    wait_until(
        lambda: (
            lab.daemon_running(1)
            and "event=ready" in lab.daemon_log(1).read_text().split("event=stopping")[-1]
        ),
    )
    assert lab.subnet(1) == subnet and lab.subnet6(1) == subnet6
    assert lab.leases() == leases_before  # the same key (both subnets) and value (both MACs)
    for family in (IPV4, IPV6):
        assert all(r.ok for r in lab.check(timeout=CONVERGE, family=family))


def test_a_fourth_host_becomes_reachable_from_all_others(lab: Lab) -> None:
    lab.add_host(4)
    new = lab.container(4)
    others = [c for c in lab.containers() if c.host != 4]
    assert others
    # The others learn the new host's lease through their etcd watch.
    for family in (IPV4, IPV6):
        for c in others:
            both_ways(new, c, family)


def remove_peer(lab: Lab, host: int) -> None:
    """A host added by a test and its lease gone, even after a failure: the
    later tests count the lab's hosts and peers."""
    lab.remove_host(host)
    public = f'"{lab.host_address(host)}"'.encode()
    for key in [k for k, v in lab.leases().items() if public in v]:
        lab.etcd(partial(delete, key))


def test_a_flannel_programmed_host_and_overlayd_hosts_reach_each_other(lab: Lab) -> None:
    """Both directions, both families: the flannel host programs overlayd's
    leases the way flannel does (flannel-v6.<VNI> towards PublicIPv6 with
    the BackendV6Data MAC), and overlayd programs flannel's dual-stack lease."""
    try:
        flannel = add_flannel_style_host(lab, 9)
        assert flannel.address6 is not None
        key = next(k for k, v in lab.leases().items() if b'"192.0.2.19"' in v)
        assert "&fd00:10:244:" in key  # flannel's dual-stack key
        # overlayd's own leases, read as flannel reads them, have an IPv6 half.
        for h in (h for h in lab.hosts() if h != 9):
            parsed = parse_flannel_lease(lab.lease_key(h), lab.leases()[lab.lease_key(h)])
            assert parsed is not None and parsed.v6 is not None, lab.lease_key(h)
            assert parsed.v6.public_ip == Lab.host_address6(h)
            assert parsed.v6.subnet == lab.subnet6(h)
        overlayd_containers = [c for c in lab.containers() if c.host != 9]
        # The overlayd hosts learn the flannel host's lease through the etcd watch.
        for family in (IPV4, IPV6):
            for c in overlayd_containers:
                both_ways(flannel, c, family)
    finally:
        remove_peer(lab, 9)


@pytest.mark.parametrize("kind", ["flannel", "overlayd"])
def test_an_ipv4_only_peer_is_reached_over_ipv4_gets_no_ipv6_entries_and_one_warning(
    lab: Lab, kind: str
) -> None:
    """An IPv4-only peer in the dual-stack cluster: a flannel host from
    before dual-stack, or an overlayd host without an IPv6 underlay address.
    Its lease has no IPv6 half, so the other hosts reach it over IPv4,
    program nothing IPv6 for it, and each says so once."""
    fake_key = f"{PREFIX}/subnets/10.244.240.0-24&{fake_subnet6(240).replace('/', '-')}"
    host = 8 if kind == "flannel" else 7
    public = f'"{Lab.host_address(host)}"'.encode()
    try:
        if kind == "flannel":
            old = add_flannel_style_host(lab, host, ipv6=False)
        else:
            lab.add_host(host, ipv6=False)
            old = lab.container(host)
            assert "event=ipv6_unavailable" in lab.daemon_log(host).read_text()
        assert old.address6 is None
        key = next(k for k, v in lab.leases().items() if public in v)
        value = json.loads(lab.leases()[key])
        assert "&" not in key and value["PublicIPv6"] is None and "BackendV6Data" not in value
        warning = f"event=peer_without_ipv6 key={key} "
        overlayd_hosts = [h for h in lab.hosts() if h != host]
        for h in overlayd_hosts:
            both_ways(old, lab.container(h), IPV4)
        for h in overlayd_hosts:
            # Positive control: the dual-stack peers have their IPv6 entries ...
            peers = [p for p in overlayd_hosts if p != h]
            assert owned_routes(lab, h, IPV6) == {str(lab.subnet6(p)) for p in peers}
            fdb = vtep6_fdb(lab, h)
            assert {v6_mac(lab, p) for p in peers} <= {e["mac"] for e in fdb}
            # ... and the IPv4-only one has none: no route, no tunnel to it.
            assert not any(e.get("dst") in (str(Lab.host_address(host)),) for e in fdb)
            assert {e.get("dst") for e in fdb if e.get("dst")} == {
                str(Lab.host_address6(p)) for p in peers
            }
            wait_until(partial(logged, lab, h, warning))
        # Another pass on every daemon (a dual-stack fake peer's IPv6 route
        # appears), which must not warn again.
        fake = {
            "PublicIP": "198.51.100.240",
            "PublicIPv6": "2001:db8::f0",
            "BackendType": "vxlan",
            "BackendData": {"VNI": VNI, "VtepMAC": "02:00:00:00:f0:01"},
            "BackendV6Data": {"VNI": VNI, "VtepMAC": "02:00:00:00:f0:02"},
        }
        lab.etcd(partial(put, fake_key, json.dumps(fake)))
        for h in overlayd_hosts:
            wait_until(partial(has_route, lab, h, IPV6, fake_subnet6(240)))
            assert lab.daemon_log(h).read_text().count(warning) == 1, h
    finally:
        lab.etcd(partial(delete, fake_key))
        remove_peer(lab, host)


def test_a_host_whose_daemon_stops_and_lease_goes_disappears_everywhere(lab: Lab) -> None:
    gone, gone6 = lab.subnet(3), lab.subnet6(3)
    assert gone6 is not None
    lease = lease_json(lab, 3)
    backend = lease["BackendData"]
    assert isinstance(backend, dict)
    macs = [str(backend["VtepMAC"]), v6_mac(lab, 3)]
    others = [h for h in lab.hosts() if h != 3]
    assert all(str(gone) in owned_routes(lab, h) for h in others)
    assert all(str(gone6) in owned_routes(lab, h, IPV6) for h in others)
    lab.stop_daemon(3)
    lab.delete_lease(3)

    def forgotten(host: int) -> bool:
        return (
            not any(kernel_mentions(lab, host, mac) for mac in macs)
            and str(gone) not in owned_routes(lab, host)
            and str(gone6) not in owned_routes(lab, host, IPV6)
        )

    for h in others:
        wait_until(partial(forgotten, h))
        assert not kernel_mentions(lab, h, str(gone.network_address))
        assert not kernel_mentions(lab, h, str(gone6.network_address))
        assert not kernel_mentions(lab, h, str(Lab.host_address6(3)))


def test_an_invalid_network_config_stops_the_daemon_naming_the_field(lab: Lab) -> None:
    lab.etcd(lambda s: s.put("/bad/config", '{"Network": "10.0.0.0/16", "SubnetLen": 17}'))
    proc = run_daemon_once(lab, "--etcd-prefix", "/bad")
    assert proc.returncode == 1
    assert "SubnetLen: /17 leaves fewer than four subnets in 10.0.0.0/16" in proc.stderr
    assert "badbr" not in netns.ip(lab.host_ns(1), "link")


def test_an_overlapping_gwbridge_subnet_stops_the_daemon_before_it_leases(lab: Lab) -> None:
    leases = lab.leases()
    proc = run_daemon_once(lab, "--egress", "gwbridge", "--gwbridge-subnet", "10.244.128.0/20")
    assert proc.returncode == 1
    assert "gwbridge-subnet: 10.244.128.0/20 overlaps the cluster network" in proc.stderr
    assert lab.leases() == leases


def test_a_host_whose_lease_is_taken_names_its_new_subnet_only_once_the_bridge_has_it(
    lab: Lab,
) -> None:
    # Last on the shared lab: h1's containers keep addresses of its old subnet.
    old = lab.subnet(1)
    key = lab.lease_key(1)
    value = json.loads(lab.leases()[key])
    value["PublicIP"] = "192.0.2.250"  # someone else has it now
    lab.etcd(lambda s: s.put(key, json.dumps(value)))
    try:
        seen: list[str] = []

        def moved_with_the_bridge() -> bool:
            new = lab.subnet(1)
            if new == old:
                return False
            # The file never names a subnet before the bridge holds its gateway.
            seen.append(netns.ip(lab.host_ns(1), "-4", "addr", "show", "dev", "ovl0"))
            return True

        wait_until(moved_with_the_bridge, step=0.005)
        gateway = f"{lab.subnet(1).network_address + 1}/{old.prefixlen}"
        assert gateway in seen[0], seen[0]
    finally:
        lab.etcd(partial(delete, key))


def test_lab_down_cleans_up_after_a_crash_half_way() -> None:
    crashed = Lab(f"{SESSION_TAG}b")
    netns.add_namespace(crashed.switch_ns)
    netns.add_namespace(crashed.host_ns(1))
    sleeper = subprocess.Popen(["ip", "netns", "exec", crashed.host_ns(1), "sleep", "300"])
    try:
        wait_until(lambda: bool(netns.pids_in(crashed.host_ns(1))))
        removed = crashed.down()
        assert sorted(removed) == sorted([crashed.switch_ns, crashed.host_ns(1)])
        assert not crashed.namespaces()
        sleeper.wait(timeout=CONVERGE)  # down() killed it (and may have reaped it already)
        with pytest.raises(ProcessLookupError):
            os.kill(sleeper.pid, 0)
    finally:
        sleeper.kill()
        sleeper.wait()
        crashed.down()
