"""Network policy end to end, in a lab: Podman containers on two hosts,
registered by overlay-cni (labels from CNI_ARGS, which Podman passes on),
policies written with `overlayctl policy apply --wait` (so no test
sleeps: the command returns once both daemons report the revision in
force), and real TCP and UDP connections over IPv4 and IPv6, on one host
(bridged) and across hosts (VXLAN), for each of the Kubernetes recipes:
deny all ingress, allow from a label, a port range, egress to an ipBlock
only, and default allow for what no policy selects. Every case has
connections that must pass beside the ones that must not, and
`overlayctl policy check` is asked the same questions.

One lab for the module, in masquerade egress mode (a container's traffic
to the outside leaves by the overlay bridge), torn down whatever happens;
tests/lab/test_policy_gwbridge.py checks egress in gwbridge mode, where
it leaves by eth1, with these helpers.

    h1: web1 app=web   db1 app=db   free1 (no labels)
    h2: web2 app=web   db2 app=db   job2 (no labels; labelled by
                                         `overlayctl endpoint label`)
    outside: 203.0.113.10, 2001:db8:ffff::10 (and, for what must be
             refused, the same server as 192.0.2.1, 2001:db8::1)

A server in every container's network namespace answers TCP and UDP on
PORTS with the address it saw (a Python process entered into the
namespace with nsenter: the busybox image has no UDP server).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Any

import pytest

from overlayd.lab import netns
from overlayd.lab.engines import EngineContainer
from overlayd.lab.lab import PREFIX, Lab, LabSettings
from overlayd.lab.topology import (
    OUTSIDE_ROUTER,
    OUTSIDE_ROUTER6,
    OUTSIDE_SERVER,
    OUTSIDE_SERVER6,
)
from overlayd.model import Lease
from overlayd.plan.leases import lease_key, render_lease
from overlayd.store.etcd import EtcdStore
from tests.conftest import SESSION_TAG, needs_root
from tests.lab.fakes import FIRST_FAKE_OCTET, lab_network
from tests.lab.probes import SLEEP

pytestmark = [needs_root, pytest.mark.lab]

PORTS = (80, 5432, 8000, 8080, 8081)
OUTSIDE_PORTS = (80, 5432)
WAIT = 1.5  # seconds a refused probe waits for an answer
CTL_TIMEOUT = 90  # seconds any overlayctl command may take
WAIT_TIMEOUT = "60"  # `--wait --timeout`: generous; the figure is printed
# Podman passes its own CNI_ARGS on to overlay-cni (containers/common).
CONTAINERS = {
    "web1": (1, {"app": "web"}),
    "db1": (1, {"app": "db"}),
    "free1": (1, {}),
    "web2": (2, {"app": "web"}),
    "db2": (2, {"app": "db"}),
    "job2": (2, {}),
}

# argv: the addresses to bind ("::" is both families' any), then the ports.
# A host with several addresses binds each: an unbound UDP socket would
# answer from the address its route picks, which is no reply to conntrack.
SERVER = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[2:]):
  for address in sys.argv[1].split(","):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        s = socket.socket(family, kind)
        if address == "::":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        sel.register(s, selectors.EVENT_READ, kind)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if key.data == socket.SOCK_STREAM:
            c, a = s.accept()
            with c:
                c.sendall(a[0].removeprefix("::ffff:").encode())
        else:
            _, a = s.recvfrom(2048)
            s.sendto(a[0].removeprefix("::ffff:").encode(), a)
"""
# Many probes at once, each answered or not within WAIT: one process per
# source container and batch, so a batch of refusals costs WAIT, not WAIT each.
PROBES = """
import json, socket, sys, threading
wait, probes = float(sys.argv[1]), json.loads(sys.argv[2])
answers = [None] * len(probes)
def probe(i, proto, host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if proto == "tcp":
            with socket.create_connection((host, port), timeout=wait) as c:
                c.settimeout(wait)
                answers[i] = c.recv(100).decode()
        else:
            with socket.socket(family, socket.SOCK_DGRAM) as u:
                u.settimeout(wait)
                u.sendto(b"?", (host, port))
                answers[i] = u.recv(100).decode()
    except OSError:
        answers[i] = None
threads = [threading.Thread(target=probe, args=(i, *p)) for i, p in enumerate(probes)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(answers))
"""


@dataclass
class Box:
    name: str
    host: int
    container: EngineContainer
    addresses: dict[int, str] = field(default_factory=dict)  # family -> address

    @property
    def netns(self) -> str:
        return self.container.netns_path


@dataclass
class Site:
    lab: Lab
    boxes: dict[str, Box] = field(default_factory=dict)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    dir: Path = Path()
    waits_ms: list[float] = field(default_factory=list)

    def address(self, target: str, family: int) -> str:
        if target == "outside":
            return str(OUTSIDE_SERVER if family == 4 else OUTSIDE_SERVER6)
        if target == "router":  # the outside server again, outside the ipBlock
            return str(OUTSIDE_ROUTER if family == 4 else OUTSIDE_ROUTER6)
        return self.boxes[target].addresses[family]

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


def serve(
    ns_path: str, ports: Sequence[int] = PORTS, addresses: Sequence[str] = ("::",)
) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        netns.nsenter_argv(
            ns_path, sys.executable, "-c", SERVER, ",".join(addresses), *map(str, ports)
        ),
        stdout=subprocess.PIPE,
    )
    assert server.stdout is not None and server.stdout.readline() == b"ready\n"
    return server


def make_site(lab: Lab, tmp: Path) -> Site:
    site = Site(lab, dir=tmp)
    # (The outside host's whoami has 8080.)
    outside = [OUTSIDE_SERVER, OUTSIDE_SERVER6, OUTSIDE_ROUTER, OUTSIDE_ROUTER6]
    site.servers.append(
        serve(f"/run/netns/{lab.outside_ns}", OUTSIDE_PORTS, [str(a) for a in outside])
    )
    for host in (1, 2):
        lab.podman(host).ensure_started()
    for name, (host, labels) in CONTAINERS.items():
        cni_args = ";".join(f"OVERLAYD_LABEL_{k}={v}" for k, v in labels.items())
        container = lab.podman(host).run(name, SLEEP, env={"CNI_ARGS": cni_args})
        site.boxes[name] = Box(name, host, container)
        site.servers.append(serve(container.netns_path))
    # The addresses as the daemons know them (and a first check of the
    # registrations: every container is a usable endpoint).
    listed = json.loads(site.ctl("endpoints", "--json").stdout)
    for endpoint in listed["endpoints"]:
        box = site.boxes[endpoint["name"]]
        box.addresses = {ip_address(a).version: a for a in endpoint["addresses"]}
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    lab = Lab(f"{SESSION_TAG}y")
    servers: list[subprocess.Popen[bytes]] = []
    try:
        lab.up(
            2,
            config=lab_network(),
            settings=LabSettings(egress="masquerade", containers_per_host=0),
        )
        built = make_site(lab, tmp_path_factory.mktemp("policies"))
        servers = built.servers
        yield built
        if built.waits_ms:
            ms = sorted(built.waits_ms)
            print(
                f"\npolicy apply/delete/label --wait: {len(ms)} waits, median"
                f" {ms[len(ms) // 2]:.0f} ms, max {ms[-1]:.0f} ms"
            )
    finally:
        for server in servers:
            server.kill()
            server.wait()
        lab.down()


@pytest.fixture
def clean(site: Site) -> Iterator[Site]:
    """No policy before or after a test, labels as the module made them."""
    site.delete_all()
    try:
        yield site
    finally:
        site.delete_all()
        site.ctl("endpoint", "label", "job2", "app-", "--wait", "--timeout", WAIT_TIMEOUT)


# (source, protocol, destination, port, must pass)
Case = tuple[str, str, str, int, bool]


def both(src: str, dst: str, port: int, passes: bool) -> list[Case]:
    return [(src, "tcp", dst, port, passes), (src, "udp", dst, port, passes)]


def probe(site: Site, src: str, targets: Sequence[tuple[str, str, int]]) -> list[str | None]:
    out = subprocess.run(
        netns.nsenter_argv(
            site.boxes[src].netns,
            sys.executable,
            "-c",
            PROBES,
            str(WAIT),
            json.dumps([list(t) for t in targets]),
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answers: list[str | None] = json.loads(out.stdout)
    return answers


def expect(site: Site, cases: Sequence[Case]) -> None:
    """Every case, over IPv4 and IPv6, as it must be. A connection that
    must pass and did not is tried twice more (a new neighbour entry); one
    that must not pass and did is a failure at once."""
    wrong: list[str] = []
    by_source: dict[str, list[tuple[Case, int]]] = {}
    for case in cases:
        for family in (4, 6):
            by_source.setdefault(case[0], []).append((case, family))
    for src, items in by_source.items():
        pending = items
        for attempt in range(3):
            targets = [(c[1], site.address(c[2], fam), c[3]) for c, fam in pending]
            answers = probe(site, src, targets)
            retry = []
            for (case, family), answer in zip(pending, answers, strict=True):
                passes = case[4]
                if answer is not None and not passes:
                    wrong.append(f"{case} IPv{family}: answered ({answer}) but must not")
                elif answer is None and passes:
                    if attempt == 2:
                        wrong.append(f"{case} IPv{family}: no answer but must pass")
                    else:
                        retry.append((case, family))
            if not retry:
                break
            pending = retry
    assert not wrong, "\n".join(wrong) + "\n" + ruleset(site)


def ruleset(site: Site) -> str:
    return "".join(
        f"--- h{host}\n"
        + netns.in_ns(
            site.lab.host_ns(host), "nft", "list", "table", "inet", "overlayd_policy", check=False
        )
        for host in (1, 2)
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


# --- tests ---------------------------------------------------------------------------


def test_containers_are_registered_with_their_names_labels_and_addresses(clean: Site) -> None:
    listed = json.loads(clean.ctl("endpoints", "--json").stdout)
    assert listed["rejected"] == []
    found = {e["name"]: e for e in listed["endpoints"]}
    assert set(found) == set(CONTAINERS)
    for name, (host, labels) in CONTAINERS.items():
        endpoint = found[name]
        # Podman's K8S_POD_NAME (the container's name) becomes a label too.
        assert endpoint["labels"] == {**labels, "k8s.pod.name": name}
        assert endpoint["hostname"] and endpoint["host"].startswith("10.244.")
        assert ip_address(endpoint["addresses"][0]) in clean.lab.subnet(host)
        assert str(clean.boxes[name].container.address) == endpoint["addresses"][0]
        assert len(endpoint["addresses"]) == 2  # dual-stack
    # With no policy everything passes, same host and across (the baseline
    # every refusal below is measured against).
    expect(
        clean,
        both("web1", "db1", 80, True)
        + both("web1", "db2", 5432, True)
        + both("job2", "free1", 8081, True),
    )
    assert check(clean, "free1", "db2", "80/tcp", True)["ingress"]["isolated"] is False


def test_deny_all_ingress(clean: Site) -> None:
    clean.apply("deny-all", k8s("deny-all", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    expect(
        clean,
        both("web1", "db1", 80, False)  # same host
        + both("web1", "db2", 80, False)  # across
        + both("web2", "free1", 5432, False)
        + both("free1", "web1", 8080, False)
        # Egress is not isolated: the outside answers (the positive control).
        + both("web1", "outside", 80, True)
        + both("db2", "outside", 80, True),
    )
    verdict = check(clean, "web1", "db1", "80/tcp", False)
    assert verdict["ingress"]["selected_by"] == ["deny-all"]
    # Deleted (and waited for): the same connections pass again.
    clean.ctl("policy", "delete", "deny-all", "--wait", "--timeout", WAIT_TIMEOUT)
    expect(clean, both("web1", "db1", 80, True) + both("web1", "db2", 80, True))


def test_allow_from_a_label(clean: Site) -> None:
    clean.apply(
        "db-from-web",
        k8s(
            "db-from-web",
            {
                "podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                        "ports": [
                            {"protocol": "TCP", "port": 5432},
                            {"protocol": "UDP", "port": 5432},
                        ],
                    }
                ],
            },
        ),
    )
    expect(
        clean,
        both("web1", "db1", 5432, True)  # same host
        + both("web2", "db1", 5432, True)  # across
        + both("web1", "db2", 5432, True)
        + both("free1", "db1", 5432, False)  # no label
        + both("job2", "db1", 5432, False)
        + both("web1", "db1", 80, False)  # another port
        + both("db1", "web1", 80, True),  # web is not selected
    )
    # Labelled afterwards by the operator: job2 gets in; unlabelled: out again.
    done = clean.ctl("endpoint", "label", "job2", "app=web", "--wait", "--timeout", WAIT_TIMEOUT)
    assert "app=web" in done.stdout
    expect(clean, both("job2", "db1", 5432, True) + both("job2", "db2", 5432, True))
    assert check(clean, "job2", "db1", "5432/tcp", True)["ingress"]["allowed_by"] == ["db-from-web"]
    clean.ctl("endpoint", "label", "job2", "app-", "--wait", "--timeout", WAIT_TIMEOUT)
    expect(clean, both("job2", "db1", 5432, False) + both("web2", "db1", 5432, True))


def test_a_port_range(clean: Site) -> None:
    clean.apply(
        "db-ports",
        {
            "name": "db-ports",
            "selector": {"matchLabels": {"app": "db"}},
            "ingress": [
                {
                    "ports": [
                        {"protocol": "TCP", "port": 8000, "endPort": 8080},
                        {"protocol": "UDP", "port": 8000, "endPort": 8080},
                    ]
                }
            ],
        },
    )
    expect(
        clean,
        both("web1", "db1", 8000, True)
        + both("free1", "db1", 8080, True)
        + both("web2", "db1", 8080, True)  # across
        + both("web1", "db1", 8081, False)
        + both("web1", "db2", 8081, False)  # across
        + both("web2", "db1", 80, False)
        + both("db1", "web1", 8081, True),  # web is not selected
    )
    check(clean, "web1", "db2", "8080/udp", True)
    check(clean, "web1", "db2", "8081/udp", False)


def test_egress_to_an_ip_block_only(clean: Site) -> None:
    clean.apply(
        "web-out",
        k8s(
            "web-out",
            {
                "podSelector": {"matchLabels": {"app": "web"}},
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [
                            {"ipBlock": {"cidr": f"{OUTSIDE_SERVER}/32"}},
                            {"ipBlock": {"cidr": f"{OUTSIDE_SERVER6}/128"}},
                        ],
                        "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "UDP", "port": 80}],
                    }
                ],
            },
        ),
    )
    expect(
        clean,
        both("web1", "outside", 80, True)
        + both("web2", "outside", 80, True)
        + both("web1", "router", 80, False)  # the same server, outside the block
        + both("web1", "outside", 5432, False)  # the block, another port
        + both("web1", "db1", 80, False)  # same host
        + both("web2", "db1", 80, False)  # across
        # Unselected: db and free go anywhere, and reach web (ingress is open).
        + both("db1", "router", 80, True)
        + both("db1", "db2", 80, True)
        + both("free1", "web2", 80, True),
    )
    verdict = check(clean, "web1", "db1", "80/tcp", False)
    assert verdict["egress"]["selected_by"] == ["web-out"]
    check(clean, "web1", str(OUTSIDE_SERVER), "80/tcp", True)


def test_default_allow_for_what_no_policy_selects(clean: Site) -> None:
    clean.apply(
        "db-closed",
        k8s(
            "db-closed",
            {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress", "Egress"]},
        ),
    )
    expect(
        clean,
        # Nothing selects web, free or job: open both ways, on one host and across.
        both("web1", "free1", 8081, True)
        + both("free1", "web1", 80, True)
        + both("free1", "web2", 5432, True)
        + both("job2", "web1", 8000, True)
        + both("web2", "job2", 80, True)
        # db is closed both ways (the negative control).
        + both("web1", "db1", 80, False)
        + both("db2", "web2", 80, False)
        + both("db1", "outside", 80, False),
    )
    verdict = check(clean, "free1", "web2", "5432/tcp", True)
    assert not verdict["egress"]["isolated"] and not verdict["ingress"]["isolated"]


def test_overlay_cni_fails_and_undoes_its_work_when_the_daemon_cannot_register(
    site: Site,
) -> None:
    """ADD with the daemon's socket missing fails with a CNI error, and
    leaves no interface, bridge port or address reservation behind; the same
    ADD with the socket attaches and registers (the positive control)."""
    lab = site.lab
    ns = lab.container_ns(1, 9)
    netns.add_namespace(ns)
    store = lab.files(1).cni_dir / "ipam" / "overlay"

    def bridge_ports() -> set[str]:
        links = json.loads(netns.ip(lab.host_ns(1), "-j", "link", "show", "master", "ovl0"))
        return {link["ifname"] for link in links}

    try:
        ports, reserved = bridge_ports(), set(store.iterdir())
        config = {**lab.cni_config(1), "controlSocket": "/run/overlayd-lab/none/overlayd.sock"}
        with pytest.raises(netns.LabCommandError, match="could not register") as info:
            lab.cni(1, "ADD", ns, config)
        assert '"code": 11' in str(info.value) or '"code":11' in str(info.value)
        assert bridge_ports() == ports and set(store.iterdir()) == reserved
        assert "eth0" not in netns.ip(ns, "-o", "link", "show")
        # Positive control: with the host's socket it attaches and registers.
        result = lab.cni(1, "ADD", ns) or {}
        assert len(bridge_ports()) == len(ports) + 1
        listed = json.loads(site.ctl("endpoints", "--json").stdout)
        mine = [e for e in listed["endpoints"] if e["id"] == ns]
        assert mine and mine[0]["addresses"][0] == result["ips"][0]["address"].split("/")[0]
        lab.cni(1, "DEL", ns)
        listed = json.loads(site.ctl("endpoints", "--json").stdout)
        assert not [e for e in listed["endpoints"] if e["id"] == ns]
        assert bridge_ports() == ports
    finally:
        netns.delete_namespace(ns)


def test_policy_wait_names_hosts_that_do_not_enforce(site: Site) -> None:
    """A host with a lease and no status key (flannel, an older overlayd)
    is named as not enforcing, and not waited for; the live hosts are."""
    lease = Lease(
        IPv4Network(f"10.244.{FIRST_FAKE_OCTET}.0/24"),
        IPv4Address("192.0.2.200"),
        1,
        "aa:00:00:00:00:c8",
    )
    key = lease_key(PREFIX, lease)

    async def put(store: EtcdStore) -> None:
        await store.put(key, render_lease(lease))

    site.lab.etcd(put)
    try:
        done = site.ctl("policy", "wait", "--json", "--timeout", WAIT_TIMEOUT)
        found = json.loads(done.stdout)["wait"]
        assert found["done"] and found["without_status"] == [f"10.244.{FIRST_FAKE_OCTET}.0-24"]
        live = {h["host"] for h in found["hosts"]}
        assert live == {f"{s.network_address}-24" for s in map(site.lab.subnet, (1, 2))}
        assert all(h["revision"] >= found["revision"] for h in found["hosts"])
        plain = site.ctl("policy", "wait", "--timeout", WAIT_TIMEOUT)
        assert "do not enforce policies" in plain.stderr
    finally:
        site.lab.etcd(lambda store: store.delete(key))
