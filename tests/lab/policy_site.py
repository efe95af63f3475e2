"""What the lab's network policy tests share (test_policy.py,
test_policy_lifecycle.py): Podman containers registered by overlay-cni
with labels, each running the echo server (overlayd/lab/echo.py) on the
test's ports; overlayctl run in a host's namespace with its daemon's
settings; probes over TCP and UDP, both families, checked against what must
pass and what must not; and the policy table's sets as a host's kernel
holds them."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

from overlayd.lab import echo, netns
from overlayd.lab.engines import EngineContainer
from overlayd.lab.lab import Lab
from overlayd.lab.topology import (
    OUTSIDE_ROUTER,
    OUTSIDE_ROUTER6,
    OUTSIDE_SERVER,
    OUTSIDE_SERVER6,
)
from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.policy_model import LabelSelector
from overlayd.plan.policy_rules import TABLE, listed_elements, set_name
from tests.lab.probes import SLEEP

WAIT = 1.5  # seconds a refused probe waits for an answer
CTL_TIMEOUT = 90  # seconds any overlayctl command may take
WAIT_TIMEOUT = "60"  # `--wait --timeout`: generous; the figure is printed


@dataclass
class Box:
    """A Podman container of the lab, with its echo server."""

    name: str
    host: int
    container: EngineContainer
    labels: dict[str, str] = field(default_factory=dict)
    addresses: dict[int, str] = field(default_factory=dict)  # family -> address
    server: subprocess.Popen[bytes] | None = None

    @property
    def netns(self) -> str:
        return self.container.netns_path


@dataclass
class Site:
    lab: Lab
    boxes: dict[str, Box] = field(default_factory=dict)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)  # not in a box
    dir: Path = Path()
    waits_ms: list[float] = field(default_factory=list)

    def address(self, target: str, family: int) -> str:
        if target == "outside":
            return str(OUTSIDE_SERVER if family == 4 else OUTSIDE_SERVER6)
        if target == "router":  # the outside server again, outside the ipBlock
            return str(OUTSIDE_ROUTER if family == 4 else OUTSIDE_ROUTER6)
        return self.boxes[target].addresses[family]

    # --- containers ------------------------------------------------------------

    def run(self, name: str, host: int, labels: Mapping[str, str], ports: Sequence[int]) -> Box:
        """`start`, then `serve`."""
        return self.serve(self.start(name, host, labels), ports)

    def start(self, name: str, host: int, labels: Mapping[str, str]) -> Box:
        """A Podman container on `host`, labelled through CNI_ARGS (Podman
        passes its own CNI_ARGS on to overlay-cni); `podman run` returns
        after CNI ADD, so after the registration is in force on its host."""
        cni_args = ";".join(f"OVERLAYD_LABEL_{k}={v}" for k, v in labels.items())
        container = self.lab.podman(host).run(name, SLEEP, env={"CNI_ARGS": cni_args})
        box = Box(name, host, container, dict(labels))
        self.boxes[name] = box
        box.addresses = {4: str(container.address), 6: ipv6_in(container.netns_path)}
        return box

    def serve(self, box: Box, ports: Sequence[int]) -> Box:
        """The echo server on `ports` in the box's namespace."""
        box.server = echo.serve_in(box.netns, ports)
        return box

    def remove(self, name: str) -> None:
        """The container stopped and removed (CNI DEL unregisters it)."""
        box = self.boxes.pop(name)
        stop_server(box.server)
        self.lab.podman(box.host).remove(name)

    def forget(self, name: str) -> None:
        """The box's server stopped, the container left to whoever removes
        its host (a dead host's engine goes with it)."""
        stop_server(self.boxes.pop(name).server)

    def close(self) -> None:
        """Every server stopped (the containers go with the lab)."""
        for server in [*self.servers, *(b.server for b in self.boxes.values())]:
            stop_server(server)

    # --- overlayctl ------------------------------------------------------------

    def ctl(
        self, *args: str, host: int = 1, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """overlayctl in a lab host's namespace, with its daemon's settings."""
        argv, env = self.lab.ctl_command(host, list(args))
        # A command that hangs shows where, in the failure (SIGABRT below).
        env["PYTHONFAULTHANDLER"] = "1"
        proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            out, err = proc.communicate(timeout=CTL_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate()
            raise AssertionError(f"overlayctl {' '.join(args)} hung:\n{out}{err}") from None
        done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and done.returncode != 0:
            raise AssertionError(
                f"overlayctl {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
            )
        found = re.search(r"\((\d+) ms\)", done.stdout)
        if found:
            self.waits_ms.append(float(found.group(1)))
        return done

    def apply(self, name: str, document: dict[str, Any]) -> None:
        path = self.dir / f"{name}.json"
        path.write_text(json.dumps(document))
        self.ctl("policy", "apply", str(path), "--wait", "--timeout", WAIT_TIMEOUT)

    def delete_all(self) -> None:
        listed = json.loads(self.ctl("policy", "list", "--json").stdout)
        for row in listed:
            self.ctl("policy", "delete", row["name"], "--wait", "--timeout", WAIT_TIMEOUT)

    def wait(self) -> None:
        """Until every live host enforces the newest change (`policy wait`)."""
        self.ctl("policy", "wait", "--timeout", WAIT_TIMEOUT)

    def endpoints(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.ctl("endpoints", "--json").stdout)
        return found


def ipv6_in(ns_path: str) -> str:
    """The global IPv6 address on eth0 in a namespace."""
    out = netns.in_ns(ns_path, "ip", "-6", "-j", "addr", "show", "dev", "eth0", "scope", "global")
    # (iproute2's JSON lists the addresses its filter left out as {}.)
    (address,) = [
        a["local"] for link in json.loads(out) for a in link.get("addr_info", []) if "local" in a
    ]
    return str(address)


def stop_server(server: subprocess.Popen[bytes] | None) -> None:
    if server is not None:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


# (source, protocol, destination, port, must pass)
Case = tuple[str, str, str, int, bool]


def both(src: str, dst: str, port: int, passes: bool) -> list[Case]:
    return [(src, "tcp", dst, port, passes), (src, "udp", dst, port, passes)]


def expect(site: Site, cases: Sequence[Case], *, wait: float = WAIT, retries: int = 2) -> None:
    """Every case, over IPv4 and IPv6, as it must be; the sources probe at
    the same time (one process each), so a batch costs one `wait`. A
    connection that must pass and did not is tried `retries` times more (a
    new neighbour entry); one that must not pass and did is a failure at
    once."""
    wrong: list[str] = []
    pending: dict[str, list[tuple[Case, int]]] = {}
    for case in cases:
        for family in (4, 6):
            pending.setdefault(case[0], []).append((case, family))
    for attempt in range(retries + 1):
        running = {
            src: echo.start_probing(
                site.boxes[src].netns,
                wait,
                [(c[1], site.address(c[2], fam), c[3]) for c, fam in items],
            )
            for src, items in pending.items()
        }
        retry: dict[str, list[tuple[Case, int]]] = {}
        for src, proc in running.items():
            for (case, family), answer in zip(pending[src], echo.answers(proc, wait), strict=True):
                passes = case[4]
                if answer is not None and not passes:
                    wrong.append(f"{case} IPv{family}: answered ({answer}) but must not")
                elif answer is None and passes:
                    if attempt == retries:
                        wrong.append(f"{case} IPv{family}: no answer but must pass")
                    else:
                        retry.setdefault(src, []).append((case, family))
        if not retry:
            break
        pending = retry
    assert not wrong, "\n".join(wrong) + "\n" + ruleset(site)


def ruleset(site: Site) -> str:
    return "".join(
        f"--- h{host}\n"
        + netns.in_ns(site.lab.host_ns(host), "nft", "list", "table", "inet", TABLE, check=False)
        for host in site.lab.hosts()
    )


def check(site: Site, src: str, dst: str, port: str, allowed: bool) -> dict[str, Any]:
    """`overlayctl policy check` agrees (exit 0 allowed, 1 denied)."""
    done = site.ctl("policy", "check", src, dst, port, "--json", host=2, check=False)
    assert done.returncode == (0 if allowed else 1), done.stdout + done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def k8s(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


# --- the policy table as a host's kernel holds it --------------------------------


def policy_sets(
    lab: Lab, host: int, *, within: Sequence[IPNetwork] = ()
) -> dict[str, frozenset[IPAddress]]:
    """Set name -> addresses in the host's `inet overlayd_policy` table
    ({} when there is no table); the MAC sets (link-local) are left out,
    and with `within`, the addresses outside those networks (a local
    container's gwbridge addresses, in gwbridge egress mode)."""
    listing = netns.in_ns(lab.host_ns(host), "nft", "-j", "list", "table", "inet", TABLE,
                          check=False)  # fmt: skip
    if not listing.strip():
        return {}
    return {
        name: frozenset(
            e
            for e in elements
            if isinstance(e, IPv4Address | IPv6Address)
            and (not within or any(e in n for n in within if n.version == e.version))
        )
        for name, elements in listed_elements(listing).items()
        if not name.endswith("_mac")
    }


def selector_sets(labels: Mapping[str, str]) -> dict[int, str]:
    """The names of the sets of a matchLabels selector, by family."""
    selector = LabelSelector(tuple(sorted(labels.items())))
    return {version: set_name(selector, version) for version in (4, 6)}


def wanted_sets(
    boxes: Sequence[Box], selectors: Sequence[Mapping[str, str]]
) -> dict[str, frozenset[IPAddress]]:
    """What every host's sets must hold for these matchLabels selectors:
    each the addresses of exactly the boxes it selects, cluster-wide."""
    found: dict[str, frozenset[IPAddress]] = {}
    for labels in selectors:
        chosen = [b for b in boxes if labels.items() <= b.labels.items()]
        for version, name in selector_sets(labels).items():
            found[name] = frozenset(ip_address(b.addresses[version]) for b in chosen)
    return found
