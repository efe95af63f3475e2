"""overlayd's Docker network plugin against real dockerds in lab hosts.

Each lab host runs overlayd with the plugin on (LabSettings.docker_plugin)
and a plain dockerd (`--bridge=none`) that finds the plugin in its own
/run/docker/plugins (lab/engines/docker.py); `docker network create -d overlayd
--ipam-driver overlayd ovl` is run on every host once. One lab for the module
in gwbridge mode, a second in masquerade mode only for the egress and
published-port test of that mode.

What Docker 20.10 does to a remote-driver network when dockerd restarts
(the restart tests hold it):
- with --live-restore: nothing reaches the plugin, neither at shutdown nor
  at start; libnetwork restores the sandbox from its own store (the
  container's netns bind mount under the exec-root must still be there, see
  lab/engines/docker.py), and a later stop sends Leave, DeleteEndpoint and
  ReleaseAddress as usual;
- without it, SIGTERM: at shutdown its containers stop and each endpoint
  gets Leave, DeleteEndpoint, ReleaseAddress; at start a `--restart always`
  container gets a fresh RequestAddress, CreateEndpoint, Join;
- without it, SIGKILL: nothing at the kill; at start the new dockerd stops
  the container it finds running, libnetwork removes the stale sandbox
  (Leave, DeleteEndpoint, ReleaseAddress), then the restart policy starts
  it with a fresh endpoint.

Figures (printed, not asserted), once:
  OVERLAYD_PLUGIN_FIGURES=1 flock /tmp/overlayd-lab.lock .venv/bin/python -m pytest \
    -s -q tests/lab/test_docker_plugin.py -k figures
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from overlayd.lab import netns
from overlayd.lab.engines import IMAGE, Docker, EngineContainer
from overlayd.lab.lab import Lab, LabSettings
from overlayd.lab.topology import OUTSIDE_SERVER, WHOAMI_PORT
from overlayd.plan.ipam import container_ranges
from tests.conftest import CONVERGE, SESSION_TAG, needs_root, wait_until
from tests.lab.fakes import lab_network
from tests.lab.probes import (
    SLEEP,
    assert_dropped_from_outside,
    fetch,
    global_ipv6,
    outside_get,
    outside_route_to,
    ping_flood,
    sent_received,
    serve,
    subnet6_or_skip,
    wait_published,
)

pytestmark = [needs_root, pytest.mark.lab]

NETWORK = "ovl"


def make_lab(name: str, egress: str) -> Lab:
    lab = Lab(name)
    try:
        lab.up(
            2,
            config=lab_network(),
            settings=LabSettings(
                egress=egress, containers_per_host=0, resync_seconds=1.0, docker_plugin=True
            ),
        )
        for host in lab.hosts():
            wait_until(lab.files(host).docker_plugin_socket.exists, timeout=CONVERGE)
            found = docker(lab, host)
            found.cli("network", "create", "-d", "overlayd", "--ipam-driver", "overlayd", NETWORK)
    except BaseException:
        lab.down()
        raise
    return lab


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = make_lab(f"{SESSION_TAG}p", "gwbridge")
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def masquerade_lab() -> Iterator[Lab]:
    lab = make_lab(f"{SESSION_TAG}q", "masquerade")
    try:
        yield lab
    finally:
        lab.down()


def docker(lab: Lab, host: int) -> Docker:
    found = lab.docker(host, "plain")
    found.ensure_started()
    return found


def run(lab: Lab, host: int, name: str, command: list[str], *extra: str) -> EngineContainer:
    return docker(lab, host).run(name, command, extra=["--network", NETWORK, *extra])


def overlay_address(container: EngineContainer) -> IPv4Address:
    return container.addresses[NETWORK]


def host_local_addresses(lab: Lab, host: int) -> dict[IPv4Address, str]:
    """host-local's reservations in overlay-cni's store: address -> container ID."""
    store = lab.files(host).cni_dir / "ipam" / "overlay"
    found = {}
    for entry in store.glob("*") if store.is_dir() else []:
        try:
            address = IPv4Address(entry.name)
        except ValueError:
            continue  # last_reserved_ip.0, lock
        found[address] = entry.read_text().split()[0]
    return found


def records(lab: Lab, host: int) -> dict[str, Any]:
    path = lab.files(host).cni_dir / "docker-plugin" / "records.json"
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def plugin_request(path: Path, method: str, body: bytes) -> tuple[int, Any]:
    """One HTTP POST over the plugin's unix socket, as dockerd sends it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(
            f"POST /{method} HTTP/1.1\r\nHost: plugin\r\n"
            "Content-Type: application/vnd.docker.plugins.v1.2+json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(payload)


def plugin_events(lab: Lab, host: int, since: int = 0) -> list[tuple[str, str]]:
    """The plugin's (event, detail) log lines of the host's daemon after byte `since`."""
    text = lab.daemon_log(host).read_bytes()[since:].decode(errors="replace")
    return [
        (m.group(1), m.group(2).strip())
        for m in re.finditer(r"event=(docker_\w+)([^\n]*)", text)
        if m.group(1) not in ("docker_request", "docker_plugin_listening")
    ]


def log_size(lab: Lab, host: int) -> int:
    return lab.daemon_log(host).stat().st_size


def bridge_veths(lab: Lab, host: int) -> list[str]:
    """The plugin's host-side veths (ovd*) on overlayd's bridge."""
    ports = json.loads(netns.ip(lab.host_ns(host), "-j", "link", "show", "master", "ovl0"))
    return sorted(p["ifname"] for p in ports if p["ifname"].startswith("ovd"))


def assert_addresses_consistent(lab: Lab, host: int) -> list[IPv4Address]:
    """Docker's running containers on the network, host-local's store, the
    plugin's records and the bridge's veths all tell the same story: one
    address per running container, none twice, none held for nobody."""
    running = [overlay_address(c) for c in docker(lab, host).containers() if NETWORK in c.addresses]
    assert len(set(running)) == len(running), running
    held = {a for a, cid in host_local_addresses(lab, host).items() if cid.startswith("docker-")}
    found = records(lab, host)
    assert held == set(running), (held, running)
    assert {IPv4Address(a) for a in found["addresses"]} == set(running), found
    endpoint_addresses = [IPv4Interface(e["address"]).ip for e in found["endpoints"].values()]
    assert sorted(endpoint_addresses) == sorted(running), found
    assert all(e["sandbox"] for e in found["endpoints"].values()), found
    assert len(bridge_veths(lab, host)) == len(running)
    return running


def in_lower_half(address: IPv4Address, subnet: IPv4Network) -> bool:
    ranges = container_ranges(subnet)
    return ranges.host_local_start <= address <= ranges.host_local_end


# --- tests -------------------------------------------------------------------------


def test_containers_get_lower_half_addresses_on_the_bridge_and_reach_each_other(
    lab: Lab,
) -> None:
    a = run(lab, 1, "pa", serve("from-h1"), "--label", "app=web")
    b = run(lab, 2, "pb", serve("from-h2"))
    try:
        for container in (a, b):
            subnet = lab.subnet(container.host)
            assert in_lower_half(overlay_address(container), subnet), (container, subnet)
            # The host end of its veth is a port of overlayd's bridge, with the overlay's MTU.
            ports = json.loads(
                netns.ip(lab.host_ns(container.host), "-j", "link", "show", "master", "ovl0")
            )
            ours = [p for p in ports if p["ifname"].startswith("ovd")]
            assert len(ours) == 1 and ours[0]["mtu"] == lab.mtu(container.host)
        assert fetch(docker(lab, 1), "pa", overlay_address(b)) == "from-h2\n"
        assert fetch(docker(lab, 2), "pb", overlay_address(a)) == "from-h1\n"
        # What Docker 20.10 passes in CreateEndpoint's options: ports, no labels.
        created = [
            line
            for line in lab.daemon_log(1).read_text().splitlines()
            if "event=docker_endpoint_created" in line
        ]
        assert created and "com.docker.network.endpoint.exposedports" in created[-1]
        assert "app" not in created[-1].partition("options=")[2]
    finally:
        docker(lab, 1).remove("pa")
        docker(lab, 2).remove("pb")


@pytest.mark.parametrize("egress", ["gwbridge", "masquerade"])
def test_egress_and_published_ports(egress: str, request: pytest.FixtureRequest) -> None:
    the_lab: Lab = request.getfixturevalue("lab" if egress == "gwbridge" else "masquerade_lab")
    client = docker(the_lab, 1)
    client.run(
        "pub", serve("published", also_on=8081), publish=["8080:80"], extra=["--network", NETWORK]
    )
    try:
        routes = client.exec("pub", "ip", "-4", "route")
        gateway = str(container_ranges(the_lab.subnet(1)).subnet.network_address + 1)
        if egress == "gwbridge":
            # No gateway from the plugin: libnetwork added docker_gwbridge
            # (eth1) with the default route; the cluster stays on the overlay.
            assert f"10.244.0.0/16 via {gateway} dev eth0" in routes
            assert "default via" in routes and "dev eth1" in routes
        else:
            assert f"default via {gateway} dev eth0" in routes
        seen = client.exec(
            "pub", "sh", "-c", f"echo | timeout 5 nc {OUTSIDE_SERVER} {WHOAMI_PORT}"
        ).strip()
        assert seen == str(the_lab.host_address(1))  # out, NATed to the host's address
        # Both ports serve inside the cluster: asked from a container on h2
        # (so what fails below fails in the network, not in the server).
        address = overlay_address(client.inspect("pub"))
        other = docker(the_lab, 2)
        other.run("pubcli", SLEEP, extra=["--network", NETWORK])
        for port in (80, 8081):
            assert fetch(other, "pubcli", address, port) == "published\n"
        # The outside host gets a route to the container via h1, so its
        # packets reach h1's forward chain.
        with outside_route_to(the_lab, address, 1):
            # Positive control: the published port, through the host.
            wait_published(the_lab, 1, 8080, "published\n")
            # The container's own address, on the port that is published
            # (through the host) and on one that is only listened on:
            # dropped by overlayd's forward chain, not refused.
            assert_dropped_from_outside(the_lab, 1, address, [80, 8081])
            # Through the host, the unpublished port: nothing maps it.
            assert outside_get(the_lab, 1, 8081) is None
    finally:
        client.remove("pub")
        docker(the_lab, 2).remove("pubcli")
    if egress == "masquerade":
        # The published port went with the container (portmap DEL).
        nat = netns.in_ns(the_lab.host_ns(1), "iptables-save", "-t", "nat")
        assert "--dport 8080" not in nat


def test_an_ipv6_network_gives_both_addresses_across_hosts(lab: Lab) -> None:
    """Dual-stack: a `--ipv6` network of the plugin on each host; the
    containers get an address of each family from host-local's halves and
    reach each other over IPv6 across the hosts. Everything goes with them."""
    subnets6 = {host: subnet6_or_skip(lab, host) for host in (1, 2)}
    for host in (1, 2):
        docker(lab, host).cli(
            "network", "create", "-d", "overlayd", "--ipam-driver", "overlayd", "--ipv6", "ovl6"
        )
    try:
        docker(lab, 2).run("six-web", serve("six-h2"), extra=["--network", "ovl6"])
        docker(lab, 1).run("six-cli", SLEEP, extra=["--network", "ovl6"])
        found = {}
        for host, name in ((1, "six-cli"), (2, "six-web")):
            address6 = global_ipv6(docker(lab, host), name)
            shared = container_ranges(subnets6[host])
            assert address6.network == subnets6[host]
            assert int(shared.host_local_start) <= int(address6.ip) <= int(shared.host_local_end)
            found[host] = address6.ip
        assert fetch(docker(lab, 1), "six-cli", found[2]) == "six-h2\n"
        # Both families in the plugin's records and host-local's store.
        assert str(found[1]) in records(lab, 1)["addresses"]
    finally:
        for host, name in ((1, "six-cli"), (2, "six-web")):
            docker(lab, host).remove(name)
            docker(lab, host).cli("network", "rm", "ovl6", check=False)
    # `docker rm` may return before libnetwork's release reached the plugin.
    wait_until(lambda: all(records(lab, h)["addresses"] == {} for h in (1, 2)), timeout=CONVERGE)
    for host in (1, 2):
        store = lab.files(host).cni_dir / "ipam" / "overlay"
        assert str(found[host]) not in {p.name for p in store.iterdir()}


def test_create_run_stop_rm_leaks_no_address(lab: Lab) -> None:
    client = docker(lab, 1)
    before = host_local_addresses(lab, 1)
    container = run(lab, 1, "leak", SLEEP)
    address = overlay_address(container)
    taken = host_local_addresses(lab, 1)
    assert set(taken) - set(before) == {address}
    assert taken[address].startswith("docker-")
    assert records(lab, 1)["addresses"] == {str(address): taken[address]}
    client.cli("stop", "-t", "0", "leak")
    # `docker stop` may return before libnetwork's release reached the plugin.
    wait_until(lambda: host_local_addresses(lab, 1) == before, timeout=CONVERGE)
    wait_until(lambda: records(lab, 1)["addresses"] == {}, timeout=CONVERGE)
    assert records(lab, 1)["endpoints"] == {}
    client.cli("start", "leak")
    again = overlay_address(client.inspect("leak"))
    assert set(host_local_addresses(lab, 1)) - set(before) == {again}
    client.cli("kill", "leak")
    wait_until(lambda: host_local_addresses(lab, 1) == before, timeout=CONVERGE)
    client.cli("rm", "leak")
    assert host_local_addresses(lab, 1) == before
    assert records(lab, 1)["addresses"] == {} and records(lab, 1)["endpoints"] == {}
    ports = netns.ip(lab.host_ns(1), "-br", "link", "show", "master", "ovl0")
    assert "ovd" not in ports


def test_network_rm_with_no_endpoints_succeeds(lab: Lab) -> None:
    client = docker(lab, 1)
    client.cli("network", "create", "-d", "overlayd", "--ipam-driver", "overlayd", "second")
    try:
        client.run("busy", SLEEP, extra=["--network", "second"])
        # Control: Docker refuses while an endpoint is there.
        refused = subprocess.run(
            client.argv("network", "rm", "second"), capture_output=True, text=True, check=False
        )
        assert refused.returncode != 0 and "active endpoints" in refused.stderr
        client.remove("busy")
        client.cli("network", "rm", "second")
        assert "second" not in client.cli("network", "ls", "--format", "{{.Name}}").split()
        assert len(records(lab, 1)["networks"]) == 1  # only the module's `ovl`
    finally:
        client.remove("busy")
        client.cli("network", "rm", "second", check=False)


def test_bad_requests_get_dockers_error_shape_and_the_daemon_keeps_serving(lab: Lab) -> None:
    sock = lab.files(1).docker_plugin_socket
    subnet = lab.subnet(1)
    pool = f"overlayd-{subnet}"
    network_id = records(lab, 1)["networks"].copy().popitem()[0]
    cases = [
        ("NetworkDriver.CreateEndpoint", b'{"NetworkID": ', 400, "not JSON"),
        (
            "NetworkDriver.CreateEndpoint",
            json.dumps(
                {"NetworkID": "f" * 64, "EndpointID": "e" * 64, "Interface": {"Address": "x"}}
            ).encode(),
            404,
            "not an overlayd network",
        ),
        (
            "IpamDriver.RequestAddress",
            json.dumps({"PoolID": pool, "Address": "10.99.0.5"}).encode(),
            400,
            "outside this host's subnet",
        ),
        (
            "NetworkDriver.CreateEndpoint",
            json.dumps(
                {
                    "NetworkID": network_id,
                    "EndpointID": "e" * 64,
                    "Interface": {"Address": "10.99.0.5/24"},
                }
            ).encode(),
            400,
            "not in the network's subnet",
        ),
    ]
    for method, body, status, text in cases:
        got_status, answer = plugin_request(sock, method, body)
        assert (got_status, list(answer)) == (status, ["Err"]), (method, answer)
        assert text in answer["Err"]
    # Nothing was made of them, and the daemon still serves: a good request
    # on the socket, and a real container.
    assert plugin_request(sock, "Plugin.Activate", b"") == (
        200,
        {"Implements": ["NetworkDriver", "IpamDriver"]},
    )
    assert lab.daemon_running(1)
    assert records(lab, 1)["endpoints"] == {}
    container = run(lab, 1, "after", SLEEP)
    try:
        assert in_lower_half(overlay_address(container), subnet)
    finally:
        docker(lab, 1).remove("after")


def test_overlayd_restarted_under_a_plugin_container_loses_no_packet_and_serves_again(
    lab: Lab,
) -> None:
    d1, d2 = docker(lab, 1), docker(lab, 2)
    dst = run(lab, 1, "rdst", SLEEP, "--stop-timeout", "1")
    src = run(lab, 2, "rsrc", serve("rsrc"), "--stop-timeout", "1")
    address = overlay_address(dst)
    try:
        veths = bridge_veths(lab, 1)
        ping = ping_flood(src, address, 6.0)
        time.sleep(1.0)
        since = log_size(lab, 1)
        lab.restart_daemon(1)  # overlayd only: dockerd and its containers go on
        out, _ = ping.communicate(timeout=60)
        sent, received = sent_received(out)
        assert sent >= 500, out
        assert received == sent, out
        assert d1.inspect("rdst").pid == dst.pid
        assert bridge_veths(lab, 1) == veths  # the restarted daemon left the port alone
        # It serves again, from the records it left on disk.
        wait_until(lab.files(1).docker_plugin_socket.exists, timeout=CONVERGE)
        new = run(lab, 1, "rnew", serve("rnew"), "--stop-timeout", "1")
        assert in_lower_half(overlay_address(new), lab.subnet(1))
        assert overlay_address(new) != address
        assert fetch(d2, "rsrc", overlay_address(new)) == "rnew\n"
        assert fetch(d1, "rnew", overlay_address(src)) == "rsrc\n"
        assert_addresses_consistent(lab, 1)
        # The old container's address and endpoint were in the reloaded
        # records: stopping it frees them.
        d1.cli("stop", "rdst")
        # `docker stop` may return before libnetwork's release reached the plugin.
        wait_until(lambda: address not in host_local_addresses(lab, 1), timeout=CONVERGE)
        wait_until(lambda: str(address) not in records(lab, 1)["addresses"], timeout=CONVERGE)
        events = plugin_events(lab, 1, since)
        assert ("docker_address_released", f"address={address}") in events, events
        assert [a for a in assert_addresses_consistent(lab, 1)] == [overlay_address(new)]
    finally:
        for client, name in ((d1, "rdst"), (d1, "rnew"), (d2, "rsrc")):
            client.remove(name)


def test_dockerd_live_restore_keeps_plugin_containers_without_calling_the_plugin(
    lab: Lab,
) -> None:
    """dockerd restarted with --live-restore: the container runs on, with
    its endpoint, and libnetwork restores its sandbox from its own store."""
    live = lab.docker(1, live_restore=True)
    live.restart()
    client = docker(lab, 2)
    try:
        kept = run(lab, 1, "lweb", serve("lweb"), "--stop-timeout", "1")
        run(lab, 2, "lcli", SLEEP, "--stop-timeout", "1")
        assert fetch(client, "lcli", overlay_address(kept)) == "lweb\n"
        before = assert_addresses_consistent(lab, 1)
        since = log_size(lab, 1)
        live.restart()
        after = live.inspect("lweb")
        assert (after.pid, overlay_address(after)) == (kept.pid, overlay_address(kept))
        assert fetch(client, "lcli", overlay_address(kept)) == "lweb\n"
        assert plugin_events(lab, 1, since) == []  # no call at all, either way
        assert assert_addresses_consistent(lab, 1) == before
        # Control: Docker still drives the plugin for that container.
        since = log_size(lab, 1)
        live.cli("stop", "lweb")
        # `docker stop` may return before libnetwork's release reached the plugin.
        wait_until(
            lambda: "docker_address_released" in [e for e, _ in plugin_events(lab, 1, since)],
            timeout=CONVERGE,
        )
        assert [e for e, _ in plugin_events(lab, 1, since)] == [
            "docker_leave",
            "docker_endpoint_deleted",
            "docker_address_released",
        ]
        assert assert_addresses_consistent(lab, 1) == []
    finally:
        live.remove("lweb")
        client.remove("lcli")
        lab.docker(1, live_restore=False).restart()


def test_dockerd_restart_brings_restart_policy_plugin_containers_back(lab: Lab) -> None:
    """dockerd restarted without live-restore: its containers stop with it;
    `--restart always` ones start again, each with a fresh endpoint."""
    d1 = docker(lab, 1)
    client = docker(lab, 2)
    try:
        web = run(lab, 1, "aweb", serve("aweb"), "--restart", "always", "--stop-timeout", "1")
        once = run(lab, 1, "aonce", SLEEP, "--stop-timeout", "1")
        run(lab, 2, "acli", SLEEP, "--stop-timeout", "1")
        assert fetch(client, "acli", overlay_address(web)) == "aweb\n"
        assert set(assert_addresses_consistent(lab, 1)) == {
            overlay_address(web),
            overlay_address(once),
        }
        since = log_size(lab, 1)
        d1.restart()
        wait_until(lambda: d1.inspect("aweb").pid > 0, timeout=CONVERGE)
        after = d1.inspect("aweb")
        assert after.pid != web.pid
        assert d1.inspect("aonce").pid == 0
        events = plugin_events(lab, 1, since)
        names = [e for e, _ in events]
        # Shutdown: both endpoints torn down; start: one fresh one, after them.
        shutdown = ["docker_leave", "docker_endpoint_deleted", "docker_address_released"]
        start = ["docker_address_taken", "docker_endpoint_created", "docker_join"]
        assert sorted(names[:6]) == sorted(shutdown * 2) and names[6:] == start, events
        released = {d for e, d in events if e == "docker_address_released"}
        assert released == {f"address={overlay_address(c)}" for c in (web, once)}
        assert events[6][1].startswith(f"address={overlay_address(after)} ")
        assert assert_addresses_consistent(lab, 1) == [overlay_address(after)]
        assert fetch(client, "acli", overlay_address(after)) == "aweb\n"
    finally:
        d1.remove("aweb")
        d1.remove("aonce")
        client.remove("acli")


# --- figures (printed, not asserted on time) --------------------------------------

FIGURES = os.environ.get("OVERLAYD_PLUGIN_FIGURES") == "1"
ROUNDS = 10

# In a namespace: wait until http://ADDR/ answers 200, print the seconds
# since the monotonic time given (CLOCK_MONOTONIC is the same in every
# namespace of the machine).
_PROBE = """
import socket, sys, time
address, started = sys.argv[1], float(sys.argv[2])
while True:
    try:
        with socket.create_connection((address, 80), timeout=0.2) as conn:
            conn.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            if conn.recv(64).split(b" ")[1:2] == [b"200"]:
                break
    except OSError:
        pass
    time.sleep(0.005)
print(time.monotonic() - started)
"""

# In the outside namespace: the seconds each of N TCP connects to ADDR:PORT took.
_CONNECTS = """
import socket, sys, time
address, port, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(rounds):
    started = time.monotonic()
    with socket.create_connection((address, port), timeout=5):
        print(time.monotonic() - started)
    time.sleep(0.1)
"""


@pytest.mark.skipif(not FIGURES, reason="figures only on demand: OVERLAYD_PLUGIN_FIGURES=1")
def test_print_run_to_reachable_and_published_port_figures(lab: Lab) -> None:
    """Prints: `docker run -d --network ovl` to the container answering HTTP
    from a container on the other host, and connect time from the outside
    host to a `-p` port, in the module lab's egress mode (gwbridge)."""
    client = run(lab, 2, "fcli", SLEEP, "--stop-timeout", "1")
    d1 = docker(lab, 1)
    reachable: list[float] = []
    run_returned: list[float] = []
    try:
        for i in range(ROUNDS):
            name = f"fig{i}"
            started = time.monotonic()
            # The address is only known once `docker run` returned (and
            # inspect answered): both count in the figure.
            container = run(lab, 1, name, serve(name), "--stop-timeout", "1")
            run_returned.append(time.monotonic() - started)
            out = netns.in_ns(
                client.netns_path,
                sys.executable,
                "-c",
                _PROBE,
                str(overlay_address(container)),
                repr(started),
                timeout=CONVERGE,
            )
            reachable.append(float(out.strip()))
            d1.remove(name)
        d1.run("fpub", serve("fpub"), publish=["8090:80"], extra=["--network", NETWORK])
        wait_until(lambda: outside_get(lab, 1, 8090) == "fpub\n", timeout=CONVERGE, step=0.3)
        out = netns.in_ns(
            lab.outside_ns,
            sys.executable,
            "-c",
            _CONNECTS,
            str(lab.host_address(1)),
            "8090",
            str(ROUNDS),
        )
        connects = [float(line) for line in out.split()]
    finally:
        for name in [f"fig{i}" for i in range(ROUNDS)] + ["fpub"]:
            d1.remove(name)
        docker(lab, 2).remove("fcli")
    ms = [round(s * 1000, 1) for s in reachable]
    print(f"\nplugin figures, egress {lab.settings().egress}, {ROUNDS} rounds")
    print(
        f"docker run -d --network {NETWORK} -> answers HTTP from a container on h2: "
        f"median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms (all: {ms})"
    )
    print(
        "  of which `docker run` + inspect returned after: median "
        f"{statistics.median(run_returned) * 1000:.0f} ms"
    )
    cms = [round(s * 1000, 2) for s in connects]
    print(
        f"TCP connect outside -> h1:8090 (-p 8090:80): median {statistics.median(cms):.2f} ms, "
        f"max {max(cms):.2f} ms (all: {cms})"
    )
    assert len(reachable) == ROUNDS and len(connects) == ROUNDS


def test_dockerd_killed_without_live_restore_cleans_up_through_the_plugin(lab: Lab) -> None:
    """dockerd killed (SIGKILL: no shutdown) under a running container:
    the new dockerd finds it running, stops it, and releases its endpoint
    through the plugin; its restart policy brings it back with a new one."""
    d1 = docker(lab, 1)
    client = docker(lab, 2)
    try:
        web = run(lab, 1, "kweb", serve("kweb"), "--restart", "always", "--stop-timeout", "1")
        run(lab, 2, "kcli", SLEEP, "--stop-timeout", "1")
        assert fetch(client, "kcli", overlay_address(web)) == "kweb\n"
        assert assert_addresses_consistent(lab, 1) == [overlay_address(web)]
        since = log_size(lab, 1)
        d1.restart(signal.SIGKILL)
        wait_until(lambda: d1.inspect("kweb").pid not in (0, web.pid), timeout=CONVERGE)
        after = d1.inspect("kweb")
        # Nothing at the kill; at start, libnetwork removes the stale
        # sandbox through the plugin, then the restart policy makes a new one.
        events = plugin_events(lab, 1, since)
        assert [e for e, _ in events] == [
            "docker_leave",
            "docker_endpoint_deleted",
            "docker_address_released",
            "docker_address_taken",
            "docker_endpoint_created",
            "docker_join",
        ], events
        assert events[2][1] == f"address={overlay_address(web)}"
        wait_until(lambda: len(bridge_veths(lab, 1)) == 1, timeout=CONVERGE)
        assert assert_addresses_consistent(lab, 1) == [overlay_address(after)]
        assert fetch(client, "kcli", overlay_address(after)) == "kweb\n"
    finally:
        d1.remove("kweb")
        client.remove("kcli")


def overlayctl(lab: Lab, host: int, *args: str) -> subprocess.CompletedProcess[str]:
    argv, env = lab.ctl_command(host, list(args))
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


def registered(lab: Lab) -> dict[str, dict[str, Any]]:
    """The usable endpoints by name, as `overlayctl endpoints` lists them."""
    listed = overlayctl(lab, 1, "endpoints", "--json")
    assert listed.returncode == 0, listed.stderr
    return {e["name"]: e for e in json.loads(listed.stdout)["endpoints"]}


def test_join_registers_endpoints_with_driver_option_labels_for_policy(
    lab: Lab, tmp_path: Path
) -> None:
    """Docker 20.10 passes no container name or labels to the plugin; the
    endpoint's driver options (`docker network connect --driver-opt`) name
    and label it. A policy selecting the label closes the container to the
    other host, while a container without it stays open (the positive
    control); the container's removal unregisters it."""
    d1, d2 = docker(lab, 1), docker(lab, 2)
    try:
        d1.cli("create", "--name", "lweb", "--network", NETWORK, IMAGE, *serve("lweb"))
        d1.cli("network", "disconnect", NETWORK, "lweb")
        d1.cli(
            "network", "connect",
            "--driver-opt", "overlayd.label.app=dweb",
            "--driver-opt", "overlayd.name=lweb",
            NETWORK, "lweb",
        )  # fmt: skip
        d1.cli("start", "lweb")
        labelled = d1.inspect("lweb")
        plain = run(lab, 1, "lplain", serve("lplain"))
        run(lab, 2, "lcli", SLEEP)
        found = registered(lab)
        endpoint_id = labelled_endpoint_id(d1, "lweb")
        assert found["lweb"]["labels"] == {"app": "dweb"}
        assert found["lweb"]["id"] == endpoint_id
        assert found["lweb"]["addresses"][0] == str(overlay_address(labelled))
        # Without options: named by the endpoint ID's first 12 digits, unlabelled.
        plain_id = labelled_endpoint_id(d1, "lplain")
        assert found[plain_id[:12]]["labels"] == {}
        policy = tmp_path / "p.json"
        policy.write_text(
            json.dumps({"name": "dweb-closed", "selector": {"matchLabels": {"app": "dweb"}}})
        )
        applied = overlayctl(lab, 2, "policy", "apply", str(policy), "--wait")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert fetch(d2, "lcli", overlay_address(plain)) == "lplain\n"
        assert d2.http_get("lcli", f"http://{overlay_address(labelled)}/", timeout=3) is None
        deleted = overlayctl(lab, 2, "policy", "delete", "dweb-closed", "--wait")
        assert deleted.returncode == 0, deleted.stdout + deleted.stderr
        assert fetch(d2, "lcli", overlay_address(labelled)) == "lweb\n"
        d1.remove("lweb")
        assert "lweb" not in registered(lab)
    finally:
        for engine, name in ((d1, "lweb"), (d1, "lplain"), (d2, "lcli")):
            engine.remove(name)


def labelled_endpoint_id(engine: Docker, name: str) -> str:
    """The container's endpoint ID on the plugin's network."""
    networks = json.loads(
        engine.cli("inspect", "--format", "{{json .NetworkSettings.Networks}}", name)
    )
    return str(networks[NETWORK]["EndpointID"])
