"""Egress in the lab, per mode and per address family: containers reach the
outside as their host's address of the family, reach each other without
NAT, and cannot be reached from outside; the gwbridge isolates containers;
the daemon's table is repaired; other owners' firewall rules survive the
daemon."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from overlayd.lab import netns
from overlayd.lab.containers import first_address
from overlayd.lab.lab import Container, Lab, LabSettings
from overlayd.model import IPV4, IPV6, Family
from overlayd.plan.nftables import split_objects
from tests.conftest import CONVERGE, SESSION_TAG, needs_root, wait_until
from tests.lab.fakes import lab_network
from tests.lab.families import FAMILIES

pytestmark = [needs_root, pytest.mark.lab]

# How long a whoami that should succeed may take to answer: a loaded machine
# can take seconds to schedule the server (a whoami that must fail keeps the
# short default, since waiting longer only makes the test slower).
ANSWER = 15.0

OTHER_TABLE = """table inet othertool {
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\ttcp dport 9999 accept
\t}
}
"""


def prepare_like_docker(ns: str) -> None:
    """Another owner's rules, in place before overlayd starts: a FORWARD
    drop policy and a rule of its own (as Docker sets), and an unrelated
    nftables table."""
    netns.in_ns(ns, "iptables", "-P", "FORWARD", "DROP")
    netns.in_ns(ns, "iptables", "-A", "FORWARD", "-s", "198.51.100.0/24", "-j", "ACCEPT")
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"], input=OTHER_TABLE.encode(), check=True
    )


def other_owners_state(lab: Lab, host: int) -> tuple[str, list[str]]:
    ns = lab.host_ns(host)
    table = netns.in_ns(ns, "nft", "list", "table", "inet", "othertool")
    forward = netns.in_ns(ns, "iptables", "-S", "FORWARD").splitlines()
    return table, [line for line in forward if "OVERLAYD" not in line]


@pytest.fixture(scope="module", params=["gwbridge", "masquerade"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab(f"{SESSION_TAG}{request.param[0]}")
    lab.prepare_host = prepare_like_docker
    try:
        lab.up(
            2,
            config=lab_network(),
            settings=LabSettings(egress=request.param, containers_per_host=2, resync_seconds=1.0),
        )
        yield lab
    finally:
        lab.down()


def table(ns: str) -> dict[str, str]:
    """Our table's objects. By object, not as one text: the egress chains
    are made again on a repair, after the VXLAN allow-list's chain, so the
    order in a listing changes, and that is not a difference."""
    return split_objects(netns.in_ns(ns, "nft", "list", "table", "ip", "overlayd", check=False))


def first(lab: Lab, host: int) -> Container:
    return next(c for c in lab.containers() if c.host == host)


def subnet_of(lab: Lab, host: int, family: Family) -> str:
    return str(lab.subnet6(host) if family.version == 6 else lab.subnet(host))


def test_overlay_cni_gives_one_interface_in_masquerade_mode_and_two_in_gwbridge(
    lab: Lab,
) -> None:
    wanted = ["eth0", "eth1"] if lab.settings().egress == "gwbridge" else ["eth0"]
    for container in lab.containers():
        links = netns.ip(container.ns, "-br", "link").split("\n")
        names = sorted(line.split()[0].split("@")[0] for line in links if line.strip())
        assert names == sorted(["lo", *wanted]), (container.ns, names)
        # The way out is the same interface in both families.
        for family in (IPV4, IPV6):
            default = netns.ip(container.ns, family.iproute2_flag, "route", "show", "default")
            assert f"dev {wanted[-1]}" in default, (container.ns, family.version, default)


@FAMILIES
def test_containers_reach_the_outside_as_their_hosts_address(lab: Lab, family: Family) -> None:
    results = lab.check_egress(family=family)
    assert len(results) == 4
    for r in results:
        assert r.expected == Lab.public_address(r.container.host, family)
        assert r.seen_as == str(r.expected), r


@FAMILIES
def test_containers_on_different_hosts_see_each_others_own_address(
    lab: Lab, family: Family
) -> None:
    src, dst = first(lab, 1), first(lab, 2)
    src_address, dst_address = src.address_of(family), dst.address_of(family)
    assert src_address is not None and dst_address is not None
    lab.serve_whoami(dst.ns)
    assert Lab.whoami(src.ns, dst_address, timeout=ANSWER) == str(src_address)
    # And every pair, through a drop policy.
    assert all(r.ok for r in lab.check(timeout=CONVERGE, family=family))


@FAMILIES
def test_the_outside_cannot_open_connections_to_containers(lab: Lab, family: Family) -> None:
    target = first(lab, 1)
    address = target.address_of(family)
    assert address is not None
    lab.serve_whoami(target.ns)
    gw_address = first_address(target.ns, "eth1", family)
    # The outside router tries the direct way in: routes to the containers via h1.
    host_len = 32 if family.version == 4 else 128
    targets = [subnet_of(lab, 1, family)] + ([f"{gw_address}/{host_len}"] if gw_address else [])
    via = str(Lab.public_address(1, family))
    for dst in targets:
        netns.ip(lab.outside_ns, family.iproute2_flag, "route", "replace", dst, "via", via)
    # The host itself reaches the container, so the service is really there ...
    assert Lab.whoami(lab.host_ns(1), address, timeout=ANSWER) is not None
    # ... but not from outside, on either of the container's addresses.
    assert Lab.whoami(lab.outside_ns, address, timeout=1) is None
    if gw_address is not None:
        assert Lab.whoami(lab.outside_ns, gw_address, timeout=1) is None


def IPv4Network_of(lab: Lab, host: int) -> str:
    return str(lab.subnet(host))


@FAMILIES
def test_containers_on_one_host_cannot_talk_through_the_gwbridge(lab: Lab, family: Family) -> None:
    if lab.settings().egress != "gwbridge":
        pytest.skip("only gwbridge mode has a gwbridge")
    a, b = [c for c in lab.containers() if c.host == 1][:2]
    b_gw = first_address(b.ns, "eth1", family)
    assert b_gw is not None
    assert not Lab.ping(a, b.reached_at(b_gw), wait=0.5, family=family).ok
    # The overlay between them still works.
    wait_until(lambda: Lab.ping(a, b, wait=1, family=family).ok)


def test_a_deleted_or_altered_table_is_put_back_by_the_next_reconcile(lab: Lab) -> None:
    ns = lab.host_ns(1)
    good = table(ns)
    assert "chain forward" in good and "chain vxlan_in" in good
    netns.in_ns(ns, "nft", "delete", "table", "ip", "overlayd")
    wait_until(lambda: table(ns) == good)
    # An altered table too: the next full pass (the resync runs every second
    # here) puts it back.
    netns.in_ns(ns, "nft", "flush", "chain", "ip", "overlayd", "postrouting")
    wait_until(lambda: table(ns) == good)
    assert all(r.seen_as == str(r.expected) for r in lab.check_egress())


def test_other_owners_rules_survive_start_reconcile_and_stop(lab: Lab) -> None:
    expected = (OTHER_TABLE, ["-P FORWARD DROP", "-A FORWARD -s 198.51.100.0/24 -j ACCEPT"])
    for host in lab.hosts():
        assert other_owners_state(lab, host) == expected
        forward = netns.in_ns(lab.host_ns(host), "iptables", "-S", "FORWARD").splitlines()
        assert "OVERLAYD-FORWARD" in forward[1]  # our one jump, first
    lab.stop_daemon(1)
    assert other_owners_state(lab, 1) == expected


@FAMILIES
def test_source_nat_only_applies_outside_the_cluster(lab: Lab, family: Family) -> None:
    """Even the host's own bridge address is not NATed towards a container."""
    dst = first(lab, 2)
    address = dst.address_of(family)
    assert address is not None
    lab.serve_whoami(dst.ns)
    subnet = lab.subnet6(1) if family.version == 6 else lab.subnet(1)
    assert subnet is not None
    gateway = str(subnet.network_address + 1)
    assert Lab.whoami(lab.host_ns(1), address, timeout=ANSWER) == gateway
