"""Data-plane benchmark: `overlayctl lab bench`.

Four paths between two simulated hosts, each in a lab of its own, all up at
once and measured in the same run, interleaved round by round with the order
rotated every round:

    underlay   host to host over the veth underlay
    routed     container to container, overlayd in host-gw mode
    overlay    container to container, overlayd's VXLAN (VTEP on the bridge)
    flannel    container to container, the kernel programmed exactly as
               flannel's vxlan backend does it (L3 flannel.<VNI> with a /32,
               route via the peer's VTEP address onlink, permanent neighbour
               and FDB entries), built with plain iproute2 by the bench

Per path and round: TCP throughput with iperf3 (congestion control named and
fixed, 1 and 2 streams, both directions), ping RTT, and TCP request/response
latency with sockperf, both ends pinned to one CPU. Hypervisor steal is
recorded per round. Ratios are paired: computed within a round, then
summarised (median, min, max) over rounds, which cancels most of the
machine's drift between rounds.

The labs run with egress "none", so that no path pays for firewall rules the
others do not have. Outputs: a Markdown table, a JSON file and an SVG chart.

`--vxlan-filter` measures something else: the cost of the VXLAN allow-list
(see `filter_bench`), on the overlay path alone.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path

from overlayd.lab import netns
from overlayd.lab.flannel_style import add_flannel_style_host, program_flannel_peers
from overlayd.lab.lab import Container, Lab, LabSettings, default_network_config
from overlayd.nsexec import netns_argv, ping_rtt_ms

PATHS = ("underlay", "routed", "overlay", "flannel")
IPERF_PORT = 5201
SOCKPERF_PORT = 11111
METRICS = (
    ("tcp1_fwd", "TCP 1 stream, A to B", "Gbit/s"),
    ("tcp1_rev", "TCP 1 stream, B to A", "Gbit/s"),
    ("tcp2_fwd", "TCP 2 streams, A to B", "Gbit/s"),
    ("tcp2_rev", "TCP 2 streams, B to A", "Gbit/s"),
    ("ping_us", "ping RTT (avg)", "us"),
    ("rr_p50_us", "TCP req/resp p50, pinned", "us"),
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    ns: str
    address: IPv4Address


@dataclass
class Environment:
    labs: list[Lab] = field(default_factory=list)
    pairs: dict[str, tuple[Endpoint, Endpoint]] = field(default_factory=dict)

    def down(self) -> None:
        for lab in self.labs:
            lab.down()


def _endpoint(c: Container) -> Endpoint:
    return Endpoint(c.ns, c.address)


def build(name: str) -> Environment:
    env = Environment()
    try:
        plain = LabSettings(egress="none")
        vx = Lab(f"{name}v")
        env.labs.append(vx)
        vx.down()
        vx.up(2, settings=plain)
        a, b = (next(c for c in vx.containers() if c.host == h) for h in (1, 2))
        env.pairs["overlay"] = (_endpoint(a), _endpoint(b))
        env.pairs["underlay"] = (
            Endpoint(vx.host_ns(1), vx.host_address(1)),
            Endpoint(vx.host_ns(2), vx.host_address(2)),
        )
        gw = Lab(f"{name}r")
        env.labs.append(gw)
        gw.down()
        gw.up(2, config=default_network_config(backend="host-gw"), settings=plain)
        a, b = (next(c for c in gw.containers() if c.host == h) for h in (1, 2))
        env.pairs["routed"] = (_endpoint(a), _endpoint(b))
        fl = Lab(f"{name}f")
        env.labs.append(fl)
        fl.down()
        fl.up(0, settings=plain)
        a = add_flannel_style_host(fl, 1)
        b = add_flannel_style_host(fl, 2)
        program_flannel_peers(fl, 1)  # host 1 learns host 2, which leased after it
        env.pairs["flannel"] = (_endpoint(a), _endpoint(b))
        for path in PATHS:
            _servers(*env.pairs[path])
        return env
    except BaseException:
        env.down()
        raise


def _servers(a: Endpoint, b: Endpoint) -> None:
    """iperf3 and sockperf servers at both ends; they live in the lab's
    namespaces, so `lab down` ends them."""
    for end in (a, b):
        sockperf = ["sockperf", "sr", "--tcp", "-i", str(end.address), "-p", str(SOCKPERF_PORT)]
        for argv in (["iperf3", "-s", "-p", str(IPERF_PORT)], ["taskset", "-c", "0", *sockperf]):
            subprocess.Popen(
                netns_argv(end.ns, *argv),
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
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9


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


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[7]  # total, steal


def congestion_control() -> str:
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def run_rounds(
    env: Environment, rounds: int, seconds: float, congestion: str, progress: Callable[[str], None]
) -> dict[str, object]:
    samples: dict[str, dict[str, list[float]]] = {p: {m: [] for m, _, _ in METRICS} for p in PATHS}
    steal: list[float] = []
    for round_no in range(rounds):
        order = PATHS[round_no % len(PATHS) :] + PATHS[: round_no % len(PATHS)]
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
            got["rr_p50_us"].append(_rr_p50_us(a, b, 2.0))
        total1, steal1 = _cpu_times()
        steal.append(100.0 * (steal1 - steal0) / max(1, total1 - total0))
        progress(
            f"round {round_no + 1}/{rounds} done (order {', '.join(order)},"
            f" steal {steal[-1]:.1f} %)"
        )
    return {"samples": samples, "steal_pct": steal}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rounds_for_5pct(ratios: list[float]) -> float:
    """Rounds needed for a 95 % interval of +-5 % on the mean paired ratio."""
    if len(ratios) < 2:
        return float("nan")
    mean = statistics.mean(ratios)
    return float((1.96 * statistics.stdev(ratios) / (0.05 * mean)) ** 2)


def summarise(raw: dict[str, object]) -> dict[str, object]:
    samples: dict[str, dict[str, list[float]]] = raw["samples"]  # type: ignore[assignment]
    out: dict[str, object] = {"paths": {}, "ratios": {}}
    for path in PATHS:
        out["paths"][path] = {m: _summary(samples[path][m]) for m, _, _ in METRICS}  # type: ignore[index]
    for num, den in (
        ("overlay", "routed"),
        ("overlay", "flannel"),
        ("overlay", "underlay"),
        ("routed", "underlay"),
        ("flannel", "routed"),
    ):
        ratios = {}
        for metric, _, _ in METRICS:
            paired = [
                x / y for x, y in zip(samples[num][metric], samples[den][metric], strict=True)
            ]
            ratios[metric] = {**_summary(paired), "rounds_for_5pct": rounds_for_5pct(paired)}
        out["ratios"][f"{num}/{den}"] = ratios  # type: ignore[index]
    return out


def markdown(summary: dict[str, object], meta: dict[str, object]) -> str:
    paths: dict[str, dict[str, dict[str, float]]] = summary["paths"]  # type: ignore[assignment]
    ratios: dict[str, dict[str, dict[str, float]]] = summary["ratios"]  # type: ignore[assignment]
    lines = [
        f"Data plane, {meta['date']}, {meta['machine']}, congestion control"
        f" {meta['congestion']}, {meta['rounds']} rounds of {meta['seconds']:g} s per iperf3"
        f" test, hypervisor steal {meta['steal']}. Median (min to max) over rounds.",
        "",
        "| metric | " + " | ".join(PATHS) + " |",
        "|---|" + "---|" * len(PATHS),
    ]
    for metric, label, unit in METRICS:
        cells = []
        for path in PATHS:
            s = paths[path][metric]
            digits = 2 if unit == "Gbit/s" else 0
            cells.append(
                f"{s['median']:.{digits}f} ({s['min']:.{digits}f} to {s['max']:.{digits}f})"
            )
        lines.append(f"| {label} ({unit}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired ratios (within a round), median (min to max):",
        "",
        "| metric | " + " | ".join(ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for metric, label, _ in METRICS:
        cells = [
            f"{r[metric]['median']:.2f} ({r[metric]['min']:.2f} to {r[metric]['max']:.2f})"
            for r in ratios.values()
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Rounds needed to resolve a 5 % difference (95 % interval of +-5 % on the"
        " mean paired ratio), from this run's spread:",
        "",
        "| metric | " + " | ".join(ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for metric, label, _ in METRICS:
        cells = [f"{r[metric]['rounds_for_5pct']:.0f}" for r in ratios.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def svg_chart(summary: dict[str, object], title: str) -> str:
    """Bars with min-max whiskers, one panel per metric. Hand-written SVG: a
    plotting library would be a large dependency for a few rectangles."""
    paths: dict[str, dict[str, dict[str, float]]] = summary["paths"]  # type: ignore[assignment]
    colours = {
        "underlay": "#7f7f7f",
        "routed": "#1f77b4",
        "overlay": "#d62728",
        "flannel": "#ff7f0e",
    }
    panel_w, panel_h, top, bar_w = 240, 220, 50, 36
    width = panel_w * 3 + 20
    height = top + 2 * (panel_h + 40) + 30
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        ' font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="20" font-size="13" font-weight="bold">{title}</text>',
    ]
    for i, path in enumerate(PATHS):
        parts.append(
            f'<rect x="{10 + i * 110}" y="30" width="10" height="10"'
            f' fill="{colours[path]}"/><text x="{24 + i * 110}" y="39">{path}</text>'
        )
    for index, (metric, label, unit) in enumerate(METRICS):
        px = 10 + (index % 3) * panel_w
        py = top + (index // 3) * (panel_h + 40)
        peak = max(paths[p][metric]["max"] for p in PATHS) or 1.0
        base = py + panel_h
        parts.append(f'<text x="{px}" y="{py + 12}" font-weight="bold">{label} ({unit})</text>')
        parts.append(
            f'<line x1="{px + 10}" y1="{base}" x2="{px + panel_w - 20}" y2="{base}"'
            ' stroke="black"/>'
        )
        for j, path in enumerate(PATHS):
            s = paths[path][metric]
            scale = (panel_h - 40) / peak
            x = px + 20 + j * (bar_w + 16)
            h = s["median"] * scale
            parts.append(
                f'<rect x="{x}" y="{base - h:.1f}" width="{bar_w}" height="{h:.1f}"'
                f' fill="{colours[path]}"/>'
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


def bench(
    name: str,
    rounds: int,
    seconds: float,
    congestion: str,
    out_dir: Path,
    progress: Callable[[str], None],
) -> Iterator[str]:
    env = build(name)
    try:
        progress(
            "labs up: "
            + ", ".join(f"{p} {a.address} -> {b.address}" for p, (a, b) in env.pairs.items())
        )
        raw = run_rounds(env, rounds, seconds, congestion, progress)
    finally:
        env.down()
    summary = summarise(raw)
    steal: list[float] = raw["steal_pct"]  # type: ignore[assignment]
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {_nproc()} vCPUs, kernel {platform.release()}",
        "congestion": congestion,
        "rounds": rounds,
        "seconds": seconds,
        "steal": f"{min(steal):.1f} to {max(steal):.1f} % per round",
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
    lines = [
        f"VXLAN allow-list on vs off, {time.strftime('%Y-%m-%d')}, {platform.machine()},"
        f" {_nproc()} vCPUs, kernel {platform.release()}, congestion control {congestion},"
        f" {rounds} rounds of {seconds:g} s iperf3 (modes interleaved, order swapped every"
        f" round), hypervisor steal {min(steal):.1f} to {max(steal):.1f} % per round.",
        "",
        "| metric | on, median (min to max) | off, median (min to max) |"
        " on/off paired: median (min to max) | mean +- stdev | rounds for +-5 % |",
        "|---|---|---|---|---|---|",
    ]
    summary: dict[str, object] = {}
    for metric, label, unit in FILTER_METRICS:
        on, off = samples["on"][metric], samples["off"][metric]
        paired = [x / y for x, y in zip(on, off, strict=True)]
        digits = 2 if unit == "Gbit/s" else 0
        cells = [
            f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f} to {max(v):.{digits}f})"
            for v in (on, off)
        ]
        spread = statistics.stdev(paired) if len(paired) > 1 else float("nan")
        lines.append(
            f"| {label} ({unit}) | {cells[0]} | {cells[1]} | {statistics.median(paired):.3f}"
            f" ({min(paired):.3f} to {max(paired):.3f}) | {statistics.mean(paired):.3f} +-"
            f" {spread:.3f} | {rounds_for_5pct(paired):.0f} |"
        )
        summary[metric] = {"on": on, "off": off, "paired": paired, **_summary(paired)}
    table = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-vxlan-filter.md").write_text(table)
    (out_dir / "bench-vxlan-filter.json").write_text(
        json.dumps({"congestion": congestion, "rounds": rounds, "steal_pct": steal, **summary})
    )
    yield table
    yield f"written: {out_dir / 'bench-vxlan-filter.md'}, {out_dir / 'bench-vxlan-filter.json'}"
