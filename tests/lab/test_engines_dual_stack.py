"""Real engines on a dual-stack host: dockerd with the `docker-opts` flags
(`--ipv6 --fixed-cidr-v6`), Podman through overlay-cni, and overlayd's
Docker plugin with a `--ipv6` network, each container with an address of
both families, on one link with the others.

No overlayd runs here: the host's bridge with its two gateway addresses
and its dual-stack subnet file are made by hand, as overlayd makes them,
and the plugin server runs alone with a fixed view of the host
(tests/lab/plugin_server.py). So these tests need only what this branch
changes; the lab's all-pairs tests of both families come with the
daemon's dual-stack work.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from pathlib import Path

import pytest

from overlayd.lab import netns as lab_netns
from overlayd.lab.engines import Docker, Engine, Podman
from overlayd.lab.engines.image import image_tarball
from overlayd.lab.hosts import HostFiles
from overlayd.lab.lab import STATE_ROOT
from overlayd.nsexec import netns_argv
from overlayd.plan.ipam import container_ranges
from tests.conftest import CONVERGE, SESSION_TAG, needs_root, unique_name, wait_until
from tests.lab.probes import SLEEP, global_ipv6, serve

pytestmark = [needs_root, pytest.mark.lab]

SUBNET, CLUSTER = IPv4Network("10.244.7.0/24"), IPv4Network("10.244.0.0/16")
SUBNET6, CLUSTER6 = IPv6Network("fd00:10:244:7::/64"), IPv6Network("fd00:10:244::/48")
GATEWAY, GATEWAY6 = "10.244.7.1", "fd00:10:244:7::1"
SUBNET_FILE = (
    f"FLANNEL_NETWORK={CLUSTER}\nFLANNEL_SUBNET={GATEWAY}/24\n"
    f"FLANNEL_IPV6_NETWORK={CLUSTER6}\nFLANNEL_IPV6_SUBNET={GATEWAY6}/64\n"
    "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\nFLANNEL_IPV6_MASQ=true\n"
    "OVERLAYD_EGRESS=masquerade\nOVERLAYD_BRIDGE=ovl0\n"
)
WORKTREE = Path(__file__).resolve().parents[2]


@dataclass
class DualHost:
    ns: str
    files: HostFiles
    docker: Docker
    podman: Podman


@pytest.fixture(scope="module")
def host() -> Iterator[DualHost]:
    ns = unique_name("d6")
    files = HostFiles(STATE_ROOT / f"{SESSION_TAG}6" / "h1")
    image = image_tarball(STATE_ROOT)
    found = DualHost(
        ns,
        files,
        Docker(1, ns, files, image, "docker-opts"),
        # No overlayd here to register containers with.
        Podman(1, ns, files, image, register_endpoints=False),
    )
    lab_netns.add_namespace(ns)
    try:
        lab_netns.ip(ns, "link", "add", "ovl0", "type", "bridge")
        lab_netns.ip(ns, "addr", "add", f"{GATEWAY}/24", "dev", "ovl0")
        lab_netns.ip(ns, "addr", "add", f"{GATEWAY6}/64", "dev", "ovl0", "nodad")
        lab_netns.ip(ns, "link", "set", "ovl0", "up")
        files.root.mkdir(parents=True, exist_ok=True)
        files.subnet_file.write_text(SUBNET_FILE)
        yield found
    finally:
        found.docker.teardown()
        found.podman.teardown()
        lab_netns.delete_namespace(ns)
        shutil.rmtree(files.root.parent, ignore_errors=True)


def bridge_addresses(ns: str) -> list[str]:
    shown = json.loads(
        lab_netns.ip(ns, "-j", "-6", "addr", "show", "dev", "ovl0", "scope", "global")
    )
    return [f"{a['local']}/{a['prefixlen']}" for a in shown[0]["addr_info"] if "local" in a]


def routes(engine: Engine, name: str, family: str) -> set[str]:
    """The container's routes of `family` ("-4", "-6") with a gateway, as
    "dst via gw dev dev" (busybox's `ip route` spelling)."""
    out = engine.exec(name, "ip", family, "route", "show")
    found = set()
    for line in out.splitlines():
        words = line.split()
        if "via" in words:
            found.add(" ".join(words[: words.index("dev") + 2]))
    return found


def host_get(ns: str, url: str) -> str | None:
    """The page `url` gives a client in the host's namespace (retried: the
    port is published a moment after the container starts)."""
    body: str | None = None

    def answered() -> bool:
        nonlocal body
        proc = subprocess.run(
            netns_argv(ns, "curl", "-sf", "-m", "3", url), capture_output=True, text=True
        )
        body = proc.stdout if proc.returncode == 0 else None
        return body is not None

    wait_until(answered, timeout=CONVERGE, step=0.2)
    return body


def pings(engine: Engine, name: str, target: IPv4Address | IPv6Address | str) -> bool:
    """Container `name` reaches `target`, within CONVERGE (the first packets
    of a new container may wait for neighbour discovery)."""

    def answered() -> bool:
        out = engine.exec(name, "ping", "-c", "1", "-W", "1", str(target), check=False)
        return " 0% packet loss" in out

    wait_until(answered, timeout=CONVERGE, step=0.2)
    return True


def test_docker_opts_and_podman_share_the_ipv6_link_from_their_own_halves(
    host: DualHost,
) -> None:
    host.docker.ensure_started()
    # dockerd 20.10 deletes every global IPv6 address of its bridge outside
    # --fixed-cidr-v6: overlayd's gateway must survive it.
    assert f"{GATEWAY6}/64" in bridge_addresses(host.ns)
    d = host.docker.run("d6", SLEEP)
    p = host.podman.run("p6", SLEEP)
    d6, p6 = global_ipv6(host.docker, "d6"), global_ipv6(host.podman, "p6")
    ranges = container_ranges(SUBNET6)
    # Docker's from its MAC, in its (lower) half; Podman's from host-local's
    # (upper) half; both with the subnet's prefix and overlayd's gateway.
    assert d6.network == p6.network == SUBNET6
    assert d6.ip in ranges.docker_ip_range, d6
    assert int(ranges.host_local_start) <= int(p6.ip) <= int(ranges.host_local_end), p6
    assert routes(host.docker, "d6", "-6") == {f"default via {GATEWAY6} dev eth0"}
    assert routes(host.podman, "p6", "-6") == {f"default via {GATEWAY6} dev eth0"}
    # One link: each reaches the other in both families.
    assert d.address is not None and p.address is not None
    assert pings(host.docker, "d6", p6.ip) and pings(host.podman, "p6", d6.ip)
    assert pings(host.docker, "d6", p.address) and pings(host.podman, "p6", d.address)
    assert pings(host.docker, "d6", GATEWAY6)
    assert bridge_addresses(host.ns)[0] == f"{GATEWAY6}/64"


@pytest.fixture
def plugin_server(host: DualHost, request: pytest.FixtureRequest) -> Iterator[str]:
    """overlayd's Docker plugin alone in the host's namespace, in the egress
    mode the test is parametrized with; answers the mode."""
    egress = str(request.param)
    socket = host.files.docker_plugin_socket
    socket.parent.mkdir(parents=True, exist_ok=True)
    log = (host.files.root / f"plugin-{egress}.log").open("wb")
    server = subprocess.Popen(
        netns_argv(
            host.ns,
            sys.executable,
            "-m",
            "tests.lab.plugin_server",
            str(socket),
            str(host.files.cni_dir),
            egress,
            str(SUBNET),
            str(CLUSTER),
            str(SUBNET6),
            str(CLUSTER6),
        ),
        cwd=WORKTREE,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        wait_until(lambda: socket.is_socket() or server.poll() is not None)
        assert server.poll() is None, (host.files.root / f"plugin-{egress}.log").read_text()
        yield egress
    finally:
        server.terminate()
        server.wait(timeout=CONVERGE)


@pytest.mark.parametrize("plugin_server", ["masquerade", "gwbridge"], indirect=True)
def test_the_docker_plugin_gives_both_addresses_and_the_modes_routes(
    host: DualHost, plugin_server: str
) -> None:
    egress = plugin_server
    docker = host.docker
    docker.ensure_started()
    network = f"ov6{egress[:4]}"
    docker.cli(
        "network", "create", "-d", "overlayd", "--ipam-driver", "overlayd", "--ipv6", network
    )
    name = f"x6{egress[:4]}"
    try:
        # A page on port 80, published on the host's 8080 (masquerade mode:
        # the plugin's portmap; gwbridge mode: Docker's own, on docker_gwbridge).
        docker.run(name, serve(name), publish=["8080:80"], extra=["--network", network])
        settings = json.loads(docker.cli("inspect", name))[0]["NetworkSettings"]["Networks"]
        ours = settings[network]
        v4, v6 = IPv4Address(ours["IPAddress"]), IPv6Address(ours["GlobalIPv6Address"])
        # Both from host-local's halves: IPv4's lower, IPv6's upper.
        for address, subnet in ((v4, SUBNET), (v6, SUBNET6)):
            shared = container_ranges(subnet)
            assert int(shared.host_local_start) <= int(address) <= int(shared.host_local_end)
        assert global_ipv6(docker, name) == IPv6Interface(f"{v6}/64")
        store = host.files.cni_dir / "ipam" / "overlay"
        assert {str(v4), str(v6)} <= {p.name for p in store.iterdir()}
        if egress == "masquerade":
            assert routes(docker, name, "-4") == {f"default via {GATEWAY} dev eth0"}
            assert routes(docker, name, "-6") == {f"default via {GATEWAY6} dev eth0"}
            # portmap got both addresses: the published port answers on both families.
            for url in (f"http://{GATEWAY}:8080/", f"http://[{GATEWAY6}]:8080/"):
                assert host_get(host.ns, url) == f"{name}\n", url
        else:
            # The cluster networks over the overlay; the IPv4 default route
            # through Docker's docker_gwbridge (eth1), which has no IPv6.
            assert routes(docker, name, "-6") == {f"{CLUSTER6} via {GATEWAY6} dev eth0"}
            v4_routes = routes(docker, name, "-4")
            assert f"{CLUSTER} via {GATEWAY} dev eth0" in v4_routes
            (default,) = [r for r in v4_routes if r.startswith("default via")]
            assert default.endswith("dev eth1"), v4_routes  # docker_gwbridge's
        assert pings(docker, name, GATEWAY6) and pings(docker, name, GATEWAY)
    finally:
        docker.cli("rm", "-f", name, check=False)
        docker.cli("network", "rm", network, check=False)
    # Docker released both addresses through the plugin.
    assert not {str(v4), str(v6)} & {p.name for p in store.iterdir()}
