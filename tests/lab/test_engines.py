"""Real container engines on overlayd, in the lab: Podman (CNI: overlay-cni
then portmap) and dockerd with the `docker-opts` flags, in lab hosts, with
a busybox image built from busybox-static.

One lab for the module (gwbridge egress), one engine of each kind per host,
started once; a second lab in masquerade mode only for the published-port
test of that mode. Containers are named per test, so tests do not depend on
each other's containers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlayd.lab import netns
from overlayd.lab.engines import IMAGE, Docker, Podman, processes_mentioning
from overlayd.lab.lab import Lab, LabSettings
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

# The conflist's `dns`, which overlay-cni passes into its result.
LAB_DNS = {"nameservers": ["192.0.2.53"], "search": ["engines.test"], "options": ["ndots:2"]}


def make_lab(name: str, egress: str) -> Lab:
    lab = Lab(name)
    try:
        lab.up(
            2,
            config=lab_network(),
            settings=LabSettings(egress=egress, containers_per_host=0, resync_seconds=1.0),
        )
    except BaseException:
        lab.down()
        raise
    return lab


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = make_lab(f"{SESSION_TAG}e", "gwbridge")
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def masquerade_lab() -> Iterator[Lab]:
    lab = make_lab(f"{SESSION_TAG}m", "masquerade")
    try:
        yield lab
    finally:
        lab.down()


def podman(lab: Lab, host: int) -> Podman:
    found = lab.podman(host, dns=LAB_DNS)
    found.ensure_started()
    return found


def docker(lab: Lab, host: int) -> Docker:
    found = lab.docker(host, "docker-opts")
    found.ensure_started()
    return found


def test_cross_host_http_from_docker_and_podman_to_podman(lab: Lab) -> None:
    web = podman(lab, 2).run("xweb", serve("xweb"))
    docker(lab, 1).run("xdocker", SLEEP)
    podman(lab, 1).run("xpodman", SLEEP)
    assert web.address in lab.subnet(2)
    assert fetch(lab.docker(1), "xdocker", web.address) == "xweb\n"
    assert fetch(lab.podman(1), "xpodman", web.address) == "xweb\n"
    # Podman <-> Podman, the other way round.
    back = podman(lab, 1).run("xweb1", serve("xweb1"))
    podman(lab, 2).run("xpodman2", SLEEP)
    assert fetch(lab.podman(2), "xpodman2", back.address) == "xweb1\n"


def test_ipv6_across_hosts_from_docker_and_podman_from_their_own_halves(lab: Lab) -> None:
    """Dual-stack: a Podman container on h2 serves over IPv6 to a Docker
    (docker-opts: --ipv6 --fixed-cidr-v6) and a Podman container on h1,
    each with an address of its allocator's half of h1's IPv6 subnet."""
    subnet6 = subnet6_or_skip(lab, 1)
    podman(lab, 2).run("x6web", serve("x6web"))
    docker(lab, 1).run("x6docker", SLEEP)
    podman(lab, 1).run("x6podman", SLEEP)
    web6 = global_ipv6(lab.podman(2), "x6web")
    assert web6.network == subnet6_or_skip(lab, 2)
    ranges = container_ranges(subnet6)
    d6, p6 = global_ipv6(lab.docker(1), "x6docker"), global_ipv6(lab.podman(1), "x6podman")
    assert d6.network == p6.network == subnet6
    assert d6.ip in ranges.docker_ip_range, d6
    assert int(ranges.host_local_start) <= int(p6.ip) <= int(ranges.host_local_end), p6
    assert fetch(lab.docker(1), "x6docker", web6.ip) == "x6web\n"
    assert fetch(lab.podman(1), "x6podman", web6.ip) == "x6web\n"


def test_docker_and_podman_on_one_host_take_their_own_halves(lab: Lab) -> None:
    p = podman(lab, 1).run("sp", serve("sp"))
    d = docker(lab, 1).run("sd", serve("sd"))
    ranges = container_ranges(lab.subnet(1))
    assert p.address is not None and d.address is not None
    assert p.address != d.address
    assert ranges.host_local_start <= p.address <= ranges.host_local_end
    assert d.address in ranges.docker_ip_range
    assert fetch(lab.podman(1), "sp", d.address) == "sd\n"
    assert fetch(lab.docker(1), "sd", p.address) == "sp\n"


@pytest.mark.parametrize("egress", ["gwbridge", "masquerade"])
def test_published_ports_answer_from_outside_and_unpublished_ones_do_not(
    egress: str, lab: Lab, request: pytest.FixtureRequest
) -> None:
    target: Lab = lab if egress == "gwbridge" else request.getfixturevalue("masquerade_lab")
    # Each container serves on 80 (published) and 81 (not published).
    pname, dname = f"pub{egress[0]}p", f"pub{egress[0]}d"
    p = podman(target, 2).run(pname, serve(pname, also_on=81), publish=["8080:80"])
    d = docker(target, 1).run(dname, serve(dname, also_on=81), publish=["8081:80"])
    # Both ports serve inside the cluster: each container asked from a
    # container of the other engine on the other host (so what fails below
    # fails in the network, not in the server).
    for port in (80, 81):
        assert fetch(target.docker(1), dname, p.address, port) == f"{pname}\n"
        assert fetch(target.podman(2), pname, d.address, port) == f"{dname}\n"
    for c, host, published in ((p, 2, 8080), (d, 1, 8081)):
        # The outside host gets a route to the container via its host, so
        # its packets reach the host's forward chain.
        with outside_route_to(target, c.address, host):
            # Positive control: the published port, through the host.
            wait_published(target, host, published, f"{c.name}\n")
            # The container's own address, on the port that is published
            # (through the host) and on one that is only listened on:
            # dropped by overlayd's forward chain, not refused.
            assert_dropped_from_outside(target, host, c.address, [80, 81])
            # Through the host, the unpublished port: nothing maps it.
            assert outside_get(target, host, 81) is None


def test_dockerd_restart_brings_restart_policy_containers_back_on_the_overlay(lab: Lab) -> None:
    """Docker 20.10 without live-restore stops its containers when dockerd
    stops; `--restart always` starts them again when it is back, with a new
    process and, on the default bridge, an address allocated afresh (seen:
    .131 before, .128 after: its IPAM state is not kept). With live-restore,
    containers keep running (same process, same address) across the restart."""
    d = docker(lab, 1)
    web = d.run("rweb", serve("rweb"), extra=["--restart", "always"])
    web2 = podman(lab, 2).run("rclient", SLEEP)
    assert fetch(lab.podman(2), "rclient", web.address) == "rweb\n"
    assert web2.address is not None
    d.restart()
    wait_until(lambda: d.inspect("rweb").pid > 0, timeout=CONVERGE)
    after = d.inspect("rweb")
    assert after.pid != web.pid  # restarted, not kept
    assert fetch(lab.podman(2), "rclient", after.address) == "rweb\n"
    # Now live-restore: the container outlives dockerd's restart.
    live = lab.docker(1, live_restore=True)
    live.restart()
    kept = live.run("lweb", serve("lweb"))
    live.restart()
    assert live.inspect("lweb").pid == kept.pid
    assert live.inspect("lweb").address == kept.address
    assert fetch(lab.podman(2), "rclient", kept.address) == "lweb\n"
    # Back to the module's default for the other tests.
    lab.docker(1, live_restore=False).restart()


def test_overlayd_restarted_under_running_containers_loses_no_packet(lab: Lab) -> None:
    src = podman(lab, 1).run("fsrc", SLEEP)
    dst = docker(lab, 2).run("fdst", SLEEP)
    assert dst.address is not None
    engines_before = {e.kind: e.containers() for e in (lab.podman(1), lab.docker(2))}
    ping = ping_flood(src, dst.address, 8.0)
    time.sleep(1.0)
    lab.restart_daemon(1)
    lab.restart_daemon(2)
    out, _ = ping.communicate(timeout=60)
    sent, received = sent_received(out)
    assert sent >= 700, out
    assert received == sent, out
    # The engines' processes were left alone by the daemon's restarts.
    after = {e.kind: e.containers() for e in (lab.podman(1), lab.docker(2))}
    assert after == engines_before


def test_podman_resolv_conf_comes_from_the_cni_result(lab: Lab) -> None:
    c = podman(lab, 2).run("dns", SLEEP)
    resolv = lab.podman(2).exec(c.name, "cat", "/etc/resolv.conf")
    assert "nameserver 192.0.2.53" in resolv
    assert "search engines.test" in resolv
    # Control: the root namespace's resolver is not what the container got.
    assert "nameserver 192.0.2.53" not in Path("/etc/resolv.conf").read_text()


def test_lab_check_includes_engine_containers(lab: Lab) -> None:
    docker(lab, 1).run("cdock", SLEEP)
    podman(lab, 2).run("cpod", SLEEP)
    names = {c.label for c in lab.engine_checkables()}
    assert {"h2/podman/cpod", "h1/docker/cdock"} <= names
    # Egress: Docker's containers on overlayd's bridge have no gwbridge path.
    egress = {c.label for c in lab.engine_checkables(egress=True)}
    assert "h2/podman/cpod" in egress and "h1/docker/cdock" not in egress
    results = lab.check(timeout=CONVERGE)
    engine_pairs = [r for r in results if r.src.label and r.dst.label]
    assert engine_pairs and all(r.ok for r in engine_pairs)


def test_teardown_leaves_no_engine_behind(lab: Lab) -> None:
    """A host removed with engines on it: no engine process, mount, runc
    container or /run/netns entry of it is left (a positive control first:
    they are there before)."""
    host = max(lab.hosts()) + 1
    lab.add_host(host)
    p = podman(lab, host).run("gone", SLEEP)
    d = docker(lab, host).run("gone", SLEEP)
    # One made with podman itself, not through run(): its netns goes too.
    lab.podman(host).cli("run", "-d", "--name", "direct", IMAGE, *SLEEP)
    root = str(lab.files(host).root)
    record = lab.podman(host).netns_record.read_text().split()
    direct = (
        lab.podman(host)
        .cli("inspect", "--format", "{{.NetworkSettings.SandboxKey}}", "direct")
        .strip()
    )
    assert direct not in record
    record.append(direct)
    assert all(os.path.exists(path) for path in record)
    assert any(root in line for line in mountinfo())
    for c in (p, d):
        assert c.pid > 0 and netns.proc_cmdline(c.pid)
    lab.remove_host(host)
    assert not any(root in line for line in mountinfo())
    assert not any(os.path.exists(path) for path in record)
    wait_until(lambda: not _alive(p.pid) and not _alive(d.pid), timeout=CONVERGE)
    assert processes_mentioning(root) == []


def mountinfo() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
