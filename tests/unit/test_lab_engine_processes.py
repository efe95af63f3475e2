"""The lab's engine helpers that pick processes to stop: only an engine's
programs (by argv[0]), and only those naming its state dir; a sibling path
that only shares a prefix with the state dir is not the engine's, and
neither is a user's program reading a file in it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayd.lab.engines import is_engine_program, processes_mentioning
from overlayd.lab.netns import proc_cmdline
from tests.conftest import wait_until


def named(argv0: str, *args: str) -> subprocess.Popen[bytes]:
    """A harmless sh whose argv[0] is `argv0` and whose command line ends
    with `args` (`; exit 0` keeps sh from exec-ing sleep, which would drop
    them): how an engine's process looks in /proc, without being one."""
    proc = subprocess.Popen([argv0, "-c", "sleep 30; exit 0", "x", *args], executable="/bin/sh")
    return started(proc, 4 + len(args))


def started(proc: subprocess.Popen[bytes], parts: int) -> subprocess.Popen[bytes]:
    """`proc` once its command line shows its arguments (seen to lag Popen's return)."""
    wait_until(lambda: len(proc_cmdline(proc.pid)) >= parts)
    return proc


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    made: list[subprocess.Popen[bytes]] = []
    try:
        yield made
    finally:
        for proc in made:
            proc.kill()
            proc.wait()


def spawn(made: list[subprocess.Popen[bytes]], argv0: str, *args: str) -> int:
    made.append(named(argv0, *args))
    return made[-1].pid


def test_a_sibling_dir_with_the_same_prefix_is_not_mentioned(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    # A dockerd-named process mentioning <host>/docker-plugins/overlayd.sock,
    # next to dockerd's <host>/docker.
    host = tmp_path / "h1"
    pid = spawn(procs, "dockerd", str(host / "docker-plugins" / "overlayd.sock"))
    assert pid not in processes_mentioning(str(host / "docker"))
    # Controls: its own dir and the host's dir do count.
    assert pid in processes_mentioning(str(host / "docker-plugins"))
    assert pid in processes_mentioning(str(host))
    assert pid in processes_mentioning(str(host) + "/")


def test_a_dir_given_as_an_option_value_is_mentioned(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    state = tmp_path / "h1" / "docker"
    pid = spawn(procs, "/usr/sbin/dockerd", f"--data-root={state}")
    assert pid in processes_mentioning(str(state))
    assert pid not in processes_mentioning(str(tmp_path / "h1" / "dock"))


def test_a_users_program_reading_the_state_dir_is_spared(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    state = tmp_path / "h1" / "docker"
    tail = spawn(procs, "tail", "-f", str(state / "x.log"))
    # Control: the same command line under an engine's name is the engine's.
    shim = spawn(procs, "containerd-shim-runc-v2", "-f", str(state / "x.log"))
    found = processes_mentioning(str(state))
    assert tail not in found
    assert shim in found


@pytest.mark.parametrize(
    ("argv0", "engine"),
    [
        ("dockerd", True),
        ("/usr/sbin/dockerd", True),
        ("containerd", True),
        ("containerd-shim-runc-v2", True),
        ("/usr/bin/conmon", True),
        ("podman", True),
        ("runc", True),
        ("/usr/libexec/podman/catatonit", True),
        ("docker-init", True),
        ("/usr/sbin/docker-proxy", True),
        ("tail", False),
        ("sh", False),
        ("/usr/bin/python3", False),
        ("dockerd-rootless.sh", False),
        ("", False),
    ],
)
def test_engine_programs_are_known_by_argv0s_base_name(argv0: str, engine: bool) -> None:
    assert is_engine_program(argv0) is engine
