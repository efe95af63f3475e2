"""overlayd's Docker network plugin against real dockerds in lab hosts.

Each lab host runs overlayd with the plugin on (LabSettings.docker_plugin)
and a plain dockerd (`--bridge=none`) that finds the plugin in its own
/run/docker/plugins (lab/engines.py); `docker network create -d overlayd
--ipam-driver overlayd ovl` is run on every host once. One lab for the module
in gwbridge mode, a second in masquerade mode only for the egress and
published-port test of that mode.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from overlayd.lab import netns
from overlayd.lab.engines import Docker, EngineContainer
from overlayd.lab.lab import Lab, LabSettings
from overlayd.lab.topology import OUTSIDE_SERVER, WHOAMI_PORT
from overlayd.plan.ipam import container_ranges
from tests.conftest import CONVERGE, SESSION_TAG, needs_root, wait_until
from tests.lab.fakes import lab_network

pytestmark = [needs_root, pytest.mark.lab]

NETWORK = "ovl"
SLEEP = ["sleep", "1000000"]


def serve(page: str, *, also_on: int | None = None) -> list[str]:
    """busybox httpd on port 80 serving `page` (and on `also_on` too)."""
    second = f"httpd -p {also_on} -h /www && " if also_on else ""
    return ["sh", "-c", f"echo {page} > /www/index.html && {second}exec httpd -f -p 80 -h /www"]


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


def fetch(client: Docker, name: str, server: IPv4Address) -> str | None:
    body: str | None = None

    def answered() -> bool:
        nonlocal body
        body = client.http_get(name, f"http://{server}/", timeout=3)
        return body is not None

    wait_until(answered, timeout=CONVERGE, step=0.2)
    return body


def outside_get(lab: Lab, host: int, port: int, *, timeout: float = 3) -> str | None:
    """From the lab's outside host to the host's underlay address."""
    out = subprocess.run(
        netns.enter_argv(
            lab.outside_ns,
            "curl",
            "-sS",
            "--max-time",
            f"{timeout:g}",
            f"http://{lab.host_address(host)}:{port}/",
        ),
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=False,
    )
    return out.stdout if out.returncode == 0 else None


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
        wait_until(
            lambda: outside_get(the_lab, 1, 8080) == "published\n", timeout=CONVERGE, step=0.3
        )
        # Control: the container listens on 8081 too, but it is not published.
        assert client.http_get("pub", "http://127.0.0.1:8081/") == "published\n"
        assert outside_get(the_lab, 1, 8081) is None
    finally:
        client.remove("pub")
    if egress == "masquerade":
        # The published port went with the container (portmap DEL).
        nat = netns.in_ns(the_lab.host_ns(1), "iptables-save", "-t", "nat")
        assert "--dport 8080" not in nat


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
    assert host_local_addresses(lab, 1) == before
    assert records(lab, 1)["addresses"] == {} and records(lab, 1)["endpoints"] == {}
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
