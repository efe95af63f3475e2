"""Shared fixtures: throwaway namespaces that are always removed."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

# Every namespace a test makes starts with this, so a last sweep at the end
# of the session can remove whatever a crashed test left behind.
SESSION_TAG = f"ovt{uuid.uuid4().hex[:6]}"


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> float:
    """Seconds until the predicate held; fails the test at the timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


def capture(
    ns: str, iface: str, bpf: str, count: int, pcap: Path, action: Callable[[], None]
) -> None:
    """tcpdump in a namespace while `action` runs, until `count` packets."""
    tcpdump = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "tcpdump",
            "-i",
            iface,
            "-n",
            "-U",
            "-w",
            str(pcap),
            "-c",
            str(count),
            *bpf.split(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)  # let tcpdump attach
        action()
        tcpdump.wait(timeout=10)
    finally:
        tcpdump.kill()
        tcpdump.wait()


def unique_name(kind: str) -> str:
    return f"{SESSION_TAG}-{kind}{uuid.uuid4().hex[:4]}"


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="session", autouse=True)
def sweep_leftover_namespaces() -> Iterator[None]:
    yield
    if os.geteuid() != 0:
        return
    from overlayd.lab.netns import delete_namespace, reap_children

    for ns in _namespaces():
        if SESSION_TAG in ns:
            delete_namespace(ns)
    reap_children()


@pytest.fixture
def netns() -> Iterator[str]:
    """An empty namespace with lo up, deleted after the test."""
    from overlayd.lab.netns import add_namespace, delete_namespace

    name = unique_name("ns")
    add_namespace(name)
    try:
        yield name
    finally:
        delete_namespace(name)
