"""The VXLAN allow-list in the lab, with real daemons and real frames.

A frame is "delivered" when its inner packet (ICMP echo or TCP SYN, with
a marker source address nobody uses) shows up on the target container's
eth0; tcpdump runs inside the container's namespace and is listening
before anything is sent. The frames carry the right VNI and port and the
target host's VtepMAC as inner destination, exactly as a peer's would, so
they are delivered unless something drops them. Every case that shows a
drop has a case in the same test that shows the same frames delivered.

The lab runs once with egress none and once with gwbridge: the filter does
not depend on the egress rules.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from overlayd.lab import hosts, netns
from overlayd.lab.allowlist import allowed, dropped, send_datagrams, vxlan_header
from overlayd.lab.lab import Container, Lab, LabSettings
from overlayd.plan.nftables import select, split_objects, table_text
from overlayd.plan.vxlan_filter import KEYS, FilterSpec, render_objects
from tests.conftest import CONVERGE, SESSION_TAG, needs_root, wait_until
from tests.lab.fakes import FIRST_FAKE_OCTET, lab_network
from tests.lab.probes import http_get

pytestmark = [needs_root, pytest.mark.lab]

VNI = 42
PORT = 8472
# How long a frame that is not dropped takes at most to reach the container
# on a loaded machine; a drop is only believed after this long.
SETTLE = 2.0
INNER_SRC_MAC = "02:00:5e:00:53:01"


@pytest.fixture(scope="module", params=["none", "gwbridge"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab(f"{SESSION_TAG}f{request.param[0]}")
    try:
        lab.up(
            2,
            config=lab_network(vni=VNI, port=PORT),
            settings=LabSettings(egress=request.param, lease_ttl=30, resync_seconds=1.0),
        )
        yield lab
    finally:
        lab.down()


# --- helpers -------------------------------------------------------------------


def target(lab: Lab) -> Container:
    return next(c for c in lab.containers() if c.host == 1)


def marker(lab: Lab) -> IPv4Address:
    """The inner source: a cluster address in a subnet no host leases (see
    tests/lab/fakes.py). Not one in h2's subnet: the container's replies
    would reach h2, which would answer them, after its lease is gone, with
    ICMP unreachables through the tunnel, and h1 would count those too."""
    return IPv4Address(f"10.244.{FIRST_FAKE_OCTET + 50}.250")


def vtep_mac(lab: Lab, host: int) -> str:
    raw = lab.leases()[lab.lease_key(host)]
    return str(json.loads(raw)["BackendData"]["VtepMAC"])


def frames(lab: Lab, *, vni: int = VNI, flags: int = 0x08) -> list[bytes]:
    """3 ICMP echo requests and 2 TCP SYNs to the container on h1, each in
    a VXLAN frame as a peer would send it."""
    from scapy.all import ICMP, IP, TCP, Ether, Raw  # type: ignore[attr-defined]

    dst = target(lab).address
    eth = Ether(dst=vtep_mac(lab, 1), src=INNER_SRC_MAC)
    ip = IP(src=str(marker(lab)), dst=str(dst))
    inner = [eth / ip / ICMP(id=0x4F56, seq=i) / Raw(b"overlayd-filter") for i in range(3)]
    inner += [eth / ip / TCP(sport=40000 + i, dport=9, flags="S") for i in range(2)]
    return [vxlan_header(vni, flags) + bytes(p) for p in inner]


def delivered(lab: Lab, action: Callable[[], None], expect: int, tmp_path: Path) -> int:
    """How many packets from the marker reach the target container while
    `action` runs: until `expect` arrived (or CONVERGE passed), or, when
    none is expected, for SETTLE seconds."""
    from scapy.all import rdpcap

    pcap = tmp_path / f"{uuid.uuid4().hex}.pcap"
    argv = ["ip", "netns", "exec", target(lab).ns, "tcpdump", "-i", "eth0", "-n", "-U"]
    argv += ["-w", str(pcap), *(["-c", str(expect)] if expect else [])]
    argv += ["src", "host", str(marker(lab))]
    tcpdump = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert tcpdump.stderr is not None
        said = b""
        while b"listening on" not in said:
            chunk = os.read(tcpdump.stderr.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"tcpdump did not start: {said!r}")
            said += chunk
        action()
        with contextlib.suppress(subprocess.TimeoutExpired):
            tcpdump.wait(timeout=CONVERGE if expect else SETTLE)
    finally:
        tcpdump.send_signal(signal.SIGINT)  # flushes what it captured
        try:
            tcpdump.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tcpdump.kill()
            tcpdump.wait()
        if tcpdump.stderr is not None:
            tcpdump.stderr.close()
    return len(rdpcap(str(pcap))) if pcap.exists() and pcap.stat().st_size > 24 else 0


def send_from(lab: Lab, ns: str, payloads: list[bytes], dst: str | None = None) -> None:
    source = None
    for host in lab.hosts():
        if ns == lab.host_ns(host):
            source = str(lab.host_address(host))
    send_datagrams(ns, dst or str(lab.host_address(1)), PORT, payloads, source=source)


def metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))


def drift_repairs(lab: Lab, host: int) -> float:
    """overlayd_drift_repaired_total{kind="nftables"}, 0 before the first."""
    name = 'overlayd_drift_repaired_total{kind="nftables"}'
    text = http_get(lab, host, "/metrics")[1]
    return metric(text, name) if name in text else 0.0


def filter_objects(lab: Lab, host: int) -> str:
    """The host's counter (name only), set (definition) and chain, as listed."""
    listing = netns.in_ns(lab.host_ns(host), "nft", "-t", "list", "table", "ip", "overlayd")
    return table_text("ip", "overlayd", select(split_objects(listing), KEYS))


def wanted_objects(lab: Lab, host: int) -> str:
    return render_objects(FilterSpec(lab.host_address(host), PORT, VNI))


def diagnose(lab: Lab, host: int) -> tuple[int, list[dict[str, Any]]]:
    argv, env = lab.ctl_command(host, ["diagnose", "--json"])
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, json.loads(proc.stdout)["findings"]


def filter_findings(findings: list[dict[str, Any]]) -> list[tuple[bool, str]]:
    return [(f["ok"], f["detail"]) for f in findings if f["check"] == "vxlan filter"]


def restart(lab: Lab, host: int, *args: str, env: dict[str, str] | None = None) -> None:
    readies = hosts.ready_count(lab.files(host))
    lab.stop_daemon(host)
    lab.start_daemon(host, *args, env=env)
    hosts.wait_ready_again(host, lab.files(host), readies, lambda: lab.daemon_running(host))


# --- tests -----------------------------------------------------------------------


def test_vxlan_from_a_non_peer_is_dropped_and_counted_and_from_a_peer_delivered(
    lab: Lab, tmp_path: Path
) -> None:
    h1, h2, outside = lab.host_ns(1), lab.host_ns(2), lab.outside_ns
    sent = frames(lab)
    assert len(sent) == 5
    assert allowed(h1) == {str(lab.host_address(2))}
    gateway = str(lab.subnet(1).network_address + 1)
    netns.ip(outside, "route", "add", str(lab.subnet(1)), "via", str(lab.host_address(1)))
    try:
        # From the outside router (192.0.2.1), on the underlay but no peer: to
        # h1's public IP, to the underlay's broadcast address, and to h1's
        # bridge address, all of which the kernel's VXLAN socket listens on.
        for dst in (str(lab.host_address(1)), "192.0.2.255", gateway):
            before = dropped(h1)
            got = delivered(lab, partial(send_from, lab, outside, sent, dst), 0, tmp_path)
            assert (dst, got, dropped(h1) - before) == (dst, 0, len(sent))
    finally:
        netns.ip(outside, "route", "del", str(lab.subnet(1)))
    # The same frames from the peer h2's own address: delivered, none counted.
    before = dropped(h1)
    assert delivered(lab, lambda: send_from(lab, h2, sent), len(sent), tmp_path) == len(sent)
    assert dropped(h1) == before
    # From the peer's address, but with another VNI: dropped and counted.
    other = frames(lab, vni=VNI + 1)
    assert delivered(lab, lambda: send_from(lab, h2, other), 0, tmp_path) == 0
    assert dropped(h1) - before == len(other)
    # The metrics say the same as the kernel.
    text = http_get(lab, 1, "/metrics")[1]
    assert metric(text, "overlayd_vxlan_dropped_packets_total") == dropped(h1)
    # One peer, one address of it per family.
    assert metric(text, "overlayd_vxlan_allowed_peers") == len(lab.families())
    print(f"\ninjection: {len(sent)} frames per case; counter now {dropped(h1)}")


def test_malformed_vxlan_from_a_peer_harms_nothing(lab: Lab, tmp_path: Path) -> None:
    from scapy.all import ICMP, IP, Ether, Raw  # type: ignore[attr-defined]

    h1, h2 = lab.host_ns(1), lab.host_ns(2)
    good = frames(lab)[0]
    inner = good[8:]
    big = bytes(
        Ether(dst=vtep_mac(lab, 1), src=INNER_SRC_MAC)
        / IP(src=str(marker(lab)), dst=str(target(lab).address), flags="DF")
        / ICMP()
        / Raw(bytes(60000))
    )
    bad = {
        "one byte": b"\x08",
        "short header": vxlan_header(VNI)[:7],
        "header only": vxlan_header(VNI),
        "truncated inner Ethernet": vxlan_header(VNI) + inner[:6],
        "I flag missing": vxlan_header(VNI, flags=0x00) + inner,
        "reserved flags set": vxlan_header(VNI, flags=0xFF) + inner,
        "reserved VNI byte set": vxlan_header(VNI)[:7] + b"\xff" + inner,
        "huge inner packet (60 kB, DF)": vxlan_header(VNI) + big,
        "60 kB of zeros": vxlan_header(VNI) + bytes(60000),
    }
    before = dropped(h1)
    got = delivered(lab, lambda: send_from(lab, h2, list(bad.values())), 0, tmp_path)
    counted = dropped(h1) - before
    assert got == 0
    # Positive control: a well-formed frame right after is delivered.
    assert delivered(lab, lambda: send_from(lab, h2, [good]), 1, tmp_path) == 1
    assert lab.daemon_running(1) and lab.daemon_running(2)
    assert http_get(lab, 1, "/healthz")[0] == 200
    assert all(r.ok for r in lab.check(timeout=CONVERGE))
    code, findings = diagnose(lab, 1)
    assert code == 0, [f for f in findings if not f["ok"]]
    print(
        f"\nmalformed from a peer: {len(bad)} sent, 0 delivered, {counted} counted by the"
        f" filter (too short to carry a VNI), {len(bad) - counted} dropped by the kernel"
    )


def test_a_set_element_or_the_rule_deleted_by_hand_is_put_back_by_the_check(lab: Lab) -> None:
    h1, peer = lab.host_ns(1), str(lab.host_address(2))
    assert filter_objects(lab, 1) == wanted_objects(lab, 1)
    drift_before = drift_repairs(lab, 1)
    netns.in_ns(h1, "nft", "delete", "element", "ip", "overlayd", "vxlan_peers", f"{{ {peer} }}")
    assert allowed(h1) == set()
    wait_until(lambda: allowed(h1) == {peer})
    count = dropped(h1)
    netns.in_ns(h1, "nft", "delete", "chain", "ip", "overlayd", "vxlan_in")
    assert "vxlan_in" not in filter_objects(lab, 1)
    wait_until(lambda: filter_objects(lab, 1) == wanted_objects(lab, 1))
    assert dropped(h1) == count  # the named counter outlived its rule
    assert drift_repairs(lab, 1) >= drift_before + 2
    assert all(r.ok for r in lab.check(timeout=CONVERGE))


def test_diagnose_fails_while_the_rule_or_an_element_is_missing(lab: Lab) -> None:
    h1, peer = lab.host_ns(1), str(lab.host_address(2))
    code, findings = diagnose(lab, 1)
    assert code == 0 and filter_findings(findings)[0][0]
    readies = hosts.ready_count(lab.files(1))
    lab.stop_daemon(1)  # the kernel stays as it was; nobody repairs it now
    try:
        netns.in_ns(h1, "nft", "delete", "chain", "ip", "overlayd", "vxlan_in")
        netns.in_ns(
            h1, "nft", "delete", "element", "ip", "overlayd", "vxlan_peers", f"{{ {peer} }}"
        )
        code, findings = diagnose(lab, 1)
        assert code == 1
        details = [detail for ok, detail in filter_findings(findings) if not ok]
        assert details == [
            "chain vxlan_in is missing from table ip overlayd: VXLAN is not filtered",
            f"{peer} (peer {lab.subnet(2)}) is not in set vxlan_peers of table ip overlayd:"
            " its VXLAN is dropped",
        ]
    finally:  # later tests share the lab
        lab.start_daemon(1)
        hosts.wait_ready_again(1, lab.files(1), readies, lambda: lab.daemon_running(1))
    wait_until(lambda: diagnose(lab, 1)[0] == 0)
    assert filter_findings(diagnose(lab, 1)[1])[0][0]


def test_vxlan_filter_off_installs_no_rule_and_says_so(lab: Lab, tmp_path: Path) -> None:
    h1, outside = lab.host_ns(1), lab.outside_ns
    sent = frames(lab)
    restart(lab, 1, "--vxlan-filter", "off")
    try:
        log = lab.daemon_log(1).read_text().split("event=stopping")[-1]
        assert "event=vxlan_filter mode=off" in log
        listing = netns.in_ns(h1, "nft", "list", "ruleset")
        assert "vxlan" not in listing
        # Without the filter, frames from the outside do reach the container.
        assert delivered(lab, lambda: send_from(lab, outside, sent), len(sent), tmp_path) == 5
        code, findings = diagnose(lab, 1)
        assert code == 0
        assert filter_findings(findings)[0][1].startswith("off (vxlan-filter=off)")
        assert all(r.ok for r in lab.check(timeout=CONVERGE))
    finally:
        restart(lab, 1)
    # Back on: the rule is there again and the same frames are dropped.
    assert filter_objects(lab, 1) == wanted_objects(lab, 1)
    wait_until(lambda: allowed(h1) == {str(lab.host_address(2))})
    before = dropped(h1)
    assert delivered(lab, lambda: send_from(lab, outside, sent), 0, tmp_path) == 0
    assert dropped(h1) - before == len(sent)


REFUSING_NFT = """#!/bin/sh
# The real nft, except that it refuses to install the VXLAN filter, as a
# kernel without the fib or raw payload support would.
real="{real}"
if [ "$1" = "-f" ]; then
    script=$(cat)
    case "$script" in
        *"vxlan_in {{"*)
            echo "Error: Could not process rule: Operation not supported" >&2
            exit 1;;
    esac
    printf '%s\\n' "$script" | exec "$real" "$@"
fi
exec "$real" "$@"
"""


def test_rules_that_cannot_be_installed_are_logged_and_readyz_and_diagnose_fail(
    lab: Lab, tmp_path: Path
) -> None:
    h1 = lab.host_ns(1)
    real = shutil.which("nft")
    assert real is not None
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nft").write_text(REFUSING_NFT.format(real=real))
    (bindir / "nft").chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/sbin:/usr/bin:/sbin:/bin"}
    readies = hosts.ready_count(lab.files(1))
    lab.stop_daemon(1)
    try:
        for what in ("chain vxlan_in", "set vxlan_peers", "counter vxlan_dropped"):
            netns.in_ns(h1, "nft", "delete", *what.split()[:1], "ip", "overlayd", what.split()[1])
        lab.start_daemon(1, env=env)
        hosts.wait_ready_again(1, lab.files(1), readies, lambda: lab.daemon_running(1))
        code, body = http_get(lab, 1, "/readyz")
        assert code == 503
        assert body.startswith("VXLAN filter not installed: nft refused the ruleset:")
        assert "event=vxlan_filter_failed" in lab.daemon_log(1).read_text()
        code, findings = diagnose(lab, 1)
        assert code == 1
        assert "chain vxlan_in is missing" in " ".join(d for _, d in filter_findings(findings))
        assert all(r.ok for r in lab.check(timeout=CONVERGE))  # the overlay still works
    finally:
        restart(lab, 1)
    # Control: with the ordinary nft the same daemon is ready and filters.
    wait_until(lambda: http_get(lab, 1, "/readyz") == (200, "ok\n"))
    assert filter_objects(lab, 1) == wanted_objects(lab, 1)


def test_a_departed_peers_frames_are_dropped_soon_after_its_lease_goes(
    lab: Lab, tmp_path: Path
) -> None:
    h1, h2 = lab.host_ns(1), lab.host_ns(2)
    peer = str(lab.host_address(2))
    sent = frames(lab)
    # Control: while h2 is a peer, its frames are delivered.
    wait_until(lambda: allowed(h1) == {peer})
    assert delivered(lab, lambda: send_from(lab, h2, sent), len(sent), tmp_path) == len(sent)
    readies = hosts.ready_count(lab.files(2))
    lab.stop_daemon(2)
    try:
        started = time.monotonic()
        lab.delete_lease(2)
        # A generous bound (a busy machine must not fail it); `overlayctl lab
        # allowlist` measures the time, milliseconds here.
        wait_until(lambda: peer not in (allowed(h1) or set()), timeout=10.0, step=0.01)
        took = (time.monotonic() - started) * 1000
        print(f"\nlease deleted -> {peer} out of h1's set: {took:.0f} ms")
        before = dropped(h1)
        assert delivered(lab, lambda: send_from(lab, h2, sent), 0, tmp_path) == 0
        assert dropped(h1) - before == len(sent)
    finally:
        # h2 comes back (same namespace, same subnet file): allowed again.
        lab.start_daemon(2)
        hosts.wait_ready_again(2, lab.files(2), readies, lambda: lab.daemon_running(2))
    wait_until(lambda: allowed(h1) == {peer})
    assert all(r.ok for r in lab.check(timeout=CONVERGE))
