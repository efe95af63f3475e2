"""The lab's engine helpers that pick processes to stop: a sibling path
that only shares a prefix with an engine's state dir is not the engine's."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayd.lab.engines import processes_mentioning
from tests.conftest import wait_until


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """(`; exit 0` keeps sh from exec-ing sleep, which would drop the
    arguments.) A process named like overlayd with the plugin on: it mentions
    <host>/docker-plugins/overlayd.sock, next to dockerd's <host>/docker."""
    host = tmp_path / "h1"
    proc = started(
        subprocess.Popen(
            [
                "sh",
                "-c",
                "sleep 30; exit 0",
                "overlayd",
                str(host / "docker-plugins" / "overlayd.sock"),
            ]
        )
    )
    try:
        yield host, proc
    finally:
        proc.kill()
        proc.wait()


def started(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """`proc` once its command line shows its arguments (seen to lag Popen's return)."""
    wait_until(lambda: len(Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")) > 4)
    return proc


def test_a_sibling_dir_with_the_same_prefix_is_not_mentioned(
    sleeper: tuple[Path, subprocess.Popen[bytes]],
) -> None:
    host, proc = sleeper
    assert proc.pid not in processes_mentioning(str(host / "docker"))
    # Controls: its own dir and the host's dir do count.
    assert proc.pid in processes_mentioning(str(host / "docker-plugins"))
    assert proc.pid in processes_mentioning(str(host))
    assert proc.pid in processes_mentioning(str(host) + "/")


def test_a_dir_given_as_an_option_value_is_mentioned(tmp_path: Path) -> None:
    state = tmp_path / "h1" / "docker"
    proc = started(
        subprocess.Popen(["sh", "-c", "sleep 30; exit 0", "dockerd", f"--data-root={state}"])
    )
    try:
        assert proc.pid in processes_mentioning(str(state))
        assert proc.pid not in processes_mentioning(str(tmp_path / "h1" / "dock"))
    finally:
        proc.kill()
        proc.wait()
