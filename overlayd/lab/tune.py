"""Tuning check: `overlayctl lab tune`. For each kernel setting overlayd
controls, the overlay path with overlayd's choice against the other choice,
measured in paired, alternating runs on the same two hosts.

The daemons are stopped while the variants are applied (the data plane
stays, and a running daemon would put its own settings back within a
second); every variant is undone before the next one.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from overlayd.lab import netns
from overlayd.lab.bench import Endpoint, _iperf, _ping_us, _servers
from overlayd.lab.lab import Lab, LabSettings


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    overlayd_choice: str
    apply: Callable[[Lab], None]
    undo: Callable[[Lab], None]


def _on_hosts(lab: Lab, *argv: str) -> None:
    for host in lab.hosts():
        netns.in_ns(lab.host_ns(host), *argv)


def _variants() -> list[Variant]:
    def both(*argv: str) -> Callable[[Lab], None]:
        return lambda lab: _on_hosts(lab, *argv)

    return [
        Variant(
            "GRO off on the underlay",
            "kernel default (on)",
            both("ethtool", "-K", "eth0", "gro", "off"),
            both("ethtool", "-K", "eth0", "gro", "on"),
        ),
        Variant(
            "ICMP redirects on the bridge",
            "off",
            both(
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.conf.ovl0.send_redirects=1",
                "net.ipv4.conf.all.send_redirects=1",
            ),
            both(
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.conf.ovl0.send_redirects=0",
                "net.ipv4.conf.all.send_redirects=0",
            ),
        ),
        Variant(
            "learning and flooding on the VTEP port",
            "off",
            both("bridge", "link", "set", "dev", "ovl.1", "learning", "on", "flood", "on"),
            both("bridge", "link", "set", "dev", "ovl.1", "learning", "off", "flood", "off"),
        ),
        Variant(
            "MTU 1400 instead of 1450",
            "underlay - 50",
            lambda lab: _mtu(lab, 1400),
            lambda lab: _mtu(lab, 1450),
        ),
        Variant(
            "tx checksum offload off on the VTEP",
            "on",
            both("ethtool", "-K", "ovl.1", "tx", "off"),
            both("ethtool", "-K", "ovl.1", "tx", "on"),
        ),
    ]


def _mtu(lab: Lab, mtu: int) -> None:
    for host in lab.hosts():
        ns = lab.host_ns(host)
        for dev in ("ovl.1", "ovl0"):
            netns.ip(ns, "link", "set", dev, "mtu", str(mtu))
        for c in (c for c in lab.containers() if c.host == host):
            netns.ip(c.ns, "link", "set", "eth0", "mtu", str(mtu))
            netns.ip(ns, "link", "set", netns.host_side_veth(c.ns), "mtu", str(mtu))


@dataclass(frozen=True, slots=True)
class Outcome:
    name: str
    overlayd_choice: str
    throughput_ratio: tuple[float, ...]  # variant / overlayd's choice, per pair of runs
    rtt_ratio: tuple[float, ...]

    def row(self) -> str:
        def cell(values: tuple[float, ...]) -> str:
            return f"{statistics.median(values):.2f} ({min(values):.2f} to {max(values):.2f})"

        return (
            f"| {self.name} | {self.overlayd_choice} | {cell(self.throughput_ratio)}"
            f" | {cell(self.rtt_ratio)} |"
        )


HEADER = (
    "| variant | overlayd's choice | TCP 1 stream, variant / overlayd | ping RTT,"
    " variant / overlayd |\n|---|---|---|---|"
)


def tune(name: str, pairs: int, seconds: float, congestion: str) -> Iterator[str]:
    lab = Lab(name)
    lab.down()
    try:
        lab.up(2, settings=LabSettings(egress="none"))
        a, b = (next(c for c in lab.containers() if c.host == h) for h in (1, 2))
        src, dst = Endpoint(a.ns, a.address), Endpoint(b.ns, b.address)
        for host in lab.hosts():
            lab.stop_daemon(host)
        _servers(src, dst)

        def measure() -> tuple[float, float]:
            return (
                _iperf(src, dst, streams=1, reverse=False, seconds=seconds, congestion=congestion),
                _ping_us(src, dst),
            )

        yield HEADER
        for variant in _variants():
            throughput, rtt = [], []
            for pair in range(pairs):
                # Alternate which goes first, so that drift does not favour one.
                if pair % 2 == 0:
                    base = measure()
                    variant.apply(lab)
                    other = measure()
                    variant.undo(lab)
                else:
                    variant.apply(lab)
                    other = measure()
                    variant.undo(lab)
                    base = measure()
                throughput.append(other[0] / base[0])
                rtt.append(other[1] / base[1])
            yield Outcome(
                variant.name, variant.overlayd_choice, tuple(throughput), tuple(rtt)
            ).row()
    finally:
        lab.down()
