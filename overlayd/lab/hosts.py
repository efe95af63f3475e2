"""The lab's hosts: where each host's daemon keeps its files, the settings it
runs with, starting and stopping it inside the host's namespace, waiting for
it, and reading what it wrote (subnet file); and running overlayctl against
it with those same settings (`overlayctl lab ctl`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path

from overlayd.config import ENV_PREFIX
from overlayd.lab import netns
from overlayd.lab.netns import LabCommandError
from overlayd.lab.pki import Issued
from overlayd.surfaces.subnetfile import read_subnet, read_subnet6, read_variables

PREFIX = "/coreos.com/network"  # the etcd prefix of every lab daemon (flannel's default)


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
    # etcd over TLS, every client with a certificate (`lab up --insecure`: off)
    tls: bool = True
    # etcd users and roles, a host's certificate its identity (`lab up --rbac`)
    rbac: bool = False
    # every daemon serves the Docker plugin on <host dir>/docker-plugins,
    # which the host's dockerd sees as /run/docker/plugins (lab/engines/docker.py)
    docker_plugin: bool = False

    def __post_init__(self) -> None:
        if self.rbac and not self.tls:
            # Without TLS a host has no certificate, so etcd could not tell
            # hosts apart: RBAC would mean passwords on every host instead.
            raise ValueError("--rbac needs TLS: it cannot be combined with --insecure")


@dataclass(frozen=True, slots=True)
class HostFiles:
    """A host's files, in its own directory under the lab's state dir."""

    root: Path

    @property
    def subnet_file(self) -> Path:
        return self.root / "subnet.env"

    @property
    def control_socket(self) -> Path:
        return self.root / "overlayd.sock"

    @property
    def daemon_log(self) -> Path:
        return self.root / "overlayd.log"

    @property
    def cni_dir(self) -> Path:
        return self.root / "cni"

    @property
    def docker_plugin_socket(self) -> Path:
        return self.root / "docker-plugins" / "overlayd.sock"

    def log_tail(self) -> str:
        return self.daemon_log.read_text(errors="replace")[-3000:]


def etcd_settings(
    etcd_urls: Sequence[str], ca: Path | None, client: Issued | None
) -> dict[str, str]:
    """How a client in a lab namespace reaches etcd, by AGENT_SETTINGS names."""
    found = {"etcd-endpoints": ",".join(etcd_urls)}
    if ca is not None:
        found["etcd-cafile"] = str(ca)
    if client is not None:
        found |= {"etcd-certfile": str(client.cert), "etcd-keyfile": str(client.key)}
    return found


def daemon_settings(
    files: HostFiles, settings: LabSettings, etcd: Mapping[str, str], mqtt_url: str | None
) -> dict[str, str]:
    """The host's daemon settings by their names in AGENT_SETTINGS: the
    daemon gets them as flags, overlayctl (`lab ctl`) as OVERLAYD_* variables,
    so both always agree. `etcd` is etcd_settings' answer for the host."""
    found = {
        **etcd,
        "etcd-prefix": PREFIX,
        "iface": "eth0",
        "subnet-file": str(files.subnet_file),
        "lease-ttl": str(settings.lease_ttl),
        "resync-seconds": str(settings.resync_seconds),
        "egress": settings.egress,
        "log-level": settings.log_level,
        "control-socket": str(files.control_socket),
        # Network safety: the lab's DNS responders forward nothing (the
        # host's own resolvers are outside every lab namespace).
        "dns-upstreams": "",
    }
    if mqtt_url is not None:
        found["mqtt-url"] = mqtt_url
    if settings.docker_plugin:
        found["docker-plugin"] = "on"
        found["docker-plugin-socket"] = str(files.docker_plugin_socket)
        # overlay-cni's dataDir in the lab: one host-local store for both.
        found["cni-data-dir"] = str(files.cni_dir)
    return found


def start_daemon(
    ns: str,
    files: HostFiles,
    settings: Mapping[str, str],
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    flags = [part for name, value in settings.items() for part in (f"--{name}", value)]
    log = files.daemon_log.open("ab")
    proc = subprocess.Popen(
        netns.module_argv(ns, "overlayd.cli.daemon", *flags, *extra_args),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    log.close()
    return proc


DAEMON_MODULE = "overlayd.cli.daemon"


def is_daemon_cmdline(argv: Sequence[str]) -> bool:
    """Whether a process's command line is an overlayd daemon: the module
    run by an interpreter (as the lab starts it) or the `overlayd` script."""
    if DAEMON_MODULE in argv:
        return True
    return any(Path(part).name == "overlayd" for part in argv[:2])


def daemon_pids(ns: str) -> list[int]:
    """overlayd's processes in the host's namespace, and nothing else that
    runs there (container engines: dockerd, containerd, conmon)."""
    found = []
    for pid in netns.pids_in(ns):
        argv = netns.proc_cmdline(pid)
        if argv and is_daemon_cmdline(argv):
            found.append(pid)
    return found


def stop_daemon(ns: str, sig: signal.Signals = signal.SIGTERM) -> None:
    """Stop the host's daemon, only it: engines running in the host's
    namespace stay, and so does the kernel state."""
    netns.kill_processes(lambda: daemon_pids(ns), sig=sig)


def ready_count(files: HostFiles) -> int:
    """How often the daemon has logged that it is ready, over all its runs."""
    return files.daemon_log.read_text().count("event=ready")


def wait_ready_again(
    host: int, files: HostFiles, readies: int, running: Callable[[], bool]
) -> None:
    """Wait until the log holds more ready events than `readies`."""
    deadline = time.monotonic() + netns.LAB_WAIT_SECONDS
    while ready_count(files) == readies:
        if time.monotonic() > deadline or not running():
            raise LabCommandError(f"overlayd on h{host} did not come back:\n{files.log_tail()}")
        time.sleep(0.02)


def wait_ready(
    host: int,
    files: HostFiles,
    running: Callable[[], bool],
    timeout: float = netns.LAB_WAIT_SECONDS,
) -> IPv4Network:
    """Wait until the daemon has written its subnet file, and is still running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        subnet = read_subnet(files.subnet_file)
        if subnet is not None and running():
            return subnet
        if not running():
            break
        time.sleep(0.05)
    raise LabCommandError(f"overlayd on h{host} did not become ready:\n{files.log_tail()}")


def subnet(host: int, files: HostFiles) -> IPv4Network:
    found = read_subnet(files.subnet_file)
    if found is None:
        raise LabCommandError(f"h{host} has no subnet file")
    return found


def mtu(host: int, files: HostFiles) -> int:
    value = read_variables(files.subnet_file).get("FLANNEL_MTU")
    if value is None:
        raise LabCommandError(f"h{host}'s subnet file has no FLANNEL_MTU")
    return int(value)


def subnet6_of(files: HostFiles) -> IPv6Network | None:
    """The host's IPv6 subnet (FLANNEL_IPV6_SUBNET), None if the host is
    IPv4-only or has no subnet file yet."""
    return read_subnet6(files.subnet_file)


def gwbridge(files: HostFiles) -> tuple[str, IPv4Interface] | None:
    """The host's egress bridge and its gateway, in gwbridge mode."""
    found = read_variables(files.subnet_file)
    if "OVERLAYD_GWBRIDGE" not in found:
        return None
    return found["OVERLAYD_GWBRIDGE"], IPv4Interface(found["OVERLAYD_GWBRIDGE_SUBNET"])


def gwbridge6(files: HostFiles) -> IPv6Interface | None:
    """The egress bridge's IPv6 gateway, in gwbridge mode on a dual-stack host."""
    value = read_variables(files.subnet_file).get("OVERLAYD_GWBRIDGE_SUBNET6")
    return IPv6Interface(value) if value else None


def parse_host(text: str, lab_name: str, hosts: Sequence[int]) -> int:
    """A host named on the command line, `h2` (or `2`), that must be up."""
    digits = text.removeprefix("h")
    if digits.isdigit() and int(digits) in hosts:
        return int(digits)
    up = ", ".join(f"h{h}" for h in hosts) or "none"
    raise LabCommandError(f"lab {lab_name!r} has no host {text!r} (hosts up: {up})")


def ctl_command(
    ns: str, settings: Mapping[str, str], args: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    """overlayctl with `args` inside the host's namespace, and the
    environment that gives it the host daemon's settings. Variables rather
    than flags: they reach every subcommand wherever it sits in `args`, and
    flags the user passes still win over them."""
    env = {
        **os.environ,
        **{ENV_PREFIX + name.upper().replace("-", "_"): value for name, value in settings.items()},
    }
    return netns.module_argv(ns, "overlayd.cli.ctl", *args), env
