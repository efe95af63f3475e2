"""Data-plane benchmark: `overlayctl lab bench`.

Paths between two simulated hosts, each in a lab of its own, all up at once
and measured in the same run, interleaved round by round with the order
rotated every round:

    underlay   host to host over the veth underlay
    routed     container to container, overlayd in host-gw mode
    overlay    container to container, overlayd's VXLAN (VTEP on the bridge)
    flannel    container to container, the kernel programmed exactly as
               flannel's vxlan backend does it (L3 flannel.<VNI> with a /32,
               route via the peer's VTEP address onlink, permanent neighbour
               and FDB entries), built with plain iproute2 by the bench

and, with `--families dual` (the default), the same four over IPv6 in the
same dual-stack labs: underlay6 (the hosts' IPv6 underlay addresses),
routed6 (host-gw's IPv6 routes via the peers' PublicIPv6), overlay6
(overlayd's IPv6 VTEP, outer IPv6 header) and flannel6 (flannel's
flannel-v6.<VNI>).

Per path and round: TCP throughput with iperf3 (congestion control named,
fixed, and checked in iperf3's own report; 1 and 2 streams, both
directions), ping RTT, and TCP request/response latency, both ends pinned
to one CPU: with sockperf (IPv4 paths only: Debian 12's sockperf 3.7 has no
IPv6) and with overlayd.lab.rr on every path. Hypervisor steal is recorded
per round. Ratios are paired: computed within a round, then summarised
(median, min, max) over rounds, which cancels most of the machine's drift
between rounds. The IPv6/IPv4 ratios pair each path with its IPv4 twin.

MTU: a dual-stack lab gives its containers underlay - 70 (the IPv6 tunnel's
overhead) for both families, an IPv4-only one underlay - 50, so the IPv4
overlay and flannel figures of a dual-stack run are not those of an
IPv4-only run (`--families v4`). The output names each path's MTU, read
from the sender's interface.

The labs run with egress "none", so that no path pays for firewall rules the
others do not have. Outputs: a Markdown table, a JSON file and an SVG chart.

`--vxlan-filter` measures something else: the cost of the VXLAN allow-list
(see `filter_bench`), on the overlay path alone.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from overlayd.lab import netns
from overlayd.lab.flannel_style import add_flannel_style_host, program_flannel_peers
from overlayd.lab.lab import Container, Lab, LabSettings, default_network_config
from overlayd.nsexec import netns_argv, ping_rtt_ms

PATHS = ("underlay", "routed", "overlay", "flannel")
# Each IPv6 path is its IPv4 twin's name with a 6.
PATHS6 = tuple(f"{p}6" for p in PATHS)
FAMILIES = ("v4", "dual")
IPERF_PORT = 5201
SOCKPERF_PORT = 11111
RR_PORT = 11112
RR_SECONDS = 2.0
METRICS = (
    ("tcp1_fwd", "TCP 1 stream, A to B", "Gbit/s"),
    ("tcp1_rev", "TCP 1 stream, B to A", "Gbit/s"),
    ("tcp2_fwd", "TCP 2 streams, A to B", "Gbit/s"),
    ("tcp2_rev", "TCP 2 streams, B to A", "Gbit/s"),
    ("ping_us", "ping RTT (avg)", "us"),
    ("rr_p50_us", "TCP req/resp p50, pinned (sockperf)", "us"),
    ("rr_py_p50_us", "TCP req/resp p50, pinned (overlayd.lab.rr)", "us"),
)
# Metrics a path cannot have: sockperf 3.7 refuses IPv6 addresses.
IPV4_ONLY_METRICS = frozenset({"rr_p50_us"})
# Paired ratios, numerator over denominator, in the groups the output shows.
RATIOS_V4 = (
    ("overlay", "routed"),
    ("overlay", "flannel"),
    ("overlay", "underlay"),
    ("routed", "underlay"),
    ("flannel", "routed"),
)
RATIOS_V6_OVER_V4 = tuple((f"{p}6", p) for p in ("overlay", "routed", "underlay", "flannel"))
RATIOS_V6 = (
    ("overlay6", "routed6"),
    ("overlay6", "flannel6"),
    ("overlay6", "underlay6"),
    ("routed6", "underlay6"),
)


def paths_for(families: str) -> tuple[str, ...]:
    """The paths a run measures: the IPv4 four, and their IPv6 twins when dual."""
    if families not in FAMILIES:
        raise ValueError(f"families: {families!r} is not one of {', '.join(FAMILIES)}")
    return PATHS + PATHS6 if families == "dual" else PATHS


def ratio_groups(families: str) -> list[tuple[str, tuple[tuple[str, str], ...]]]:
    """The paired-ratio tables of a run, titled, in output order."""
    groups: list[tuple[str, tuple[tuple[str, str], ...]]] = [("IPv4 paths", RATIOS_V4)]
    if families == "dual":
        groups += [
            ("IPv6 over IPv4, each path against its IPv4 twin", RATIOS_V6_OVER_V4),
            ("IPv6 paths", RATIOS_V6),
        ]
    return groups


def is_ipv6_path(path: str) -> bool:
    return path.endswith("6")


def metric_applies(path: str, metric: str) -> bool:
    return not (is_ipv6_path(path) and metric in IPV4_ONLY_METRICS)


@dataclass(frozen=True, slots=True)
class Endpoint:
    ns: str
    address: IPv4Address | IPv6Address
    mtu: int = 0  # of the interface it sends from; 0: not read


@dataclass
class Environment:
    labs: list[Lab] = field(default_factory=list)
    pairs: dict[str, tuple[Endpoint, Endpoint]] = field(default_factory=dict)

    def down(self) -> None:
        for lab in self.labs:
            lab.down()


def sending_mtu(ns: str, dst: IPv4Address | IPv6Address) -> int:
    """The MTU of the interface `ns` sends to `dst` from (its route's device)."""
    route = netns.ip(ns, "-o", f"-{dst.version}", "route", "get", str(dst)).split()
    device = route[route.index("dev") + 1]
    link = netns.ip(ns, "-o", "link", "show", "dev", device).split()
    return int(link[link.index("mtu") + 1])


def _pair(
    ns_a: str, a: IPv4Address | IPv6Address, ns_b: str, b: IPv4Address | IPv6Address
) -> tuple[Endpoint, Endpoint]:
    return (Endpoint(ns_a, a, sending_mtu(ns_a, b)), Endpoint(ns_b, b, sending_mtu(ns_b, a)))


def _endpoint(c: Container) -> Endpoint:
    return Endpoint(c.ns, c.address)


def _containers(lab: Lab) -> tuple[Container, Container]:
    a, b = (next(c for c in lab.containers() if c.host == h) for h in (1, 2))
    return a, b


def _add_container_pairs(
    env: Environment, path: str, a: Container, b: Container, dual: bool
) -> None:
    env.pairs[path] = _pair(a.ns, a.address, b.ns, b.address)
    if dual:
        if a.address6 is None or b.address6 is None:
            raise RuntimeError(f"{path}: a container has no IPv6 address in a dual-stack lab")
        env.pairs[f"{path}6"] = _pair(a.ns, a.address6, b.ns, b.address6)


def build(name: str, families: str = "v4") -> Environment:
    dual = families == "dual"
    paths_for(families)  # refuses an unknown value before anything is built
    env = Environment()
    try:
        plain = LabSettings(egress="none")
        vx = Lab(f"{name}v")
        env.labs.append(vx)
        vx.down()
        vx.up(2, config=default_network_config(ipv6=dual), settings=plain)
        _add_container_pairs(env, "overlay", *_containers(vx), dual)
        h1, h2 = vx.host_ns(1), vx.host_ns(2)
        env.pairs["underlay"] = _pair(h1, vx.host_address(1), h2, vx.host_address(2))
        if dual:
            env.pairs["underlay6"] = _pair(h1, vx.host_address6(1), h2, vx.host_address6(2))
        gw = Lab(f"{name}r")
        env.labs.append(gw)
        gw.down()
        gw.up(2, config=default_network_config(backend="host-gw", ipv6=dual), settings=plain)
        _add_container_pairs(env, "routed", *_containers(gw), dual)
        fl = Lab(f"{name}f")
        env.labs.append(fl)
        fl.down()
        fl.up(0, config=default_network_config(ipv6=dual), settings=plain)
        a = add_flannel_style_host(fl, 1)
        b = add_flannel_style_host(fl, 2)
        program_flannel_peers(fl, 1)  # host 1 learns host 2, which leased after it
        _add_container_pairs(env, "flannel", a, b, dual)
        _servers(*(end for pair in env.pairs.values() for end in pair))
        return env
    except BaseException:
        env.down()
        raise


def _servers(*ends: Endpoint) -> None:
    """iperf3 (both families), overlayd.lab.rr (both families) and sockperf
    (IPv4, bound to the address) servers at every end; once per namespace,
    or per address for sockperf. They live in the lab's namespaces, so `lab
    down` ends them."""
    started: set[str] = set()
    argvs: list[list[str]] = []
    for end in ends:
        if end.address.version == 4:
            sockperf = ["sockperf", "sr", "--tcp", "-i", str(end.address), "-p", str(SOCKPERF_PORT)]
            argvs.append(netns_argv(end.ns, "taskset", "-c", "0", *sockperf))
        if end.ns not in started:
            started.add(end.ns)
            argvs.append(netns_argv(end.ns, "iperf3", "-s", "-p", str(IPERF_PORT)))
            rr = netns.module_argv(end.ns, "overlayd.lab.rr", "serve", str(RR_PORT))
            argvs.append(["taskset", "-c", "0", *rr])
    for argv in dict.fromkeys(tuple(a) for a in argvs):  # an address in two paths: once
        subprocess.Popen(
            list(argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    time.sleep(1.0)


def _iperf(
    src: Endpoint, dst: Endpoint, *, streams: int, reverse: bool, seconds: float, congestion: str
) -> float:
    argv = [
        "iperf3",
        "-c",
        str(dst.address),
        "-p",
        str(IPERF_PORT),
        "-t",
        f"{seconds:g}",
        "-C",
        congestion,
        "-P",
        str(streams),
        "-J",
        "-O",
        "0.5",
    ]
    if reverse:
        argv.append("-R")
    out = netns.in_ns(src.ns, *argv, check=False, timeout=seconds + 30)
    result = json.loads(out)
    if "error" in result:
        raise RuntimeError(f"iperf3 {src.ns} -> {dst.address}: {result['error']}")
    end = result["end"]
    # "Fixed" means the sender used it: iperf3 reports what the kernel gave.
    used = end.get("sender_tcp_congestion")
    if used is not None and used != congestion:
        raise RuntimeError(
            f"iperf3 {src.ns} -> {dst.address}: sender used {used}, not {congestion}"
        )
    return float(end["sum_received"]["bits_per_second"]) / 1e9


def _ping_us(src: Endpoint, dst: Endpoint) -> float:
    out = netns.in_ns(src.ns, "ping", "-n", "-q", "-c", "50", "-i", "0.01", str(dst.address))
    rtt = ping_rtt_ms(out)
    if rtt is None:
        raise RuntimeError(f"ping {src.ns} -> {dst.address}: no reply")
    return rtt * 1000


def _rr_p50_us(src: Endpoint, dst: Endpoint, seconds: float) -> float:
    out = netns.in_ns(
        src.ns,
        "taskset",
        "-c",
        "0",
        "sockperf",
        "pp",
        "--tcp",
        "-i",
        str(dst.address),
        "-p",
        str(SOCKPERF_PORT),
        "-t",
        f"{seconds:g}",
        timeout=seconds + 30,
    )
    for line in out.splitlines():
        if "percentile 50.000" in line:
            return float(line.split("=")[1])
    raise RuntimeError(f"sockperf printed no median: {out[-300:]}")


def _rr_py_p50_us(src: Endpoint, dst: Endpoint, seconds: float) -> float:
    argv = netns.module_argv(
        src.ns, "overlayd.lab.rr", "ping", str(dst.address), str(RR_PORT), f"{seconds:g}"
    )
    out = netns.sh(["taskset", "-c", "0", *argv], timeout=seconds + 30)
    return float(out.split()[0])


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[7]  # total, steal


def congestion_control() -> str:
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def rotated(paths: Sequence[str], round_no: int) -> tuple[str, ...]:
    """The order of round `round_no`: `paths` rotated by the round's number,
    so that every path takes every place in turn."""
    k = round_no % len(paths)
    return tuple(paths[k:]) + tuple(paths[:k])


def run_rounds(
    env: Environment,
    rounds: int,
    seconds: float,
    congestion: str,
    progress: Callable[[str], None],
    paths: Sequence[str] = PATHS,
) -> dict[str, object]:
    samples: dict[str, dict[str, list[float]]] = {p: {m: [] for m, _, _ in METRICS} for p in paths}
    steal: list[float] = []
    for round_no in range(rounds):
        order = rotated(paths, round_no)
        total0, steal0 = _cpu_times()
        for path in order:
            a, b = env.pairs[path]
            got = samples[path]
            got["tcp1_fwd"].append(
                _iperf(a, b, streams=1, reverse=False, seconds=seconds, congestion=congestion)
            )
            got["tcp1_rev"].append(
                _iperf(a, b, streams=1, reverse=True, seconds=seconds, congestion=congestion)
            )
            got["tcp2_fwd"].append(
                _iperf(a, b, streams=2, reverse=False, seconds=seconds, congestion=congestion)
            )
            got["tcp2_rev"].append(
                _iperf(a, b, streams=2, reverse=True, seconds=seconds, congestion=congestion)
            )
            got["ping_us"].append(_ping_us(a, b))
            if metric_applies(path, "rr_p50_us"):
                got["rr_p50_us"].append(_rr_p50_us(a, b, RR_SECONDS))
            got["rr_py_p50_us"].append(_rr_py_p50_us(a, b, RR_SECONDS))
        total1, steal1 = _cpu_times()
        steal.append(100.0 * (steal1 - steal0) / max(1, total1 - total0))
        tcp1 = ", ".join(f"{p} {samples[p]['tcp1_fwd'][-1]:.2f}" for p in paths)
        progress(
            f"round {round_no + 1}/{rounds} done (order {', '.join(order)},"
            f" steal {steal[-1]:.1f} %); TCP 1 stream A to B, Gbit/s: {tcp1}"
        )
    return {"samples": samples, "steal_pct": steal}


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rounds_for_5pct(ratios: list[float]) -> float:
    """Rounds needed for a 95 % interval of +-5 % on the mean paired ratio."""
    if len(ratios) < 2:
        return float("nan")
    mean = statistics.mean(ratios)
    return float((1.96 * statistics.stdev(ratios) / (0.05 * mean)) ** 2)


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    """Round by round num/den, summarised over rounds (median, min, max and
    the rounds a 5 % resolution would need); all NaN when a side has no
    samples (a metric one of the paths cannot have)."""
    if not num or not den:
        return {**_summary([]), "rounds_for_5pct": math.nan}
    paired = [x / y for x, y in zip(num, den, strict=True)]
    return {**_summary(paired), "rounds_for_5pct": rounds_for_5pct(paired)}


def summarise(raw: dict[str, object], families: str = "v4") -> dict[str, object]:
    samples: dict[str, dict[str, list[float]]] = raw["samples"]  # type: ignore[assignment]
    paths: dict[str, object] = {
        path: {m: _summary(samples[path][m]) for m, _, _ in METRICS} for path in paths_for(families)
    }
    ratios: dict[str, object] = {}
    for _, group in ratio_groups(families):
        for num, den in group:
            ratios[f"{num}/{den}"] = {
                metric: paired_ratio(samples[num][metric], samples[den][metric])
                for metric, _, _ in METRICS
            }
    return {"paths": paths, "ratios": ratios}


def _cell(s: dict[str, float], digits: int) -> str:
    if math.isnan(s["median"]):
        return "n/a"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f} to {s['max']:.{digits}f})"


def mtu_note(mtus: dict[str, int]) -> str:
    """What the MTUs mean for the figures: said when the run is dual-stack,
    where the IPv4 overlay paths carry the IPv6 tunnel's smaller MTU."""
    if "overlay6" not in mtus:
        return (
            "IPv4-only labs: the containers' MTU is the underlay's less 50 on the VXLAN"
            " paths (overlay, flannel)."
        )
    return (
        f"Dual-stack labs: the containers' MTU is {mtus['overlay']} for both families on"
        f" the VXLAN paths (the underlay's {mtus['underlay']} less 70, the IPv6 tunnel's"
        " overhead), so the IPv4 overlay and flannel figures here are for a smaller MTU"
        " than an IPv4-only lab's (underlay less 50: `--families v4`)."
    )


def _ratio_tables(title: str, ratios: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = [
        "",
        f"Paired ratios (within a round), {title}, median (min to max):",
        "",
        "| metric | " + " | ".join(ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for metric, label, _ in METRICS:
        cells = [_cell(r[metric], 2) for r in ratios.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Rounds needed to resolve a 5 % difference ({title}; 95 % interval of +-5 % on"
        " the mean paired ratio), from this run's spread:",
        "",
        "| metric | " + " | ".join(ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for metric, label, _ in METRICS:
        cells = [
            "n/a" if math.isnan(n := r[metric]["rounds_for_5pct"]) else f"{n:.0f}"
            for r in ratios.values()
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict[str, object], meta: dict[str, object]) -> str:
    paths: dict[str, dict[str, dict[str, float]]] = summary["paths"]  # type: ignore[assignment]
    ratios: dict[str, dict[str, dict[str, float]]] = summary["ratios"]  # type: ignore[assignment]
    families = str(meta.get("families", "v4"))
    mtus: dict[str, int] = meta.get("mtu", {})  # type: ignore[assignment]
    names = list(paths)
    lines = [
        f"Data plane, {meta['date']}, {meta['machine']}, congestion control"
        f" {meta['congestion']}, {meta['rounds']} rounds of {meta['seconds']:g} s per iperf3"
        f" test, hypervisor steal {meta['steal']}. Median (min to max) over rounds.",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    if mtus:
        lines.append(
            "| MTU (sender's interface) | " + " | ".join(str(mtus[p]) for p in names) + " |"
        )
    for metric, label, unit in METRICS:
        digits = 2 if unit == "Gbit/s" else 0
        cells = [_cell(paths[path][metric], digits) for path in names]
        lines.append(f"| {label} ({unit}) | " + " | ".join(cells) + " |")
    if mtus:
        lines += ["", mtu_note(mtus)]
    if families == "dual":
        lines += [
            "",
            "sockperf 3.7 has no IPv6 (n/a on the IPv6 paths); overlayd.lab.rr measures"
            " every path the same way, its interpreter's time per message included.",
        ]
    for title, group in ratio_groups(families):
        wanted = {f"{n}/{d}" for n, d in group}
        lines += _ratio_tables(title, {k: v for k, v in ratios.items() if k in wanted})
    return "\n".join(lines) + "\n"


COLOURS = {
    "underlay": "#7f7f7f",
    "routed": "#1f77b4",
    "overlay": "#d62728",
    "flannel": "#ff7f0e",
    "underlay6": "#c7c7c7",
    "routed6": "#aec7e8",
    "overlay6": "#ff9896",
    "flannel6": "#ffbb78",
}


def svg_chart(summary: dict[str, object], title: str) -> str:
    """Bars with min-max whiskers, one panel per metric. Hand-written SVG: a
    plotting library would be a large dependency for a few rectangles."""
    paths: dict[str, dict[str, dict[str, float]]] = summary["paths"]  # type: ignore[assignment]
    names = list(paths)
    bar_w = 36 if len(names) <= 4 else 22
    gap = 16 if len(names) <= 4 else 6
    panel_w = max(240, 40 + len(names) * (bar_w + gap))
    panel_h, top = 220, 50
    rows = math.ceil(len(METRICS) / 3)
    width = panel_w * 3 + 20
    height = top + rows * (panel_h + 40) + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        ' font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="20" font-size="13" font-weight="bold">{title}</text>',
    ]
    for i, path in enumerate(names):
        parts.append(
            f'<rect x="{10 + i * 90}" y="30" width="10" height="10"'
            f' fill="{COLOURS[path]}"/><text x="{24 + i * 90}" y="39">{path}</text>'
        )
    for index, (metric, label, unit) in enumerate(METRICS):
        px = 10 + (index % 3) * panel_w
        py = top + (index // 3) * (panel_h + 40)
        measured = [paths[p][metric] for p in names if not math.isnan(paths[p][metric]["max"])]
        peak = max((s["max"] for s in measured), default=1.0) or 1.0
        base = py + panel_h
        parts.append(f'<text x="{px}" y="{py + 12}" font-weight="bold">{label} ({unit})</text>')
        parts.append(
            f'<line x1="{px + 10}" y1="{base}" x2="{px + panel_w - 20}" y2="{base}"'
            ' stroke="black"/>'
        )
        for j, path in enumerate(names):
            s = paths[path][metric]
            if math.isnan(s["median"]):
                continue
            scale = (panel_h - 40) / peak
            x = px + 20 + j * (bar_w + gap)
            h = s["median"] * scale
            parts.append(
                f'<rect x="{x}" y="{base - h:.1f}" width="{bar_w}" height="{h:.1f}"'
                f' fill="{COLOURS[path]}"/>'
            )
            cx = x + bar_w / 2
            y_min, y_max = base - s["min"] * scale, base - s["max"] * scale
            parts.append(
                f'<line x1="{cx}" y1="{y_min:.1f}" x2="{cx}" y2="{y_max:.1f}" stroke="black"/>'
            )
            for y in (y_min, y_max):
                parts.append(
                    f'<line x1="{cx - 6}" y1="{y:.1f}" x2="{cx + 6}" y2="{y:.1f}" stroke="black"/>'
                )
            value = f"{s['median']:.2f}" if unit == "Gbit/s" else f"{s['median']:.0f}"
            parts.append(f'<text x="{cx}" y="{y_max - 4:.1f}" text-anchor="middle">{value}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def check_congestion(congestion: str) -> None:
    """The congestion control must be one the kernel has: iperf3 would
    otherwise fail on the first test, after the labs are built."""
    available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    if congestion not in available:
        raise RuntimeError(
            f"congestion control {congestion!r} is not available here ({' '.join(available)})"
        )


def bench(
    name: str,
    rounds: int,
    seconds: float,
    congestion: str,
    out_dir: Path,
    progress: Callable[[str], None],
    families: str = "v4",
) -> Iterator[str]:
    paths = paths_for(families)
    check_congestion(congestion)
    env = build(name, families)
    try:
        progress(
            "labs up: "
            + ", ".join(
                f"{p} {a.address} -> {b.address} (MTU {a.mtu})" for p, (a, b) in env.pairs.items()
            )
        )
        raw = run_rounds(env, rounds, seconds, congestion, progress, paths)
    finally:
        env.down()
    summary = summarise(raw, families)
    steal: list[float] = raw["steal_pct"]  # type: ignore[assignment]
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {_nproc()} vCPUs, kernel {platform.release()}",
        "congestion": congestion,
        "rounds": rounds,
        "seconds": seconds,
        "steal": f"{min(steal):.1f} to {max(steal):.1f} % per round",
        "families": families,
        "mtu": {p: env.pairs[p][0].mtu for p in paths},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(summary, meta)
    (out_dir / "bench.md").write_text(table)
    (out_dir / "bench.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "raw": raw}, indent=1)
    )
    title = (
        f"overlayd data plane, {meta['date']}, {congestion}, {rounds} rounds"
        " (bars: median, whiskers: min-max)"
    )
    (out_dir / "bench.svg").write_text(svg_chart(summary, title))
    yield table
    yield f"written: {out_dir / 'bench.md'}, {out_dir / 'bench.json'}, {out_dir / 'bench.svg'}"


def _nproc() -> int:
    return int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or 0)


# --- the VXLAN allow-list's cost: `overlayctl lab bench --vxlan-filter` -------

FILTER_MODES = ("on", "off")
FILTER_METRICS = (
    ("tcp1_fwd", "TCP 1 stream, A to B", "Gbit/s"),
    ("ping_us", "ping RTT (avg)", "us"),
)


def _set_filter(lab: Lab, mode: str) -> None:
    """Restart both daemons with vxlan-filter=`mode` (the data plane stays
    up meanwhile) and check that the rule is there, or not."""
    from overlayd.lab import hosts

    for host in lab.hosts():
        readies = hosts.ready_count(lab.files(host))
        lab.stop_daemon(host)
        lab.start_daemon(host, "--vxlan-filter", mode)
        hosts.wait_ready_again(host, lab.files(host), readies, partial(lab.daemon_running, host))
    for host in lab.hosts():
        listing = netns.in_ns(lab.host_ns(host), "nft", "list", "ruleset")
        if ("chain vxlan_in" in listing) != (mode == "on"):
            raise RuntimeError(f"h{host}: vxlan-filter={mode} but the ruleset says otherwise")


def mode_rows(
    samples: Mapping[str, Mapping[str, list[float]]],
    modes: tuple[str, str],
    metrics: Sequence[tuple[str, str, str]],
) -> tuple[list[str], dict[str, object]]:
    """A Markdown table of two modes measured in the same rounds: each
    mode's median (min to max), and the first over the second paired within
    each round (median, min to max, mean +- stdev, and the rounds a 5 %
    resolution would need); and the same as data, per metric."""
    num, den = modes
    lines = [
        f"| metric | {num}, median (min to max) | {den}, median (min to max) |"
        f" {num}/{den} paired: median (min to max) | mean +- stdev | rounds for +-5 % |",
        "|---|---|---|---|---|---|",
    ]
    summary: dict[str, object] = {}
    for metric, label, unit in metrics:
        first, second = samples[num][metric], samples[den][metric]
        paired = [x / y for x, y in zip(first, second, strict=True)]
        digits = 2 if unit == "Gbit/s" else 0
        cells = [
            f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f} to {max(v):.{digits}f})"
            for v in (first, second)
        ]
        spread = statistics.stdev(paired) if len(paired) > 1 else float("nan")
        lines.append(
            f"| {label} ({unit}) | {cells[0]} | {cells[1]} | {statistics.median(paired):.3f}"
            f" ({min(paired):.3f} to {max(paired):.3f}) | {statistics.mean(paired):.3f} +-"
            f" {spread:.3f} | {rounds_for_5pct(paired):.0f} |"
        )
        summary[metric] = {num: first, den: second, "paired": paired, **_summary(paired)}
    return lines, summary


def filter_bench(
    name: str,
    rounds: int,
    seconds: float,
    congestion: str,
    out_dir: Path,
    progress: Callable[[str], None],
) -> Iterator[str]:
    """The overlay path with the allow-list on and off: one lab (egress none,
    so that only the filter differs), modes alternated within each round
    and the order swapped every round; the daemons restart with the other
    setting between modes. Ratios on/off are paired within a round."""
    lab = Lab(f"{name}v")
    lab.down()
    samples: dict[str, dict[str, list[float]]] = {
        mode: {m: [] for m, _, _ in FILTER_METRICS} for mode in FILTER_MODES
    }
    steal: list[float] = []
    try:
        lab.up(2, settings=LabSettings(egress="none"))
        a, b = (_endpoint(next(c for c in lab.containers() if c.host == h)) for h in (1, 2))
        _servers(a, b)
        current = "on"
        for round_no in range(rounds):
            order = FILTER_MODES if round_no % 2 == 0 else FILTER_MODES[::-1]
            total0, steal0 = _cpu_times()
            for mode in order:
                if mode != current:
                    _set_filter(lab, mode)
                    current = mode
                got = samples[mode]
                got["tcp1_fwd"].append(
                    _iperf(a, b, streams=1, reverse=False, seconds=seconds, congestion=congestion)
                )
                got["ping_us"].append(_ping_us(a, b))
            total1, steal1 = _cpu_times()
            steal.append(100.0 * (steal1 - steal0) / max(1, total1 - total0))
            progress(
                f"round {round_no + 1}/{rounds} ({', '.join(order)}):"
                f" on {samples['on']['tcp1_fwd'][-1]:.2f} / off"
                f" {samples['off']['tcp1_fwd'][-1]:.2f} Gbit/s, ping on"
                f" {samples['on']['ping_us'][-1]:.0f} / off {samples['off']['ping_us'][-1]:.0f} us,"
                f" steal {steal[-1]:.1f} %"
            )
    finally:
        lab.down()
    rows, summary = mode_rows(samples, FILTER_MODES, FILTER_METRICS)
    lines = [
        f"VXLAN allow-list on vs off, {time.strftime('%Y-%m-%d')}, {platform.machine()},"
        f" {_nproc()} vCPUs, kernel {platform.release()}, congestion control {congestion},"
        f" {rounds} rounds of {seconds:g} s iperf3 (modes interleaved, order swapped every"
        f" round), hypervisor steal {min(steal):.1f} to {max(steal):.1f} % per round.",
        "",
        *rows,
    ]
    table = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-vxlan-filter.md").write_text(table)
    (out_dir / "bench-vxlan-filter.json").write_text(
        json.dumps({"congestion": congestion, "rounds": rounds, "steal_pct": steal, **summary})
    )
    yield table
    yield f"written: {out_dir / 'bench-vxlan-filter.md'}, {out_dir / 'bench-vxlan-filter.json'}"
