"""The lab's containers: namespaces attached to a host's bridge through
overlay-cni, exactly as a container runtime attaches them, or by hand with
iproute2 (for the flannel-style host, which has no overlayd subnet file).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from overlayd.lab import netns
from overlayd.lab.hosts import HostFiles
from overlayd.lab.netns import LabCommandError
from overlayd.nsexec import call_plugin, netns_argv, runtime_env
from overlayd.plan.ipam import gateway_address

CNI_PLUGIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins


@dataclass(frozen=True, slots=True)
class Container:
    """A container the lab checks: `ns` is a lab namespace's name, or the
    path of a real engine's container's network namespace."""

    ns: str
    host: int
    address: IPv4Address
    label: str = ""  # what reports call it; the namespace name when empty

    @property
    def title(self) -> str:
        return self.label or self.ns


def cni_config(files: HostFiles) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "overlay",
        "type": "overlay-cni",
        "subnetFile": str(files.subnet_file),
        "dataDir": str(files.cni_dir),
    }


def invoke_cni(
    host_ns: str, command: str, container_ns: str, config: dict[str, Any]
) -> dict[str, Any] | None:
    """Invoke overlay-cni in the host's namespace as a container runtime
    does: CNI_* variables, the network config on stdin, the result (or a
    CNI error) on stdout."""
    plugin = Path(sys.executable).parent / "overlay-cni"
    argv = [str(plugin)] if plugin.exists() else [sys.executable, "-m", "overlayd.cli.cni"]
    env = runtime_env(
        command, container_ns, CNI_PLUGIN_DIR, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    )
    ok, result, raw = call_plugin(netns_argv(host_ns, *argv), config, env)
    if not ok:
        raise LabCommandError(f"overlay-cni {command} {container_ns}: {raw}")
    return result


def attach_through_cni(host: int, host_ns: str, ns: str, files: HostFiles) -> Container:
    """A container namespace attached through overlay-cni, as a runtime
    would attach it: eth0 on the overlay bridge, and in gwbridge mode eth1
    on the gwbridge with the default route."""
    netns.add_namespace(ns)
    result = invoke_cni(host_ns, "ADD", ns, cni_config(files)) or {}
    interfaces = result.get("interfaces", [])
    for ip in result.get("ips", []):
        if interfaces[ip["interface"]].get("name") == "eth0":
            return Container(ns, host, IPv4Interface(ip["address"]).ip)
    raise LabCommandError(f"overlay-cni gave {ns} no address on eth0: {result}")


def attach_by_hand(
    host: int, host_ns: str, ns: str, index: int, *, bridge: str, subnet: IPv4Network, mtu: int
) -> Container:
    """A namespace with eth0 on `bridge`, addressed from `subnet` with
    iproute2: the bridge holds the gateway (.1), containers take .2 upwards."""
    gateway = gateway_address(subnet)
    address = IPv4Interface((gateway + index, subnet.prefixlen))
    netns.add_namespace(ns)
    netns.veth(host_ns, f"c{index}", ns, "eth0", mtu=mtu)
    netns.ip(host_ns, "link", "set", f"c{index}", "master", bridge, "up")
    netns.ip(ns, "addr", "add", str(address), "dev", "eth0")
    netns.ip(ns, "link", "set", "eth0", "up")
    netns.ip(ns, "route", "add", "default", "via", str(gateway))
    return Container(ns, host, address.ip)


def address_on(container: Container, ifname: str) -> IPv4Address | None:
    out = netns.ip(container.ns, "-j", "-4", "addr", "show", "dev", ifname, check=False)
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            return IPv4Address(info["local"])
    return None
