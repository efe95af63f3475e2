"""Network policy while things change, in a lab: containers started and
stopped in a loop under a policy, a host killed, and bad input written into
etcd and sent to the control socket. Real components throughout: the lab's
etcd, one overlayd per host, the kernel's nftables, and Podman containers
registered by overlay-cni (labels from CNI_ARGS), probed over TCP and UDP,
IPv4 and IPv6, by the echo server and prober of overlayd/lab/echo.py. The
helpers are test_policy.py's (policy_site.py).

One lab for the module, with a short lease TTL so that a killed host's
endpoints expire in seconds:

    h1: web0 app=web   client1 app=client   free1 (no labels)
    h2:                client2 app=client   free2 (no labels)
    churn: web-N app=web and guest-N app=client, on alternate hosts
    h3 (one test): web3 app=web, client3 app=client; its daemon killed

The policy under test lets app=client into app=web on port 80 (TCP and
UDP) and nothing else; every refusal below has connections that pass
beside it, so no test passes by blocking everything.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from overlayd.lab import echo, hosts, netns
from overlayd.lab.lab import Lab, LabSettings
from overlayd.model import IPAddress
from overlayd.plan.endpoints import endpoints_prefix, host_id
from overlayd.plan.policy import policies_prefix
from overlayd.plan.policy_model import Direction
from overlayd.plan.policy_rules import TABLE, chain_name
from overlayd.store.etcd import EtcdStore
from tests.conftest import SESSION_TAG, needs_root, wait_until
from tests.lab.fakes import FIRST_FAKE_OCTET, lab_network
from tests.lab.policy_site import (
    Box,
    Case,
    Site,
    both,
    expect,
    k8s,
    policy_sets,
    ruleset,
    selector_sets,
    wanted_sets,
)

pytestmark = [needs_root, pytest.mark.lab]

OWN_PREFIX = "/overlayd"  # the lab daemons' overlayd-prefix (the default)
TTL = 6  # seconds: the lab's etcd lease TTL (renewed every TTL / 3)
PORT = 80
WEB = {"app": "web"}
CLIENT = {"app": "client"}
POLICY_NAME = "web-from-client"
POLICY = k8s(
    POLICY_NAME,
    {
        "podSelector": {"matchLabels": WEB},
        "ingress": [
            {
                "from": [{"podSelector": {"matchLabels": CLIENT}}],
                "ports": [{"protocol": "TCP", "port": PORT}, {"protocol": "UDP", "port": PORT}],
            }
        ],
    },
)
STABLE: dict[str, tuple[int, dict[str, str]]] = {
    "web0": (1, WEB),
    "client1": (1, CLIENT),
    "free1": (1, {}),
    "client2": (2, CLIENT),
    "free2": (2, {}),
}
CYCLES = 10
# The first probes of a new container: no retry, so a must-pass that needed
# one fails; long enough for its first neighbour resolution on a busy machine.
FIRST_WAIT = 2.0
WATCH_WAIT = 1.0  # seconds a background probe waits for an answer


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    lab = Lab(f"{SESSION_TAG}p")
    built: Site | None = None
    try:
        lab.up(
            2,
            config=lab_network(),
            settings=LabSettings(lease_ttl=TTL, containers_per_host=0, resync_seconds=3.0),
        )
        built = Site(lab, dir=tmp_path_factory.mktemp("lifecycle"))
        for host in (1, 2):
            lab.podman(host).ensure_started()
        for name, (host, labels) in STABLE.items():
            built.run(name, host, labels, (PORT,))
        yield built
    finally:
        if built is not None:
            built.close()
        lab.down()


@pytest.fixture
def clean(site: Site) -> Iterator[Site]:
    """No policy before or after a test, and only the stable containers after it."""
    site.delete_all()
    try:
        yield site
    finally:
        for name in [n for n in site.boxes if n not in STABLE]:
            site.remove(name)
        site.delete_all()


# --- helpers -----------------------------------------------------------------------


def stable_cases() -> list[Case]:
    """The policy in force for the stable containers, both ways."""
    return (
        both("client1", "web0", PORT, True)  # same host
        + both("client2", "web0", PORT, True)  # across
        + both("free1", "web0", PORT, False)
        + both("free2", "web0", PORT, False)
        # Unselected: open to anyone (the policy isolates web only).
        + both("free2", "client1", PORT, True)
        + both("web0", "free2", PORT, True)
    )


def assert_sets(site: Site, boxes: Sequence[Box], hosts: Sequence[int] = (1, 2)) -> None:
    """Every host's policy sets hold exactly these boxes' addresses, and no
    other set exists (no stale element, none missing)."""
    wanted = wanted_sets(boxes, [WEB, CLIENT])
    cluster = lab_network()
    overlay = [cluster.network] + ([cluster.ipv6.network] if cluster.ipv6 else [])
    for host in hosts:
        found = policy_sets(site.lab, host, within=overlay)
        assert found == wanted, f"h{host}: {describe(found, wanted)}\n{ruleset(site)}"


def describe(
    found: Mapping[str, frozenset[IPAddress]], wanted: Mapping[str, frozenset[IPAddress]]
) -> str:
    out = []
    for name in sorted(set(found) | set(wanted)):
        extra = sorted(map(str, found.get(name, frozenset()) - wanted.get(name, frozenset())))
        missing = sorted(map(str, wanted.get(name, frozenset()) - found.get(name, frozenset())))
        if extra or missing or name not in found or name not in wanted:
            out.append(f"{name}: extra {extra}, missing {missing}")
    return "; ".join(out)


def in_parallel(*jobs: tuple[Any, ...]) -> None:
    """Each (function, *args) at once (Podman on two hosts), raising the first failure."""
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        for future in [pool.submit(*job) for job in jobs]:
            future.result()


def policy_findings(site: Site, host: int) -> list[dict[str, Any]]:
    done = site.ctl("diagnose", "--json", host=host, check=False)
    findings: list[dict[str, Any]] = json.loads(done.stdout)["findings"]
    return [f for f in findings if f["check"] == "network policy"]


def policy_chains(lab: Lab, host: int) -> set[str]:
    """The per-policy chains in the host's policy table."""
    listing = json.loads(
        netns.in_ns(lab.host_ns(host), "nft", "-j", "list", "table", "inet", TABLE)
    )
    names = {i["chain"]["name"] for i in listing["nftables"] if "chain" in i}
    return {n for n in names if n.startswith("p_")}


def endpoint_keys(lab: Lab, host_prefix: str) -> set[str]:
    async def get(store: EtcdStore) -> set[str]:
        values, _ = await store.get_prefix(host_prefix)
        return set(values)

    return lab.etcd(get)


def put_all(lab: Lab, values: Mapping[str, bytes]) -> None:
    async def put(store: EtcdStore) -> None:
        for key, value in values.items():
            await store.put(key, value)

    lab.etcd(put)


def delete_all(lab: Lab, keys: Sequence[str]) -> None:
    async def delete(store: EtcdStore) -> None:
        for key in keys:
            await store.delete(key)

    lab.etcd(delete)


def skipped_warnings(lab: Lab, host: int, key: str) -> int:
    return lab.daemon_log(host).read_text().count(f"event=policy_input_skipped key={key} ")


# --- churn -------------------------------------------------------------------------


def test_churn_lets_allowed_clients_in_and_keeps_others_out_at_every_moment(
    clean: Site,
) -> None:
    """Containers start and stop in a loop (a web and a client container
    per cycle, on alternate hosts) while four containers probe web0 all
    along: the clients are never refused and the others never answered.
    Each new web container refuses its first probe from the others (CNI
    ADD returned only once its address was in its host's sets) and
    answers the clients'; each new client gets in once every host
    enforces it (`policy wait`); after every cycle each host's sets hold
    exactly the running containers' addresses."""
    site = clean
    site.apply(POLICY_NAME, POLICY)
    expect(site, stable_cases())
    web0 = site.boxes["web0"]
    targets = [(p, web0.addresses[f], PORT) for p in ("tcp", "udp") for f in (4, 6)]
    watchers = {
        src: echo.watch_from(site.boxes[src].netns, WATCH_WAIT, 0.2, targets)
        for src in ("client1", "client2", "free1", "free2")
    }
    previous: list[str] = []
    try:
        for cycle in range(CYCLES):
            web_host = 1 + cycle % 2
            web, guest = f"web-{cycle}", f"guest-{cycle}"
            in_parallel(*[(site.remove, name) for name in previous])
            in_parallel(
                (site.run, web, web_host, WEB, (PORT,)),
                (site.run, guest, 3 - web_host, CLIENT, (PORT,)),
            )
            # The new web container's first probes: its own host decides, and
            # knew it as a web container before `podman run` returned.
            expect(
                site,
                both("client1", web, PORT, True)
                + both("client2", web, PORT, True)
                + both("free1", web, PORT, False)
                + both("free2", web, PORT, False),
                wait=FIRST_WAIT,
                retries=0,
            )
            # Every host knows the new client once `policy wait` returns.
            site.wait()
            expect(
                site,
                both(guest, "web0", PORT, True) + both(guest, web, PORT, True),
                wait=FIRST_WAIT,
                retries=0,
            )
            assert_sets(site, list(site.boxes.values()))
            previous = [web, guest]
    finally:
        rounds = {src: echo.stop_watching(w) for src, w in watchers.items()}
    for src, found in rounds.items():
        allowed = STABLE[src][1] == CLIENT
        # Enough rounds to have watched every cycle (a denied round takes WATCH_WAIT).
        assert len(found) >= CYCLES, (src, len(found))
        wrong = [r for r in found if any((a is None) == allowed for a in r)]
        assert not wrong, (
            f"{src} -> web0 ({'allowed' if allowed else 'denied'}): {len(wrong)} of"
            f" {len(found)} rounds wrong, e.g. {wrong[0]} for {targets}"
        )
    print(f"\nbackground probe rounds: { {src: len(found) for src, found in rounds.items()} }")
    # The registrations are exactly the running containers, and diagnose
    # finds each host's table as the policy and the endpoints make it.
    listed = site.endpoints()
    assert listed["rejected"] == []
    assert sorted(e["name"] for e in listed["endpoints"]) == sorted(site.boxes)
    for host in (1, 2):
        findings = policy_findings(site, host)
        assert findings and all(f["ok"] for f in findings), findings
    # Stopped, the last cycle's containers leave every set too.
    in_parallel(*[(site.remove, name) for name in previous])
    site.wait()
    assert_sets(site, list(site.boxes.values()))
    expect(site, stable_cases())


# --- no window ---------------------------------------------------------------------

NFT_DELAY = 3.0  # seconds a slowed daemon's policy transaction waits before it runs
# The nft a daemon finds first on its PATH in the test below: the real one,
# but a transaction that adds elements to the policy table's sets waits
# NFT_DELAY seconds first. Whoever waits for such a transaction waits that
# long, and whoever does not is done before the elements are in.
SLOW_NFT = """#!/bin/sh
if [ "$1" = "-f" ] && [ "$2" = "-" ]; then
    script="$(cat)"
    case "$script" in
        *"add element inet {table} "*) sleep {delay} ;;
    esac
    printf '%s\\n' "$script" | {nft} "$@"
    exit $?
fi
exec {nft} "$@"
"""


def restart_daemon(lab: Lab, host: int, env: Mapping[str, str] | None = None) -> None:
    readies = hosts.ready_count(lab.files(host))
    lab.stop_daemon(host)
    lab.start_daemon(host, env=dict(env) if env is not None else None)
    hosts.wait_ready_again(host, lab.files(host), readies, lambda: lab.daemon_running(host))


@contextmanager
def slow_policy_transactions(lab: Lab, host: int, bindir: Path) -> Iterator[None]:
    """The host's daemon restarted with SLOW_NFT, and again without it after."""
    real = shutil.which("nft")
    assert real is not None
    bindir.mkdir()
    wrapper = bindir / "nft"
    wrapper.write_text(SLOW_NFT.format(table=TABLE, delay=NFT_DELAY, nft=real))
    wrapper.chmod(0o755)
    restart_daemon(lab, host, {"PATH": f"{bindir}:{os.environ['PATH']}"})
    try:
        yield
    finally:
        restart_daemon(lab, host)


def test_cni_add_returns_only_once_the_new_address_is_in_its_hosts_sets(
    clean: Site, tmp_path: Path
) -> None:
    """The issue's "no window", made visible: h2's daemon takes NFT_DELAY
    seconds for every transaction that adds set elements, so `podman run`
    of a web container on h2 takes at least that long (CNI ADD waited for
    the transaction: the positive control that the delay was in force),
    and the moment it returns h2's web sets hold the new address. Its
    first probes: refused from the unlabelled containers, answered for the
    clients."""
    site, lab = clean, clean.lab
    site.apply(POLICY_NAME, POLICY)
    with slow_policy_transactions(lab, 2, tmp_path / "bin"):
        site.wait()
        started = time.monotonic()
        box = site.start("web-slow", 2, WEB)
        took = time.monotonic() - started
        found = policy_sets(lab, 2)
        for version, name in selector_sets(WEB).items():
            assert ip_address(box.addresses[version]) in found.get(name, frozenset()), (
                f"{box.addresses[version]} not in h2's {name} when ADD returned\n{ruleset(site)}"
            )
        assert took >= NFT_DELAY, f"podman run took {took:.1f} s: did ADD wait at all?"
        print(f"\npodman run with a {NFT_DELAY:g} s policy transaction: {took:.1f} s")
        site.serve(box, (PORT,))
        expect(
            site,
            both("free1", "web-slow", PORT, False)
            + both("free2", "web-slow", PORT, False)
            + both("client1", "web-slow", PORT, True)
            + both("client2", "web-slow", PORT, True),
            wait=FIRST_WAIT,
            retries=0,
        )


# --- a host killed -----------------------------------------------------------------


def test_a_killed_hosts_endpoints_leave_every_set_after_its_lease_ttl(clean: Site) -> None:
    """h3's daemon is killed (SIGKILL: no goodbye): its containers'
    registrations stay until its etcd lease runs out, then leave etcd and
    the other hosts' sets; the other hosts' own endpoints stay in them."""
    site, lab = clean, clean.lab
    site.apply(POLICY_NAME, POLICY)
    lab.add_host(3)
    try:
        lab.podman(3).ensure_started()
        in_parallel(
            (site.run, "web3", 3, WEB, (PORT,)),
            (site.run, "client3", 3, CLIENT, (PORT,)),
        )
        site.wait()
        assert_sets(site, list(site.boxes.values()), hosts=(1, 2, 3))
        # h3's endpoints count on the other hosts, and h3 enforces the policy.
        expect(
            site,
            both("client3", "web0", PORT, True)
            + both("client1", "web3", PORT, True)
            + both("free2", "web3", PORT, False),
        )
        h3_prefix = f"{endpoints_prefix(OWN_PREFIX)}{host_id(lab.subnet(3))}/"
        assert len(endpoint_keys(lab, h3_prefix)) == 2

        lab.stop_daemon(3, signal.SIGKILL)
        killed = time.monotonic()
        survivors = [b for b in site.boxes.values() if b.host != 3]
        h3_addresses = {
            ip_address(a) for b in site.boxes.values() if b.host == 3 for a in b.addresses.values()
        }
        # Until the lease runs out nothing changes: a daemon that stops
        # renewing may only be slow.
        assert len(endpoint_keys(lab, h3_prefix)) == 2

        def gone() -> bool:
            if endpoint_keys(lab, h3_prefix):
                return False
            for host in (1, 2):
                held: set[IPAddress] = set()
                for elements in policy_sets(lab, host).values():
                    held |= elements
                if held & h3_addresses:
                    return False
            return True

        wait_until(gone, timeout=TTL + 30, step=0.1)
        took = time.monotonic() - killed
        print(f"\nh3's endpoints left etcd and h1's and h2's sets {took:.1f} s after the kill")
        # The lease was renewed at most TTL / 3 before the kill.
        assert took >= TTL - TTL / 3 - 0.5, took
        # The survivors' endpoints stay (the positive control), and so does
        # the policy: clients in, others out.
        assert_sets(site, survivors)
        expect(site, stable_cases())
        listed = site.endpoints()
        assert sorted(e["name"] for e in listed["endpoints"]) == sorted(b.name for b in survivors)
        assert listed["rejected"] == []
    finally:
        for name in [n for n, b in site.boxes.items() if b.host == 3]:
            site.forget(name)
        lab.remove_host(3)


# --- bad input ---------------------------------------------------------------------


def endpoint_value(host: str, addresses: Sequence[str], labels: Mapping[str, str]) -> bytes:
    return json.dumps(
        {"name": "bad", "host": host, "addresses": list(addresses), "labels": dict(labels)}
    ).encode()


def test_bad_endpoints_and_policies_in_etcd_are_skipped_with_one_warning_each(
    clean: Site,
) -> None:
    """Malformed registrations and policy documents written straight into
    etcd (no CLI to refuse them): each daemon stays up, warns once per bad
    key, programs nothing for any of them, and enforces the good policy
    written after them. Several of the bad ones would widen or narrow
    what passes if they were used, and the probes say they are not."""
    site, lab = clean, clean.lab
    h1, h2 = host_id(lab.subnet(1)), host_id(lab.subnet(2))
    free2 = site.boxes["free2"]
    spare = str(lab.subnet(1).network_address + 240)  # no container has it
    ghost = f"10.244.{FIRST_FAKE_OCTET + 1}"  # a subnet no host leases
    ep, pp = endpoints_prefix(OWN_PREFIX), policies_prefix(OWN_PREFIX)
    bad_endpoints = {
        f"{ep}{h1}/not-json": b"{not json",
        f"{ep}{h1}/not-utf8": b"\xff\xfe\x00",
        f"{ep}{h1}/wrong-types": json.dumps(
            {"name": 5, "host": h1, "addresses": spare, "labels": ["app", "client"]}
        ).encode(),
        # free2 (of h2) claimed as a client, under h1: it would get into web0.
        f"{ep}{h1}/outside": endpoint_value(h1, list(free2.addresses.values()), CLIENT),
        f"{ep}{ghost}.0-24/ghost": endpoint_value(f"{ghost}.0-24", [f"{ghost}.5"], CLIENT),
        f"{ep}not-a-subnet/x": endpoint_value("not-a-subnet", [spare], CLIENT),
        f"{ep}{h1}/odd-labels": endpoint_value(h1, [spare], {**CLIENT, "bad key!": "x"}),
        f"{ep}{h2}/deep": b"[" * 5000,
    }
    deny_all = {"selector": {}, "policyTypes": ["Ingress"]}
    bad_policies = {
        f"{pp}not-json": b"{{{ not: [yaml",
        f"{pp}not-utf8": b"\xff\xfe\x00",
        f"{pp}wrong-types": json.dumps({"name": "wrong-types", "selector": "app=web"}).encode(),
        # Each of these would isolate every container (client1 -> free2 below).
        f"{pp}Bad_Name": json.dumps(deny_all).encode(),
        f"{pp}typo": json.dumps({**deny_all, "name": "typo", "ingres": []}).encode(),
        f"{pp}no-selector": json.dumps({"name": "no-selector", "ingress": []}).encode(),
        f"{pp}other-name": json.dumps({**deny_all, "name": "another"}).encode(),
        f"{pp}aliases": b"name: aliases\nselector: &s {}\npolicyTypes: [Ingress]\nx: *s\n",
        # This one would let anyone into web0 (free1, free2 below).
        f"{pp}named-port": json.dumps(
            {
                "name": "named-port",
                "selector": {"matchLabels": WEB},
                "ingress": [
                    {
                        "from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                        "ports": [{"protocol": "TCP", "port": "http"}],
                    }
                ],
            }
        ).encode(),
    }
    bad = {**bad_endpoints, **bad_policies}
    try:
        put_all(lab, bad)
        site.apply(POLICY_NAME, POLICY)  # the good one, after them; --wait
        assert lab.daemon_running(1) and lab.daemon_running(2)
        expect(
            site,
            stable_cases()
            + both("client1", "free2", PORT, True)  # no deny-all
            + both("free1", "client2", PORT, True),
        )
        assert_sets(site, list(site.boxes.values()))
        for host in (1, 2):
            assert policy_chains(lab, host) == {chain_name(POLICY_NAME, Direction.INGRESS)}
        # Readers say why each registration is not used.
        listed = site.endpoints()
        assert {r["key"] for r in listed["rejected"]} == set(bad_endpoints)
        # One warning per bad key and host, not one per pass: more passes
        # (a label set and removed, each waited for) warn no more.
        site.ctl("endpoint", "label", "free1", "tier=x", "--wait", "--timeout", "60")
        site.ctl("endpoint", "label", "free1", "tier-", "--wait", "--timeout", "60")
        for host in (1, 2):
            counts = {key: skipped_warnings(lab, host, key) for key in bad}
            assert set(counts.values()) == {1}, (host, counts)
        findings = policy_findings(site, 1)
        assert any(f"{len(bad)} policy document(s) or endpoint(s)" in f["detail"] for f in findings)
        assert "Traceback" not in lab.daemon_log(1).read_text()
        assert "Traceback" not in lab.daemon_log(2).read_text()
    finally:
        delete_all(lab, list(bad))
    site.wait()
    findings = policy_findings(site, 1)
    assert findings and all(f["ok"] for f in findings), findings


def control_request(lab: Lab, host: int, payload: bytes) -> dict[str, Any]:
    """One raw request line on the host daemon's control socket (a Unix
    socket: a path, not a network), and its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(lab.control_socket(host)))
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer, f"no answer to {payload[:60]!r}"
    found: dict[str, Any] = json.loads(answer)
    return found


def endpoint_add(args: Mapping[str, Any]) -> bytes:
    return json.dumps({"command": "endpoint_add", "args": dict(args)}).encode() + b"\n"


def test_bad_control_requests_are_refused_by_name_and_the_daemon_serves_on(
    clean: Site,
) -> None:
    """Malformed endpoint_add requests on the control socket (what
    overlay-cni and the Docker plugin send): each is answered with an
    error that names the problem, nothing is registered, and the daemon
    goes on serving: a valid request afterwards registers an endpoint
    that every host's sets then hold."""
    site, lab = clean, clean.lab
    site.apply(POLICY_NAME, POLICY)
    subnet, other = lab.subnet(1), lab.subnet(2)
    spare = str(subnet.network_address + 241)
    valid = {"id": "lab-control-1", "name": "by-hand", "addresses": [spare], "labels": WEB}
    many = {f"k{i}": "v" * 63 for i in range(300)}  # 300 good labels: too big a value
    cases: dict[str, tuple[bytes, str]] = {
        "not JSON": (b"hello\n", "request is not JSON"),
        "not an object": (b"[1, 2]\n", "must be a JSON object"),
        "nested": (b'{"command": "endpoint_add", "args": ' + b"[" * 20000 + b"\n", "nested"),
        "longer than the limit": (b"x" * 70_000 + b"\n", "request longer than"),
        "unknown command": (b'{"command": "endpoint_steal"}\n', "unknown command"),
        "args not an object": (b'{"command": "endpoint_add", "args": [1]}\n', "args"),
        "no id": (endpoint_add({**valid, "id": None}), "id: must be a string"),
        "id with a slash": (endpoint_add({**valid, "id": "../../x"}), 'id "../../x"'),
        "no addresses": (endpoint_add({**valid, "addresses": None}), "addresses"),
        "bad address": (endpoint_add({**valid, "addresses": ["10.244.999.1"]}), "not an IP"),
        "outside our subnet": (
            endpoint_add({**valid, "addresses": [str(other.network_address + 5)]}),
            "outside host",
        ),
        "the gateway": (
            endpoint_add({**valid, "addresses": [str(subnet.network_address + 1)]}),
            "gateway",
        ),
        "three addresses": (
            endpoint_add({**valid, "addresses": [spare, spare, spare]}),
            "one or two addresses",
        ),
        "a bad label": (endpoint_add({**valid, "labels": {"bad key!": "x"}}), "bad key!"),
        "a long label": (endpoint_add({**valid, "labels": {"app": "w" * 64}}), "63"),
        "huge labels": (endpoint_add({**valid, "labels": many}), "more than 8192"),
        "labels not an object": (endpoint_add({**valid, "labels": ["app=web"]}), "labels"),
        "a name not a string": (endpoint_add({**valid, "name": 5}), "name"),
    }
    wrong = []
    for what, (payload, reason) in cases.items():
        answer = control_request(lab, 1, payload)
        if reason not in str(answer.get("error")):
            wrong.append(f"{what}: {answer} (wanted an error naming {reason!r})")
    assert not wrong, "\n".join(wrong)
    assert lab.daemon_running(1)
    listed = site.endpoints()
    assert sorted(e["name"] for e in listed["endpoints"]) == sorted(site.boxes)
    assert "Traceback" not in lab.daemon_log(1).read_text()
    # A valid request: registered, and in every host's web set.
    answer = control_request(lab, 1, endpoint_add(valid))
    assert answer.get("result", {}).get("revision", 0) > 0, answer
    try:
        site.wait()
        by_hand = ip_address(spare)
        for host in (1, 2):
            found = policy_sets(lab, host)
            assert by_hand in found[selector_sets(WEB)[4]], (host, found)
    finally:
        answer = control_request(
            lab,
            1,
            json.dumps({"command": "endpoint_del", "args": {"id": valid["id"]}}).encode() + b"\n",
        )
        assert answer.get("result", {}).get("existed") is True, answer
    site.wait()
    assert_sets(site, list(site.boxes.values()))
