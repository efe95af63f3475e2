"""Shared fixtures: throwaway namespaces that are always removed; hypothesis
profiles; waiting for convergence without a speed bound."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis profiles. "ci" (the default, also what ./bootstrap.sh test runs):
# the same examples on every run and no example database, so a failure is a
# real counterexample that reproduces anywhere, never one a previous run on
# this machine left behind; and nothing that depends on how busy the machine
# is (a per-example deadline, the too_slow health check), since a CPU shared
# with other work must not fail a test whose property holds. The remaining
# health checks count examples, not seconds, so they stay on.
# HYPOTHESIS_PROFILE=dev: random exploration with the local example database
# (failures found once are replayed first) and hypothesis's own timing checks,
# for someone working on a parser on an idle machine.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# How long a test waits for something to converge (a route to appear, a
# daemon to be ready) before it fails. Generous on purpose: waits return as
# soon as the condition holds, so this only matters on a failure, and a
# loaded 2-vCPU machine can be many times slower than an idle one. How fast
# things converge is measured by `overlayctl lab bench/faults`, not here.
CONVERGE = 60.0

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

# Every namespace a test makes starts with this, so a last sweep at the end
# of the session can remove whatever a crashed test left behind.
SESSION_TAG = f"ovt{uuid.uuid4().hex[:6]}"


def wait_until(
    predicate: Callable[[], bool], timeout: float = CONVERGE, step: float = 0.05
) -> float:
    """Seconds until the predicate held; fails the test at the timeout."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started >= timeout:
            raise AssertionError(f"condition not met within {timeout:g} s")
        time.sleep(step)


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
        stderr=subprocess.PIPE,
    )
    try:
        # tcpdump says "listening on IFACE" once its capture is attached: only
        # then can the action's packets be seen (a fixed sleep is too short on
        # a loaded machine).
        assert tcpdump.stderr is not None
        said = b""
        deadline = time.monotonic() + CONVERGE
        while b"listening on" not in said:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([tcpdump.stderr], [], [], max(remaining, 0))
            chunk = os.read(tcpdump.stderr.fileno(), 4096) if ready else b""
            if not chunk:
                raise AssertionError(f"tcpdump did not start capturing: {said!r}")
            said += chunk
        action()
        # Fewer packets than `count` in time: the caller checks what was captured.
        with contextlib.suppress(subprocess.TimeoutExpired):
            tcpdump.wait(timeout=CONVERGE)
    finally:
        tcpdump.kill()
        tcpdump.wait()
        if tcpdump.stderr is not None:
            tcpdump.stderr.close()


def unique_name(kind: str) -> str:
    return f"{SESSION_TAG}-{kind}{uuid.uuid4().hex[:4]}"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """A private temp root per session, removed at its end, passed or failed.
    Not pytest's shared /tmp/pytest-of-USER: with retention policy "none" a
    session ending there deletes every numbered dir in it, including those of
    another test run still going on the same machine (seen: a concurrent run
    lost its tmp_path mid-test). An explicit --basetemp is left alone."""
    if config.option.basetemp is not None:
        return
    private = Path(tempfile.mkdtemp(prefix="overlayd-tests-"))
    config.option.basetemp = str(private / "t")
    config.add_cleanup(partial(shutil.rmtree, private, ignore_errors=True))


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


# Lines of each lab daemon's log attached to a failed lab test's report: the
# lab and its logs are gone once the module's fixture tears it down, and a
# failure seen once in CI must be diagnosable from the report alone.
DAEMON_LOG_LINES = 80


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if call.when == "call" and report.failed:
        from overlayd.lab.lab import Lab

        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Lab):
                for host in value.hosts():
                    with contextlib.suppress(OSError):
                        lines = value.daemon_log(host).read_text().splitlines()
                        report.sections.append(
                            (
                                f"overlayd log of h{host} (last {DAEMON_LOG_LINES} lines)",
                                "\n".join(lines[-DAEMON_LOG_LINES:]),
                            )
                        )
    return report
