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
PORTS with the address it saw (overlayd/lab/echo.py, entered into the
namespace with nsenter: the busybox image has no UDP server); the helpers
are shared with test_policy_lifecycle.py (policy_site.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, ip_address

import pytest

from overlayd.lab import echo, netns
from overlayd.lab.lab import PREFIX, Lab, LabSettings
from overlayd.lab.policycheck import counters
from overlayd.lab.topology import (
    OUTSIDE_ROUTER,
    OUTSIDE_ROUTER6,
    OUTSIDE_SERVER,
    OUTSIDE_SERVER6,
)
from overlayd.model import Lease
from overlayd.plan.leases import lease_key, render_lease
from overlayd.plan.policy_model import Direction
from overlayd.plan.policy_rules import TABLE, counter_name
from overlayd.store.etcd import EtcdStore
from tests.conftest import SESSION_TAG, needs_root, wait_until
from tests.lab.fakes import FIRST_FAKE_OCTET, lab_network
from tests.lab.policy_site import WAIT_TIMEOUT, Site, both, check, expect, k8s
from tests.lab.probes import http_get

pytestmark = [needs_root, pytest.mark.lab]

PORTS = (80, 5432, 8000, 8080, 8081)
OUTSIDE_PORTS = (80, 5432)
RESYNC_SECONDS = LabSettings().resync_seconds  # the site's: a check pass each
# Podman passes its own CNI_ARGS on to overlay-cni (containers/common).
CONTAINERS = {
    "web1": (1, {"app": "web"}),
    "db1": (1, {"app": "db"}),
    "free1": (1, {}),
    "web2": (2, {"app": "web"}),
    "db2": (2, {"app": "db"}),
    "job2": (2, {}),
}


def fill_site(site: Site) -> None:
    """The outside server and the containers, each with its echo server."""
    lab = site.lab
    # (The outside host's whoami has 8080.)
    outside = [OUTSIDE_SERVER, OUTSIDE_SERVER6, OUTSIDE_ROUTER, OUTSIDE_ROUTER6]
    site.servers.append(
        echo.serve_in(f"/run/netns/{lab.outside_ns}", OUTSIDE_PORTS, [str(a) for a in outside])
    )
    for host in (1, 2):
        lab.podman(host).ensure_started()
    for name, (host, labels) in CONTAINERS.items():
        site.run(name, host, labels, PORTS)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    lab = Lab(f"{SESSION_TAG}y")
    built: Site | None = None
    try:
        lab.up(
            2,
            config=lab_network(),
            settings=LabSettings(egress="masquerade", containers_per_host=0),
        )
        built = Site(lab, dir=tmp_path_factory.mktemp("policies"))
        fill_site(built)
        yield built
        if built.waits_ms:
            ms = sorted(built.waits_ms)
            print(
                f"\npolicy apply/delete/label --wait: {len(ms)} waits, median"
                f" {ms[len(ms) // 2]:.0f} ms, max {ms[-1]:.0f} ms"
            )
    finally:
        if built is not None:
            built.close()
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
        assert endpoint["addresses"] == [clean.boxes[name].addresses[v] for v in (4, 6)]
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


def test_drops_reach_the_metric_and_a_restart_keeps_counting_from_there(clean: Site) -> None:
    """The deny counter of the host that drops, in nft and in the metrics;
    a restarted daemon makes its table afresh (a full pass) and its counters
    carry on from what the old table counted."""
    lab = clean.lab
    deny = counter_name("deny-all", Direction.INGRESS, "deny")
    clean.apply("deny-all", k8s("deny-all", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    # Dropped on h1 (web2 is on h2); the outside still answers (the control).
    expect(clean, both("web2", "db1", 80, False) + both("db1", "outside", 80, True))
    dropped = counters(lab.host_ns(1))[deny]
    assert dropped >= 4  # TCP and UDP, both families
    sample = 'overlayd_policy_packets_total{direction="Ingress",policy="deny-all",verdict="deny"}'
    # (The metric is what the last check pass read: one every resync.)
    wait_until(lambda: metric_value(lab, 1, sample) >= dropped, 3 * RESYNC_SECONDS, step=0.5)
    table = table_handle(lab, 1)
    lab.restart_daemon(1)
    assert table_handle(lab, 1) != table  # made afresh, not left as it was
    assert counters(lab.host_ns(1))[deny] >= dropped
    expect(clean, both("web2", "db1", 80, False) + both("db1", "outside", 80, True))
    assert counters(lab.host_ns(1))[deny] >= dropped + 4


def table_handle(lab: Lab, host: int) -> int:
    tables = json.loads(netns.in_ns(lab.host_ns(host), "nft", "-j", "list", "tables", "inet"))
    [handle] = [
        t["table"]["handle"]
        for t in tables["nftables"]
        if "table" in t and t["table"]["name"] == TABLE
    ]
    return int(handle)


def metric_value(lab: Lab, host: int, sample: str) -> float:
    """The sample's value on the host's /metrics; -1 when it is not there."""
    for line in http_get(lab, host, "/metrics")[1].splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return -1.0


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
