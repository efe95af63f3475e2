"""The lab's wiring: which namespace is which, the underlay switch, the
underlay's addresses, and the services that sit on it besides etcd (the
outside router with its whoami server, and the MQTT broker).

    switch namespace  <p>sw: bridge br0, one veth port per host
    outside           <p>inet: 192.0.2.1 and 2001:db8::1 on the underlay, the
                      hosts' default router for both families, and
                      203.0.113.10 and 2001:db8:ffff::10, "a server on the
                      internet"
    etcd namespaces   <p>etcd (192.0.2.2), and <p>etcd2, <p>etcd3 (.3, .4) for a
                      three-member cluster
    mqtt              <p>mqtt (192.0.2.6), mosquitto, with `lab up --mqtt`
    host namespaces   <p>h1..hN: eth0 = 192.0.2.(10+i) and 2001:db8::(10+i)
                      (the same digits: h1 is 192.0.2.11 and 2001:db8::11)
    containers        <p>h<i>c<k>

(<p> is `ovl-<lab name>-`.) The underlay is dual-stack whatever the
cluster's network config says, so that a host's daemon finds an IPv6
address to tunnel from as soon as the config enables IPv6, and host-gw finds
its IPv6 peers on the link. etcd and MQTT stay IPv4-only: the daemons reach
them as before. Underlay and outside addresses come from the documentation
ranges; nothing is added to the root namespace.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from overlayd.lab import netns
from overlayd.lab.netns import LabCommandError
from overlayd.nsexec import netns_argv

UNDERLAY = IPv4Network("192.0.2.0/24")
UNDERLAY6 = IPv6Network("2001:db8::/64")
ETCD_ADDRESS = IPv4Address("192.0.2.2")
OUTSIDE_ROUTER = IPv4Address("192.0.2.1")
OUTSIDE_ROUTER6 = IPv6Address("2001:db8::1")
OUTSIDE_SERVER = IPv4Address("203.0.113.10")
OUTSIDE_SERVER6 = IPv6Address("2001:db8:ffff::10")
WHOAMI_PORT = 8080
MQTT_ADDRESS = IPv4Address("192.0.2.6")
MQTT_PORT = 1883
FIRST_HOST_OCTET = 10


@dataclass(frozen=True, slots=True)
class Names:
    """The namespace names of one lab, all under its prefix, so that `down`
    can find everything by the prefix alone."""

    prefix: str

    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}sw"

    @property
    def outside_ns(self) -> str:
        return f"{self.prefix}inet"

    @property
    def mqtt_ns(self) -> str:
        return f"{self.prefix}mqtt"

    def etcd_ns(self, member: int) -> str:
        return f"{self.prefix}etcd" + (str(member) if member > 1 else "")

    def host_ns(self, host: int) -> str:
        return f"{self.prefix}h{host}"

    def container_ns(self, host: int, index: int) -> str:
        return f"{self.prefix}h{host}c{index}"

    def namespaces(self) -> list[str]:
        return [ns for ns in netns.list_namespaces() if ns.startswith(self.prefix)]

    def hosts(self) -> list[int]:
        found = []
        for ns in self.namespaces():
            rest = ns[len(self.prefix) :]
            if rest.startswith("h") and rest[1:].isdigit():
                found.append(int(rest[1:]))
        return sorted(found)

    def container_host(self, ns: str) -> int | None:
        """The host number of a container namespace (<p>h<i>c<k>), None for
        any other namespace."""
        rest = ns[len(self.prefix) :] if ns.startswith(self.prefix) else ""
        host_part, sep, index = rest.partition("c")
        if sep and host_part.startswith("h") and host_part[1:].isdigit() and index.isdigit():
            return int(host_part[1:])
        return None


def host_address(host: int) -> IPv4Address:
    return UNDERLAY.network_address + FIRST_HOST_OCTET + host


def host_address6(host: int) -> IPv6Address:
    """The host's IPv6 underlay address, spelled with the same digits as its
    IPv4 one (h1: 192.0.2.11, 2001:db8::11), so that a capture or a log
    line names the same host in both families at a glance."""
    return IPv6Address(f"{UNDERLAY6.network_address}{FIRST_HOST_OCTET + host}")


def mqtt_url() -> str:
    return f"mqtt://{MQTT_ADDRESS}:{MQTT_PORT}"


def add_switch(names: Names) -> None:
    netns.add_namespace(names.switch_ns)
    netns.ip(names.switch_ns, "link", "add", "br0", "type", "bridge")
    netns.ip(names.switch_ns, "link", "set", "br0", "up")


def attach_to_switch(
    names: Names, ns: str, port: str, address: IPv4Address, address6: IPv6Address | None = None
) -> None:
    """A new namespace `ns` whose eth0 is plugged into the switch's port
    `port`, with `address` and, if given, `address6` on it."""
    netns.add_namespace(ns)
    netns.veth(names.switch_ns, port, ns, "eth0")
    netns.ip(names.switch_ns, "link", "set", port, "master", "br0", "up")
    netns.ip(ns, "addr", "add", f"{address}/{UNDERLAY.prefixlen}", "dev", "eth0")
    if address6 is not None:
        # nodad: the address is usable at once. With duplicate address
        # detection it stays "tentative" for about a second after the link
        # comes up, and a daemon started meanwhile would find no global
        # IPv6 address to tunnel from (nor could the outside answer it).
        # The lab hands out every address itself, so there is no duplicate
        # to detect.
        netns.ip(ns, "addr", "add", f"{address6}/{UNDERLAY6.prefixlen}", "dev", "eth0", "nodad")
    netns.ip(ns, "link", "set", "eth0", "up")


def attach_host(names: Names, host: int, *, ipv6: bool = True) -> None:
    """The host's namespace on the switch, with both underlay addresses and
    the outside router as its default route for both families; without
    `ipv6`, an IPv4-only host (no global IPv6 address: a daemon there runs
    IPv4 only, even in a dual-stack network)."""
    ns = names.host_ns(host)
    address6 = host_address6(host) if ipv6 else None
    attach_to_switch(names, ns, f"h{host}", host_address(host), address6)
    netns.ip(ns, "route", "add", "default", "via", str(OUTSIDE_ROUTER))
    if ipv6:
        netns.ip(ns, "-6", "route", "add", "default", "via", str(OUTSIDE_ROUTER6))


def wait_switch_port_gone(names: Names, host: int) -> None:
    """The kernel dismantles a deleted namespace in the background; the
    switch's end of the host's veth goes with it, a moment later."""
    deadline = time.monotonic() + netns.LAB_WAIT_SECONDS
    while netns.ip(names.switch_ns, "link", "show", f"h{host}", check=False):
        if time.monotonic() > deadline:
            raise LabCommandError(f"h{host}'s switch port outlived its namespace")
        time.sleep(0.02)


def add_outside(names: Names) -> None:
    """The hosts' default router, which also plays a server on the internet
    (for both families: the hosts' underlay prefixes are on its link, so
    it needs no route back to them)."""
    ns = names.outside_ns
    attach_to_switch(names, ns, "inet", OUTSIDE_ROUTER, OUTSIDE_ROUTER6)
    netns.ip(ns, "addr", "add", f"{OUTSIDE_SERVER}/32", "dev", "lo")
    netns.ip(ns, "addr", "add", f"{OUTSIDE_SERVER6}/128", "dev", "lo")
    serve_whoami(ns)


def _wait_listening(ns: str, port: int, what: str) -> None:
    deadline = time.monotonic() + netns.LAB_WAIT_SECONDS
    while time.monotonic() < deadline:
        if f":{port}" in netns.in_ns(ns, "ss", "-Htln", check=False):
            return
        time.sleep(0.05)
    raise LabCommandError(f"{what} did not start in {ns}")


def serve_whoami(ns: str) -> None:
    """Start the whoami service in a namespace and wait until it listens."""
    subprocess.Popen(
        netns.module_argv(ns, "overlayd.lab.whoami", "serve", str(WHOAMI_PORT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _wait_listening(ns, WHOAMI_PORT, "whoami")


def start_mqtt(names: Names, state_dir: Path) -> None:
    """mosquitto in its own namespace on the underlay, as a shared broker."""
    if names.mqtt_ns not in netns.list_namespaces():
        attach_to_switch(names, names.mqtt_ns, "mqtt", MQTT_ADDRESS)
    conf = state_dir / "mosquitto.conf"
    conf.write_text(
        f"listener {MQTT_PORT} {MQTT_ADDRESS}\nallow_anonymous true\npersistence false\n"
    )
    log = (state_dir / "mosquitto.log").open("ab")
    subprocess.Popen(
        netns_argv(names.mqtt_ns, "mosquitto", "-c", str(conf)),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    _wait_listening(names.mqtt_ns, MQTT_PORT, "mosquitto")
