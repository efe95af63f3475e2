"""`overlayctl lab ...`: the lab commands (`up`, `check`, `add-host`,
`status`, `ctl`, `run`, `demo`, `down`) and the figure commands (`timing`, `faults`,
`bench`, `converge`, `tune`, `cpbench`, `allowlist`, `svcbench`, `svcchurn`,
`dnsbench`).

overlayd.lab is imported inside the commands only, never at module level,
so that overlayctl on a real host (status, diagnose, ...) loads no lab code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING

from overlayd.cli.common import table
from overlayd.errors import OverlaydError

if TYPE_CHECKING:
    from overlayd.lab.lab import Lab


def _require_root() -> None:
    if os.geteuid() != 0:
        raise OverlaydError("the lab creates network namespaces: run it as root")


def _family_tag(version: int, dual: bool, *, space: str = " ") -> str:
    """How output names a family: only in a dual-stack lab, so a v4-only
    lab's output stays as it was."""
    return f"{space}IPv{version}" if dual else ""


def _check(lab: Lab, *, timeout: float, as_json: bool) -> int:
    """All-pairs reachability across hosts over each of the lab's families,
    then (unless egress is off) every container's way out in each family:
    the outside server must see its host's address of that family."""
    from overlayd.lab.checks import outside_server

    started = time.monotonic()
    families = lab.families()
    dual = len(families) > 1
    pings = [r for family in families for r in lab.check(timeout=timeout, family=family)]
    egress_mode = lab.settings().egress
    egress = (
        [e for family in families for e in lab.check_egress(family=family)]
        if egress_mode != "none"
        else []
    )
    engines = lab.engine_checkables()
    # Docker's containers on overlayd's bridge have no gwbridge path, so
    # check_egress leaves them out in gwbridge mode: say so, not silently.
    unchecked = len(engines) - len(lab.engine_checkables(egress=True)) if egress else 0
    # Engine containers without an address of a family are left out of its
    # checks (Docker's bridge driver hands out IPv4 only unless told).
    no_address = {f.version: sum(c.address_of(f) is None for c in engines) for f in families}
    elapsed = time.monotonic() - started
    reachable = sum(r.ok for r in pings)
    egress_ok = sum(e.ok for e in egress)
    # No pair at all is a failure, unless a one-host lab cannot have any.
    single_host = len(lab.hosts()) < 2
    healthy = (bool(pings) or single_host) and reachable == len(pings) and egress_ok == len(egress)
    if as_json:
        print(
            json.dumps(
                {
                    "ok": healthy,
                    "seconds": round(elapsed, 3),
                    "families": [f.version for f in families],
                    "egress_mode": egress_mode,
                    "egress_unchecked": unchecked,
                    "pairs": len(pings),
                    "reachable": reachable,
                    "pings": [
                        {
                            "family": r.family.version,
                            "src": r.src.title,
                            "src_ip": str(r.src_address),
                            "dst": r.dst.title,
                            "dst_ip": str(r.dst_address),
                            "ok": r.ok,
                            "rtt_ms": r.rtt_ms,
                        }
                        for r in pings
                    ],
                    "egress": [
                        {
                            "family": e.family.version,
                            "container": e.container.title,
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
    per_family = {f.version: [r for r in pings if r.family.version == f.version] for f in families}
    if single_host:
        print(f"lab check: one host, so no cross-host pairs to ping ({elapsed:.1f} s)")
    elif dual:
        counts = ", ".join(
            f"IPv{v} {sum(r.ok for r in rs)}/{len(rs)}" for v, rs in per_family.items()
        )
        print(
            f"lab check: cross-host container pairs reachable across {hosts} hosts"
            f" in {elapsed:.1f} s: {counts}"
        )
    else:
        print(
            f"lab check: {reachable}/{len(pings)} cross-host container pairs reachable"
            f" across {hosts} hosts in {elapsed:.1f} s"
        )
    for version, results in per_family.items():
        rtts = sorted(r.rtt_ms for r in results if r.rtt_ms is not None)
        if rtts:
            print(
                f" {_family_tag(version, dual)} ping RTT ms: min {rtts[0]:.3f}"
                f"  median {rtts[len(rtts) // 2]:.3f}  max {rtts[-1]:.3f}"
            )
    for r in pings:
        if not r.ok:
            tag = f" (IPv{r.family.version})" if dual else ""
            src, dst = r.src_address or "no address", r.dst_address or "no address"
            print(f"  UNREACHABLE{tag} {r.src.title} ({src}) -> {r.dst.title} ({dst})")
    for version, count in no_address.items():
        if count and version != 4:
            print(
                f"  ({count} engine containers without an IPv{version} address not checked"
                f" over IPv{version})"
            )
    if egress_mode == "none":
        print("  egress: off (egress = none)")
        return 0 if healthy else 1
    for family in families:
        seen = [e for e in egress if e.family.version == family.version]
        mode = f"{egress_mode},{_family_tag(family.version, dual)}" if dual else egress_mode
        print(
            f"  egress ({mode}): {sum(e.ok for e in seen)}/{len(seen)} containers reach"
            f" {outside_server(family)} as their host's{_family_tag(family.version, dual)} address"
        )
    if unchecked:
        print(
            f"  ({unchecked} Docker containers on overlayd's bridge not checked: with"
            " egress=gwbridge they have no way out, see `overlayctl docker-opts`)"
        )
    for e in egress:
        if not e.ok:
            tag = f" (IPv{e.family.version})" if dual else ""
            where = e.seen_as or "unreachable"
            print(f"  EGRESS{tag} {e.container.title}: seen as {where}, expected {e.expected}")
    return 0 if healthy else 1


def _service_network(text: str | None) -> IPv4Network | None:
    if text is None:
        return None
    try:
        return IPv4Network(text, strict=True)
    except ValueError as exc:
        raise OverlaydError(f"lab up: --service-network: {text!r} is not a network: {exc}") from exc


def _service_network6(text: str | None) -> IPv6Network | None:
    if text is None:
        return None
    try:
        return IPv6Network(text, strict=True)
    except ValueError as exc:
        raise OverlaydError(
            f"lab up: --ipv6-service-network: {text!r} is not an IPv6 network: {exc}"
        ) from exc


def _up(lab: Lab, args: argparse.Namespace) -> int:
    from overlayd.lab.lab import DEFAULT_IPV6, DEFAULT_NETWORK, LabSettings, default_network_config

    if args.rbac and args.insecure:
        raise OverlaydError("lab up: --rbac needs TLS; it cannot be combined with --insecure")
    started = time.monotonic()
    config = default_network_config(
        IPv4Network(args.network) if args.network else DEFAULT_NETWORK,
        args.vni,
        args.port,
        backend=args.backend,
        direct_routing=args.direct_routing,
        ipv6=DEFAULT_IPV6 if args.ipv6 is None else args.ipv6,
        service_network=_service_network(args.service_network),
        service_network6=_service_network6(args.ipv6_service_network),
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
                tls=not args.insecure,
                rbac=args.rbac,
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
    print(f"  etcd: {_security_line(lab)}")
    dual = lab.dual_stack
    for host in lab.hosts():
        v6 = f" {lab.host_address6(host)}" if dual else ""
        print(
            f"  h{host}  ns {lab.host_ns(host)}  underlay {lab.host_address(host)}{v6}"
            f"  subnet {_subnets(lab, host)}"
        )
    return _check(lab, timeout=args.timeout, as_json=False) if args.check else 0


def _subnets(lab: Lab, host: int) -> str:
    """The host's subnet, and its IPv6 one beside it when it has one."""
    subnet6 = lab.subnet6(host)
    return f"{lab.subnet(host)}" + (f" {subnet6}" if subnet6 is not None else "")


def _security_line(lab: Lab) -> str:
    settings = lab.settings()
    if not settings.tls:
        return "plain http, no client certificates (--insecure)"
    text = f"mutual TLS, certificates in {lab.pki.directory}"
    if settings.rbac:
        text += f"; RBAC on, root's password in {lab.pki.password_file}"
    return text


def _lab_check(lab: Lab, args: argparse.Namespace) -> int:
    if not lab.hosts():
        raise OverlaydError(f"lab {args.name!r} is not up")
    return _check(lab, timeout=args.timeout, as_json=args.json)


def _add_host(lab: Lab, args: argparse.Namespace) -> int:
    host = max(lab.hosts(), default=0) + 1
    lab.add_host(host)
    print(f"h{host} up: subnet {_subnets(lab, host)}")
    return 0


def _status(lab: Lab, args: argparse.Namespace) -> int:
    running = [c.title.rsplit("/", 1)[0] for c in lab.engine_containers()]
    rows = [
        [
            f"h{h}",
            lab.host_ns(h),
            f"{lab.host_address(h)} {lab.host_address6(h)}"
            if lab.dual_stack
            else lab.host_address(h),
            _subnets(lab, h),
            "running" if lab.daemon_running(h) else "stopped",
            " ".join(
                f"{kind}:{running.count(f'h{h}/{kind}')}"
                for kind in ("podman", "docker")
                if f"h{h}/{kind}" in running
            )
            or "-",
        ]
        for h in lab.hosts()
    ]
    print(table(rows, ["HOST", "NAMESPACE", "UNDERLAY", "SUBNET", "OVERLAYD", "ENGINES"]))
    print(f"etcd: {_security_line(lab)}")
    return 0


def _ctl(lab: Lab, args: argparse.Namespace) -> int:
    """overlayctl inside a lab host, against that host's daemon; its output
    goes straight to ours and its exit status is ours."""
    host = lab.host_named(args.host)
    # argparse keeps the `--` that separates the host's overlayctl arguments.
    ctl_args = args.ctl_args[1:] if args.ctl_args[:1] == ["--"] else args.ctl_args
    if not ctl_args:
        raise OverlaydError("lab ctl: name the overlayctl command to run, e.g. -- status")
    argv, env = lab.ctl_command(host, ctl_args, admin=args.admin)
    return subprocess.run(argv, env=env, check=False).returncode


def _engines_missing() -> list[str]:
    """The engine programs this machine lacks (the lab runs them for real)."""
    import shutil

    from overlayd.lab.engines import DOCKER

    wanted = ["podman", "dockerd", DOCKER, "runc", "nsenter", "unshare"]
    return [name for name in wanted if shutil.which(name) is None]


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """`lab run`'s options (also parsed again from what follows the host)."""
    parser.add_argument("--name", dest="container", help="container name (default: the engine's)")
    parser.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="HOSTPORT:PORT",
        help="publish a container port on the host's underlay address (TCP)",
    )
    parser.add_argument("--engine", choices=["podman", "docker"], default="podman")


def split_run_command(
    args: argparse.Namespace, rest: list[str]
) -> tuple[argparse.Namespace, list[str]]:
    """`lab run HOST [options] -- CMD...`: argparse's REMAINDER takes
    everything after the host, so options given there (before `--`) are
    parsed here, on top of those given before the host."""
    if "--" not in rest:
        return args, rest
    cut = rest.index("--")
    parser = argparse.ArgumentParser(prog="overlayctl lab run", add_help=False)
    add_run_options(parser)
    # Parsed onto a copy of what came before the host: -p adds to its list.
    before = argparse.Namespace(**{**vars(args), "publish": list(args.publish)})
    return parser.parse_args(rest[:cut], namespace=before), rest[cut + 1 :]


def _run(lab: Lab, args: argparse.Namespace) -> int:
    """A real container (Podman or Docker) on a lab host, its engine started
    on first use and kept; prints its name and overlay address."""
    host = lab.host_named(args.host)
    args, command = split_run_command(args, args.command)
    if not command:
        raise OverlaydError("lab run: give the container's command after --, e.g. -- sleep 1d")
    missing = _engines_missing()
    if missing:
        raise OverlaydError(f"lab run: this machine lacks {', '.join(missing)}")
    engine = lab.engine(host, args.engine)
    started = engine.ensure_started()
    if started:
        print(f"{args.engine} on h{host} started in {started:.1f} s", file=sys.stderr)
    c = engine.run(args.container, command, publish=args.publish)
    published = "".join(f"  -p {lab.host_address(host)}:{spec}" for spec in args.publish)
    print(f"{c.name}  h{host}  {c.engine}  {c.address}{published}")
    return 0


def _demo(lab: Lab, args: argparse.Namespace) -> int:
    """A web server in a Podman container on h2 answers a client in a
    Docker container (on overlayd's bridge, `docker-opts`) on h1."""
    from overlayd.lab.demo import cross_engine_demo

    missing = _engines_missing()
    if missing:
        print(f"lab demo: skipped, this machine lacks {', '.join(missing)}")
        return 0
    if len(lab.hosts()) < 2:
        # `HOSTS=1 ./bootstrap.sh lab` is fine: there is just no second host.
        print(f"lab demo: skipped, it needs 2 hosts and lab {args.name!r} has {len(lab.hosts())}")
        return 0
    result = cross_engine_demo(lab, timeout=args.timeout)
    for line in result.lines:
        print(line)
    return 0 if result.ok else 1


def _down(lab: Lab, args: argparse.Namespace) -> int:
    removed = lab.down()
    print(f"lab {args.name!r} down: removed {len(removed)} namespaces")
    return 0


def _timing(lab: Lab, args: argparse.Namespace) -> int:
    from overlayd.lab.timing import time_joins, time_lab_up

    for hosts in args.hosts:
        print(time_lab_up(hosts, args.runs, name=f"{args.name}t").line(), flush=True)
    for summary in time_joins(3, args.joins, name=f"{args.name}j"):
        print(summary.line())
    return 0


def _faults(lab: Lab, args: argparse.Namespace) -> int:
    from overlayd.lab.faults import fault_figures

    for line in fault_figures(f"{args.name}f", args.runs, args.outage):
        print(line, flush=True)
    return 0


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _bench(lab: Lab, args: argparse.Namespace) -> int:
    from overlayd.lab.bench import bench, filter_bench

    name, out = f"{args.name}b", Path(args.out)
    if args.vxlan_filter and args.policies:
        print(
            "--vxlan-filter and --policies measure different things: one at a time", file=sys.stderr
        )
        return 2
    if args.policies:
        from overlayd.lab.policycost import MAX_ENDPOINTS, policy_bench

        if args.policies < 2 or not 0 <= args.policy_endpoints <= MAX_ENDPOINTS:
            print(
                "--policies must be at least 2 and --policy-endpoints between 0 and"
                f" {MAX_ENDPOINTS}",
                file=sys.stderr,
            )
            return 2
        texts = policy_bench(
            name,
            args.rounds,
            args.seconds,
            args.congestion,
            args.policies,
            args.policy_endpoints,
            out,
            _progress,
            egress=args.policy_egress,
        )
    elif args.vxlan_filter:
        texts = filter_bench(name, args.rounds, args.seconds, args.congestion, out, _progress)
    else:
        texts = bench(
            name, args.rounds, args.seconds, args.congestion, out, _progress, args.families
        )
    for text in texts:
        print(text)
    return 0


def _converge(lab: Lab, args: argparse.Namespace) -> int:
    from overlayd.lab.converge import converge

    for line in converge(f"{args.name}k", args.rounds, _progress):
        print(line, flush=True)
    return 0


def _policybench(lab: Lab, args: argparse.Namespace) -> int:
    from overlayd.lab.policybench import policybench

    if args.cold:
        return _policy_cold(args)
    if args.hosts < 2 or args.rounds < 1:
        print("--hosts must be at least 2 and --rounds at least 1", file=sys.stderr)
        return 2
    for line in policybench(f"{args.name}p", args.hosts, args.rounds, _progress):
        print(line, flush=True)
    return 0


def _policy_cold(args: argparse.Namespace) -> int:
    from overlayd.lab import policycold

    if args.endpoints < 0 or args.per_host < 1 or args.runs < 1 or min(args.policies) < 0:
        print(
            "--endpoints and --policies must be at least 0, --per-host and --runs at least 1",
            file=sys.stderr,
        )
        return 2
    print(
        f"policy cold start: one overlayd, {args.endpoints} endpoints ({args.per_host} per host),"
        f" policies {' and '.join(map(str, args.policies))}, {args.runs} run(s) each"
    )
    print(policycold.HEADER, flush=True)
    results = []
    for number in range(args.runs):
        # The order alternates, so that a machine slowing down over the run
        # does not favour one count.
        order = args.policies if number % 2 == 0 else args.policies[::-1]
        for policies in order:
            # The same cluster every run (seed 0): runs differ by the machine only.
            result = policycold.run_one(f"{args.name}o", args.endpoints, policies, args.per_host)
            results.append(result)
            print(result.row(), flush=True)
    for result in results[: len(args.policies)]:
        print(f"  {result.policies} policies: kernel checked: {result.check}")
    for line in policycold.summary(results):
        print(line)
    return 0


def _allowlist(lab: Lab, args: argparse.Namespace) -> int:
    from overlayd.lab.allowlist import time_leave_to_drop

    figures = time_leave_to_drop(f"{args.name}w", args.runs, _progress)
    for line in figures.lines():
        print(line)
    return 0


def _tune(lab: Lab, args: argparse.Namespace) -> int:
    from overlayd.lab.tune import tune

    print(
        f"overlay path, {args.pairs} alternating pairs of runs per variant,"
        f" {args.seconds:g} s iperf3 -C {args.congestion}"
    )
    for line in tune(f"{args.name}t", args.pairs, args.seconds, args.congestion):
        print(line, flush=True)
    return 0


def _cpbench(lab: Lab, args: argparse.Namespace) -> int:
    from overlayd.lab import cpbench

    print(
        f"control plane: {args.changes} adds and removes per size, idle {args.idle:g} s,"
        f" resync {args.resync:g} s"
    )
    print(cpbench.HEADER)
    duals = {"v4": (False,), "dual": (True,), "both": (False, True)}[args.family]
    rounds = args.rounds
    if rounds < 1 or (rounds > 1 and len(duals) != 2):
        print("--rounds must be at least 1, and more only with --family both", file=sys.stderr)
        return 2
    dual_results: list[cpbench.CpResult] = []
    for peers in args.peers:
        ratios: list[list[float]] = []
        for round_number in range(rounds):
            # The order alternates, so that a machine slowing down or
            # speeding up over the run does not favour one family.
            order = duals if round_number % 2 == 0 else duals[::-1]
            results = {}
            for dual in order:
                result = results[dual] = cpbench.run_one(
                    f"{args.name}c",
                    peers,
                    args.changes,
                    args.idle,
                    resync_seconds=args.resync,
                    dual=dual,
                )
                print(result.row(), flush=True)
                if dual:
                    dual_results.append(result)
            if len(results) == 2:
                print(cpbench.ratio_row(results[True], results[False]), flush=True)
                ratios.append(cpbench.ratios(results[True], results[False]))
        if len(ratios) > 1:
            print(cpbench.median_ratio_row(peers, ratios), flush=True)
    if any(duals):
        # Below the table, not inside it: the row's add/remove is the slower family's.
        for result in dual_results:
            print(result.family_line())
        # check_dual and the route count refused the run otherwise.
        print(
            "dual runs: the daemon's IPv6 underlay address was"
            f" {', '.join(sorted({str(r.underlay6) for r in dual_results}))}, its lease had an"
            " IPv6 subnet, and every peer had both routes after ready (checked)"
        )
    seconds, distinct = cpbench.acquisition(f"{args.name}a", args.acquirers)
    print(
        f"lease acquisition: {args.acquirers} acquirers at once, {distinct} distinct"
        f" subnets, {seconds:.2f} s"
    )
    return 0


def _svcbench(lab: Lab, args: argparse.Namespace) -> int:
    from overlayd.lab.svcbench import svcbench

    if min(args.services) < 1 or args.changes < 1 or max(args.services) > 65_536:
        print("--services must be 1 to 65536 and --changes at least 1", file=sys.stderr)
        return 2
    if args.cold:
        return _service_cold(args)
    if args.latency:
        from overlayd.lab.svclatency import svclatency

        if args.rounds < 1 or args.connects < 1:
            print("--rounds and --connects must be at least 1", file=sys.stderr)
            return 2
        lines = svclatency(args.services, args.rounds, args.connects)
    else:
        lines = svcbench(args.services, args.changes)
    for line in lines:
        print(line, flush=True)
    return 0


def _service_cold(args: argparse.Namespace) -> int:
    from overlayd.lab import svccold

    count = max(args.services)
    if args.per_host < 2 or args.runs < 1 or count > 30_000:
        print(
            "--per-host must be at least 2, --runs at least 1, --services at most 30000",
            file=sys.stderr,
        )
        return 2
    print(
        f"services cold start: one overlayd, {count} services with 2 endpoints each"
        f" ({args.per_host} endpoints per host), {args.runs} run(s)"
    )
    print(svccold.HEADER, flush=True)
    results = []
    for _ in range(args.runs):
        result = svccold.run_one(f"{args.name}v", count, args.per_host)
        results.append(result)
        print(result.row(), flush=True)
    for line in svccold.summary(results):
        print(line)
    return 0


def _svcchurn(lab: Lab, args: argparse.Namespace) -> int:
    from overlayd.lab.svcchurn import churn, lines

    if args.cycles < 1 or args.workers < 1:
        print("--cycles and --workers must be at least 1", file=sys.stderr)
        return 2
    result = churn(lab, args.cycles, args.workers, _progress)
    if args.json:
        print(
            json.dumps(
                {
                    "hosts": list(result.hosts),
                    "cycles": result.cycles,
                    "workers": args.workers,
                    "failed": result.failed,
                    "seconds": round(result.seconds, 2),
                    "revision": result.revision,
                    "converge_seconds": result.converge_seconds,
                    "disagreements": result.disagreements,
                    "findings": {f"h{h}": f for h, f in result.findings.items()},
                },
                indent=2,
            )
        )
    else:
        for line in lines(result, args.workers):
            print(line)
    healthy = result.converge_seconds is not None and not result.failed
    return 0 if healthy and result.disagreements == 0 else 1


def _dnsbench(lab: Lab, args: argparse.Namespace) -> int:
    if args.seconds <= 0:
        print("--seconds must be positive", file=sys.stderr)
        return 2
    if args.passes:
        from overlayd.lab.dnsload import dns_load

        for line in dns_load(f"{args.name}d", args.seconds):
            print(line, flush=True)
        return 0
    from overlayd.lab.dnsbench import dnsbench

    for line in dnsbench(seconds=args.seconds):
        print(line, flush=True)
    return 0


COMMANDS: dict[str, Callable[[Lab, argparse.Namespace], int]] = {
    "up": _up,
    "check": _lab_check,
    "add-host": _add_host,
    "status": _status,
    "ctl": _ctl,
    "run": _run,
    "demo": _demo,
    "down": _down,
    "timing": _timing,
    "faults": _faults,
    "bench": _bench,
    "converge": _converge,
    "tune": _tune,
    "cpbench": _cpbench,
    "policybench": _policybench,
    "allowlist": _allowlist,
    "svcbench": _svcbench,
    "svcchurn": _svcchurn,
    "dnsbench": _dnsbench,
}


def cmd_lab(args: argparse.Namespace) -> int:
    _require_root()
    from overlayd.lab.lab import Lab
    from overlayd.lab.netns import LabCommandError

    try:
        return COMMANDS[args.lab_command](Lab(args.name), args)
    except LabCommandError as exc:
        # main() reports OverlaydError as one line; it knows nothing of the lab.
        raise OverlaydError(str(exc)) from exc
