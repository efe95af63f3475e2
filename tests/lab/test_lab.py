"""The multi-host lab end to end: a real etcd, one real overlayd per host,
containers in namespaces, traffic across a namespaced underlay switch."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from overlayd.lab import netns
from overlayd.lab.flannel_style import add_flannel_style_host
from overlayd.lab.lab import Lab, LabSettings
from overlayd.store.etcd import EtcdStore
from tests.conftest import CONVERGE, SESSION_TAG, capture, needs_root, wait_until
from tests.lab.fakes import lab_network
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


def owned_routes(lab: Lab, host: int) -> set[str]:
    out = netns.ip(lab.host_ns(host), "-j", "route", "show", "proto", "77")
    return {r["dst"] for r in json.loads(out or "[]")}


def kernel_mentions(lab: Lab, host: int, needle: str) -> bool:
    ns = lab.host_ns(host)
    text = (
        netns.ip(ns, "route", "show", "proto", "77")
        + netns.ip(ns, "neigh", "show", "dev", "ovl0", "nud", "permanent")
        + netns.sh(["bridge", "-n", ns, "fdb", "show", "dev", f"ovl.{VNI}"])
    )
    return needle in text


async def delete(key: str, store: EtcdStore) -> bool:
    return await store.delete(key)


def test_every_container_reaches_every_other_hosts_containers(lab: Lab) -> None:
    results = lab.check(timeout=CONVERGE)
    assert len(results) == 6
    assert all(r.ok for r in results), [f"{r.src.ns}->{r.dst.ns}" for r in results if not r.ok]


def test_underlay_carries_vxlan_with_the_configured_vni_and_port_and_no_nat(
    lab: Lab, tmp_path: Path
) -> None:
    from scapy.all import ICMP, IP, UDP, VXLAN, bind_layers, rdpcap  # type: ignore[attr-defined]

    bind_layers(UDP, VXLAN, dport=PORT)
    src, dst = (next(c for c in lab.containers() if c.host == h) for h in (1, 2))
    pcap = tmp_path / "underlay.pcap"

    def ping() -> None:
        assert Lab.ping(src, dst, count=3, wait=1).ok

    capture(lab.switch_ns, "br0", "udp", 4, pcap, ping)
    packets = [p for p in rdpcap(str(pcap)) if VXLAN in p]
    assert packets, "no VXLAN packet seen on the underlay"
    first = packets[0]
    assert first[UDP].dport == PORT
    assert first[VXLAN].vni == VNI
    outer = {(str(p[IP].src), str(p[IP].dst)) for p in packets}
    assert ("192.0.2.11", "192.0.2.12") in outer
    inner = [p[VXLAN][IP] for p in packets if ICMP in p[VXLAN]]
    assert any(
        IPv4Address(i.src) == src.address and IPv4Address(i.dst) == dst.address for i in inner
    )


def test_a_restarted_daemon_keeps_its_subnet_and_mac(lab: Lab) -> None:
    subnet = lab.subnet(1)
    leases_before = lab.leases()
    lab.stop_daemon(1)
    lab.start_daemon(1)
    wait_until(
        lambda: (
            lab.daemon_running(1)
            and "event=ready" in lab.daemon_log(1).read_text().split("event=stopping")[-1]
        ),
    )
    assert lab.subnet(1) == subnet
    assert lab.leases() == leases_before
    assert all(r.ok for r in lab.check(timeout=CONVERGE))


def test_a_fourth_host_becomes_reachable_from_all_others(lab: Lab) -> None:
    lab.add_host(4)
    new = [c for c in lab.containers() if c.host == 4]
    others = [c for c in lab.containers() if c.host != 4]
    assert new and others
    # The others learn the new host's lease through their etcd watch.
    for c in others:
        wait_until(partial(lambda src: Lab.ping(src, new[0], wait=1).ok, c))
        wait_until(partial(lambda dst: Lab.ping(new[0], dst, wait=1).ok, c))


def test_a_flannel_programmed_host_and_overlayd_hosts_reach_each_other(lab: Lab) -> None:
    try:
        flannel = add_flannel_style_host(lab, 9)
        overlayd_containers = [c for c in lab.containers() if c.host != 9]
        # The overlayd hosts learn the flannel host's lease through the etcd watch.
        for c in overlayd_containers:
            wait_until(partial(lambda dst: Lab.ping(flannel, dst, wait=0.5).ok, c))
            wait_until(partial(lambda src: Lab.ping(src, flannel, wait=1).ok, c))
    finally:
        # Even after a failure: the later tests count the lab's hosts.
        lab.remove_host(9)
        for key in [k for k, v in lab.leases().items() if b'"192.0.2.19"' in v]:
            lab.etcd(partial(delete, key))


def test_a_host_whose_daemon_stops_and_lease_goes_disappears_everywhere(lab: Lab) -> None:
    gone = lab.subnet(3)
    mac = json.loads(lab.leases()[f"/coreos.com/network/subnets/{gone.network_address}-24"])[
        "BackendData"
    ]["VtepMAC"]
    others = [h for h in lab.hosts() if h != 3]
    assert all(str(gone) in owned_routes(lab, h) for h in others)
    lab.stop_daemon(3)
    lab.delete_lease(3)

    def forgotten(host: int) -> bool:
        return not kernel_mentions(lab, host, mac) and str(gone) not in owned_routes(lab, host)

    for h in others:
        wait_until(partial(forgotten, h))
        assert not kernel_mentions(lab, h, str(gone.network_address))


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
    key = f"/coreos.com/network/subnets/{old.network_address}-{old.prefixlen}"
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
