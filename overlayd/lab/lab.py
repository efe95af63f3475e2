"""The lab: N simulated hosts on an isolated underlay, a real etcd, one real
overlayd per host, and containers attached to each host's bridge.

    switch namespace  <p>sw: bridge br0, one veth port per host
    outside           <p>inet: 192.0.2.1 on the underlay, the hosts' default
                      router, and 203.0.113.10, "a server on the internet"
    etcd namespaces   <p>etcd (192.0.2.2), and <p>etcd2, <p>etcd3 (.3, .4) for a
                      three-member cluster
    host namespaces   <p>h1..hN: eth0 = 192.0.2.(10+i), overlayd, bridge ovl0
    containers        <p>h<i>c<k>: eth0 on host i's bridge, address from its
                      subnet; in gwbridge mode also eth1 on the host's gwbridge

(<p> is `ovl-<lab name>-`.) Underlay and outside addresses come from the
documentation ranges; nothing is added to the root namespace. `down` removes
every namespace with the lab's prefix and everything running inside them, so
it also cleans up after a crash half way through `up`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

from overlayd.cli.cni import call_plugin, runtime_env
from overlayd.config import parse_network_config, render_network_config
from overlayd.lab import netns
from overlayd.lab.etcd import Member, start_member, wait_healthy
from overlayd.lab.netns import LabCommandError
from overlayd.model import NetworkConfig
from overlayd.plan.leases import config_key, subnet_key, subnets_prefix
from overlayd.store.etcd import EtcdStore
from overlayd.surfaces.subnetfile import read_subnet, read_variables

STATE_ROOT = Path("/run/overlayd-lab")
PREFIX = "/coreos.com/network"
UNDERLAY = IPv4Network("192.0.2.0/24")
ETCD_ADDRESS = IPv4Address("192.0.2.2")
OUTSIDE_ROUTER = IPv4Address("192.0.2.1")
OUTSIDE_SERVER = IPv4Address("203.0.113.10")
WHOAMI_PORT = 8080
MQTT_ADDRESS = IPv4Address("192.0.2.6")
CNI_PLUGIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
MQTT_PORT = 1883
FIRST_HOST_OCTET = 10
DEFAULT_NETWORK = IPv4Network("10.244.0.0/16")

T = TypeVar("T")
A = TypeVar("A")


def default_network_config(
    network: IPv4Network = DEFAULT_NETWORK,
    vni: int = 1,
    port: int = 8472,
    *,
    backend: str = "vxlan",
    direct_routing: bool = False,
    subnet_max: IPv4Address | None = None,
) -> NetworkConfig:
    backend_json: dict[str, object] = {"Type": backend}
    if backend == "vxlan":
        backend_json.update(VNI=vni, Port=port, DirectRouting=direct_routing)
    raw: dict[str, object] = {"Network": str(network), "Backend": backend_json}
    if subnet_max is not None:
        raw["SubnetMax"] = str(subnet_max)
    return parse_network_config(json.dumps(raw))


@dataclass(frozen=True, slots=True)
class LabSettings:
    """What every host of a lab shares; kept in the state dir for later commands."""

    lease_ttl: int = 60
    containers_per_host: int = 1
    egress: str = "gwbridge"
    resync_seconds: float = 10.0
    etcd_members: int = 1
    log_level: str = "info"
    mqtt: bool = False  # a mosquitto broker, and every daemon publishing to it


@dataclass(frozen=True, slots=True)
class EgressResult:
    container: Container
    seen_as: str | None  # the source address the outside server saw, None if unreachable
    expected: IPv4Address  # the host's public address


@dataclass(frozen=True, slots=True)
class Container:
    ns: str
    host: int
    address: IPv4Address


@dataclass(frozen=True, slots=True)
class PingResult:
    src: Container
    dst: Container
    ok: bool
    rtt_ms: float | None


class Lab:
    def __init__(self, name: str = "lab", *, state_root: Path = STATE_ROOT) -> None:
        if not name.replace("-", "").isalnum() or len(name) > 20:
            raise ValueError("lab name: letters, digits and dashes, at most 20 characters")
        self.name = name
        self.prefix = f"ovl-{name}-"
        self.state_dir = state_root / name
        # Called with a host's namespace before its daemon starts (tests use
        # it to put other owners' firewall rules in place first).
        self.prepare_host: Callable[[str], None] | None = None
        self._daemons: dict[int, subprocess.Popen[bytes]] = {}

    # --- names ------------------------------------------------------------

    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}sw"

    @property
    def outside_ns(self) -> str:
        return f"{self.prefix}inet"

    @property
    def mqtt_ns(self) -> str:
        return f"{self.prefix}mqtt"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{MQTT_ADDRESS}:{MQTT_PORT}"

    def start_mqtt(self) -> None:
        """mosquitto in its own namespace on the underlay, as a shared broker."""
        if self.mqtt_ns not in netns.list_namespaces():
            self._attach_to_switch(self.mqtt_ns, "mqtt", MQTT_ADDRESS)
        conf = self.state_dir / "mosquitto.conf"
        conf.write_text(
            f"listener {MQTT_PORT} {MQTT_ADDRESS}\nallow_anonymous true\npersistence false\n"
        )
        log = (self.state_dir / "mosquitto.log").open("ab")
        subprocess.Popen(
            ["ip", "netns", "exec", self.mqtt_ns, "mosquitto", "-c", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if f":{MQTT_PORT}" in netns.in_ns(self.mqtt_ns, "ss", "-Htln", check=False):
                return
            time.sleep(0.05)
        raise LabCommandError(f"mosquitto did not start in {self.mqtt_ns}")

    def stop_mqtt(self) -> None:
        netns.kill_namespace_processes(self.mqtt_ns)

    def etcd_members(self, count: int | None = None) -> list[Member]:
        count = count or self.settings().etcd_members
        return [
            Member(
                name=f"etcd{i}",
                ns=f"{self.prefix}etcd" + (str(i) if i > 1 else ""),
                address=ETCD_ADDRESS + (i - 1),
                state_dir=self.state_dir / f"etcd{i}",
            )
            for i in range(1, count + 1)
        ]

    @property
    def etcd_endpoint(self) -> str:
        """The unix socket of the first member that is running, for the driver."""
        members = self.etcd_members()
        running = [m for m in members if netns.pids_in(m.ns)]
        return (running or members)[0].socket_endpoint

    def etcd_member_in_use(self, host: int) -> int:
        """Which etcd member (1-based) the host's daemon is connected to."""
        out = netns.in_ns(
            self.host_ns(host), "ss", "-Htn", "state", "established", "( dport = :2379 )"
        )
        # gRPC's sockets are dual-stack: [::ffff:192.0.2.3]:2379
        peers = {
            line.split()[-1].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
            for line in out.splitlines()
        }
        if len(peers) != 1:
            raise LabCommandError(f"h{host} talks to {len(peers)} etcd members: {out}")
        used = peers.pop()
        return next(i for i, m in enumerate(self.etcd_members(), 1) if str(m.address) == used)

    def stop_etcd(self, member: int = 1) -> None:
        """An outage: the member's process is stopped; its data stays."""
        netns.kill_namespace_processes(self.etcd_members()[member - 1].ns)

    def start_etcd(self, member: int = 1) -> None:
        members = self.etcd_members()
        proc = start_member(members[member - 1], members)
        wait_healthy(members[member - 1], proc)

    def host_ns(self, host: int) -> str:
        return f"{self.prefix}h{host}"

    def container_ns(self, host: int, index: int) -> str:
        return f"{self.prefix}h{host}c{index}"

    @staticmethod
    def host_address(host: int) -> IPv4Address:
        return UNDERLAY.network_address + FIRST_HOST_OCTET + host

    def subnet_file(self, host: int) -> Path:
        return self.state_dir / f"h{host}" / "subnet.env"

    def control_socket(self, host: int) -> Path:
        return self.state_dir / f"h{host}" / "overlayd.sock"

    def daemon_log(self, host: int) -> Path:
        return self.state_dir / f"h{host}" / "overlayd.log"

    def namespaces(self) -> list[str]:
        return [ns for ns in netns.list_namespaces() if ns.startswith(self.prefix)]

    def hosts(self) -> list[int]:
        found = []
        for ns in self.namespaces():
            rest = ns[len(self.prefix) :]
            if rest.startswith("h") and rest[1:].isdigit():
                found.append(int(rest[1:]))
        return sorted(found)

    def containers(self) -> list[Container]:
        found = []
        for ns in self.namespaces():
            rest = ns[len(self.prefix) :]
            host_part, sep, index = rest.partition("c")
            if not (
                sep and host_part.startswith("h") and host_part[1:].isdigit() and index.isdigit()
            ):
                continue
            container = Container(ns, int(host_part[1:]), IPv4Address(0))
            address = self.address_on(container, "eth0")
            if address is not None:
                found.append(Container(ns, container.host, address))
        return sorted(found, key=lambda c: (c.host, c.ns))

    # --- etcd -------------------------------------------------------------

    def etcd(self, action: Callable[[EtcdStore], Awaitable[T]]) -> T:
        """Run one coroutine against the lab's etcd (from the root namespace)."""

        async def go() -> T:
            async with EtcdStore([self.etcd_endpoint]) as store:
                return await action(store)

        return asyncio.run(go())

    def leases(self) -> dict[str, bytes]:
        async def get(store: EtcdStore) -> dict[str, bytes]:
            values, _ = await store.get_prefix(subnets_prefix(PREFIX))
            return values

        return self.etcd(get)

    def delete_lease(self, host: int) -> None:
        subnet = self.subnet(host)
        self.etcd(lambda s: s.delete(subnet_key(PREFIX, subnet)))

    # --- building ---------------------------------------------------------

    def up(
        self,
        hosts: int = 3,
        *,
        config: NetworkConfig | None = None,
        settings: LabSettings | None = None,
    ) -> None:
        if hosts < 0 or hosts > 200:
            raise ValueError("--hosts must be between 0 and 200")
        if self.namespaces():
            raise LabCommandError(
                f"lab {self.name!r} already exists ({len(self.namespaces())} namespaces);"
                f" run `overlayctl lab down --name {self.name}` first"
            )
        settings = settings or LabSettings()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "lab.json").write_text(json.dumps(asdict(settings)))
        netns.add_namespace(self.switch_ns)
        netns.ip(self.switch_ns, "link", "add", "br0", "type", "bridge")
        netns.ip(self.switch_ns, "link", "set", "br0", "up")
        self._add_outside()
        members = self.etcd_members(settings.etcd_members)
        for member in members:
            self._attach_to_switch(member.ns, member.name, member.address)
        procs = [start_member(member, members) for member in members]
        for member, proc in zip(members, procs, strict=True):
            wait_healthy(member, proc)
        if settings.mqtt:
            self.start_mqtt()
        cfg = config or default_network_config()
        self.etcd(lambda s: s.put(config_key(PREFIX), render_network_config(cfg)))
        self._parallel(self.add_host, range(1, hosts + 1))

    def settings(self) -> LabSettings:
        try:
            return LabSettings(**json.loads((self.state_dir / "lab.json").read_text()))
        except FileNotFoundError:
            return LabSettings()

    def _add_outside(self) -> None:
        """The hosts' default router, which also plays a server on the internet."""
        self._attach_to_switch(self.outside_ns, "inet", OUTSIDE_ROUTER)
        netns.ip(self.outside_ns, "addr", "add", f"{OUTSIDE_SERVER}/32", "dev", "lo")
        self.serve_whoami(self.outside_ns)

    def serve_whoami(self, ns: str) -> None:
        """Start the whoami service in a namespace and wait until it listens."""
        subprocess.Popen(
            netns.module_argv(ns, "overlayd.lab.whoami", "serve", str(WHOAMI_PORT)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if f":{WHOAMI_PORT}" in netns.in_ns(ns, "ss", "-Htln", check=False):
                return
            time.sleep(0.05)
        raise LabCommandError(f"whoami did not start in {ns}")

    def _attach_to_switch(self, ns: str, port: str, address: IPv4Address) -> None:
        netns.add_namespace(ns)
        netns.veth(self.switch_ns, port, ns, "eth0")
        netns.ip(self.switch_ns, "link", "set", port, "master", "br0", "up")
        netns.ip(ns, "addr", "add", f"{address}/{UNDERLAY.prefixlen}", "dev", "eth0")
        netns.ip(ns, "link", "set", "eth0", "up")

    def attach_host_namespace(self, host: int) -> None:
        """The host's namespace, plugged into the underlay switch, with the
        outside router as its default route."""
        ns = self.host_ns(host)
        self._attach_to_switch(ns, f"h{host}", self.host_address(host))
        netns.ip(ns, "route", "add", "default", "via", str(OUTSIDE_ROUTER))
        self.subnet_file(host).parent.mkdir(parents=True, exist_ok=True)

    def add_host(self, host: int) -> None:
        """A new host on the underlay, its daemon, and its containers."""
        self.attach_host_namespace(host)
        if self.prepare_host is not None:
            self.prepare_host(self.host_ns(host))
        self.start_daemon(host)
        self.wait_ready(host)
        for index in range(1, self.settings().containers_per_host + 1):
            self.add_container(host, index)

    def start_daemon(
        self, host: int, *extra_args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        settings = self.settings()
        log = self.daemon_log(host).open("ab")
        proc = subprocess.Popen(
            netns.module_argv(
                self.host_ns(host),
                "overlayd.cli.daemon",
                "--etcd-endpoints",
                ",".join(m.client_url for m in self.etcd_members()),
                "--etcd-prefix",
                PREFIX,
                "--iface",
                "eth0",
                "--subnet-file",
                str(self.subnet_file(host)),
                "--lease-ttl",
                str(settings.lease_ttl),
                "--resync-seconds",
                str(settings.resync_seconds),
                "--egress",
                settings.egress,
                "--log-level",
                settings.log_level,
                "--control-socket",
                str(self.control_socket(host)),
                *(["--mqtt-url", self.mqtt_url] if settings.mqtt else []),
                *extra_args,
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        log.close()
        self._daemons[host] = proc
        return proc

    def stop_daemon(self, host: int, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the host's daemon (and whatever else runs in the host's
        namespace); its kernel state stays."""
        netns.kill_namespace_processes(self.host_ns(host), sig=sig)

    def restart_daemon(self, host: int, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the daemon with `sig`, start it again, wait until it is ready."""
        readies = self.daemon_log(host).read_text().count("event=ready")
        self.stop_daemon(host, sig)
        self.start_daemon(host)
        deadline = time.monotonic() + 30
        while self.daemon_log(host).read_text().count("event=ready") == readies:
            if time.monotonic() > deadline or not self.daemon_running(host):
                tail = self.daemon_log(host).read_text(errors="replace")[-3000:]
                raise LabCommandError(f"overlayd on h{host} did not come back:\n{tail}")
            time.sleep(0.02)

    def remove_host(self, host: int) -> None:
        """The host and its containers are gone, as if powered off."""
        for ns in self.namespaces():
            if ns == self.host_ns(host) or ns.startswith(f"{self.host_ns(host)}c"):
                netns.delete_namespace(ns)
        # /run is a tmpfs: a reboot loses the subnet file (the log stays).
        self.subnet_file(host).unlink(missing_ok=True)
        # And the containers' CNI records: the lab keeps host-local's
        # reservations under the state dir, in /run, so they go too (a runtime
        # on a real host calls DEL for the sandboxes that died with it).
        shutil.rmtree(self.state_dir / f"h{host}" / "cni", ignore_errors=True)
        self._daemons.pop(host, None)
        # The kernel dismantles a deleted namespace in the background; the
        # switch's end of the host's veth goes with it, a moment later.
        deadline = time.monotonic() + 10
        while netns.ip(self.switch_ns, "link", "show", f"h{host}", check=False):
            if time.monotonic() > deadline:
                raise LabCommandError(f"h{host}'s switch port outlived its namespace")
            time.sleep(0.02)

    def daemon_running(self, host: int) -> bool:
        proc = self._daemons.get(host)
        if proc is not None:
            # Right after start, `ip netns exec` may not have entered the
            # namespace yet, so our own child is asked first.
            return proc.poll() is None
        return bool(netns.pids_in(self.host_ns(host)))

    def wait_ready(self, host: int, timeout: float = 30) -> IPv4Network:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            subnet = read_subnet(self.subnet_file(host))
            if subnet is not None and self.daemon_running(host):
                return subnet
            if not self.daemon_running(host):
                break
            time.sleep(0.05)
        tail = self.daemon_log(host).read_text(errors="replace")[-3000:]
        raise LabCommandError(f"overlayd on h{host} did not become ready:\n{tail}")

    def subnet(self, host: int) -> IPv4Network:
        subnet = read_subnet(self.subnet_file(host))
        if subnet is None:
            raise LabCommandError(f"h{host} has no subnet file")
        return subnet

    def mtu(self, host: int) -> int:
        value = read_variables(self.subnet_file(host)).get("FLANNEL_MTU")
        if value is None:
            raise LabCommandError(f"h{host}'s subnet file has no FLANNEL_MTU")
        return int(value)

    def gwbridge(self, host: int) -> tuple[str, IPv4Interface] | None:
        """The host's egress bridge and its gateway, in gwbridge mode."""
        found = read_variables(self.subnet_file(host))
        if "OVERLAYD_GWBRIDGE" not in found:
            return None
        return found["OVERLAYD_GWBRIDGE"], IPv4Interface(found["OVERLAYD_GWBRIDGE_SUBNET"])

    def cni_config(self, host: int) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "overlay",
            "type": "overlay-cni",
            "subnetFile": str(self.subnet_file(host)),
            "dataDir": str(self.state_dir / f"h{host}" / "cni"),
        }

    def cni(
        self, host: int, command: str, container_ns: str, config: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Invoke overlay-cni in the host's namespace as a container runtime
        does: CNI_* variables, the network config on stdin, the result (or a
        CNI error) on stdout."""
        plugin = Path(sys.executable).parent / "overlay-cni"
        argv = [str(plugin)] if plugin.exists() else [sys.executable, "-m", "overlayd.cli.cni"]
        env = runtime_env(
            command, container_ns, CNI_PLUGIN_DIR, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        )
        ok, result, raw = call_plugin(
            ["ip", "netns", "exec", self.host_ns(host), *argv],
            config or self.cni_config(host),
            env,
        )
        if not ok:
            raise LabCommandError(f"overlay-cni {command} {container_ns}: {raw}")
        return result

    def add_container(self, host: int, index: int) -> Container:
        """A container namespace attached through overlay-cni, as a runtime
        would attach it: eth0 on the overlay bridge, and in gwbridge mode eth1
        on the gwbridge with the default route."""
        ns = self.container_ns(host, index)
        netns.add_namespace(ns)
        result = self.cni(host, "ADD", ns) or {}
        interfaces = result.get("interfaces", [])
        for ip in result.get("ips", []):
            if interfaces[ip["interface"]].get("name") == "eth0":
                return Container(ns, host, IPv4Interface(ip["address"]).ip)
        raise LabCommandError(f"overlay-cni gave {ns} no address on eth0: {result}")

    def add_container_by_hand(
        self, host: int, index: int, *, bridge: str, subnet: IPv4Network, mtu: int
    ) -> Container:
        """A namespace with eth0 on `bridge`, addressed from `subnet` with
        iproute2 (for the flannel-style host, which has no subnet file of
        overlayd's): the bridge holds .1, containers take .2 upwards."""
        gateway = subnet.network_address + 1
        address = IPv4Interface((subnet.network_address + 1 + index, subnet.prefixlen))
        ns = self.container_ns(host, index)
        netns.add_namespace(ns)
        netns.veth(self.host_ns(host), f"c{index}", ns, "eth0", mtu=mtu)
        netns.ip(self.host_ns(host), "link", "set", f"c{index}", "master", bridge, "up")
        netns.ip(ns, "addr", "add", str(address), "dev", "eth0")
        netns.ip(ns, "link", "set", "eth0", "up")
        netns.ip(ns, "route", "add", "default", "via", str(gateway))
        return Container(ns, host, address.ip)

    @staticmethod
    def address_on(container: Container, ifname: str) -> IPv4Address | None:
        out = netns.ip(container.ns, "-j", "-4", "addr", "show", "dev", ifname, check=False)
        for link in json.loads(out or "[]"):
            for info in link.get("addr_info", []):
                return IPv4Address(info["local"])
        return None

    # --- checking ---------------------------------------------------------

    @staticmethod
    def ping(src: Container, dst: Container, *, count: int = 1, wait: float = 1.0) -> PingResult:
        out = netns.in_ns(
            src.ns,
            "ping",
            "-n",
            "-q",
            "-c",
            str(count),
            "-W",
            f"{wait:g}",
            str(dst.address),
            check=False,
            timeout=count * wait + 5,
        )
        ok = f" {count} received" in out or (
            count > 1 and " 0 received" not in out and "received" in out
        )
        rtt = None
        for line in out.splitlines():
            if "min/avg/max" in line:
                rtt = float(line.split("=")[1].split("/")[1])
        return PingResult(src, dst, ok and rtt is not None, rtt)

    def cross_host_pairs(self) -> list[tuple[Container, Container]]:
        cs = self.containers()
        return [(a, b) for a in cs for b in cs if a.host != b.host]

    def check(self, *, timeout: float = 20.0) -> list[PingResult]:
        """Ping every container from every container on another host; pairs
        that fail are retried until all answer or the timeout passes."""
        pending = self.cross_host_pairs()
        results: dict[tuple[str, str], PingResult] = {}
        deadline = time.monotonic() + timeout
        while pending:
            outcome = self._parallel(lambda pair: self.ping(*pair), pending)
            for r in outcome:
                results[(r.src.ns, r.dst.ns)] = r
            pending = [(r.src, r.dst) for r in outcome if not r.ok]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        return sorted(results.values(), key=lambda r: (r.src.ns, r.dst.ns))

    @staticmethod
    def whoami(ns: str, address: IPv4Address, *, timeout: float = 2.0) -> str | None:
        """The source address `address`'s whoami service sees for a connection
        from `ns`; None if the connection fails."""
        argv = netns.module_argv(
            ns, "overlayd.lab.whoami", "ask", str(address), str(WHOAMI_PORT), f"{timeout:g}"
        )
        out = netns.sh(argv, check=False, timeout=timeout + 10).strip()
        return out or None

    def check_egress(self) -> list[EgressResult]:
        """Every container connects to the outside server, which must see the
        container's host's public address (source NAT)."""
        return self._parallel(
            lambda c: EgressResult(c, self.whoami(c.ns, OUTSIDE_SERVER), self.host_address(c.host)),
            self.containers(),
        )

    @staticmethod
    def _parallel(fn: Callable[[A], T], items: Iterable[A]) -> list[T]:
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(fn, items))

    # --- tearing down -----------------------------------------------------

    def down(self) -> list[str]:
        """Remove every namespace of this lab and everything running in it."""
        removed = []
        # Containers and hosts first, the underlay switch last.
        for ns in sorted(self.namespaces(), key=lambda n: (n == self.switch_ns, n)):
            netns.delete_namespace(ns)
            removed.append(ns)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        netns.reap_children()
        return removed
