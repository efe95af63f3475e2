"""The lab: N simulated hosts on an isolated underlay, a real etcd, one real
overlayd per host, and containers attached to each host's bridge.

`Lab` is the one handle the CLI, the tests and the figure drivers use; it
ties the pieces together and keeps the lab's state directory:

    topology.py    namespace names, underlay switch and addresses, the
                   outside router and its whoami server, the MQTT broker
    etcd.py        the etcd members
    security.py    the lab's CA and certificates, etcd's TLS and RBAC
    hosts.py       each host's daemon: files, settings, start, stop, wait
    containers.py  containers attached through overlay-cni (or by hand)
    checks.py      cross-host pings and the egress check
    engines/       real Podman and dockerd per host, and their teardown

`down` removes every namespace with the lab's prefix and everything running
inside them, so it also cleans up after a crash half way through `up`.

A lab is secure unless made with `insecure` settings (LabSettings.tls off):
etcd speaks TLS and wants a client certificate from everyone on the
underlay; with `rbac`, etcd users and roles decide who writes what. The
settings are kept in the state dir (lab.json), so later commands (check,
ctl, add-host, the figure drivers) dial etcd the way the lab was made.

A lab is dual-stack when its network config enables IPv6 (the default:
default_network_config's `ipv6`; `lab up --no-ipv6` leaves it out): every
host leases an IPv6 subnet beside its IPv4 one, containers get an address
of each family, and `check`/`check_egress` run once per family. The config
the lab was made with is kept in the state dir too (network.json), so
`check` knows which families to check even while etcd is down.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path
from typing import Any, TypeVar

from overlayd.config import parse_network_config, render_network_config
from overlayd.errors import ConfigError
from overlayd.lab import checks, containers, engines, hosts, netns, security, topology
from overlayd.lab.checks import EgressResult, PingResult
from overlayd.lab.containers import Container
from overlayd.lab.etcd import Member, start_member, wait_healthy
from overlayd.lab.hosts import PREFIX, HostFiles, LabSettings
from overlayd.lab.netns import LabCommandError
from overlayd.lab.pki import Issued
from overlayd.lab.security import ADMIN_USER, LabPki
from overlayd.lab.topology import ETCD_ADDRESS
from overlayd.model import DEFAULT_VNI, DEFAULT_VXLAN_PORT, IPV4, IPV6, Family, NetworkConfig
from overlayd.plan.leases import config_key, subnets_prefix
from overlayd.store.access import EtcdAccess
from overlayd.store.etcd import EtcdStore

# What tests and figure drivers import from here, wherever it is defined.
__all__ = [
    "DEFAULT_NETWORK",
    "DEFAULT_NETWORK6",
    "PREFIX",
    "STATE_ROOT",
    "Container",
    "EgressResult",
    "Lab",
    "LabSettings",
    "PingResult",
    "default_network_config",
]

STATE_ROOT = Path("/run/overlayd-lab")
DEFAULT_NETWORK = IPv4Network("10.244.0.0/16")
# A unique local /56: 255 host /64s beside the IPv4 network's 255 /24s.
DEFAULT_NETWORK6 = IPv6Network("fd00:10:244::/56")
DEFAULT_SUBNET_LEN6 = 64
# Dual-stack unless told otherwise: it costs little at `lab up` (the
# README's lab section has the measured times) and proves both families.
DEFAULT_IPV6 = True

T = TypeVar("T")


def default_network_config(
    network: IPv4Network = DEFAULT_NETWORK,
    vni: int = DEFAULT_VNI,
    port: int = DEFAULT_VXLAN_PORT,
    *,
    backend: str = "vxlan",
    direct_routing: bool = False,
    subnet_max: IPv4Address | None = None,
    ipv6: bool = DEFAULT_IPV6,
    network6: IPv6Network = DEFAULT_NETWORK6,
    subnet_max6: IPv6Address | None = None,
    service_network: IPv4Network | None = None,
    service_network6: IPv6Network | None = None,
) -> NetworkConfig:
    """The lab's network config, written in flannel's schema and parsed by
    the daemon's own parser, so the lab runs what a user's config would.
    With `ipv6`, dual-stack: `EnableIPv6`, `IPv6Network`, `IPv6SubnetLen`;
    with `service_network`, services (`ServiceNetwork`) and so DNS; with
    `service_network6` too, IPv6 VIPs (`IPv6ServiceNetwork`, dual-stack only)."""
    backend_json: dict[str, object] = {"Type": backend}
    if backend == "vxlan":
        backend_json.update(VNI=vni, Port=port, DirectRouting=direct_routing)
    raw: dict[str, object] = {"Network": str(network), "Backend": backend_json}
    if subnet_max is not None:
        raw["SubnetMax"] = str(subnet_max)
    if ipv6:
        raw.update(EnableIPv6=True, IPv6Network=str(network6), IPv6SubnetLen=DEFAULT_SUBNET_LEN6)
        if subnet_max6 is not None:
            raw["IPv6SubnetMax"] = str(subnet_max6)
    if service_network is not None:
        raw["ServiceNetwork"] = str(service_network)
    if service_network6 is not None:
        raw["IPv6ServiceNetwork"] = str(service_network6)
    return parse_network_config(json.dumps(raw))


class Lab:
    # Stateless helpers, kept reachable as Lab.ping etc. for the callers
    # that use them without a lab at hand.
    ping = staticmethod(checks.ping)
    whoami = staticmethod(checks.whoami)
    address_on = staticmethod(containers.address_on)
    address6_on = staticmethod(containers.address6_on)
    host_address = staticmethod(topology.host_address)
    host_address6 = staticmethod(topology.host_address6)
    public_address = staticmethod(checks.public_address)

    def __init__(self, name: str = "lab", *, state_root: Path = STATE_ROOT) -> None:
        if not name.replace("-", "").isalnum() or len(name) > 20:
            raise ValueError("lab name: letters, digits and dashes, at most 20 characters")
        self.name = name
        self.prefix = f"ovl-{name}-"
        self.names = topology.Names(self.prefix)
        self.state_dir = state_root / name
        self.pki = LabPki(self.state_dir / "pki")
        # Called with a host's namespace before its daemon starts (tests use
        # it to put other owners' firewall rules in place first).
        self.prepare_host: Callable[[str], None] | None = None
        self._daemons: dict[int, subprocess.Popen[bytes]] = {}

    # --- names ------------------------------------------------------------

    @property
    def switch_ns(self) -> str:
        return self.names.switch_ns

    @property
    def outside_ns(self) -> str:
        return self.names.outside_ns

    @property
    def mqtt_ns(self) -> str:
        return self.names.mqtt_ns

    @property
    def mqtt_url(self) -> str:
        return topology.mqtt_url()

    def host_ns(self, host: int) -> str:
        return self.names.host_ns(host)

    def container_ns(self, host: int, index: int) -> str:
        return self.names.container_ns(host, index)

    def files(self, host: int) -> HostFiles:
        return HostFiles(self.state_dir / f"h{host}")

    def subnet_file(self, host: int) -> Path:
        return self.files(host).subnet_file

    def control_socket(self, host: int) -> Path:
        return self.files(host).control_socket

    def daemon_log(self, host: int) -> Path:
        return self.files(host).daemon_log

    def namespaces(self) -> list[str]:
        return self.names.namespaces()

    def hosts(self) -> list[int]:
        return self.names.hosts()

    def containers(self) -> list[Container]:
        """The lab's own containers (namespaces <p>h<i>c<k>), each with its
        eth0 addresses: IPv4, and IPv6 where it has one."""
        found = []
        for ns in self.namespaces():
            host = self.names.container_host(ns)
            if host is None:
                continue
            probe = Container(ns, host, IPv4Address(0))
            address = containers.address_on(probe, "eth0")
            if address is not None:
                address6 = containers.address6_on(probe, "eth0")
                found.append(Container(ns, host, address, address6=address6))
        return sorted(found, key=lambda c: (c.host, c.ns))

    # --- services on the underlay --------------------------------------------

    def start_mqtt(self) -> None:
        topology.start_mqtt(self.names, self.state_dir)

    def stop_mqtt(self) -> None:
        netns.kill_namespace_processes(self.mqtt_ns)

    def serve_whoami(self, ns: str) -> None:
        topology.serve_whoami(ns)

    def etcd_members(self, count: int | None = None) -> list[Member]:
        settings = self.settings()
        count = count or settings.etcd_members
        return [
            Member(
                name=f"etcd{i}",
                ns=self.names.etcd_ns(i),
                address=ETCD_ADDRESS + (i - 1),
                state_dir=self.state_dir / f"etcd{i}",
                tls=self.pki.member(f"etcd{i}") if settings.tls else None,
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
        wait_healthy(members[member - 1], proc, env=self._etcdctl_env())

    # --- etcd -------------------------------------------------------------

    @property
    def etcd_access(self) -> EtcdAccess:
        """The driver's way into etcd: a member's unix socket (plain, guarded
        by the file system), as root with its password once RBAC is on."""
        password = self.pki.password() if self.settings().rbac else None
        return EtcdAccess(
            endpoints=(self.etcd_endpoint,),
            username=ADMIN_USER if password is not None else None,
            password=password,
            password_setting=f"etcd-password-file {self.pki.password_file}",
        )

    def _etcdctl_env(self) -> dict[str, str]:
        return security.etcdctl_env(self.etcd_access.password)

    def etcdctl(self, *args: str) -> str:
        """etcdctl against the lab's etcd, with the driver's access."""
        return security.etcdctl(self.etcd_endpoint, *args, password=self.etcd_access.password)

    def etcd(self, action: Callable[[EtcdStore], Awaitable[T]]) -> T:
        """Run one coroutine against the lab's etcd (from the root namespace)."""

        async def go() -> T:
            async with EtcdStore(self.etcd_access) as store:
                return await action(store)

        return asyncio.run(go())

    def leases(self) -> dict[str, bytes]:
        async def get(store: EtcdStore) -> dict[str, bytes]:
            values, _ = await store.get_prefix(subnets_prefix(PREFIX))
            return values

        return self.etcd(get)

    def lease_key(self, host: int) -> str:
        """The etcd key of the host's lease, as it is in etcd: flannel's
        `10.244.1.0-24`, or in a dual-stack cluster `10.244.1.0-24&fd00:...-64`."""
        subnet = self.subnet(host)
        wanted = f"{subnets_prefix(PREFIX)}{subnet.network_address}-{subnet.prefixlen}"
        for key in self.leases():
            if key == wanted or key.startswith(f"{wanted}&"):
                return key
        raise LabCommandError(f"h{host}'s lease for {subnet} is not in etcd")

    def delete_lease(self, host: int) -> None:
        key = self.lease_key(host)
        self.etcd(lambda s: s.delete(key))

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
        cfg = config or default_network_config()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "lab.json").write_text(json.dumps(asdict(settings)))
        (self.state_dir / "network.json").write_text(render_network_config(cfg))
        topology.add_switch(self.names)
        topology.add_outside(self.names)
        members = self.etcd_members(settings.etcd_members)
        if settings.tls:
            self.pki.make([(m.name, m.address) for m in members])
        for member in members:
            topology.attach_to_switch(self.names, member.ns, member.name, member.address)
        procs = [start_member(member, members) for member in members]
        for member, proc in zip(members, procs, strict=True):
            wait_healthy(member, proc)
        if settings.rbac:
            security.enable_rbac(self.etcd_endpoint, self.pki.new_password(), PREFIX)
        if settings.mqtt:
            self.start_mqtt()
        self.etcd(lambda s: s.put(config_key(PREFIX), render_network_config(cfg)))
        checks.parallel(self.add_host, range(1, hosts + 1))

    def settings(self) -> LabSettings:
        try:
            return LabSettings(**json.loads((self.state_dir / "lab.json").read_text()))
        except FileNotFoundError:
            return LabSettings()

    def network_config(self) -> NetworkConfig | None:
        """The network config the lab was made with (None: made by an older
        lab, which kept no copy, or already down)."""
        try:
            return parse_network_config((self.state_dir / "network.json").read_text())
        except (FileNotFoundError, ConfigError):
            return None

    @property
    def dual_stack(self) -> bool:
        config = self.network_config()
        return config is not None and config.ipv6 is not None

    def families(self) -> list[Family]:
        """The address families the lab's containers speak."""
        return [IPV4, IPV6] if self.dual_stack else [IPV4]

    def attach_host_namespace(self, host: int, *, ipv6: bool = True) -> None:
        """The host's namespace, plugged into the underlay switch, with the
        outside router as its default route; and its identity for etcd (a
        client certificate, and with RBAC an etcd user of the same name).
        Without `ipv6` the host has no IPv6 underlay address."""
        topology.attach_host(self.names, host, ipv6=ipv6)
        self.files(host).root.mkdir(parents=True, exist_ok=True)
        settings = self.settings()
        if settings.tls:
            self.pki.ensure_client(f"h{host}")
        password = self.pki.password() if settings.rbac else None
        if password is not None:
            security.add_host_user(self.etcd_endpoint, password, f"h{host}")

    def add_host(self, host: int, *, ipv6: bool = True) -> None:
        """A new host on the underlay, its daemon, and its containers.
        Without `ipv6` the host has no IPv6 underlay address, so its daemon
        runs IPv4 only even in a dual-stack network (as an older overlayd
        would): an IPv4-only peer of the others."""
        self.attach_host_namespace(host, ipv6=ipv6)
        if self.prepare_host is not None:
            self.prepare_host(self.host_ns(host))
        self.start_daemon(host)
        self.wait_ready(host)
        for index in range(1, self.settings().containers_per_host + 1):
            self.add_container(host, index)

    # --- daemons ------------------------------------------------------------

    def etcd_settings(self, host: int, *, admin: bool = False) -> dict[str, str]:
        """How a client in host `host`'s namespace reaches etcd, by
        AGENT_SETTINGS name: the members' underlay URLs, and with TLS the
        lab's CA and the host's certificate (root's with `admin`)."""
        client: Issued | None = None
        if self.settings().tls:
            client = self.pki.client(ADMIN_USER if admin else f"h{host}")
        return hosts.etcd_settings(
            [m.client_url for m in self.etcd_members()],
            self.pki.ca if client is not None else None,
            client,
        )

    def etcd_flags(self, host: int, *, admin: bool = False) -> list[str]:
        """etcd_settings as command-line flags, for overlayd and overlayctl."""
        return [
            part
            for name, value in self.etcd_settings(host, admin=admin).items()
            for part in (f"--{name}", value)
        ]

    def daemon_settings(self, host: int) -> dict[str, str]:
        """The settings host `host`'s daemon runs with, by AGENT_SETTINGS name."""
        settings = self.settings()
        return hosts.daemon_settings(
            self.files(host),
            settings,
            self.etcd_settings(host),
            self.mqtt_url if settings.mqtt else None,
        )

    def start_daemon(
        self, host: int, *extra_args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = hosts.start_daemon(
            self.host_ns(host), self.files(host), self.daemon_settings(host), extra_args, env
        )
        self._daemons[host] = proc
        return proc

    def stop_daemon(self, host: int, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the host's daemon, only it (container engines in the host's
        namespace go on); its kernel state stays."""
        hosts.stop_daemon(self.host_ns(host), sig)

    def restart_daemon(self, host: int, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the daemon with `sig`, start it again, wait until it is ready."""
        readies = hosts.ready_count(self.files(host))
        self.stop_daemon(host, sig)
        self.start_daemon(host)
        hosts.wait_ready_again(host, self.files(host), readies, lambda: self.daemon_running(host))

    def remove_host(self, host: int) -> None:
        """The host and its containers are gone, as if powered off. A failed
        engine teardown does not stop the rest; it is raised at the end."""
        failure = self._teardown_engines_noting(host)
        for ns in self.namespaces():
            if ns == self.host_ns(host) or ns.startswith(f"{self.host_ns(host)}c"):
                netns.delete_namespace(ns)
        # /run is a tmpfs: a reboot loses the subnet file (the log stays).
        self.subnet_file(host).unlink(missing_ok=True)
        # And the containers' CNI records: the lab keeps host-local's
        # reservations under the state dir, in /run, so they go too (a runtime
        # on a real host calls DEL for the sandboxes that died with it).
        shutil.rmtree(self.files(host).cni_dir, ignore_errors=True)
        self._daemons.pop(host, None)
        topology.wait_switch_port_gone(self.names, host)
        if failure is not None:
            raise LabCommandError(failure)

    def daemon_running(self, host: int) -> bool:
        proc = self._daemons.get(host)
        if proc is not None:
            # Right after start, `ip netns exec` may not have entered the
            # namespace yet, so our own child is asked first.
            return proc.poll() is None
        return bool(hosts.daemon_pids(self.host_ns(host)))

    def wait_ready(self, host: int, timeout: float = netns.LAB_WAIT_SECONDS) -> IPv4Network:
        return hosts.wait_ready(host, self.files(host), lambda: self.daemon_running(host), timeout)

    def subnet(self, host: int) -> IPv4Network:
        return hosts.subnet(host, self.files(host))

    def subnet6(self, host: int) -> IPv6Network | None:
        """The host's IPv6 subnet from its subnet file (None: IPv4-only)."""
        return hosts.subnet6_of(self.files(host))

    def mtu(self, host: int) -> int:
        return hosts.mtu(host, self.files(host))

    def gwbridge(self, host: int) -> tuple[str, IPv4Interface] | None:
        """The host's egress bridge and its gateway, in gwbridge mode."""
        return hosts.gwbridge(self.files(host))

    def gwbridge6(self, host: int) -> IPv6Interface | None:
        """The egress bridge's IPv6 gateway, in gwbridge mode when dual-stack."""
        return hosts.gwbridge6(self.files(host))

    def host_named(self, text: str) -> int:
        """The number of a running host given as `h2` (or `2`); a clear
        error naming it otherwise."""
        return hosts.parse_host(text, self.name, self.hosts())

    def ctl_command(
        self, host: int, args: Sequence[str], *, admin: bool = False
    ) -> tuple[list[str], dict[str, str]]:
        """overlayctl `args` in the host's namespace, against its daemon;
        with `admin`, etcd is dialled with root's certificate instead of the
        host's (for `network set` when RBAC is on)."""
        settings = {**self.daemon_settings(host), **self.etcd_settings(host, admin=admin)}
        return hosts.ctl_command(self.host_ns(host), settings, args)

    # --- containers ---------------------------------------------------------

    def cni_config(self, host: int) -> dict[str, Any]:
        return containers.cni_config(self.files(host))

    def cni(
        self, host: int, command: str, container_ns: str, config: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Invoke overlay-cni in the host's namespace as a container runtime does."""
        return containers.invoke_cni(
            self.host_ns(host), command, container_ns, config or self.cni_config(host)
        )

    def add_container(self, host: int, index: int) -> Container:
        """A container attached through overlay-cni (see containers.py)."""
        return containers.attach_through_cni(
            host, self.host_ns(host), self.container_ns(host, index), self.files(host)
        )

    def add_container_by_hand(
        self,
        host: int,
        index: int,
        *,
        bridge: str,
        subnet: IPv4Network,
        mtu: int,
        subnet6: IPv6Network | None = None,
    ) -> Container:
        """A container on `bridge` addressed with iproute2 (see containers.py)."""
        return containers.attach_by_hand(
            host,
            self.host_ns(host),
            self.container_ns(host, index),
            index,
            bridge=bridge,
            subnet=subnet,
            mtu=mtu,
            subnet6=subnet6,
        )

    # --- container engines ---------------------------------------------------

    @property
    def image_tar(self) -> Path:
        """The busybox rootfs the engines import, built once under the state root."""
        return engines.image_tarball(self.state_dir.parent)

    def podman(self, host: int, *, dns: dict[str, Any] | None = None) -> engines.Podman:
        """Podman on the host (configured on first use: `ensure_started`;
        `dns` goes into its network config then)."""
        return engines.Podman(host, self.host_ns(host), self.files(host), self.image_tar, dns=dns)

    def docker(
        self, host: int, flavour: str | None = None, *, live_restore: bool | None = None
    ) -> engines.Docker:
        """dockerd on the host, `docker-opts` (default) or `plain` (not
        started: `ensure_started`); a started one keeps the flavour it has."""
        return engines.Docker(
            host,
            self.host_ns(host),
            self.files(host),
            self.image_tar,
            flavour,
            live_restore=live_restore,
        )

    def engine(self, host: int, kind: str) -> engines.Engine:
        return self.podman(host) if kind == "podman" else self.docker(host)

    def engine_containers(self) -> list[engines.EngineContainer]:
        """Every running engine container on every host of the lab."""
        found: list[engines.EngineContainer] = []
        for host in self.hosts():
            for e in engines.present(host, self.host_ns(host), self.files(host), Path()):
                found += e.containers()
        return sorted(found, key=lambda c: (c.host, c.engine, c.name))

    def teardown_engines(self, host: int) -> None:
        """The host's engines stopped, their containers, mounts and
        /run/netns entries gone (works from their state on disk)."""
        engines.teardown_host(host, self.host_ns(host), self.files(host), Path())

    def _teardown_engines_noting(self, host: int) -> str | None:
        """teardown_engines, its failure (any: a broken or hung engine
        command, damaged state) returned as text instead of raised, so a
        caller tearing down more goes on."""
        try:
            self.teardown_engines(host)
        except Exception as exc:  # reported by the caller, after the rest is down
            return f"h{host}: {type(exc).__name__}: {exc}"
        return None

    def _hosts_with_state(self) -> list[int]:
        if not self.state_dir.is_dir():
            return []
        return sorted(
            int(d.name[1:])
            for d in self.state_dir.iterdir()
            if d.is_dir() and d.name[:1] == "h" and d.name[1:].isdigit()
        )

    # --- checking ---------------------------------------------------------

    def cross_host_pairs(self) -> list[tuple[Container, Container]]:
        return checks.cross_host_pairs(self.containers())

    def container(self, host: int, index: int = 1) -> Container:
        """The lab's container <p>h<host>c<index>, with its addresses."""
        ns = self.container_ns(host, index)
        for c in self.containers():
            if c.ns == ns:
                return c
        raise LabCommandError(f"lab {self.name!r} has no container {ns}")

    def engine_checkables(self, *, egress: bool = False) -> list[Container]:
        """The running engine containers, as containers `check` can ping
        (entered by their network namespace's path; RootNamespaceError if
        one of those is the root namespace's). With `egress`, those
        that should have a way out: not Docker's on overlayd's bridge in
        gwbridge mode, since Docker's bridge driver adds no second interface
        (`overlayctl docker-opts` warns of it)."""
        gwbridge = self.settings().egress == "gwbridge"
        found = []
        for c in self.engine_containers():
            if c.address is None or c.pid <= 0:
                continue
            on_bridge_only = c.engine == "docker" and self.docker(c.host).flavour == "docker-opts"
            if egress and gwbridge and on_bridge_only:
                continue
            # Refused here, before any check runs, if the PID now belongs
            # to the root namespace (the container died, its PID reused).
            netns.refuse_root_netns(c.netns_path)
            probe = Container(c.netns_path, c.host, c.address)
            address6 = containers.address6_on(probe, "eth0") if self.dual_stack else None
            found.append(
                Container(c.netns_path, c.host, c.address, label=c.title, address6=address6)
            )
        return found

    def checkables(self, family: Family = IPV4, *, egress: bool = False) -> list[Container]:
        """What `check` and `check_egress` try over `family`: every lab
        container (each must have an address of the family: one without
        fails its checks), and the engine containers (see
        engine_checkables) that have an address of the family. An engine
        may give its containers IPv4 only (Docker's bridge driver without
        IPv6 settings of its own): `lab check` counts those it left out."""
        engine = self.engine_checkables(egress=egress)
        return self.containers() + [c for c in engine if c.address_of(family) is not None]

    def check(self, *, timeout: float = 20.0, family: Family = IPV4) -> list[PingResult]:
        """Ping every container (the lab's and the engines') from every
        container on another host over `family`, retried until all answer
        or the timeout passes."""
        return checks.check(self.checkables(family), timeout=timeout, family=family)

    def check_egress(self, *, family: Family = IPV4) -> list[EgressResult]:
        """Every container reaches the outside server's address of `family`
        as its host's address of `family` (engine containers: see
        engine_checkables)."""
        return checks.check_egress(self.checkables(family, egress=True), family=family)

    # --- tearing down -----------------------------------------------------

    def down(self) -> list[str]:
        """Remove every namespace of this lab and everything running in it.

        A host whose engines fail to tear down does not stop the rest: every
        namespace still goes, and then a LabCommandError names the failures.
        The state dir is kept in that case, so that `lab down` run again
        finds the engines' state (their runc containers, mounts) and sweeps
        it."""
        removed = []
        # Engines first, while their hosts' namespaces are there: their
        # containers live in namespaces of their own, which deleting the
        # host's would not reach.
        failures = [
            failure
            for host in self._hosts_with_state()
            if (failure := self._teardown_engines_noting(host)) is not None
        ]
        # Containers and hosts first, the underlay switch last.
        for ns in sorted(self.namespaces(), key=lambda n: (n == self.switch_ns, n)):
            netns.delete_namespace(ns)
            removed.append(ns)
        netns.reap_children()
        if failures:
            raise LabCommandError(
                f"lab {self.name!r}: {len(removed)} namespaces removed, but engine teardown"
                f" failed ({'; '.join(failures)}); state kept in {self.state_dir}:"
                f" run `overlayctl lab down --name {self.name}` again"
            )
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return removed
