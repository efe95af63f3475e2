"""The pure parts of the dual-stack lab: the flannel-style host's lease in
flannel's exact spelling (key and JSON, read back as flannel reads them),
the underlay's IPv6 addresses, the whoami server's naming of IPv4 clients
on its dual-stack socket, the containers' per-family addresses, `lab up
--ipv6/--no-ipv6`, and `lab check`'s output (unchanged for an IPv4-only
lab, naming the family in a dual-stack one)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, cast

import pytest

from overlayd.cli import ctl
from overlayd.cli.labctl import _check
from overlayd.lab.checks import EgressResult, PingResult, outside_server, public_address
from overlayd.lab.containers import Container
from overlayd.lab.flannel_style import (
    FlannelLease,
    Half,
    flannel_key,
    flannel_value,
    parse_flannel_lease,
    vtep_mtu,
    vtep_name,
)
from overlayd.lab.hosts import LabSettings
from overlayd.lab.lab import Lab
from overlayd.lab.topology import host_address, host_address6
from overlayd.lab.whoami import seen_as
from overlayd.model import IPV4, IPV6, Family, Lease
from overlayd.plan.leases import render_lease

V4 = Half(IPv4Network("10.244.1.0/24"), IPv4Address("192.0.2.11"), "02:00:00:00:00:01")
V6 = Half(IPv6Network("fd00:10:244:1::/64"), IPv6Address("2001:db8::11"), "02:00:00:00:00:02")

# What flannel v0.26's etcd registry writes for a dual-stack vxlan host
# (json.Marshal of lease.LeaseAttrs), and for an IPv4-only one.
FLANNEL_DUAL = (
    '{"PublicIP":"192.0.2.11","PublicIPv6":"2001:db8::11","BackendType":"vxlan",'
    '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"},'
    '"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:02"}}'
)
FLANNEL_V4 = (
    '{"PublicIP":"192.0.2.11","PublicIPv6":null,"BackendType":"vxlan",'
    '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}'
)


def test_the_flannel_style_lease_is_flannels_dual_stack_key_and_json() -> None:
    lease = FlannelLease(V4, V6)
    assert flannel_key(lease) == "/coreos.com/network/subnets/10.244.1.0-24&fd00:10:244:1::-64"
    assert flannel_value(lease, 1) == FLANNEL_DUAL
    assert parse_flannel_lease(flannel_key(lease), FLANNEL_DUAL.encode()) == lease


def test_an_ipv4_only_flannel_lease_has_the_old_key_and_no_ipv6_half() -> None:
    lease = FlannelLease(V4)
    assert flannel_key(lease) == "/coreos.com/network/subnets/10.244.1.0-24"
    assert flannel_value(lease, 1) == FLANNEL_V4
    parsed = parse_flannel_lease(flannel_key(lease), FLANNEL_V4.encode())
    assert parsed == lease and parsed.half(IPV6) is None and parsed.half(IPV4) == V4


def test_flannel_style_reads_overlayds_ipv4_lease_and_skips_what_flannel_skips() -> None:
    overlayd_lease = Lease(IPv4Network("10.244.1.0/24"), IPv4Address("192.0.2.11"), 1, V4.vtep_mac)
    rendered = render_lease(overlayd_lease)
    key = "/coreos.com/network/subnets/10.244.1.0-24"
    assert parse_flannel_lease(key, rendered.encode()) == FlannelLease(V4)
    host_gw = json.dumps({"PublicIP": "192.0.2.11", "BackendType": "host-gw"})
    assert parse_flannel_lease(key, host_gw.encode()) is None  # not for the vxlan backend
    assert parse_flannel_lease("/coreos.com/network/subnets/nonsense", FLANNEL_V4.encode()) is None
    assert parse_flannel_lease(key, b"{not json") is None
    # A dual-stack key whose value lacks the IPv6 half is refused, not half-read.
    dual_key = key + "&fd00:10:244:1::-64"
    assert parse_flannel_lease(dual_key, FLANNEL_V4.encode()) is None


def test_flannel_style_devices_are_named_and_sized_per_family() -> None:
    assert (vtep_name(IPV4, 42), vtep_name(IPV6, 42)) == ("flannel.42", "flannel-v6.42")
    # What the kernel allows over the lab's 1500-byte underlay, not flannel #1781's 1450.
    assert (vtep_mtu(IPV4), vtep_mtu(IPV6)) == (1450, 1430)


def test_the_underlay_spells_a_hosts_ipv6_address_with_its_ipv4_digits() -> None:
    assert host_address(1) == IPv4Address("192.0.2.11")
    assert host_address6(1) == IPv6Address("2001:db8::11")
    assert host_address6(190) == IPv6Address("2001:db8::200")
    assert public_address(3, IPV6) == IPv6Address("2001:db8::13")
    assert outside_server(IPV4) == IPv4Address("203.0.113.10")
    assert outside_server(IPV6) == IPv6Address("2001:db8:ffff::10")


def test_whoami_names_an_ipv4_client_on_its_dual_stack_socket_by_its_ipv4_address() -> None:
    assert seen_as("::ffff:192.0.2.11") == "192.0.2.11"
    assert seen_as("2001:db8::11") == "2001:db8::11"
    assert seen_as("192.0.2.11") == "192.0.2.11"
    assert seen_as("fe80::1%eth0") == "fe80::1"


def test_a_container_has_an_address_per_family_and_can_be_aimed_at_another() -> None:
    c = Container("ns", 1, IPv4Address("10.244.1.2"), address6=IPv6Address("fd00:10:244:1::2"))
    assert c.address_of(IPV4) == IPv4Address("10.244.1.2")
    assert c.address_of(IPV6) == IPv6Address("fd00:10:244:1::2")
    other = c.reached_at(IPv6Address("fd00:ffff::2"))
    assert other.address6 == IPv6Address("fd00:ffff::2") and other.address == c.address
    assert Container("ns", 1, IPv4Address("10.244.1.2")).address_of(IPV6) is None


@pytest.mark.parametrize(
    ("flags", "wanted"), [([], None), (["--ipv6"], True), (["--no-ipv6"], False)]
)
def test_lab_up_takes_ipv6_on_or_off_and_otherwise_the_labs_default(
    flags: list[str], wanted: bool | None
) -> None:
    args = ctl.parser().parse_args(["lab", "up", *flags])
    assert args.ipv6 is wanted


@dataclass
class FakeLab:
    """What `lab check` asks of a lab, answered from fixed results."""

    families_: list[Family]
    pings: list[PingResult]
    egress: list[EgressResult]
    mode: str = "gwbridge"
    host_numbers: list[int] = field(default_factory=lambda: [1, 2])

    def families(self) -> list[Family]:
        return self.families_

    def check(self, *, timeout: float, family: Family) -> list[PingResult]:
        return [r for r in self.pings if r.family == family]

    def check_egress(self, *, family: Family) -> list[EgressResult]:
        return [e for e in self.egress if e.family == family]

    def settings(self) -> LabSettings:
        return LabSettings(egress=self.mode)

    def engine_checkables(self, *, egress: bool = False) -> list[Container]:
        return []

    def hosts(self) -> list[int]:
        return self.host_numbers


A = Container("h1c1", 1, IPv4Address("10.244.1.2"), address6=IPv6Address("fd00:10:244:1::2"))
B = Container("h2c1", 2, IPv4Address("10.244.2.2"), address6=IPv6Address("fd00:10:244:2::2"))


def results(family: Family, *, ok: bool = True) -> tuple[list[PingResult], list[EgressResult]]:
    pings = [PingResult(A, B, ok, 0.1, family), PingResult(B, A, True, 0.2, family)]
    egress = [
        EgressResult(c, str(public_address(c.host, family)), public_address(c.host, family), family)
        for c in (A, B)
    ]
    return pings, egress


def run_check(lab: FakeLab, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = _check(cast(Lab, lab), timeout=1.0, as_json=False)
    return code, capsys.readouterr().out


def test_lab_check_of_an_ipv4_only_lab_prints_what_it_always_printed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pings, egress = results(IPV4)
    code, out = run_check(FakeLab([IPV4], pings, egress), capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("lab check: 2/2 cross-host container pairs reachable across 2")
    assert lines[1].startswith("  ping RTT ms: min 0.100")
    assert (
        lines[2] == "  egress (gwbridge): 2/2 containers reach 203.0.113.10 as their host's address"
    )
    assert "IPv" not in out


def test_lab_check_of_a_dual_stack_lab_names_each_family_and_fails_on_either(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pings4, egress4 = results(IPV4)
    pings6, egress6 = results(IPV6, ok=False)
    lab = FakeLab([IPV4, IPV6], pings4 + pings6, egress4 + egress6)
    code, out = run_check(lab, capsys)
    assert code == 1  # one IPv6 pair failed
    assert "IPv4 2/2, IPv6 1/2" in out.splitlines()[0]
    assert "  IPv4 ping RTT ms:" in out and "  IPv6 ping RTT ms:" in out
    assert "UNREACHABLE (IPv6) h1c1 (fd00:10:244:1::2) -> h2c1 (fd00:10:244:2::2)" in out
    assert (
        "  egress (gwbridge, IPv6): 2/2 containers reach 2001:db8:ffff::10"
        " as their host's IPv6 address"
    ) in out
    code = _check(cast(Lab, lab), timeout=1.0, as_json=True)
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert code == 1 and report["families"] == [4, 6] and report["pairs"] == 4
    assert {p["family"] for p in report["pings"]} == {4, 6}
    assert {e["expected"] for e in report["egress"] if e["family"] == 6} == {
        "2001:db8::11",
        "2001:db8::12",
    }
