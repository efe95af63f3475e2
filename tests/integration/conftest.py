"""A real etcd server on loopback for the control-plane tests (no root needed)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CONVERGE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_etcd(
    data: Path, scheme: str, extra: Sequence[str], also_on: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    client, peer = f"{scheme}://127.0.0.1:{port}", f"http://127.0.0.1:{_free_port()}"
    listen = ",".join([client, *(f"{scheme}://{host}:{port}" for host in also_on)])
    with (data / "etcd.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                "etcd",
                "--name",
                "t",
                "--data-dir",
                str(data / "d"),
                "--listen-client-urls",
                listen,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"t={peer}",
                "--heartbeat-interval",
                "10",
                "--election-timeout",
                "50",
                "--log-level",
                "warn",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, client


def stop_etcd(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def etcdctl(client: str, *args: str, auth: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """etcdctl against `client`; `auth` holds its TLS or user flags."""
    argv = ["etcdctl", "--endpoints", client, "--command-timeout", "5s", *auth, *args]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)


@dataclass
class RunningEtcd:
    proc: subprocess.Popen[bytes]
    client: str
    data: Path
    auth: tuple[str, ...]

    def restart(self) -> None:
        """Stop and start again with the same data, address and flags."""
        argv = self.proc.args
        stop_etcd(self.proc)
        with (self.data / "etcd.log").open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _wait_healthy(self.proc, self.client, self.data, self.auth)


def _wait_healthy(
    proc: subprocess.Popen[bytes], client: str, data: Path, auth: Sequence[str]
) -> None:
    deadline = time.monotonic() + CONVERGE
    while proc.poll() is None:
        if etcdctl(client, "endpoint", "health", auth=auth).returncode == 0:
            return
        if time.monotonic() > deadline:
            stop_etcd(proc)
            pytest.fail(f"etcd not healthy within {CONVERGE:g} s: " + _log_tail(data))
        time.sleep(0.1)


def start_etcd(
    make_dir: Callable[[], Path],
    *,
    scheme: str = "http",
    extra: Sequence[str] = (),
    auth: Sequence[str] = (),
    also_on: Sequence[str] = (),
) -> RunningEtcd:
    """A healthy etcd on loopback (`auth`: etcdctl's flags to reach it).

    A free port can be taken by something else (another test run) between
    _free_port() and etcd's bind: then etcd exits at once, and a fresh pair
    of ports is tried. `also_on`: more loopback addresses it listens on,
    on the same port."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (./bootstrap.sh test installs it)")
    for _ in range(5):
        data = make_dir()
        proc, client = _start_etcd(data, scheme, extra, also_on)
        _wait_healthy(proc, client, data, auth)
        if proc.poll() is None:
            return RunningEtcd(proc, client, data, tuple(auth))
        if "address already in use" not in _log_tail(data):
            pytest.fail("etcd exited: " + _log_tail(data))
    pytest.fail("etcd found no free ports in five tries")


@pytest.fixture(scope="session")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    etcd = start_etcd(lambda: tmp_path_factory.mktemp("etcd"))
    try:
        yield etcd.client
    finally:
        stop_etcd(etcd.proc)


def _log_tail(data: Path) -> str:
    return (data / "etcd.log").read_text(errors="replace")[-2000:]


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so tests share one etcd without interfering."""
    return f"/t{uuid.uuid4().hex[:8]}/network"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path
