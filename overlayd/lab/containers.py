"""The lab's containers: namespaces attached to a host's bridge through
overlay-cni, exactly as a container runtime attaches them, or by hand with
iproute2 (for the flannel-style host, which has no overlayd subnet file).

In a dual-stack cluster a container has an address of each family on eth0:
overlay-cni hands both out (the IPv6 one from the host's
FLANNEL_IPV6_SUBNET, gateway ::1 of it) with the routes of the host's egress
mode for both families; by hand, the same layout is made with iproute2.

A container attached through overlay-cni gets the resolv.conf its CNI
result's `dns` asks for (overlayd's DNS responder when the host serves
services), as a runtime that honours it (Podman) writes one: in
/etc/netns/<ns>/resolv.conf, which `ip netns exec` shows the commands it
runs in the namespace as /etc/resolv.conf. Without a `dns` in the result
the container keeps the machine's resolv.conf, as before.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_interface,
)
from pathlib import Path
from typing import Any, overload

from overlayd.lab import netns
from overlayd.lab.hosts import HostFiles, subnet6_of
from overlayd.lab.netns import LabCommandError
from overlayd.model import IPV4, IPV6, Family
from overlayd.nsexec import call_plugin, netns_argv, runtime_env

CNI_PLUGIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins


@dataclass(frozen=True, slots=True)
class Container:
    """A container the lab checks: `ns` is a lab namespace's name, or the
    path of a real engine's container's network namespace."""

    ns: str
    host: int
    address: IPv4Address
    label: str = ""  # what reports call it; the namespace name when empty
    address6: IPv6Address | None = None  # its IPv6 address in a dual-stack cluster

    @property
    def title(self) -> str:
        return self.label or self.ns

    def address_of(self, family: Family) -> IPv4Address | IPv6Address | None:
        """The container's address of `family` (None: it has none)."""
        return self.address6 if family.version == 6 else self.address

    def reached_at(self, address: IPv4Address | IPv6Address) -> Container:
        """The same container, with `address` as its address of that family
        (another interface's, for a check that must fail there)."""
        if isinstance(address, IPv6Address):
            return replace(self, address6=address)
        return replace(self, address=address)


def cni_config(files: HostFiles) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "overlay",
        "type": "overlay-cni",
        "subnetFile": str(files.subnet_file),
        "dataDir": str(files.cni_dir),
        # The host's own daemon registers its containers (network policy).
        "controlSocket": str(files.control_socket),
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
    on the gwbridge with the default route. On a dual-stack host (its
    subnet file names an IPv6 subnet) eth0 must get an IPv6 address too:
    a container without one is an error here, not a quietly IPv4-only lab."""
    netns.add_namespace(ns)
    result = invoke_cni(host_ns, "ADD", ns, cni_config(files)) or {}
    interfaces = result.get("interfaces", [])
    found: dict[int, IPv4Address | IPv6Address] = {}
    for ip in result.get("ips", []):
        if interfaces[ip["interface"]].get("name") == "eth0":
            address = ip_interface(ip["address"]).ip
            found.setdefault(address.version, address)
    v4, v6 = found.get(4), found.get(6)
    if not isinstance(v4, IPv4Address):
        raise LabCommandError(f"overlay-cni gave {ns} no IPv4 address on eth0: {result}")
    subnet6 = subnet6_of(files)
    if subnet6 is not None and not (isinstance(v6, IPv6Address) and v6 in subnet6):
        raise LabCommandError(
            f"overlay-cni gave {ns} no IPv6 address of {subnet6} on eth0, though the host"
            f" is dual-stack: {result}"
        )
    text = resolv_conf(result.get("dns"))
    if text is not None:
        netns.write_resolv_conf(ns, text)
    return Container(ns, host, v4, address6=v6 if isinstance(v6, IPv6Address) else None)


def resolv_conf(dns: Any) -> str | None:
    """resolv.conf for a CNI result's `dns` (nameservers, domain, search,
    options), as a runtime writes it; None when it names no nameserver."""
    if not isinstance(dns, dict):
        return None
    lines = [f"nameserver {server}" for server in _strings(dns.get("nameservers"))]
    if not lines:
        return None
    if isinstance(dns.get("domain"), str) and dns["domain"]:
        lines.append(f"domain {dns['domain']}")
    for key, word in (("search", "search"), ("options", "options")):
        values = _strings(dns.get(key))
        if values:
            lines.append(f"{word} {' '.join(values)}")
    return "\n".join(lines) + "\n"


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str) and v] if isinstance(value, list) else []


def attach_by_hand(
    host: int,
    host_ns: str,
    ns: str,
    index: int,
    *,
    bridge: str,
    subnet: IPv4Network,
    mtu: int,
    subnet6: IPv6Network | None = None,
) -> Container:
    """A namespace with eth0 on `bridge`, addressed with iproute2 from
    `subnet` and, when given, `subnet6`: the bridge holds each subnet's
    gateway (.1, ::1), containers take .2 and ::2 upwards, with a default
    route via the gateway in each family."""
    netns.add_namespace(ns)
    netns.veth(host_ns, f"c{index}", ns, "eth0", mtu=mtu)
    netns.ip(host_ns, "link", "set", f"c{index}", "master", bridge, "up")
    address = _address_by_hand(ns, subnet, index)
    address6 = _address_by_hand(ns, subnet6, index) if subnet6 is not None else None
    netns.ip(ns, "link", "set", "eth0", "up")
    for family, net in ((IPV4, subnet), (IPV6, subnet6)):
        if net is not None:
            gateway = net.network_address + 1
            netns.ip(ns, family.iproute2_flag, "route", "add", "default", "via", str(gateway))
    return Container(ns, host, address, address6=address6)


@overload
def _address_by_hand(ns: str, subnet: IPv4Network, index: int) -> IPv4Address: ...
@overload
def _address_by_hand(ns: str, subnet: IPv6Network, index: int) -> IPv6Address: ...
def _address_by_hand(
    ns: str, subnet: IPv4Network | IPv6Network, index: int
) -> IPv4Address | IPv6Address:
    """Container `index`'s address of `subnet` on eth0: gateway + index.
    nodad: an IPv6 address is usable at once, and the lab hands out every
    address itself, so there is no duplicate to detect."""
    interface = ip_interface((subnet.network_address + 1 + index, subnet.prefixlen))
    nodad = ["nodad"] if interface.version == 6 else []
    netns.ip(ns, "addr", "add", str(interface), "dev", "eth0", *nodad)
    return interface.ip


def first_address(ns: str, ifname: str, family: Family) -> IPv4Address | IPv6Address | None:
    """The first address of `family` on `ifname` in `ns` (a lab namespace's
    name or a network namespace's path; IPv6: the first global address, not
    the kernel's link-local), None if it has none."""
    scope = ["scope", "global"] if family.version == 6 else []
    args = ["-j", family.iproute2_flag, "addr", "show", "dev", ifname, *scope]
    # A lab namespace by name (`ip -n`), an engine's container by its
    # namespace's path (entered with nsenter).
    if ns.startswith("/"):
        out = netns.in_ns(ns, "ip", *args, check=False)
    else:
        out = netns.ip(ns, *args, check=False)
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            return family.address(info["local"])
    return None


def address_on(container: Container, ifname: str) -> IPv4Address | None:
    found = first_address(container.ns, ifname, IPV4)
    return found if isinstance(found, IPv4Address) else None


def address6_on(container: Container, ifname: str) -> IPv6Address | None:
    found = first_address(container.ns, ifname, IPV6)
    return found if isinstance(found, IPv6Address) else None
