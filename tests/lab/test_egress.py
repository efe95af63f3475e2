"""Egress in the lab, per mode: containers reach the outside as their host's
address, reach each other without NAT, and cannot be reached from outside;
the gwbridge isolates containers; the daemon's table is repaired; other
owners' firewall rules survive the daemon."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from overlayd.lab import netns
from overlayd.lab.lab import Container, Lab, LabSettings
from overlayd.plan.nftables import split_objects
from tests.conftest import CONVERGE, SESSION_TAG, needs_root, wait_until
from tests.lab.fakes import lab_network

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


def test_overlay_cni_gives_one_interface_in_masquerade_mode_and_two_in_gwbridge(
    lab: Lab,
) -> None:
    wanted = ["eth0", "eth1"] if lab.settings().egress == "gwbridge" else ["eth0"]
    for container in lab.containers():
        links = netns.ip(container.ns, "-br", "link").split("\n")
        names = sorted(line.split()[0].split("@")[0] for line in links if line.strip())
        assert names == sorted(["lo", *wanted]), (container.ns, names)
        default = netns.ip(container.ns, "route", "show", "default")
        assert f"dev {wanted[-1]}" in default


def test_containers_reach_the_outside_as_their_hosts_address(lab: Lab) -> None:
    results = lab.check_egress()
    assert len(results) == 4
    for r in results:
        assert r.seen_as == str(r.expected), r


def test_containers_on_different_hosts_see_each_others_own_address(lab: Lab) -> None:
    src, dst = first(lab, 1), first(lab, 2)
    lab.serve_whoami(dst.ns)
    assert Lab.whoami(src.ns, dst.address, timeout=ANSWER) == str(src.address)
    assert all(r.ok for r in lab.check(timeout=CONVERGE))  # and every pair, through a drop policy


def test_the_outside_cannot_open_connections_to_containers(lab: Lab) -> None:
    target = first(lab, 1)
    lab.serve_whoami(target.ns)
    gw_address = Lab.address_on(target, "eth1")
    # The outside router tries the direct way in: routes to the containers via h1.
    targets = [str(lab.subnet(1))] + ([f"{gw_address}/32"] if gw_address else [])
    for dst in targets:
        netns.ip(lab.outside_ns, "route", "replace", dst, "via", str(lab.host_address(1)))
    # The host itself reaches the container, so the service is really there ...
    assert Lab.whoami(lab.host_ns(1), target.address, timeout=ANSWER) is not None
    # ... but not from outside, on either of the container's addresses.
    assert Lab.whoami(lab.outside_ns, target.address, timeout=1) is None
    if gw_address is not None:
        assert Lab.whoami(lab.outside_ns, gw_address, timeout=1) is None


def IPv4Network_of(lab: Lab, host: int) -> str:
    return str(lab.subnet(host))


def test_containers_on_one_host_cannot_talk_through_the_gwbridge(lab: Lab) -> None:
    if lab.settings().egress != "gwbridge":
        pytest.skip("only gwbridge mode has a gwbridge")
    a, b = [c for c in lab.containers() if c.host == 1][:2]
    b_gw = Lab.address_on(b, "eth1")
    assert b_gw is not None
    assert not Lab.ping(a, Container(b.ns, b.host, b_gw), wait=0.5).ok
    wait_until(lambda: Lab.ping(a, b, wait=1).ok)  # the overlay between them still works


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


def test_source_nat_only_applies_outside_the_cluster(lab: Lab) -> None:
    """Even the host's own bridge address is not NATed towards a container."""
    dst = first(lab, 2)
    lab.serve_whoami(dst.ns)
    gateway = str(lab.subnet(1).network_address + 1)
    assert Lab.whoami(lab.host_ns(1), dst.address, timeout=ANSWER) == gateway
