"""overlay-cni without root: what it asks the bridge plugin for, how it
merges results, and the CNI error it prints for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from overlayd.cli.cni import CniError, delegate_configs, dns_settings, merge_results, result_dns

MASQUERADE = (
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=true\nOVERLAYD_EGRESS=masquerade\nOVERLAYD_BRIDGE=ovl0\n"
)
GWBRIDGE = (
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=false\nOVERLAYD_EGRESS=gwbridge\nOVERLAYD_BRIDGE=ovl0\n"
    "OVERLAYD_GWBRIDGE=ovl_gwbridge\nOVERLAYD_GWBRIDGE_SUBNET=172.18.0.1/16\n"
)
# What overlayd's subnet file adds in a dual-stack network.
V6 = "FLANNEL_IPV6_NETWORK=fd00:10:244::/48\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n"
V6_GWBRIDGE = "OVERLAYD_GWBRIDGE_SUBNET6=fd00:ffff:18::1/64\n"
V4_RANGE = {
    "subnet": "10.244.7.0/24",
    "gateway": "10.244.7.1",
    "rangeStart": "10.244.7.2",
    "rangeEnd": "10.244.7.127",
}
V6_RANGE = {
    "subnet": "fd00:10:244:7::/64",
    "gateway": "fd00:10:244:7::1",
    # The upper half: Docker's IPv6 addresses are in the lower one (plan/ipam.py).
    "rangeStart": "fd00:10:244:7:8000::",
    "rangeEnd": "fd00:10:244:7:ffff:ffff:ffff:ffff",
}


def conf(tmp_path: Path, subnet_env: str) -> dict[str, Any]:
    (tmp_path / "subnet.env").write_text(subnet_env)
    return {
        "cniVersion": "1.0.0",
        "name": "overlay",
        "type": "overlay-cni",
        "subnetFile": str(tmp_path / "subnet.env"),
        "dataDir": str(tmp_path / "cni"),
        # Never a real daemon's socket (test_cni_registration.py serves one).
        "controlSocket": str(tmp_path / "no-daemon" / "overlayd.sock"),
    }


def test_masquerade_mode_asks_for_one_interface_with_the_default_route(tmp_path: Path) -> None:
    delegates = delegate_configs(conf(tmp_path, MASQUERADE), "eth0")
    assert [ifname for ifname, _ in delegates] == ["eth0"]
    bridge = delegates[0][1]
    assert bridge["type"] == "bridge" and bridge["bridge"] == "ovl0" and bridge["mtu"] == 1450
    assert bridge["isGateway"] is False and bridge["ipMasq"] is False
    assert bridge["ipam"]["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.7.1"}]


def test_host_local_takes_the_lower_half_and_leaves_the_upper_half_to_docker(
    tmp_path: Path,
) -> None:
    (_, bridge), *_ = delegate_configs(conf(tmp_path, MASQUERADE), "eth0")
    assert bridge["ipam"]["ranges"] == [
        [
            {
                "subnet": "10.244.7.0/24",  # the container's prefix: one link for both engines
                "gateway": "10.244.7.1",
                "rangeStart": "10.244.7.2",
                "rangeEnd": "10.244.7.127",
            }
        ]
    ]
    whole = {**conf(tmp_path, MASQUERADE), "wholeSubnet": True}
    (_, bridge), *_ = delegate_configs(whole, "eth0")
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.244.7.0/24", "gateway": "10.244.7.1"}]]
    with pytest.raises(CniError, match="wholeSubnet"):
        delegate_configs({**whole, "wholeSubnet": "yes"}, "eth0")


def test_a_subnet_too_small_to_share_asks_for_whole_subnet(tmp_path: Path) -> None:
    small = MASQUERADE.replace("10.244.7.1/24", "10.244.7.1/29")
    with pytest.raises(CniError, match="wholeSubnet"):
        delegate_configs(conf(tmp_path, small), "eth0")
    whole = {**conf(tmp_path, small), "wholeSubnet": True}
    assert delegate_configs(whole, "eth0")


def test_dns_from_the_network_config_goes_into_the_result_and_bad_dns_is_named() -> None:
    dns = {"nameservers": ["203.0.113.53"], "search": ["lab.example"], "domain": "lab.example"}
    assert dns_settings({"dns": dns}) == dns
    assert merge_results("1.0.0", [], dns_settings({"dns": dns}))["dns"] == dns
    assert merge_results("1.0.0", [], dns_settings({}))["dns"] == {}
    for bad, field in (
        ({"nameservers": "203.0.113.53"}, "dns.nameservers"),
        ({"nameservers": ["not-an-address"]}, "dns.nameservers"),
        ({"domain": 5}, "dns.domain"),
        ({"servers": []}, "dns.servers"),
        ([], "dns must be an object"),
    ):
        with pytest.raises(CniError, match=field) as error:
            dns_settings({"dns": bad})
        assert error.value.code == 4


def test_gwbridge_mode_asks_for_a_second_interface_with_the_default_route(
    tmp_path: Path,
) -> None:
    delegates = delegate_configs(conf(tmp_path, GWBRIDGE), "eth0")
    assert [ifname for ifname, _ in delegates] == ["eth0", "eth1"]
    overlay, egress = delegates[0][1], delegates[1][1]
    assert overlay["ipam"]["routes"] == [{"dst": "10.244.0.0/16", "gw": "10.244.7.1"}]
    assert egress["bridge"] == "ovl_gwbridge" and "mtu" not in egress
    assert egress["name"] == "overlay-egress"  # its own host-local state
    assert egress["ipam"]["ranges"] == [[{"subnet": "172.18.0.0/16", "gateway": "172.18.0.1"}]]
    assert egress["ipam"]["routes"] == [{"dst": "0.0.0.0/0", "gw": "172.18.0.1"}]


def test_gwbridge_mode_routes_the_service_networks_by_the_overlay_too(tmp_path: Path) -> None:
    """A VIP by eth1 would reach its backend masqueraded from the gwbridge."""
    services = "OVERLAYD_SERVICE_NETWORK=10.96.0.0/16,fd00:96::/108,not-a-network\n"
    (_, overlay), (_, egress) = delegate_configs(
        conf(tmp_path, GWBRIDGE + V6 + V6_GWBRIDGE + services), "eth0"
    )
    assert overlay["ipam"]["routes"] == [
        {"dst": "10.244.0.0/16", "gw": "10.244.7.1"},
        {"dst": "fd00:10:244::/48", "gw": "fd00:10:244:7::1"},
        {"dst": "10.96.0.0/16", "gw": "10.244.7.1"},
        {"dst": "fd00:96::/108", "gw": "fd00:10:244:7::1"},
    ]
    assert {"dst": "0.0.0.0/0", "gw": "172.18.0.1"} in egress["ipam"]["routes"]
    # Other modes: the default route by eth0 covers the VIPs already.
    [(_, only)] = delegate_configs(conf(tmp_path, MASQUERADE + services), "eth0")
    assert only["ipam"]["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.7.1"}]


def test_a_missing_subnet_file_means_try_again_later(tmp_path: Path) -> None:
    c = conf(tmp_path, "")
    with pytest.raises(CniError) as error:
        delegate_configs(c, "eth0")
    assert error.value.code == 11
    assert "FLANNEL_SUBNET" in error.value.msg


def test_the_egress_interface_cannot_be_the_runtime_s_interface(tmp_path: Path) -> None:
    c = {**conf(tmp_path, GWBRIDGE), "egressIfName": "eth0"}
    with pytest.raises(CniError, match="egressIfName"):
        delegate_configs(c, "eth0")


def test_results_are_merged_with_interface_indexes_shifted() -> None:
    first = {
        "interfaces": [{"name": "ovl0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/n"}],
        "ips": [{"interface": 2, "address": "10.244.7.2/24", "gateway": "10.244.7.1"}],
        "routes": [{"dst": "10.244.0.0/16"}],
    }
    second = {
        "interfaces": [{"name": "ovl_gwbridge"}, {"name": "veth2"}, {"name": "eth1"}],
        "ips": [{"interface": 2, "address": "172.18.0.2/16", "gateway": "172.18.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
    }
    merged = merge_results("1.0.0", [first, second])
    assert [i["name"] for i in merged["interfaces"]][5] == "eth1"
    assert [ip["interface"] for ip in merged["ips"]] == [2, 5]
    assert len(merged["routes"]) == 2


def run_plugin(stdin: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "overlayd.cli.cni"],
        input=stdin,
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], **env},
        check=False,
    )


def test_version_lists_the_supported_spec_versions() -> None:
    proc = run_plugin("", CNI_COMMAND="VERSION")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["supportedVersions"] == ["0.4.0", "1.0.0"]


def test_bad_input_is_a_cni_error_on_stdout() -> None:
    proc = run_plugin("{not json", CNI_COMMAND="ADD")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["code"] == 4
    proc = run_plugin(
        '{"cniVersion": "1.0.0", "name": "n", "type": "overlay-cni"}', CNI_COMMAND="ADD"
    )
    error = json.loads(proc.stdout)
    assert error["code"] == 7 and "CNI_CONTAINERID" in error["msg"]


def test_del_of_something_never_added_succeeds(tmp_path: Path) -> None:
    proc = run_plugin(
        json.dumps(conf(tmp_path, MASQUERADE)),
        CNI_COMMAND="DEL",
        CNI_CONTAINERID="nothing",
        CNI_IFNAME="eth0",
    )
    assert proc.returncode == 0, proc.stdout


def test_host_local_keeps_one_store_whatever_the_conflist_calls_the_network(
    tmp_path: Path,
) -> None:
    # flannel's conflists call it cbr0; overlayd's Docker plugin allocates
    # from the store named "overlay": both must be the same books.
    for name in ("overlay", "cbr0"):
        (_, overlay), (_, egress) = delegate_configs(
            {**conf(tmp_path, GWBRIDGE), "name": name}, "eth0"
        )
        assert overlay["name"] == "overlay"
        assert egress["name"] == "overlay-egress"


def families(delegates: list[tuple[str, dict[str, Any]]]) -> list[tuple[set[int], set[int]]]:
    """Per interface: the families of its host-local ranges and of its routes."""
    return [
        (
            {ip_network(r[0]["subnet"]).version for r in d["ipam"]["ranges"]},
            {ip_network(r["dst"]).version for r in d["ipam"]["routes"]},
        )
        for _, d in delegates
    ]


def test_an_ipv4_only_file_gets_ipv4_only_delegates(tmp_path: Path) -> None:
    """The IPv6 variables are what adds IPv6: without them nothing of it
    appears (a gwbridge IPv6 subnet alone adds nothing either)."""
    for env in (MASQUERADE, GWBRIDGE, GWBRIDGE + V6_GWBRIDGE):
        v4_only = delegate_configs(conf(tmp_path, env), "eth0")
        assert all(f == ({4}, {4}) for f in families(v4_only))
        assert not any("enabledad" in d for _, d in v4_only)  # the delegates of before
        # Positive control: the same file, dual-stack.
        dual = families(delegate_configs(conf(tmp_path, env + V6), "eth0"))
        assert dual[0] == ({4, 6}, {4, 6})


def test_dual_stack_masquerade_gives_both_ranges_and_both_default_routes(tmp_path: Path) -> None:
    delegates = delegate_configs(conf(tmp_path, MASQUERADE + V6), "eth0")
    assert [ifname for ifname, _ in delegates] == ["eth0"]
    ipam = delegates[0][1]["ipam"]
    # One range set per family: host-local gives one address from each.
    assert ipam["ranges"] == [[V4_RANGE], [V6_RANGE]]
    assert ipam["routes"] == [
        {"dst": "0.0.0.0/0", "gw": "10.244.7.1"},
        {"dst": "::/0", "gw": "fd00:10:244:7::1"},
    ]
    assert delegates[0][1]["enabledad"] is False  # usable at once (see the real test)
    whole = {**conf(tmp_path, MASQUERADE + V6), "wholeSubnet": True}
    (_, bridge), *_ = delegate_configs(whole, "eth0")
    assert bridge["ipam"]["ranges"][1] == [
        {"subnet": "fd00:10:244:7::/64", "gateway": "fd00:10:244:7::1"}
    ]


def test_dual_stack_gwbridge_routes_both_clusters_on_eth0_and_both_defaults_on_eth1(
    tmp_path: Path,
) -> None:
    (_, overlay), (_, egress) = delegate_configs(
        conf(tmp_path, GWBRIDGE + V6 + V6_GWBRIDGE), "eth0"
    )
    assert overlay["ipam"]["ranges"] == [[V4_RANGE], [V6_RANGE]]
    assert overlay["ipam"]["routes"] == [
        {"dst": "10.244.0.0/16", "gw": "10.244.7.1"},
        {"dst": "fd00:10:244::/48", "gw": "fd00:10:244:7::1"},
    ]
    # The gwbridge's IPv6 address is handed out as its IPv4 one is: the
    # whole subnet, from the egress store.
    assert egress["name"] == "overlay-egress"
    assert egress["ipam"]["ranges"] == [
        [{"subnet": "172.18.0.0/16", "gateway": "172.18.0.1"}],
        [{"subnet": "fd00:ffff:18::/64", "gateway": "fd00:ffff:18::1"}],
    ]
    assert egress["ipam"]["routes"] == [
        {"dst": "0.0.0.0/0", "gw": "172.18.0.1"},
        {"dst": "::/0", "gw": "fd00:ffff:18::1"},
    ]
    # Without a gwbridge IPv6 subnet: the cluster route, and no IPv6 way out.
    (_, overlay), (_, egress) = delegate_configs(conf(tmp_path, GWBRIDGE + V6), "eth0")
    assert overlay["ipam"]["routes"][1] == {"dst": "fd00:10:244::/48", "gw": "fd00:10:244:7::1"}
    assert egress["ipam"]["routes"] == [{"dst": "0.0.0.0/0", "gw": "172.18.0.1"}]
    assert len(egress["ipam"]["ranges"]) == 1


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("FLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n", "FLANNEL_IPV6_SUBNET but not"),
        ("FLANNEL_IPV6_NETWORK=fd00:10:244::/48\n", "FLANNEL_IPV6_NETWORK but not"),
        (V6.replace("fd00:10:244:7::1/64", "10.244.7.1/24"), "FLANNEL_IPV6"),
        (V6.replace("fd00:10:244::/48", "fd00:10:244::1/48"), "FLANNEL_IPV6"),
        (V6.replace("/64", "/126"), "wholeSubnet"),  # too small to share with Docker
    ],
)
def test_a_damaged_ipv6_half_is_a_config_error_naming_it(
    tmp_path: Path, extra: str, named: str
) -> None:
    with pytest.raises(CniError, match=named) as error:
        delegate_configs(conf(tmp_path, MASQUERADE + extra), "eth0")
    assert error.value.code == 4
    assert delegate_configs(conf(tmp_path, MASQUERADE + V6), "eth0")  # positive control


def test_a_bad_gwbridge_ipv6_subnet_is_named(tmp_path: Path) -> None:
    bad = GWBRIDGE + V6 + "OVERLAYD_GWBRIDGE_SUBNET6=172.19.0.1/16\n"
    with pytest.raises(CniError, match="OVERLAYD_GWBRIDGE_SUBNET6 is not an IPv6"):
        delegate_configs(conf(tmp_path, bad), "eth0")
    assert delegate_configs(conf(tmp_path, GWBRIDGE + V6 + V6_GWBRIDGE), "eth0")


def test_dual_stack_results_list_both_addresses() -> None:
    result = {
        "interfaces": [{"name": "ovl0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/n"}],
        "ips": [
            {"interface": 2, "address": "10.244.7.2/24", "gateway": "10.244.7.1"},
            {"interface": 2, "address": "fd00:10:244:7::2/64", "gateway": "fd00:10:244:7::1"},
        ],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
    }
    merged = merge_results("1.0.0", [result])
    assert [ip["address"] for ip in merged["ips"]] == ["10.244.7.2/24", "fd00:10:244:7::2/64"]
    assert [ip["interface"] for ip in merged["ips"]] == [2, 2]


def test_the_overlay_port_asks_for_hairpin_mode_and_the_gwbridge_port_does_not(
    tmp_path: Path,
) -> None:
    (_, masquerade), *_ = delegate_configs(conf(tmp_path, MASQUERADE), "eth0")
    assert masquerade["hairpinMode"] is True  # services: a container reaching itself
    (_, overlay), (_, egress) = delegate_configs(conf(tmp_path, GWBRIDGE), "eth0")
    assert overlay["hairpinMode"] is True
    assert "hairpinMode" not in egress


DNS_LINES = "OVERLAYD_DNS=10.244.7.1,fd00:10:244:7::1\nOVERLAYD_DNS_DOMAIN=overlay.internal\n"


def test_the_result_names_overlayds_responder_when_the_subnet_file_does(tmp_path: Path) -> None:
    with_dns = conf(tmp_path, MASQUERADE + DNS_LINES)
    assert result_dns(with_dns) == {
        "nameservers": ["10.244.7.1", "fd00:10:244:7::1"],
        "search": ["overlay.internal"],
        "options": ["ndots:2"],
    }
    assert merge_results("1.0.0", [], result_dns(with_dns))["dns"]["nameservers"] == [
        "10.244.7.1",
        "fd00:10:244:7::1",
    ]
    # The network config's own dns wins over the file's.
    own = {"nameservers": ["203.0.113.53"]}
    assert result_dns({**with_dns, "dns": own}) == own
    # A server without a domain: no search list, no ndots.
    assert result_dns(conf(tmp_path, MASQUERADE + "OVERLAYD_DNS=10.244.7.1\n")) == {
        "nameservers": ["10.244.7.1"]
    }
    # Control: no OVERLAYD_DNS (no services on the host), no dns at all.
    assert result_dns(conf(tmp_path, MASQUERADE)) == {}
    assert result_dns(conf(tmp_path, MASQUERADE + "OVERLAYD_DNS_DOMAIN=overlay.internal\n")) == {}
