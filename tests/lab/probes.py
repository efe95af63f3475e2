"""What several lab test modules ask of a lab host: its daemon's HTTP
endpoints, a daemon run once to see how it starts (or refuses to), a
100/s ping between containers to count lost packets; and for the engine
tests: what their containers run, a page fetched from one container by
another, and connections from the lab's outside host, through a host's
published port or straight at a container's address (dropped by overlayd's
forward chain, after a positive control that lets them through)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv6Address, IPv6Interface, IPv6Network

import pytest

from overlayd.lab import netns
from overlayd.lab.engines import Engine, EngineContainer
from overlayd.lab.lab import Lab
from overlayd.lab.topology import OUTSIDE_ROUTER
from overlayd.plan.egress import FAMILY, TABLE
from tests.conftest import CONVERGE, wait_until

SLEEP = ["sleep", "1000000"]


def serve(page: str, *, also_on: int | None = None) -> list[str]:
    """busybox httpd on port 80 serving `page` (and on `also_on` too)."""
    second = f"httpd -p {also_on} -h /www && " if also_on else ""
    return ["sh", "-c", f"echo {page} > /www/index.html && {second}exec httpd -f -p 80 -h /www"]


def fetch(
    client: Engine, name: str, server: IPv4Address | IPv6Address | None, port: int = 80
) -> str | None:
    """The page http://server:port/ serves, fetched from container `name`,
    retried: the first packets of a new container may wait for ARP (or
    neighbour discovery) and the bridge."""
    assert server is not None
    body: str | None = None
    host = f"[{server}]" if server.version == 6 else str(server)

    def answered() -> bool:
        nonlocal body
        body = client.http_get(name, f"http://{host}:{port}/", timeout=3)
        return body is not None

    wait_until(answered, timeout=CONVERGE, step=0.2)
    return body


def global_ipv6(engine: Engine, name: str) -> IPv6Interface:
    """Container `name`'s global IPv6 address on eth0, as its kernel has it."""
    out = engine.exec(name, "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global")
    (address,) = [IPv6Interface(w) for line in out.splitlines() for w in line.split()[3:4]]
    return address


def subnet6_or_skip(lab: Lab, host: int) -> IPv6Network:
    """The host's IPv6 subnet; the test is skipped in an IPv4-only lab (the
    lab's dual-stack support is another branch's work, v6-lab)."""
    subnet6 = getattr(lab, "subnet6", None)
    found = subnet6(host) if subnet6 is not None else None
    if not isinstance(found, IPv6Network):
        pytest.skip("needs a dual-stack lab")
    return found


# curl's exit codes for the two ways a connection fails: 7, nothing
# listens or no route (a refusal, an ICMP error); 28, no answer at all
# before --max-time (the packets were dropped on the way).
CURL_COULD_NOT_CONNECT = 7
CURL_TIMED_OUT = 28


def outside_curl(
    lab: Lab, address: IPv4Address | None, port: int, *, timeout: float = 3
) -> tuple[int, str]:
    """curl from the lab's outside host to address:port: its exit code and
    the page (stderr when it failed)."""
    assert address is not None
    out = subprocess.run(
        netns.nsenter_argv(
            lab.outside_ns, "curl", "-sS", "--max-time", f"{timeout:g}", f"http://{address}:{port}/"
        ),
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=False,
    )
    return out.returncode, out.stdout if out.returncode == 0 else out.stderr.strip()


def outside_get(lab: Lab, host: int, port: int, *, timeout: float = 3) -> str | None:
    """A connection from the lab's outside host to the host's underlay
    address: the page, or None if it was refused or timed out."""
    code, text = outside_curl(lab, lab.host_address(host), port, timeout=timeout)
    return text if code == 0 else None


def wait_published(lab: Lab, host: int, port: int, page: str) -> None:
    """Until the host's published `port` serves `page` to the outside host
    (the engine's port mapping and the server take a moment after `run`)."""
    wait_until(lambda: outside_get(lab, host, port) == page, timeout=CONVERGE, step=0.2)


@contextmanager
def outside_route_to(lab: Lab, container: IPv4Address | None, host: int) -> Iterator[None]:
    """A /32 route in the outside namespace to `container` via its host's
    underlay address, for as long as the block runs: without it the outside
    host has no route to the cluster at all, and a connection fails there
    ("Network unreachable") whatever the host's firewall would do."""
    assert container is not None
    netns.ip(
        lab.outside_ns, "route", "replace", f"{container}/32", "via", str(lab.host_address(host))
    )
    try:
        yield
    finally:
        netns.ip(lab.outside_ns, "route", "del", f"{container}/32", check=False)


def forward_state(lab: Lab, host: int) -> str:
    """The host's nftables ruleset and iptables' filter table, for a failure
    message: which rule should have dropped a packet and did not."""
    ns = lab.host_ns(host)
    return (
        netns.in_ns(ns, "nft", "list", "ruleset", check=False)
        + netns.in_ns(ns, "iptables-save", "-t", "filter", check=False)
        + netns.in_ns(ns, "iptables-save", "-t", "nat", check=False)
    )


# The rule the positive control puts at the head of overlayd's forward
# chain, found again by its comment.
CONTROL_COMMENT = "lab positive control"
# How often the control inserts its rule again after overlayd's check pass
# removed it (the pass rewrites a chain that differs from what it wrote)
# before the probe could get through.
CONTROL_ATTEMPTS = 10


def _nft(lab: Lab, host: int, *args: str, check: bool = True) -> str:
    return netns.in_ns(lab.host_ns(host), "nft", *args, check=check)


def _control_handles(lab: Lab, host: int) -> list[int]:
    """Handles of the control's rules now in overlayd's forward chain."""
    listing = _nft(lab, host, "-a", "list", "chain", FAMILY, TABLE, "forward", check=False)
    return [
        int(found.group(1))
        for line in listing.splitlines()
        if CONTROL_COMMENT in line and (found := re.search(r"# handle (\d+)", line))
    ]


def _insert_control(lab: Lab, host: int, address: IPv4Address) -> int:
    """An accept for new connections from the outside host to `address`,
    ahead of overlayd's isolation rules; its handle."""
    echoed = _nft(
        lab, host, "--echo", "--handle", "insert", "rule", FAMILY, TABLE, "forward",
        "ip", "saddr", str(OUTSIDE_ROUTER), "ip", "daddr", str(address),
        "accept", "comment", f'"{CONTROL_COMMENT}"',
    )  # fmt: skip
    found = re.search(r"# handle (\d+)", echoed)
    assert found, echoed
    return int(found.group(1))


def _answers_with_control(
    lab: Lab, host: int, address: IPv4Address, port: int
) -> tuple[int, str, bool]:
    """curl from outside to address:port while the control's accept rule is
    in overlayd's forward chain: exit code, text, and whether the rule was
    there all along. overlayd's check pass removes any rule it did not
    write (at each resync), so a probe that failed while the rule was gone
    is retried with the rule inserted again; one that failed with the rule
    in place all along (its handle, never reused in a table, still listed
    after the probe) is the answer."""
    code, text = CURL_TIMED_OUT, "not tried"
    for _ in range(CONTROL_ATTEMPTS):
        handles = _control_handles(lab, host)
        handle = handles[0] if handles else _insert_control(lab, host, address)
        code, text = outside_curl(lab, address, port, timeout=3)
        if code == 0 or handle in _control_handles(lab, host):
            return code, text, True
    return code, text, False


def _remove_control(lab: Lab, host: int) -> None:
    for handle in _control_handles(lab, host):
        _nft(lab, host, "delete", "rule", FAMILY, TABLE, "forward", "handle", str(handle),
             check=False)  # fmt: skip


def assert_dropped_from_outside(
    lab: Lab, host: int, address: IPv4Address | None, ports: list[int]
) -> None:
    """Connections from the outside host straight at a container of `host`
    (routed there via the host: outside_route_to) time out on each port:
    dropped on the way (overlayd's forward chain), not refused by the host
    and not unreachable. The caller shows they are served from inside the
    cluster, and that the host's published port answers from outside.

    Positive control first: with an accept for exactly these connections at
    the head of overlayd's forward chain, they answer. So the way there and
    the container's reply back (in gwbridge mode by its default route on
    the gwbridge, with its overlay address as source) both work, and the
    timeouts after the accept is gone come from the forward chain's drop."""
    assert address is not None
    try:
        for port in ports:
            code, text, held = _answers_with_control(lab, host, address, port)
            assert code == 0, (
                f"{address}:{port} from outside with an accept rule in overlayd's forward"
                f" chain ({'in place all along' if held else 'removed by every check pass'}):"
                f" curl exit {code} ({text!r}), so a timeout without the rule proves nothing\n"
                + forward_state(lab, host)
            )
    finally:
        _remove_control(lab, host)
    assert _control_handles(lab, host) == []
    for port in ports:
        code, text = outside_curl(lab, address, port, timeout=2)
        assert code == CURL_TIMED_OUT, (
            f"{address}:{port} from outside: curl exit {code} ({text!r}), not a timeout\n"
            + forward_state(lab, host)
        )


def http_get(lab: Lab, host: int, path: str) -> tuple[int, str]:
    """Status and body of `path` on the host's metrics address."""
    script = (
        "import urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://127.0.0.1:9469{path}', timeout=30)\n"
        "    print(r.status); print(r.read().decode(), end='')\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode(), end='')\n"
    )
    out = netns.in_ns(lab.host_ns(host), sys.executable, "-c", script)
    code, _, body = out.partition("\n")
    return int(code), body


def run_daemon_once(
    lab: Lab, *args: str, bridge: str = "badbr"
) -> subprocess.CompletedProcess[str]:
    """overlayd in h1's namespace with the lab's etcd (and h1's certificate)
    and underlay, to the end; `args` come last, so they override (an empty
    value drops a setting)."""
    return subprocess.run(
        netns.module_argv(
            lab.host_ns(1),
            "overlayd.cli.daemon",
            *lab.etcd_flags(1),
            "--iface",
            "eth0",
            "--bridge",
            bridge,
            "--subnet-file",
            "/nonexistent/subnet.env",
            "--control-socket",
            str(lab.state_dir / "once.sock"),
            "--metrics-address",
            "off",
            *args,
        ),
        capture_output=True,
        text=True,
        timeout=CONVERGE,
    )


def ping_flood(src: EngineContainer, dst: IPv4Address, seconds: float) -> subprocess.Popen[str]:
    """iputils ping at 100/s inside the container's network namespace."""
    count = int(seconds * 100)
    return subprocess.Popen(
        netns.nsenter_argv(
            src.netns_path, "ping", "-n", "-q", "-i", "0.01", "-c", str(count), "-W", "1", str(dst)
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def sent_received(out: str) -> tuple[int, int]:
    found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert found, out
    return int(found.group(1)), int(found.group(2))
