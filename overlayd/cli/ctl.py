"""`overlayctl`: the operator CLI. This module holds the parser and the lab
commands (`lab up`, `check`, `add-host`, `status`, `down`, and the figure
commands `timing`, `faults`, `bench`, `tune`, `cpbench`); the commands for a
real host (status, peers, leases, diagnose, network, events, docker-opts,
leave) live in `operator.py`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path

from overlayd import __version__
from overlayd.cli import operator
from overlayd.cli.operator import table
from overlayd.config import (
    DEFAULT_EGRESS,
    DEFAULT_RESYNC_SECONDS,
    EGRESS_MODES,
)
from overlayd.errors import LeaseError, OverlaydError
from overlayd.lab.lab import (
    DEFAULT_NETWORK,
    OUTSIDE_SERVER,
    Lab,
    LabSettings,
    default_network_config,
)
from overlayd.lab.netns import LabCommandError
from overlayd.plan.leases import (
    subnet_key,
)
from overlayd.store.etcd import EtcdStore, StoreUnavailable
from overlayd.surfaces.subnetfile import read_subnet


async def _leave(endpoints: list[str], prefix: str, subnet_file: Path) -> str:
    subnet = read_subnet(subnet_file)
    if subnet is None:
        raise LeaseError(f"{subnet_file} names no subnet: this host holds no lease to release")
    key = subnet_key(prefix, subnet)
    async with EtcdStore(endpoints) as store:
        if not await store.delete(key):
            return f"{key} was not leased"
        await asyncio.sleep(2)
        if (await store.get(key))[0] is not None:
            return (
                f"released {key}, but it was leased again at once: overlayd is still"
                " running on this host; stop it first (or use `overlayd --teardown`)"
            )
    return f"released {key}; peers remove this host's entries now"


def cmd_leave(args: argparse.Namespace) -> int:
    s = operator.settings_from(args)
    outcome = asyncio.run(_leave(list(s.etcd_endpoints), s.etcd_prefix, s.subnet_file))
    print(json.dumps({"result": outcome}) if args.json else outcome)
    return 0


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabCommandError("the lab creates network namespaces: run it as root")


def _check(lab: Lab, *, timeout: float, as_json: bool) -> int:
    """All-pairs reachability across hosts, then (unless egress is off) every
    container's way out: the outside server must see its host's address."""
    started = time.monotonic()
    pings = lab.check(timeout=timeout)
    egress_mode = lab.settings().egress
    egress = lab.check_egress() if egress_mode != "none" else []
    elapsed = time.monotonic() - started
    reachable = sum(r.ok for r in pings)
    egress_ok = sum(e.seen_as == str(e.expected) for e in egress)
    healthy = bool(pings) and reachable == len(pings) and egress_ok == len(egress)
    if as_json:
        print(
            json.dumps(
                {
                    "ok": healthy,
                    "seconds": round(elapsed, 3),
                    "egress_mode": egress_mode,
                    "pairs": len(pings),
                    "reachable": reachable,
                    "pings": [
                        {
                            "src": r.src.ns,
                            "src_ip": str(r.src.address),
                            "dst": r.dst.ns,
                            "dst_ip": str(r.dst.address),
                            "ok": r.ok,
                            "rtt_ms": r.rtt_ms,
                        }
                        for r in pings
                    ],
                    "egress": [
                        {
                            "container": e.container.ns,
                            "seen_as": e.seen_as,
                            "expected": str(e.expected),
                        }
                        for e in egress
                    ],
                },
                indent=2,
            )
        )
        return 0 if healthy else 1
    hosts = len({r.src.host for r in pings})
    print(
        f"lab check: {reachable}/{len(pings)} cross-host container pairs reachable"
        f" across {hosts} hosts in {elapsed:.1f} s"
    )
    rtts = sorted(r.rtt_ms for r in pings if r.rtt_ms is not None)
    if rtts:
        print(
            f"  ping RTT ms: min {rtts[0]:.3f}  median {rtts[len(rtts) // 2]:.3f}"
            f"  max {rtts[-1]:.3f}"
        )
    for r in pings:
        if not r.ok:
            print(f"  UNREACHABLE {r.src.ns} ({r.src.address}) -> {r.dst.ns} ({r.dst.address})")
    if egress_mode == "none":
        print("  egress: off (egress = none)")
    else:
        print(
            f"  egress ({egress_mode}): {egress_ok}/{len(egress)} containers reach"
            f" {OUTSIDE_SERVER} as their host's address"
        )
        for e in egress:
            if e.seen_as != str(e.expected):
                seen = e.seen_as or "unreachable"
                print(f"  EGRESS {e.container.ns}: seen as {seen}, expected {e.expected}")
    return 0 if healthy else 1


def cmd_lab(args: argparse.Namespace) -> int:
    _require_root()
    lab = Lab(args.name)
    if args.lab_command == "up":
        started = time.monotonic()
        config = default_network_config(
            IPv4Network(args.network),
            args.vni,
            args.port,
            backend=args.backend,
            direct_routing=args.direct_routing,
        )
        try:
            lab.up(
                args.hosts,
                config=config,
                settings=LabSettings(
                    lease_ttl=args.lease_ttl,
                    containers_per_host=args.containers,
                    egress=args.egress,
                    mqtt=args.mqtt,
                ),
            )
        except BaseException:
            print(
                f"lab up failed; `overlayctl lab down --name {args.name}` removes what"
                " was made (logs are in "
                f"{lab.state_dir} until then)",
                file=sys.stderr,
            )
            raise
        built = time.monotonic() - started
        print(
            f"lab {args.name!r}: {args.hosts} hosts up in {built:.1f} s"
            f" (state and logs in {lab.state_dir})"
        )
        for host in lab.hosts():
            print(
                f"  h{host}  ns {lab.host_ns(host)}  underlay {lab.host_address(host)}"
                f"  subnet {lab.subnet(host)}"
            )
        return _check(lab, timeout=args.timeout, as_json=False) if args.check else 0
    if args.lab_command == "check":
        if not lab.hosts():
            raise LabCommandError(f"lab {args.name!r} is not up")
        return _check(lab, timeout=args.timeout, as_json=args.json)
    if args.lab_command == "add-host":
        host = max(lab.hosts(), default=0) + 1
        lab.add_host(host)
        print(f"h{host} up: subnet {lab.subnet(host)}")
        return 0
    if args.lab_command == "timing":
        from overlayd.lab.timing import time_joins, time_lab_up

        for hosts in args.hosts:
            print(time_lab_up(hosts, args.runs, name=f"{args.name}t").line(), flush=True)
        for summary in time_joins(3, args.joins, name=f"{args.name}j"):
            print(summary.line())
        return 0
    if args.lab_command == "faults":
        from overlayd.lab.faults import fault_figures

        for line in fault_figures(f"{args.name}f", args.runs, args.outage):
            print(line, flush=True)
        return 0
    if args.lab_command == "bench":
        from overlayd.lab.bench import bench

        def progress(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        for text in bench(
            f"{args.name}b", args.rounds, args.seconds, args.congestion, Path(args.out), progress
        ):
            print(text)
        return 0
    if args.lab_command == "tune":
        from overlayd.lab.tune import tune

        print(
            f"overlay path, {args.pairs} alternating pairs of runs per variant,"
            f" {args.seconds:g} s iperf3 -C {args.congestion}"
        )
        for line in tune(f"{args.name}t", args.pairs, args.seconds, args.congestion):
            print(line, flush=True)
        return 0
    if args.lab_command == "cpbench":
        from overlayd.lab import cpbench

        print(
            f"control plane: {args.changes} adds and removes per size, idle {args.idle:g} s,"
            f" resync {args.resync:g} s"
        )
        print(cpbench.HEADER)
        for peers in args.peers:
            result = cpbench.run_one(
                f"{args.name}c", peers, args.changes, args.idle, resync_seconds=args.resync
            )
            print(result.row(), flush=True)
        seconds, distinct = cpbench.acquisition(f"{args.name}a", args.acquirers)
        print(
            f"lease acquisition: {args.acquirers} acquirers at once, {distinct} distinct"
            f" subnets, {seconds:.2f} s"
        )
        return 0
    if args.lab_command == "status":
        rows = [
            [
                f"h{h}",
                lab.host_ns(h),
                lab.host_address(h),
                lab.subnet(h),
                "running" if lab.daemon_running(h) else "stopped",
            ]
            for h in lab.hosts()
        ]
        print(table(rows, ["HOST", "NAMESPACE", "UNDERLAY", "SUBNET", "OVERLAYD"]))
        return 0
    removed = lab.down()
    print(f"lab {args.name!r} down: removed {len(removed)} namespaces")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="overlayctl", description="Operate overlayd and its lab.")
    p.add_argument("--version", action="version", version=f"overlayctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(
        name: str,
        func: Callable[[argparse.Namespace], int],
        help_text: str,
    ) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text, description=help_text)
        operator.add_settings_flags(c)
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.set_defaults(func=func)
        return c

    command(
        "status",
        operator.cmd_status,
        "this host's lease, mode, peers, last reconcile and drift repairs, from the daemon"
        " (exit status 1 when it is not ready)",
    )
    command("peers", operator.cmd_peers, "the peers as the daemon has programmed them")
    command("leases", operator.cmd_leases, "the cluster's subnet leases as etcd holds them")
    command(
        "diagnose",
        operator.cmd_diagnose,
        "compare the kernel with the desired state and the cluster's leases, check devices,"
        " MTU, offload, forwarding and firewall; exit status 0 only when all is well",
    )
    network_help = "read or write the cluster network config in etcd"
    network = sub.add_parser("network", help=network_help, description=network_help)
    network.set_defaults(func=operator.cmd_network)
    network_sub = network.add_subparsers(dest="network_command", required=True)
    show = network_sub.add_parser("show", help="print the config and whether it is valid")
    operator.add_settings_flags(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    set_cmd = network_sub.add_parser(
        "set",
        help="validate and write a config (refused when invalid or when it would orphan"
        " existing leases, unless --force)",
    )
    operator.add_settings_flags(set_cmd)
    set_cmd.add_argument("file", help="flannel-style JSON file, or - for stdin")
    set_cmd.add_argument("--force", action="store_true", help="write even if leases are orphaned")
    set_cmd.add_argument("--dry-run", action="store_true", help="validate only")
    set_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    events = command(
        "events",
        operator.cmd_events,
        "print the MQTT status and event stream of every host, live",
    )
    events.add_argument("--mqtt-url", help="mqtt://HOST[:PORT] (default: the config's)")
    events.add_argument("--count", type=int, help="stop after this many messages")
    docker = command(
        "docker-opts",
        operator.cmd_docker_opts,
        "write Docker daemon options that put Docker on overlayd's bridge, subnet and MTU"
        " (what flannel's mk-docker-opts.sh does)",
    )
    docker.add_argument(
        "--format",
        choices=["env", "daemon-json", "network-create"],
        default="env",
        help="env file for DOCKER_OPTS, /etc/docker/daemon.json keys, or a"
        " `docker network create` command (default %(default)s)",
    )
    docker.add_argument("--out", default="/run/docker_opts.env", help="file to write, - for stdout")
    docker.add_argument("--key", default="DOCKER_OPTS", help="variable name in env format")
    check_cmd = command(
        "check",
        operator.cmd_check,
        "from a probe container attached through overlay-cni, ping every peer host's"
        " overlay gateway; exit status 0 only when all answer",
    )
    check_cmd.add_argument(
        "--expect-hosts", type=int, default=1, help="wait until this many hosts hold leases"
    )
    check_cmd.add_argument("--timeout", type=float, default=60.0)
    check_cmd.add_argument(
        "--probe-name", default="overlayd-probe", help="name of the probe's network namespace"
    )
    command(
        "leave",
        cmd_leave,
        "release this host's lease on purpose (stop overlayd first); peers forget the host",
    )

    lab = sub.add_parser("lab", help="a multi-host lab in network namespaces on this machine")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default="lab", help="lab name, for several labs at once")
    up = lab_sub.add_parser("up", parents=[common], help="build the lab and start overlayd")
    up.add_argument("--hosts", type=int, default=3)
    up.add_argument("--containers", type=int, default=1, help="containers per host")
    up.add_argument("--network", default=str(DEFAULT_NETWORK))
    up.add_argument(
        "--backend",
        choices=["vxlan", "host-gw"],
        default="vxlan",
        help="overlay (vxlan) or routed (host-gw) (default %(default)s)",
    )
    up.add_argument(
        "--direct-routing",
        action="store_true",
        help="vxlan: route peers on the same link directly, as flannel's DirectRouting",
    )
    up.add_argument("--vni", type=int, default=1)
    up.add_argument("--port", type=int, default=8472)
    up.add_argument("--lease-ttl", type=int, default=60)
    up.add_argument(
        "--egress",
        choices=EGRESS_MODES,
        default=DEFAULT_EGRESS,
        help="containers' way out (default %(default)s)",
    )
    up.add_argument(
        "--mqtt", action="store_true", help="run mosquitto and have every daemon publish to it"
    )
    up.add_argument("--check", action="store_true", help="run `lab check` once up")
    up.add_argument("--timeout", type=float, default=30.0)
    check = lab_sub.add_parser("check", parents=[common], help="all-pairs reachability")
    check.add_argument("--timeout", type=float, default=30.0)
    check.add_argument("--json", action="store_true")
    lab_sub.add_parser("add-host", parents=[common], help="add one more host")
    lab_sub.add_parser("status", parents=[common], help="the lab's hosts")
    timing = lab_sub.add_parser(
        "timing",
        parents=[common],
        help="figures: lab bring-up time and new-host join time (own labs)",
    )
    timing.add_argument("--hosts", type=int, nargs="+", default=[3, 10])
    timing.add_argument("--runs", type=int, default=5)
    timing.add_argument("--joins", type=int, default=7, help="hosts added one by one to 3")
    bench = lab_sub.add_parser(
        "bench",
        parents=[common],
        help="figures: underlay, routed, overlay and flannel-style paths, interleaved rounds,"
        " Markdown table, JSON and SVG chart",
    )
    bench.add_argument("--rounds", type=int, default=10)
    bench.add_argument("--seconds", type=float, default=3.0, help="per iperf3 test")
    bench.add_argument("--congestion", default="cubic", help="TCP congestion control, fixed")
    bench.add_argument("--out", default="bench-results", help="directory for the outputs")
    tune_cmd = lab_sub.add_parser(
        "tune",
        parents=[common],
        help="figures: each kernel setting overlayd controls against the other choice",
    )
    tune_cmd.add_argument("--pairs", type=int, default=6)
    tune_cmd.add_argument("--seconds", type=float, default=3.0)
    tune_cmd.add_argument("--congestion", default="cubic")
    cp = lab_sub.add_parser(
        "cpbench",
        parents=[common],
        help="figures: control plane with N synthetic peers (cold start, add/remove latency,"
        " RSS, idle CPU) and concurrent lease acquisition",
    )
    cp.add_argument("--peers", type=int, nargs="+", default=[100, 1000, 5000])
    cp.add_argument("--changes", type=int, default=100, help="adds and removes to time")
    cp.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU measurement")
    cp.add_argument("--resync", type=float, default=DEFAULT_RESYNC_SECONDS)
    cp.add_argument("--acquirers", type=int, default=200)
    faults = lab_sub.add_parser(
        "faults",
        parents=[common],
        help="figures: packets lost and repair/convergence times per injected fault (own labs)",
    )
    faults.add_argument("--runs", type=int, default=5)
    faults.add_argument("--outage", type=float, default=60.0, help="etcd outage, seconds")
    lab_sub.add_parser("down", parents=[common], help="remove everything the lab made")
    lab.set_defaults(func=cmd_lab)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (OverlaydError, LabCommandError, StoreUnavailable, ValueError, OSError) as exc:
        print(f"overlayctl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
