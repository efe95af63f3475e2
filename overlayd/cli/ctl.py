"""`overlayctl`: the operator CLI. This module only builds the argument
tree and dispatches; each command group lives in its own module:

    status.py    status, peers (the daemon, over its control socket)
    diagnose.py  diagnose (daemon, kernel and etcd)
    leases.py    leases, network show|set, leave (etcd)
    policy.py    policy apply|list|show|delete|check|wait, endpoints,
                 endpoint label (network policy in etcd)
    service.py   service create|list|show|delete (services in etcd)
    probe.py     check (a probe container pings every peer)
    events.py    events (MQTT)
    docker.py    docker-opts
    labctl.py    lab ... (loads overlayd.lab only when a lab command runs)
    common.py    the settings flags and output helpers they share
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from overlayd import __version__
from overlayd.cli import diagnose, docker, events, labctl, leases, policy, probe, service, status
from overlayd.cli.common import add_settings_flags
from overlayd.config import DEFAULT_EGRESS, DEFAULT_RESYNC_SECONDS, EGRESS_MODES
from overlayd.errors import OverlaydError
from overlayd.model import DEFAULT_VNI, DEFAULT_VXLAN_PORT
from overlayd.store.etcd import StoreUnavailable


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
        add_settings_flags(c)
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.set_defaults(func=func)
        return c

    command(
        "status",
        status.cmd_status,
        "this host's lease, mode, peers, last reconcile and drift repairs, from the daemon"
        " (exit status 1 when it is not ready)",
    )
    command("peers", status.cmd_peers, "the peers as the daemon has programmed them")
    command("leases", leases.cmd_leases, "the cluster's subnet leases as etcd holds them")
    command(
        "diagnose",
        diagnose.cmd_diagnose,
        "compare the kernel with the desired state and the cluster's leases, check devices,"
        " MTU, offload, forwarding and firewall; exit status 0 only when all is well",
    )
    network_help = "read or write the cluster network config in etcd"
    network = sub.add_parser("network", help=network_help, description=network_help)
    network.set_defaults(func=leases.cmd_network)
    network_sub = network.add_subparsers(dest="network_command", required=True)
    show = network_sub.add_parser("show", help="print the config and whether it is valid")
    add_settings_flags(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    set_cmd = network_sub.add_parser(
        "set",
        help="validate and write a config (refused when invalid or when it would orphan"
        " existing leases, unless --force)",
    )
    add_settings_flags(set_cmd)
    set_cmd.add_argument("file", help="flannel-style JSON file, or - for stdin")
    set_cmd.add_argument("--force", action="store_true", help="write even if leases are orphaned")
    set_cmd.add_argument("--dry-run", action="store_true", help="validate only")
    set_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    events_cmd = command(
        "events",
        events.cmd_events,
        "print the MQTT status and event stream of every host, live",
    )
    events_cmd.add_argument("--mqtt-url", help="mqtt://HOST[:PORT] (default: the config's)")
    events_cmd.add_argument("--count", type=int, help="stop after this many messages")
    docker_cmd = command(
        "docker-opts",
        docker.cmd_docker_opts,
        "write Docker daemon options that put Docker on overlayd's bridge, subnet and MTU"
        " (what flannel's mk-docker-opts.sh does)",
    )
    docker_cmd.add_argument(
        "--format",
        choices=["env", "daemon-json", "network-create"],
        default="env",
        help="env file for DOCKER_OPTS, /etc/docker/daemon.json keys, or a"
        " `docker network create` command (default %(default)s)",
    )
    docker_cmd.add_argument(
        "--out", default="/run/docker_opts.env", help="file to write, - for stdout"
    )
    docker_cmd.add_argument("--key", default="DOCKER_OPTS", help="variable name in env format")
    check_cmd = command(
        "check",
        probe.cmd_check,
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
    policy.add_commands(sub)
    service.add_commands(sub)
    command(
        "leave",
        leases.cmd_leave,
        "release this host's lease on purpose (stop overlayd first); peers forget the host",
    )

    lab = sub.add_parser("lab", help="a multi-host lab in network namespaces on this machine")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default="lab", help="lab name, for several labs at once")
    up = lab_sub.add_parser("up", parents=[common], help="build the lab and start overlayd")
    up.add_argument("--hosts", type=int, default=3)
    up.add_argument("--containers", type=int, default=1, help="containers per host")
    # None: the lab's default network, which only the lab module knows.
    up.add_argument("--network")
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
    up.add_argument("--vni", type=int, default=DEFAULT_VNI)
    up.add_argument("--port", type=int, default=DEFAULT_VXLAN_PORT)
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
    up.add_argument(
        "--insecure",
        action="store_true",
        help="plain etcd: no TLS, no client certificates (the lab's default is mutual TLS)",
    )
    up.add_argument(
        "--rbac",
        action="store_true",
        help="etcd users and roles: each host writes only leases, root the config (needs TLS)",
    )
    up.add_argument(
        "--ipv6",
        action=argparse.BooleanOptionalAction,
        default=None,  # the lab's own default (overlayd.lab.lab.DEFAULT_IPV6)
        help="dual-stack: every host leases an IPv6 subnet too, containers get both"
        " families, `lab check` checks both (default: on; --no-ipv6 for IPv4 only)",
    )
    up.add_argument(
        "--service-network",
        metavar="CIDR",
        help="services: the network config's ServiceNetwork (e.g. 10.96.0.0/16), so that"
        " `overlayctl service` works and every host answers DNS (default: none)",
    )
    up.add_argument(
        "--ipv6-service-network",
        metavar="CIDR",
        help="IPv6 VIPs too: the network config's IPv6ServiceNetwork (e.g."
        " fd00:10:96::/112); needs dual-stack (default: none)",
    )
    up.add_argument("--check", action="store_true", help="run `lab check` once up")
    up.add_argument("--timeout", type=float, default=30.0)
    check = lab_sub.add_parser("check", parents=[common], help="all-pairs reachability")
    check.add_argument("--timeout", type=float, default=30.0)
    check.add_argument("--json", action="store_true")
    lab_sub.add_parser("add-host", parents=[common], help="add one more host")
    lab_sub.add_parser("status", parents=[common], help="the lab's hosts")
    ctl_help = (
        "run overlayctl inside a lab host against its daemon (socket, subnet file, etcd"
        " as the daemon has them), e.g. `lab ctl h1 -- status --json`"
    )
    ctl = lab_sub.add_parser("ctl", parents=[common], help=ctl_help, description=ctl_help)
    ctl.add_argument("host", help="h1, h2, ...")
    ctl.add_argument(
        "--admin",
        action="store_true",
        help="dial etcd with the lab's admin certificate (CN root) instead of the host's",
    )
    ctl.add_argument("ctl_args", nargs=argparse.REMAINDER, help="-- and overlayctl's arguments")
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
        help="figures: underlay, routed, overlay and flannel-style paths, over IPv4 and IPv6,"
        " interleaved rounds, Markdown table, JSON and SVG chart",
    )
    bench.add_argument("--rounds", type=int, default=10)
    bench.add_argument("--seconds", type=float, default=3.0, help="per iperf3 test")
    bench.add_argument("--congestion", default="cubic", help="TCP congestion control, fixed")
    bench.add_argument("--out", default="bench-results", help="directory for the outputs")
    bench.add_argument(
        "--families",
        choices=("v4", "dual"),
        default="dual",
        help="dual: the four paths over IPv4 and IPv6 in dual-stack labs, with IPv6/IPv4"
        " ratios (containers' MTU underlay-70 for both families); v4: IPv4 only, in"
        " IPv4-only labs (MTU underlay-50) (default %(default)s)",
    )
    bench.add_argument(
        "--vxlan-filter",
        action="store_true",
        help="instead: the overlay path with the VXLAN allow-list on and off (TCP 1 stream,"
        " ping), interleaved, daemons restarted with the other setting between modes",
    )
    bench.add_argument(
        "--policies",
        type=int,
        default=0,
        metavar="N",
        help="instead: the overlay path with N network policies in force (two of them"
        " selecting the bench containers and allowing their traffic) and with none,"
        " interleaved, paired ratios, policy counters checked (e.g. 500)",
    )
    bench.add_argument(
        "--policy-endpoints",
        type=int,
        default=400,
        help="with --policies: synthetic endpoints registered on the two hosts besides the"
        " bench containers (default %(default)s, at most 476)",
    )
    bench.add_argument(
        "--policy-egress",
        choices=("gwbridge", "masquerade", "none"),
        default="gwbridge",
        help="with --policies: the lab's egress mode (default %(default)s, overlayd's own;"
        " with none, the mode without policies has no stateful rule at all, so the ratio"
        " also prices turning connection tracking on)",
    )
    converge = lab_sub.add_parser(
        "converge",
        parents=[common],
        help="figures: a new dual-stack host joins 2 running hosts, from its lease in etcd"
        " to containers reaching each other over IPv4 and IPv6 (p50, p99, max; own lab)",
    )
    converge.add_argument("--rounds", type=int, default=20, help="new hosts, one per round")
    policybench = lab_sub.add_parser(
        "policybench",
        parents=[common],
        help="figures: from a policy written (or deleted) in etcd to every host enforcing it,"
        " by the hosts' status keys, checked with a real connection (own lab)",
    )
    policybench.add_argument("--hosts", type=int, default=10)
    policybench.add_argument("--rounds", type=int, default=20, help="policy changes to time")
    policybench.add_argument(
        "--cold",
        action="store_true",
        help="instead: cold start of one real overlayd with --endpoints endpoints and"
        " --policies policies already in etcd, to ready and to its status naming the"
        " revision; nft statements loaded, peak RSS; the kernel's table checked",
    )
    policybench.add_argument(
        "--endpoints", type=int, default=10_000, help="with --cold (default %(default)s)"
    )
    policybench.add_argument(
        "--policies",
        type=int,
        nargs="+",
        default=[0, 500],
        help="with --cold: policy counts, one cold start each per run (default 0 500: the"
        " first is the baseline)",
    )
    policybench.add_argument(
        "--per-host",
        type=int,
        default=50,
        help="with --cold: endpoints per host (the daemon's and synthetic peers')"
        " (default %(default)s)",
    )
    policybench.add_argument(
        "--runs",
        type=int,
        default=1,
        help="with --cold: cold starts per policy count, interleaved (the order alternates)",
    )
    svcbench = lab_sub.add_parser(
        "svcbench",
        parents=[common],
        help="figures: the services table at scale, in a throwaway namespace: cold load of N"
        " services and one backend added per change (render plus nft -f), statements written;"
        " with --latency, TCP connect time through a VIP at each size against direct",
    )
    svcbench.add_argument(
        "--services", type=int, nargs="+", default=[100, 10_000], help="sizes (default 100 10000)"
    )
    svcbench.add_argument("--changes", type=int, default=100, help="changes timed per size")
    svcbench.add_argument(
        "--latency",
        action="store_true",
        help="instead: TCP connect time through a VIP and to its backend directly, with the"
        " table at each size (first-packet latency)",
    )
    svcbench.add_argument(
        "--rounds", type=int, default=5, help="with --latency: rounds, the order alternating"
    )
    svcbench.add_argument(
        "--cold",
        action="store_true",
        help="instead: a whole overlayd started with the largest --services size in etcd, two"
        " endpoints each; time to ready and to enforced, the kernel's table checked",
    )
    svcbench.add_argument(
        "--runs", type=int, default=3, help="with --cold: cold starts (default %(default)s)"
    )
    svcbench.add_argument(
        "--per-host",
        type=int,
        default=200,
        help="with --cold: endpoints per host (the daemon's and synthetic peers')"
        " (default %(default)s)",
    )
    svcbench.add_argument(
        "--connects",
        type=int,
        default=500,
        help="with --latency: connects per path per size per round (default %(default)s)",
    )
    svcchurn = lab_sub.add_parser(
        "svcchurn",
        parents=[common],
        help="figures, on a running lab with --service-network: start/stop cycles of real"
        " (Podman) containers behind one service, then etcd, every host's services table and"
        " DNS compared by `diagnose` on every host (disagreements must be 0)",
    )
    svcchurn.add_argument("--cycles", type=int, default=1000, help="default %(default)s")
    svcchurn.add_argument(
        "--workers", type=int, default=1, help="cycles at once per host (default %(default)s)"
    )
    svcchurn.add_argument("--json", action="store_true")
    dnsbench = lab_sub.add_parser(
        "dnsbench",
        parents=[common],
        help="figures: the DNS responder's answers per second for one client and its CPU"
        " (loopback); with --passes, light passes during a DNS flood (own lab)",
    )
    dnsbench.add_argument("--seconds", type=float, default=5.0, help="per phase")
    dnsbench.add_argument(
        "--passes",
        action="store_true",
        help="instead: reconcile passes with and without a container flooding its host's DNS",
    )
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
    cp.add_argument(
        "--family",
        choices=("v4", "dual", "both"),
        default="v4",
        help="IPv4-only peers, dual-stack peers, or both in turn with their ratio (default v4)",
    )
    cp.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --family both: runs of each family per size, interleaved (the order"
        " alternates), and the median of the per-round ratios (default 1)",
    )
    faults = lab_sub.add_parser(
        "faults",
        parents=[common],
        help="figures: packets lost and repair/convergence times per injected fault (own labs)",
    )
    faults.add_argument("--runs", type=int, default=5)
    faults.add_argument("--outage", type=float, default=60.0, help="etcd outage, seconds")
    allowlist = lab_sub.add_parser(
        "allowlist",
        parents=[common],
        help="figures: from a peer's lease deleted to its address out of the VXLAN allow-list"
        " of the other host (p50, p99), and its frames dropped afterwards (own lab)",
    )
    allowlist.add_argument("--runs", type=int, default=20)
    run = lab_sub.add_parser(
        "run",
        help="start a real container (Podman or Docker) on a lab host, e.g."
        " `lab run h2 -p 8080:80 -- httpd -f -p 80 -h /www`",
    )
    # --name is the container's here (as with `podman run`); --lab names the lab.
    run.add_argument("--lab", dest="name", default="lab", help="lab name")
    run.add_argument("host", help="h1, h2, ...")
    labctl.add_run_options(run)
    # REMAINDER: the container's command keeps its own options; options of
    # ours that follow the host are picked out of it by labctl (up to `--`).
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- and the container's command")
    demo = lab_sub.add_parser(
        "demo",
        parents=[common],
        help="a web server in a Podman container on h2 answers a client in a Docker"
        " container on h1 (needs podman, docker.io, runc)",
    )
    demo.add_argument("--timeout", type=float, default=30.0)
    lab_sub.add_parser("down", parents=[common], help="remove everything the lab made")
    lab.set_defaults(func=labctl.cmd_lab)
    return p


def main(argv: list[str] | None = None) -> int:
    # The store logs a refusal for the daemon's log; here the same error is
    # the command's own message, printed once below.
    logging.getLogger("overlayd.store").addHandler(logging.NullHandler())
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (OverlaydError, StoreUnavailable, ValueError, OSError) as exc:
        print(f"overlayctl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
