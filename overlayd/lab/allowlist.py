"""The VXLAN allow-list in the lab: sending hand-made VXLAN datagrams from
inside a lab namespace, reading a host's allow-list set and drop counter,
and the figure `overlayctl lab allowlist`: how long after a peer's lease is
deleted its address leaves the other hosts' set (from then on its frames
are dropped).

Datagrams are sent through an ordinary UDP socket in the sender's
namespace (the kernel writes the outer IP and UDP headers, so the outer
source is the sender's own address); the VXLAN header and the inner frame
are the payload, as bytes.
"""

from __future__ import annotations

import json
import math
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from overlayd.lab import hosts, netns
from overlayd.lab.lab import Lab, LabSettings
from overlayd.nsexec import netns_argv
from overlayd.plan.vxlan_filter import COUNTER, SET
from overlayd.store.etcd import EtcdStore

VXLAN_FLAG_VNI = 0x08  # the I flag: "the VNI field is valid"

_SENDER = """
import json, socket, sys
spec = json.load(sys.stdin)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
if spec["source"]:
    s.bind((spec["source"], 0))
for payload in spec["payloads"]:
    s.sendto(bytes.fromhex(payload), (spec["dst"], spec["port"]))
"""


def vxlan_header(vni: int, flags: int = VXLAN_FLAG_VNI) -> bytes:
    """RFC 7348: flags (8 bits), 24 reserved, VNI (24 bits), 8 reserved."""
    return struct.pack("!B3xI", flags, vni << 8)


def send_datagrams(
    ns: str, dst: str, port: int, payloads: Sequence[bytes], *, source: str | None = None
) -> None:
    """UDP datagrams from `ns` (bound to `source` if given) to dst:port."""
    spec = {"dst": dst, "port": port, "source": source, "payloads": [p.hex() for p in payloads]}
    subprocess.run(
        netns_argv(ns, sys.executable, "-c", _SENDER),
        input=json.dumps(spec).encode(),
        check=True,
        capture_output=True,
        timeout=60,
    )


def allowed(ns: str) -> set[str] | None:
    """The host's allow-list set; None when it does not exist."""
    out = netns.in_ns(ns, "nft", "-j", "list", "set", "ip", "overlayd", SET, check=False)
    if not out:
        return None
    items = json.loads(out)["nftables"]
    return {str(e) for item in items if "set" in item for e in item["set"].get("elem", [])}


def dropped(ns: str) -> int:
    """The host's drop counter (packets)."""
    out = netns.in_ns(ns, "nft", "-j", "list", "counter", "ip", "overlayd", COUNTER)
    items = json.loads(out)["nftables"]
    return int(next(item["counter"]["packets"] for item in items if "counter" in item))


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class LeaveFigures:
    seconds: tuple[float, ...]  # lease deleted -> address out of the other host's set
    probes_sent: int
    probes_dropped: int  # counted by the other host's filter after the address left

    def lines(self) -> list[str]:
        s = self.seconds
        return [
            f"lease deleted -> address out of the peer's allow-list (n={len(s)}):"
            f" p50 {percentile(s, 50) * 1000:.0f} ms, p99 {percentile(s, 99) * 1000:.0f} ms,"
            f" min {min(s) * 1000:.0f} ms, max {max(s) * 1000:.0f} ms,"
            f" mean {statistics.mean(s) * 1000:.0f} ms",
            f"VXLAN probes from the departed address afterwards: {self.probes_sent} sent,"
            f" {self.probes_dropped} counted as dropped",
        ]


def time_leave_to_drop(
    name: str, runs: int, progress: Callable[[str], None] = lambda line: None
) -> LeaveFigures:
    """Two hosts. Per run: h2's daemon stops, its lease is deleted in etcd,
    and h1's set is polled (every few ms, from inside h1's namespace) until
    h2's address is gone; then probes with the right VNI are sent from h2's
    address and h1's drop counter must count them. h2's daemon then starts
    again and takes its lease back before the next run."""
    lab = Lab(name)
    lab.down()
    samples: list[float] = []
    sent = counted = 0
    try:
        lab.up(2, settings=LabSettings(egress="none", containers_per_host=0))
        h1, h2 = lab.host_ns(1), lab.host_ns(2)
        source = str(lab.host_address(2))
        config_port, vni = 8472, 1
        for run in range(runs):
            _wait(lambda: source in (allowed(h1) or set()), "h2 back in h1's set")
            lab.stop_daemon(2)
            poller = _poll_until_gone(h1, source)
            try:
                started = lab.etcd(partial(_delete_timed, lab.lease_key(2)))
                assert poller.stdout is not None
                line = poller.stdout.readline()
                poller.wait(timeout=30)
            finally:
                poller.kill()
                poller.wait()
            if not line.strip():
                raise RuntimeError(f"run {run + 1}: h2 never left h1's set")
            # The poller prints the moment (monotonic, same clock) it saw the set without h2.
            samples.append(float(line) - started)
            before = dropped(h1)
            probes = [vxlan_header(vni) + bytes(64)] * 5
            send_datagrams(h2, str(lab.host_address(1)), config_port, probes, source=source)
            sent += len(probes)
            counted += dropped(h1) - before
            readies = hosts.ready_count(lab.files(2))
            lab.start_daemon(2)
            hosts.wait_ready_again(2, lab.files(2), readies, lambda: lab.daemon_running(2))
            progress(f"run {run + 1}/{runs}: {samples[-1] * 1000:.0f} ms")
    finally:
        lab.down()
    return LeaveFigures(tuple(samples), sent, counted)


_POLLER = """
import json, subprocess, sys, time
address, told = sys.argv[1], False
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    out = subprocess.run(["nft", "-j", "list", "set", "ip", "overlayd", "@SET@"],
                         capture_output=True, text=True).stdout
    items = json.loads(out)["nftables"] if out else []
    elems = {str(e) for i in items if "set" in i for e in i["set"].get("elem", [])}
    if address not in elems:
        print(time.monotonic() if told else "absent before", flush=True)
        break
    if not told:
        print("polling", flush=True)
        told = True
""".replace("@SET@", SET)


def _poll_until_gone(ns: str, address: str) -> subprocess.Popen[str]:
    """A poller in `ns` that prints CLOCK_MONOTONIC when `address` has left
    the set (the clock is the machine's, shared by every namespace). It has
    seen the address in the set once when this returns."""
    proc = subprocess.Popen(
        netns_argv(ns, sys.executable, "-c", _POLLER, address),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    if first != "polling":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the poller in {ns} did not see {address} in the set: {first!r}")
    return proc


async def _delete_timed(key: str, store: EtcdStore) -> float:
    """Delete `key`; the moment just before the request (the channel is
    already open, so connecting is not counted)."""
    await store.get(key)
    started = time.monotonic()
    if not await store.delete(key):
        raise RuntimeError(f"{key} was not in etcd")
    return started


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)
