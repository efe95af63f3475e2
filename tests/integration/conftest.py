"""A real etcd server on loopback for the control-plane tests (no root needed)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CONVERGE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_etcd(data: Path) -> tuple[subprocess.Popen[bytes], str]:
    client, peer = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    with (data / "etcd.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                "etcd",
                "--name",
                "t",
                "--data-dir",
                str(data / "d"),
                "--listen-client-urls",
                client,
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
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, client


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _healthy(client: str) -> bool:
    argv = ["etcdctl", "--endpoints", client, "endpoint", "health"]
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="session")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (./bootstrap.sh test installs it)")
    # A free port can be taken by something else (another test run) between
    # _free_port() and etcd's bind: then etcd exits at once, and a fresh pair
    # of ports is tried.
    for _ in range(5):
        data = tmp_path_factory.mktemp("etcd")
        proc, client = _start_etcd(data)
        deadline = time.monotonic() + CONVERGE
        while proc.poll() is None and not _healthy(client):
            if time.monotonic() > deadline:
                _stop(proc)
                pytest.fail(f"etcd not healthy within {CONVERGE:g} s: " + _log_tail(data))
            time.sleep(0.1)
        if proc.poll() is None:
            break
        if "address already in use" not in _log_tail(data):
            pytest.fail("etcd exited: " + _log_tail(data))
    else:
        pytest.fail("etcd found no free ports in five tries")
    try:
        yield client
    finally:
        _stop(proc)


def _log_tail(data: Path) -> str:
    return (data / "etcd.log").read_text(errors="replace")[-2000:]


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so tests share one etcd without interfering."""
    return f"/t{uuid.uuid4().hex[:8]}/network"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path
