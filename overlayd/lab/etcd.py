"""A throwaway single-member etcd server for the lab, inside its own namespace.

It listens on the lab underlay (for the daemons) and on a unix socket in the
lab's state directory (for the lab driver, which runs in the root namespace
and must not get an address there).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from overlayd.lab.netns import LabCommandError

ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
# etcd creates a unix listener at the URL's "host:port" relative to its cwd.
SOCKET_NAME = "etcd.sock:0"


def socket_endpoint(state_dir: Path) -> str:
    return f"unix://{state_dir / SOCKET_NAME}"


def start_etcd(ns: str, address: str, state_dir: Path) -> subprocess.Popen[bytes]:
    if shutil.which("etcd") is None:
        raise LabCommandError("etcd is not installed (apt-get install etcd-server)")
    data = state_dir / "etcd-data"
    log = (state_dir / "etcd.log").open("ab")
    client = f"http://{address}:{ETCD_CLIENT_PORT}"
    peer = f"http://{address}:{ETCD_PEER_PORT}"
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "etcd",
            "--name",
            "lab",
            "--data-dir",
            str(data),
            "--listen-client-urls",
            f"{client},unix://{SOCKET_NAME}",
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"lab={peer}",
            # A one-member cluster on one machine: elect a leader at once.
            "--heartbeat-interval",
            "10",
            "--election-timeout",
            "50",
            "--log-level",
            "warn",
        ],
        cwd=state_dir,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    wait_healthy(state_dir, proc)
    return proc


def wait_healthy(state_dir: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    endpoint = socket_endpoint(state_dir)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (state_dir / "etcd.log").read_text(errors="replace")[-2000:]
            raise LabCommandError(f"etcd exited with {proc.returncode}:\n{tail}")
        # etcdctl 3.4 prints its health verdict on stderr.
        health = subprocess.run(
            ["etcdctl", "--endpoints", endpoint, "endpoint", "health"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if health.returncode == 0:
            return
        time.sleep(0.1)
    raise LabCommandError(f"etcd did not become healthy within {timeout:g} s")
