"""`overlayctl lab svcchurn`: many start/stop cycles of real containers
behind one service, then etcd, every host's services table and every
host's DNS responder compared, with `overlayctl diagnose`'s services check
run on every host. The issue's "after 1,000 start/stop cycles, etcd,
nftables and DNS agree exactly", measured on a running lab with services
(`overlayctl lab up --service-network 10.96.0.0/16`).

How:
- the service `churn` (selector app=churn, port 80 to 8080) is created
  through `overlayctl service create` (and deleted at the end) unless it
  exists;
- each host runs `workers` loops at once, each cycle one Podman container
  (`podman run -d`, labelled app=churn through CNI_ARGS, which Podman
  passes to overlay-cni) started and removed again (`podman rm -f`): real
  CNI ADD and DEL, registration and unregistration by the host's daemon,
  the endpoint key in etcd written and deleted, every host's services
  table (the service between no backend and a few) and DNS records moved
  each time. Podman, not bare namespaces: at about 1.5 cycles a second on
  2 vCPUs across three hosts, 1,000 cycles take about 11 minutes, which is
  fine for a figure;
- then one anchor container per host, labelled app=churn, is started and
  kept, so that the final comparison has a backend on every host and
  something in each map, set and record; its registration is the newest
  endpoint change, after every removal, and its etcd revision R is what
  every host must enforce: converged when every live host's status says
  R (`overlayctl policy wait --revision R`; a host's status counts policy,
  service and endpoint changes only, so the store's own revision, moved
  by status writes, would never be reached), timed from the anchors' start;
- then `overlayctl diagnose --json` on every host: its failed "services"
  findings are disagreements (each finding's count);
- and every host's responder is asked for the name of every container
  removed (a container's name is a record while it runs, and must be
  NXDOMAIN after: no stale record), beside the anchors' names (their
  addresses: the control); each other answer is a disagreement.
  The figure must be 0.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from overlayd.config import DEFAULT_OVERLAYD_PREFIX
from overlayd.lab.dnsask import ask_in
from overlayd.lab.engines.common import IMAGE, EngineContainer, EngineError
from overlayd.lab.lab import Lab
from overlayd.plan.endpoints import endpoints_prefix
from overlayd.plan.service_check import DnsQuestion
from overlayd.surfaces.subnetfile import read_dns

SERVICE = "churn"
LABEL = ("app", "churn")
PORT, TARGET_PORT = 80, 8080
SLEEP = ("sleep", "1000000")
CONVERGE_TIMEOUT = 120.0  # seconds (`policy wait --timeout` below)
CTL_TIMEOUT = 600.0  # diagnose asks etcd, nft and DNS: seconds, not minutes


@dataclass
class ChurnResult:
    hosts: tuple[int, ...]
    cycles: int
    failed: list[str] = field(default_factory=list)  # what went wrong, per failed cycle
    seconds: float = 0.0
    converge_seconds: float | None = None  # None: not within CONVERGE_TIMEOUT
    revision: int = 0
    # host -> its diagnose's services findings (check, ok, detail, count)
    findings: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    # Names asked of every responder: the removed containers' and the anchors'.
    removed_names: int = 0
    anchor_names: int = 0
    names: dict[int, list[str]] = field(default_factory=dict)  # host -> differences

    @property
    def disagreements(self) -> int:
        failed = (f for found in self.findings.values() for f in found if not f["ok"])
        return sum(int(f.get("count", 1)) for f in failed) + sum(map(len, self.names.values()))


def ctl(lab: Lab, host: int, *args: str, stdin: str | None = None, check: bool = True) -> str:
    """overlayctl in a lab host, with its daemon's settings; its stdout."""
    argv, env = lab.ctl_command(host, list(args))
    done = subprocess.run(
        argv, input=stdin, env=env, capture_output=True, text=True, timeout=CTL_TIMEOUT
    )
    if check and done.returncode != 0:
        raise EngineError(f"overlayctl {' '.join(args)} on h{host}: {done.stderr.strip()}")
    return done.stdout


def services_findings(lab: Lab, host: int) -> list[dict[str, Any]]:
    """`overlayctl diagnose --json` on `host`: its services findings."""
    out = ctl(lab, host, "diagnose", "--json", check=False)
    return [f for f in json.loads(out)["findings"] if str(f["check"]).startswith("services")]


def newest_endpoint_revision(lab: Lab) -> int:
    """The mod revision of the newest key under the endpoints prefix."""

    async def get(store: Any) -> int:
        found, _ = await store.get_prefix_revisions(endpoints_prefix(DEFAULT_OVERLAYD_PREFIX))
        return max((revision for _, revision in found.values()), default=0)

    return lab.etcd(get)


def _ensure_service(lab: Lab, host: int) -> bool:
    """The churn service, made unless it exists; whether it was made here."""
    listed = json.loads(ctl(lab, host, "service", "list", "--json"))
    if any(s["name"] == SERVICE for s in listed["services"]):
        return False
    document = {
        "name": SERVICE,
        "selector": {"matchLabels": dict([LABEL])},
        "ports": [{"name": "http", "port": PORT, "targetPort": TARGET_PORT}],
    }
    ctl(lab, host, "service", "create", "-", "--json", stdin=json.dumps(document))
    return True


def _labels_env() -> dict[str, str]:
    return {"CNI_ARGS": f"OVERLAYD_LABEL_{LABEL[0]}={LABEL[1]}"}


def _cycles(lab: Lab, host: int, names: Sequence[str], failed: list[str]) -> None:
    """One worker: each name a container started and removed again (the
    endpoint takes the container's name: Podman passes it to CNI as
    K8S_POD_NAME)."""
    podman = lab.podman(host)
    for name in names:
        try:
            podman.cli("run", "-d", "--name", name, IMAGE, *SLEEP, env=_labels_env())
        except EngineError as exc:
            failed.append(f"h{host} start {name}: {exc}")
            # Removed all the same, if it was half made.
            podman.cli("rm", "-f", "--time", "0", name, check=False)
            continue
        try:
            podman.cli("rm", "-f", "--time", "0", name)
        except EngineError as exc:
            failed.append(f"h{host} stop {name}: {exc}")


def split(cycles: int, slots: int) -> list[int]:
    """`cycles` shared among `slots` workers, the first ones taking one
    more when it does not divide."""
    return [cycles // slots + (1 if i < cycles % slots else 0) for i in range(slots)]


def churn(
    lab: Lab, cycles: int, workers: int = 1, progress: Callable[[str], None] | None = None
) -> ChurnResult:
    """The cycles, the wait for convergence, and the check on every host."""
    hosts = tuple(lab.hosts())
    if not hosts:
        raise EngineError("the lab is not up")
    config = lab.network_config()
    if config is None or not config.service_networks:
        raise EngineError(
            "the lab has no ServiceNetwork: bring it up with `overlayctl lab up --service-network"
            " 10.96.0.0/16`"
        )
    say = progress or (lambda line: None)
    made = _ensure_service(lab, hosts[0])
    anchors = {h: f"{SERVICE}-anchor-h{h}" for h in hosts}
    result = ChurnResult(hosts, cycles)
    try:
        for host in hosts:  # one at a time: the first builds the image
            lab.podman(host).ensure_started()
        slots = [(h, w) for h in hosts for w in range(workers)]
        shares = split(cycles, len(slots))
        say(f"{cycles} cycles on {len(hosts)} hosts, {workers} worker(s) each")
        names = {
            (h, w): [f"{SERVICE}-h{h}-w{w}-{i}" for i in range(n)]
            for (h, w), n in zip(slots, shares, strict=True)
        }
        started = time.monotonic()
        _together([partial(_cycles, lab, h, n, result.failed) for (h, _), n in names.items()])
        result.seconds = time.monotonic() - started
        running: dict[int, EngineContainer] = {}

        def anchor(host: int) -> None:
            running[host] = lab.podman(host).run(anchors[host], list(SLEEP), env=_labels_env())

        _together([partial(anchor, h) for h in hosts])
        anchored = time.monotonic()
        result.revision = newest_endpoint_revision(lab)
        say(f"cycles done in {result.seconds:.1f} s; waiting for revision {result.revision}")
        wait = ["policy", "wait", "--revision", str(result.revision)]
        argv, env = lab.ctl_command(hosts[0], [*wait, "--timeout", f"{CONVERGE_TIMEOUT:g}"])
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=CONVERGE_TIMEOUT + 60
        )
        if done.returncode == 0:
            result.converge_seconds = time.monotonic() - anchored
        for host in hosts:
            result.findings[host] = services_findings(lab, host)
        removed = [name for chunk in names.values() for name in chunk]
        result.removed_names, result.anchor_names = len(removed), len(running)
        for host in hosts:
            result.names[host] = _names_in_dns(lab, host, removed, running.values())
        return result
    finally:
        for host, name in anchors.items():
            lab.podman(host).remove(name)
        if made:
            ctl(lab, hosts[0], "service", "delete", SERVICE, check=False)


def _names_in_dns(
    lab: Lab, host: int, removed: Sequence[str], kept: Iterable[EngineContainer]
) -> list[str]:
    """Every responder of `host` asked for the removed containers' names
    (NXDOMAIN expected: no stale record) and the kept ones' (their IPv4
    address expected: the control); the differences."""
    servers, domain = read_dns(lab.subnet_file(host))
    if not servers or domain is None:
        return [f"h{host}'s subnet file names no DNS server"]
    questions = [
        DnsQuestion(f"{name}.{domain}.", "A", None, f"container {name}, removed")
        for name in removed
    ]
    questions += [
        DnsQuestion(f"{c.name}.{domain}.", "A", frozenset({str(c.address)}), f"container {c.name}")
        for c in kept
    ]
    found: list[str] = []
    for server in servers:
        found += ask_in(lab.host_ns(host), str(server), questions)
    return found


def _together(jobs: Sequence[Callable[[], object]]) -> None:
    """Each job in a thread of its own, all at once; back when all are.
    A job's exception is raised here (the first one)."""
    failures: list[BaseException] = []

    def run(job: Callable[[], object]) -> None:
        try:
            job()
        except BaseException as exc:  # raised again below, in the caller's thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def lines(result: ChurnResult, workers: int) -> Iterator[str]:
    hosts = len(result.hosts)
    yield (
        f"service {SERVICE}: {result.cycles} start/stop cycles of Podman containers (label"
        f" {LABEL[0]}={LABEL[1]}) on {hosts} hosts, {workers} at a time per host, one anchor"
        " container per host started afterwards and kept for the comparison"
    )
    rate = result.cycles / result.seconds if result.seconds else 0.0
    yield (
        f"  cycles: {result.cycles} in {result.seconds:.1f} s ({rate:.2f} a second),"
        f" {len(result.failed)} failed"
    )
    for failure in result.failed[:5]:
        yield f"    {failure}"
    if result.converge_seconds is None:
        yield (
            f"  converged: NO, revision {result.revision} not in force everywhere after"
            f" {CONVERGE_TIMEOUT:g} s"
        )
    else:
        yield (
            f"  converged: every host enforces etcd revision {result.revision}"
            f" (the anchors' registrations, after every removal)"
            f" {result.converge_seconds:.2f} s after the anchors started (overlayctl policy wait)"
        )
    yield "  agreement, `overlayctl diagnose` services checks on every host:"
    for host, found in sorted(result.findings.items()):
        bad = [f for f in found if not f["ok"]]
        if not bad:
            yield f"    h{host} ok: " + "; ".join(str(f["detail"]) for f in found)
        for f in bad:
            yield f"    h{host} FAIL {f['check']}: {f['detail']}"
    yield (
        f"  container names: every responder asked for the {result.removed_names} removed"
        f" containers' (NXDOMAIN expected) and the {result.anchor_names} anchors' (their"
        " addresses expected):"
    )
    for host, differences in sorted(result.names.items()):
        yield f"    h{host} " + ("ok" if not differences else f"{len(differences)} differ")
        for difference in differences[:5]:
            yield f"      {difference}"
    yield f"  disagreements: {result.disagreements}"
