"""The subnet file is flannel's and atomic; etcd endpoints map to one gRPC target."""

from __future__ import annotations

from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path

import pytest

from overlayd.store.etcd import grpc_target
from overlayd.surfaces.subnetfile import (
    SubnetFile,
    read_dns,
    read_gwbridge_subnets,
    read_service_networks,
    read_subnet,
    write_atomically,
)


def test_subnet_file_has_flannels_four_variables(tmp_path: Path) -> None:
    content = SubnetFile(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.7.0/24"), 1450).render()
    assert content == (
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\nOVERLAYD_EGRESS=none\n"
    )
    path = tmp_path / "run" / "subnet.env"
    write_atomically(path, content)
    assert read_subnet(path) == IPv4Network("10.244.7.0/24")
    assert [p.name for p in path.parent.iterdir()] == ["subnet.env"]  # no temp file left


def test_subnet_file_names_the_gwbridge_in_gwbridge_mode() -> None:
    content = SubnetFile(
        IPv4Network("10.244.0.0/16"),
        IPv4Network("10.244.7.0/24"),
        1450,
        ipmasq=False,
        egress="gwbridge",
        gwbridge="ovl_gwbridge",
        gwbridge_gateway=IPv4Interface("172.18.0.1/16"),
    ).render()
    assert content.endswith(
        "OVERLAYD_EGRESS=gwbridge\nOVERLAYD_GWBRIDGE=ovl_gwbridge\n"
        "OVERLAYD_GWBRIDGE_SUBNET=172.18.0.1/16\n"
    )
    masq = SubnetFile(
        IPv4Network("10.244.0.0/16"),
        IPv4Network("10.244.7.0/24"),
        1450,
        ipmasq=True,
        egress="masquerade",
    ).render()
    assert "FLANNEL_IPMASQ=true\n" in masq and "GWBRIDGE" not in masq


def test_the_gwbridge_subnets_are_read_back_in_gwbridge_mode_only(tmp_path: Path) -> None:
    """For diagnose, which judges this host's containers as the daemon does."""
    path = tmp_path / "subnet.env"
    gwbridge = SubnetFile(
        IPv4Network("10.244.0.0/16"),
        IPv4Network("10.244.7.0/24"),
        1450,
        egress="gwbridge",
        gwbridge="ovl_gwbridge",
        gwbridge_gateway=IPv4Interface("172.18.0.1/16"),
        network6=IPv6Network("fd00:10:244::/48"),
        subnet6=IPv6Network("fd00:10:244:7::/64"),
        gwbridge_gateway6=IPv6Interface("fd4a:4eae:8d08::1/64"),
    )
    write_atomically(path, gwbridge.render())
    assert read_gwbridge_subnets(path) == (
        IPv4Network("172.18.0.0/16"),
        IPv6Network("fd4a:4eae:8d08::/64"),
    )
    masquerade = SubnetFile(
        IPv4Network("10.244.0.0/16"), IPv4Network("10.244.7.0/24"), 1450, egress="masquerade"
    )
    write_atomically(path, masquerade.render())
    assert read_gwbridge_subnets(path) == ()
    assert read_gwbridge_subnets(tmp_path / "absent") == ()


def test_a_missing_or_broken_subnet_file_gives_no_hint(tmp_path: Path) -> None:
    assert read_subnet(tmp_path / "absent") is None
    broken = tmp_path / "broken"
    broken.write_text("FLANNEL_SUBNET=nonsense\n")
    assert read_subnet(broken) is None


def test_the_dns_lines_are_written_only_when_given_and_read_back(tmp_path: Path) -> None:
    base = (IPv4Network("10.244.0.0/16"), IPv4Network("10.244.7.0/24"), 1450)
    servers = (IPv4Address("10.244.7.1"), IPv6Address("fd00:10:244:7::1"))
    content = SubnetFile(*base, dns_servers=servers, dns_domain="overlay.internal").render()
    assert content.endswith(
        "OVERLAYD_DNS=10.244.7.1,fd00:10:244:7::1\nOVERLAYD_DNS_DOMAIN=overlay.internal\n"
    )
    path = tmp_path / "subnet.env"
    write_atomically(path, content)
    assert read_dns(path) == (servers, "overlay.internal")
    # Control: without them (no services), no line and nothing read.
    plain = SubnetFile(*base).render()
    assert "OVERLAYD_DNS" not in plain
    write_atomically(path, plain)
    assert read_dns(path) == ((), None)
    assert read_dns(tmp_path / "absent") == ((), None)


def test_the_service_networks_are_written_when_configured_and_read_back(tmp_path: Path) -> None:
    base = (IPv4Network("10.244.0.0/16"), IPv4Network("10.244.7.0/24"), 1450)
    networks = (IPv4Network("10.96.0.0/16"), IPv6Network("fd00:96::/108"))
    content = SubnetFile(*base, service_networks=networks).render()
    assert "OVERLAYD_SERVICE_NETWORK=10.96.0.0/16,fd00:96::/108\n" in content
    path = tmp_path / "subnet.env"
    write_atomically(path, content + "")
    assert read_service_networks(path) == networks
    write_atomically(path, SubnetFile(*base).render())  # control: none configured
    assert read_service_networks(path) == ()
    path.write_text("OVERLAYD_SERVICE_NETWORK=10.96.0.1/16,junk,10.96.0.0/16\n")
    assert read_service_networks(path) == (IPv4Network("10.96.0.0/16"),)


def test_bad_dns_values_are_left_out_without_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "subnet.env"
    path.write_text(
        "OVERLAYD_DNS=10.244.7.1, nonsense,,10.244.7.1,999.1.1.1, fd00::1\n"
        "OVERLAYD_DNS_DOMAIN=bad_domain..example\n"
    )
    # The good addresses survive (once each), the bad domain reads as none.
    assert read_dns(path) == ((IPv4Address("10.244.7.1"), IPv6Address("fd00::1")), None)
    path.write_text("OVERLAYD_DNS=\nOVERLAYD_DNS_DOMAIN=Overlay.Internal.\n")
    assert read_dns(path) == ((), "overlay.internal")


def test_several_ip_endpoints_become_one_failover_target() -> None:
    target = grpc_target(["http://192.0.2.2:2379", "http://192.0.2.3:2379"])
    assert target == "ipv4:192.0.2.2:2379,192.0.2.3:2379"


def test_a_single_host_name_is_resolved_by_grpc() -> None:
    assert grpc_target(["http://etcd.example:2379"]) == "dns:etcd.example:2379"
    with pytest.raises(ValueError, match="IP addresses"):
        grpc_target(["http://a.example:2379", "http://b.example:2379"])


def test_a_unix_socket_endpoint_is_passed_through() -> None:
    assert grpc_target(["unix:///run/etcd.sock:0"]) == "unix:/run/etcd.sock:0"
