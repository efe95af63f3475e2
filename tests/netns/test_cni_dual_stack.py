"""overlay-cni with the real bridge and host-local plugins, for a dual-stack
subnet file: a container namespace gets an address of each family, the
routes of the host's egress mode for both, an IPv6 address it can use at
once, and DEL gives both addresses back.

No overlayd runs: the test makes the host's bridges and their gateway
addresses itself, as overlayd's device manager would, and writes the
subnet file overlayd would write."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overlayd.lab import netns as lab_netns
from overlayd.lab.containers import invoke_cni
from overlayd.lab.netns import LabCommandError
from tests.conftest import needs_root, unique_name
from tests.netns.test_attach_hairpin import hairpin

pytestmark = [needs_root, pytest.mark.root]

GATEWAY4, GATEWAY6 = "10.244.7.1", "fd00:10:244:7::1"
GWBRIDGE4, GWBRIDGE6 = "172.18.0.1", "fd00:ffff:18::1"
SUBNET_FILE = (
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n"
    "FLANNEL_IPV6_NETWORK=fd00:10:244::/48\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n"
    "FLANNEL_MTU=1450\nFLANNEL_IPMASQ={masq}\nFLANNEL_IPV6_MASQ={masq}\n"
    "OVERLAYD_EGRESS={mode}\nOVERLAYD_BRIDGE=ovl0\n"
    # overlayd's DNS responder, on the overlay bridge's gateways (services).
    "OVERLAYD_DNS=10.244.7.1,fd00:10:244:7::1\nOVERLAYD_DNS_DOMAIN=overlay.internal\n"
)
GWBRIDGE_LINES = (
    "OVERLAYD_GWBRIDGE=ovl_gwbridge\nOVERLAYD_GWBRIDGE_SUBNET=172.18.0.1/16\n"
    "OVERLAYD_GWBRIDGE_SUBNET6=fd00:ffff:18::1/64\n"
)


def add_bridge(ns: str, name: str, *addresses: str) -> None:
    lab_netns.ip(ns, "link", "add", name, "type", "bridge")
    for address in addresses:
        # nodad on the host's side: the gateway must answer at once too.
        extra = ["nodad"] if ":" in address else []
        lab_netns.ip(ns, "addr", "add", address, "dev", name, *extra)
    lab_netns.ip(ns, "link", "set", name, "up")


@pytest.fixture
def container() -> Iterator[str]:
    name = unique_name("c")
    lab_netns.add_namespace(name)
    try:
        yield name
    finally:
        lab_netns.delete_namespace(name)


def config(tmp_path: Path, mode: str) -> dict[str, Any]:
    text = SUBNET_FILE.format(mode=mode, masq=str(mode == "masquerade").lower())
    if mode == "gwbridge":
        text += GWBRIDGE_LINES
    (tmp_path / "subnet.env").write_text(text)
    return {
        "cniVersion": "1.0.0",
        "name": "overlay",
        "type": "overlay-cni",
        "subnetFile": str(tmp_path / "subnet.env"),
        "dataDir": str(tmp_path / "cni"),
        # No daemon here to register containers with.
        "registerEndpoint": False,
    }


def addresses(ns: str, ifname: str, family: str) -> list[dict[str, Any]]:
    shown = json.loads(
        lab_netns.ip(ns, "-j", family, "addr", "show", "dev", ifname, "scope", "global")
    )
    # iproute2 prints an empty object for each address the filter left out.
    return [a for link in shown for a in link.get("addr_info", []) if "local" in a]


def routes(ns: str, family: str) -> set[tuple[str, str, str]]:
    shown = json.loads(lab_netns.ip(ns, "-j", family, "route", "show"))
    return {(r["dst"], r.get("gateway", ""), r["dev"]) for r in shown if "gateway" in r}


def pings_from(ns: str, source: str, target: str) -> bool:
    """One ping from `source` (bound to it: a tentative address cannot be)."""
    out = lab_netns.in_ns(ns, "ping", "-c", "1", "-W", "2", "-I", source, target, check=False)
    return " 0% packet loss" in out


@pytest.mark.parametrize("mode", ["masquerade", "gwbridge"])
def test_a_dual_stack_container_gets_both_addresses_and_its_mode_s_routes(
    netns: str, container: str, tmp_path: Path, mode: str
) -> None:
    add_bridge(netns, "ovl0", f"{GATEWAY4}/24", f"{GATEWAY6}/64")
    if mode == "gwbridge":
        add_bridge(netns, "ovl_gwbridge", f"{GWBRIDGE4}/16", f"{GWBRIDGE6}/64")
    conf = config(tmp_path, mode)
    result = invoke_cni(netns, "ADD", container, conf) or {}

    # Both addresses in the result, on eth0, from host-local's halves (IPv6: the upper).
    names = [i["name"] for i in result["interfaces"]]
    on_eth0 = [ip["address"] for ip in result["ips"] if names[ip["interface"]] == "eth0"]
    assert on_eth0 == ["10.244.7.2/24", "fd00:10:244:7:8000::/64"], result
    # The responder, for the runtime to write into resolv.conf.
    assert result["dns"] == {
        "nameservers": [GATEWAY4, GATEWAY6],
        "search": ["overlay.internal"],
        "options": ["ndots:2"],
    }
    # Usable at once: the IPv6 address is not tentative when ADD returns,
    # and a ping bound to it goes out and comes back.
    v6 = addresses(container, "eth0", "-6")
    assert [a["local"] for a in v6] == ["fd00:10:244:7:8000::"]  # it is there...
    assert not any(a.get("tentative") for a in v6), v6  # ...and not tentative
    dad = lab_netns.in_ns(container, "sysctl", "-n", "net.ipv6.conf.eth0.accept_dad")
    assert dad.strip() == "0"
    assert pings_from(container, "fd00:10:244:7:8000::", GATEWAY6)
    assert pings_from(container, "10.244.7.2", GATEWAY4)
    # Control: an address added with DAD (on the host's bridge, which does
    # it) is seen tentative by the same check, and a ping cannot use it.
    lab_netns.ip(netns, "addr", "add", "fd00:10:244:7::99/64", "dev", "ovl0")
    added = [a for a in addresses(netns, "ovl0", "-6") if a["local"] == "fd00:10:244:7::99"]
    assert added and added[0].get("tentative"), added
    assert not pings_from(netns, "fd00:10:244:7::99", "fd00:10:244:7:8000::")
    lab_netns.ip(netns, "addr", "del", "fd00:10:244:7::99/64", "dev", "ovl0")

    v4_routes, v6_routes = routes(container, "-4"), routes(container, "-6")
    if mode == "masquerade":
        assert v4_routes == {("default", GATEWAY4, "eth0")}
        assert v6_routes == {("default", GATEWAY6, "eth0")}
    else:
        on_eth1 = [ip["address"] for ip in result["ips"] if names[ip["interface"]] == "eth1"]
        assert on_eth1 == ["172.18.0.2/16", "fd00:ffff:18::2/64"], result
        assert v4_routes == {("10.244.0.0/16", GATEWAY4, "eth0"), ("default", GWBRIDGE4, "eth1")}
        assert v6_routes == {
            ("fd00:10:244::/48", GATEWAY6, "eth0"),
            ("default", GWBRIDGE6, "eth1"),
        }
        assert pings_from(container, "fd00:ffff:18::2", GWBRIDGE6)

    # The overlay bridge port is in hairpin mode (services: a container
    # reaching itself through a VIP); the gwbridge port is not (nothing is
    # bridged between the gwbridge's ports).
    ports = [
        p["ifname"] for p in json.loads(lab_netns.ip(netns, "-j", "link", "show", "master", "ovl0"))
    ]
    assert len(ports) == 1 and hairpin(netns, ports[0])
    if mode == "gwbridge":
        (egress_port,) = [
            p["ifname"]
            for p in json.loads(lab_netns.ip(netns, "-j", "link", "show", "master", "ovl_gwbridge"))
        ]
        assert not hairpin(netns, egress_port)

    # CHECK agrees with what ADD made, for both families.
    assert invoke_cni(netns, "CHECK", container, {**conf, "prevResult": result}) is None
    lab_netns.ip(container, "-6", "addr", "del", "fd00:10:244:7:8000::/64", "dev", "eth0")
    with pytest.raises(LabCommandError, match="fd00:10:244:7:8000::"):
        invoke_cni(netns, "CHECK", container, {**conf, "prevResult": result})

    # DEL gives both addresses back to host-local's one store.
    store = tmp_path / "cni" / "ipam" / "overlay"
    assert {"10.244.7.2", "fd00:10:244:7:8000::"} <= {p.name for p in store.iterdir()}
    assert invoke_cni(netns, "DEL", container, conf) is None
    assert not {"10.244.7.2", "fd00:10:244:7:8000::"} & {p.name for p in store.iterdir()}
    assert lab_netns.ip(container, "-br", "link").split()[0] == "lo"
