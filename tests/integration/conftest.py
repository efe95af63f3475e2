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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (./bootstrap.sh test installs it)")
    data = tmp_path_factory.mktemp("etcd")
    client, peer = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    log = (data / "etcd.log").open("wb")
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
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            ok = (
                subprocess.run(
                    ["etcdctl", "--endpoints", client, "endpoint", "health"],
                    capture_output=True,
                    check=False,
                ).returncode
                == 0
            )
            if ok:
                break
            if proc.poll() is not None:
                pytest.fail((data / "etcd.log").read_text()[-2000:])
            time.sleep(0.1)
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so tests share one etcd without interfering."""
    return f"/t{uuid.uuid4().hex[:8]}/network"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path
