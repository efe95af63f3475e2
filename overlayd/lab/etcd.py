"""The lab's etcd: one or three real members, each in its own namespace.

Each member listens on the lab underlay (for the daemons) and on a unix
socket in its own state directory (for the lab driver, which runs in the
root namespace and must not get an address there). Members can be stopped
and started again with their data, to inject outages. With TLS (the lab's
default) the underlay listeners, client and peer, are https with client
certificates required; the unix socket stays plain (see security.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from overlayd.lab.netns import LAB_WAIT_SECONDS, LabCommandError
from overlayd.lab.security import MemberTls

ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
# etcd creates a unix listener at the URL's "host:port" relative to its cwd.
SOCKET_NAME = "etcd.sock:0"


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    ns: str
    address: IPv4Address
    state_dir: Path
    tls: MemberTls | None = None  # None: plain http (`lab up --insecure`)

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.address}:{ETCD_CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.address}:{ETCD_PEER_PORT}"

    @property
    def socket_endpoint(self) -> str:
        return f"unix://{self.state_dir / SOCKET_NAME}"


def start_member(member: Member, cluster: list[Member]) -> subprocess.Popen[bytes]:
    """Start (or restart, with its data) one member of the cluster."""
    if shutil.which("etcd") is None:
        raise LabCommandError("etcd is not installed (apt-get install etcd-server)")
    member.state_dir.mkdir(parents=True, exist_ok=True)
    # The unix socket in it is the driver's way in, without TLS: only root
    # may reach it (see security.py).
    os.chmod(member.state_dir, 0o700)
    (member.state_dir / SOCKET_NAME).unlink(missing_ok=True)
    log = (member.state_dir / "etcd.log").open("ab")
    initial = ",".join(f"{m.name}={m.peer_url}" for m in cluster)
    # Short timers: all members share one machine, so elections can be quick.
    timers = ["--heartbeat-interval", "10", "--election-timeout", "50"]
    if len(cluster) > 1:
        timers = ["--heartbeat-interval", "50", "--election-timeout", "500"]
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            member.ns,
            "etcd",
            "--name",
            member.name,
            "--data-dir",
            str(member.state_dir / "data"),
            "--listen-client-urls",
            f"{member.client_url},unix://{SOCKET_NAME}",
            "--advertise-client-urls",
            member.client_url,
            "--listen-peer-urls",
            member.peer_url,
            "--initial-advertise-peer-urls",
            member.peer_url,
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            "new",
            *timers,
            *(member.tls.flags() if member.tls is not None else []),
            "--log-level",
            "warn",
        ],
        cwd=member.state_dir,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return proc


def healthy(member: Member, env: Mapping[str, str] | None = None) -> bool:
    """Asked over the member's unix socket; `env` carries etcdctl's root
    credentials once the lab's RBAC is on (without a user, etcd 3.4 calls a
    member with authentication on unhealthy: "user name is empty")."""
    # etcdctl 3.4 prints its verdict on stderr; the exit status is enough.
    probe = subprocess.run(
        [
            "etcdctl",
            "--endpoints",
            member.socket_endpoint,
            "--command-timeout",
            "2s",
            "endpoint",
            "health",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
        env=env,
    )
    return probe.returncode == 0


def wait_healthy(
    member: Member,
    proc: subprocess.Popen[bytes] | None,
    timeout: float = LAB_WAIT_SECONDS,
    env: Mapping[str, str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = (member.state_dir / "etcd.log").read_text(errors="replace")[-2000:]
            raise LabCommandError(f"etcd {member.name} exited with {proc.returncode}:\n{tail}")
        if healthy(member, env):
            return
        time.sleep(0.1)
    raise LabCommandError(f"etcd {member.name} did not become healthy within {timeout:g} s")
