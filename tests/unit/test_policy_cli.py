"""`overlayctl policy ...`, `endpoints` and `endpoint label` against a
FakeStore: what is written and refused, the verdicts and which policies
decide them, waiting for the hosts' status keys, and labels changed in
place with the key's lease kept. Each refusal beside an accepted twin.
(tests/integration/test_policy_cli_etcd.py runs the writes against a real
etcd; tests/lab/test_policy.py runs all of it against real daemons.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path

import pytest

from overlayd.cli import ctl
from overlayd.cli import policy as cli
from overlayd.config import AgentConfig
from overlayd.errors import EndpointError, OverlaydError
from overlayd.model import Lease
from overlayd.plan.endpoints import (
    LabelChanges,
    endpoint_key,
    host_id,
    parse_label_changes,
    render_endpoint,
)
from overlayd.plan.leases import config_key, lease_key, render_lease
from overlayd.plan.policy import policy_key
from overlayd.plan.policy_model import Endpoint
from tests.unit.fake_store import FakeStore

PREFIX = "/coreos.com/network"
OWN = "/overlayd"
CONFIG = json.dumps(
    {
        "Network": "10.244.0.0/16",
        "EnableIPv6": True,
        "IPv6Network": "fd00:10:244::/56",
        "IPv6SubnetLen": 64,
        "Backend": {"Type": "vxlan"},
    }
)
H1, H2, H3 = "10.244.1.0-24", "10.244.2.0-24", "10.244.3.0-24"

DENY_DB = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-db}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
"""
ALLOW_WEB = json.dumps(
    {
        "name": "allow-web",
        "selector": {"matchLabels": {"app": "db"}},
        "ingress": [
            {
                "from": [{"selector": {"matchLabels": {"app": "web"}}}],
                "ports": [{"protocol": "TCP", "port": 5432}],
            }
        ],
    }
)


def lease(n: int) -> Lease:
    return Lease(
        subnet=IPv4Network(f"10.244.{n}.0/24"),
        public_ip=IPv4Address(f"192.0.2.{n}"),
        vni=1,
        vtep_mac=f"aa:00:00:00:00:0{n}",
        ipv6_subnet=IPv6Network(f"fd00:10:244:{n}::/64"),
        public_ipv6=IPv6Address(f"2001:db8::{n}"),
        vtep_mac_v6=f"aa:00:00:00:01:0{n}",
    )


class Cluster:
    """Two hosts with leases (h1, h2) and their endpoints in a FakeStore."""

    def __init__(self) -> None:
        self.store = FakeStore()
        self.leases: dict[str, int] = {}

    async def host(self, n: int) -> int:
        held = lease(n)
        lease_id = await self.store.grant(60)
        await self.store.create(lease_key(PREFIX, held), render_lease(held), lease_id)
        self.leases[host_id(held.subnet)] = lease_id
        return lease_id

    async def endpoint(self, n: int, ident: str, name: str, last: int, **labels: str) -> Endpoint:
        host = f"10.244.{n}.0-24"
        found = Endpoint(
            key=endpoint_key(OWN, host, ident),
            id=ident,
            host=host,
            name=name,
            addresses=(ip_address(f"10.244.{n}.{last}"), ip_address(f"fd00:10:244:{n}::{last}")),
            labels=labels,
            registered=1.0,
            hostname=f"h{n}",
        )
        await self.store.put_bound(found.key, render_endpoint(found), self.leases.get(host, 999))
        return found

    async def status(self, host: str, revision: int) -> None:
        value = json.dumps({"revision": revision, "hostname": f"n{host}", "time": 1.0})
        await self.store.put_bound(cli.status_prefix(OWN) + host, value.encode(), self.leases[host])


@pytest.fixture
async def cluster() -> Cluster:
    c = Cluster()
    await c.store.put(config_key(PREFIX), CONFIG)
    await c.host(1)
    await c.host(2)
    await c.endpoint(1, "c-web1", "web1", 5, app="web")
    await c.endpoint(1, "c-db1", "db1", 6, app="db")
    await c.endpoint(1, "c-free1", "free1", 7)
    await c.endpoint(2, "c-db2", "db2", 5, app="db")
    # A host without a lease: its endpoint is not used.
    await c.endpoint(3, "c-ghost", "ghost", 5, app="web")
    return c


async def state(c: Cluster) -> cli.PolicyState:
    return await cli.read_state(c.store, PREFIX, OWN)


# --- apply, show, list, delete ---------------------------------------------------------


async def test_apply_writes_the_canonical_document_and_refuses_bad_ones_unwritten(
    cluster: Cluster,
) -> None:
    store = cluster.store
    before = store.revision
    for bad, field in (
        (DENY_DB.replace("podSelector", "podSelectr"), "spec.podSelectr"),
        (DENY_DB.replace("[Ingress]", "[Ingres]"), "spec.policyTypes[0]"),
        (ALLOW_WEB.replace('"port": 5432', '"port": "http"'), "ingress[0].ports[0].port"),
        ("{not json", "document"),
    ):
        with pytest.raises(cli.Refused, match="nothing written") as info:
            await cli.apply_policy(store, OWN, bad.encode())
        assert field in str(info.value)
    assert store.revision == before  # nothing was written
    name, revision = await cli.apply_policy(store, OWN, DENY_DB.encode())
    assert (name, revision) == ("deny-db", store.revision)
    stored = json.loads(store.values[policy_key(OWN, "deny-db")][0])
    assert stored == {
        "name": "deny-db",
        "selector": {"matchLabels": {"app": "db"}},
        "policyTypes": ["Ingress"],
        "ingress": [],
    }
    shown = await cli.show_policy(store, OWN, "deny-db")
    assert shown["valid"] and shown["policy"] == stored and shown["revision"] == revision
    assert "matchLabels:\n    app: db" in cli.render_shown(shown)


async def test_list_shows_what_each_policy_selects_and_what_is_not_used(cluster: Cluster) -> None:
    store = cluster.store
    await cli.apply_policy(store, OWN, DENY_DB.encode())
    await cli.apply_policy(store, OWN, ALLOW_WEB.encode())
    await store.put(policy_key(OWN, "broken"), b'{"name": "broken", "selector": {}, "x": 1}')
    rows = {r["name"]: r for r in cli.policy_rows(await state(cluster), OWN)}
    assert rows["deny-db"]["selects"] == 2  # db1, db2
    assert rows["allow-web"]["types"] == ["Ingress"] and rows["allow-web"]["ingress_rules"] == 1
    assert rows["broken"]["status"].startswith("NOT USED: x: unknown field")
    assert rows["deny-db"]["status"] == "ok"
    table = cli.render_policy_rows(list(rows.values()))
    assert "app=db" in table and "NOT USED" in table


async def test_delete_returns_the_revision_of_the_deletion(cluster: Cluster) -> None:
    store = cluster.store
    await cli.apply_policy(store, OWN, DENY_DB.encode())
    revision = await cli.delete_policy(store, OWN, "deny-db")
    assert revision == store.revision and policy_key(OWN, "deny-db") not in store.values
    with pytest.raises(OverlaydError, match="no policy 'deny-db'"):
        await cli.delete_policy(store, OWN, "deny-db")


# --- check ----------------------------------------------------------------------------


async def test_check_names_the_policies_that_select_and_allow(cluster: Cluster) -> None:
    await cli.apply_policy(cluster.store, OWN, DENY_DB.encode())
    await cli.apply_policy(cluster.store, OWN, ALLOW_WEB.encode())
    s = await state(cluster)
    allowed = cli.check(s, "web1", "db2", "5432/tcp")
    assert allowed.allowed
    assert (str(allowed.src), str(allowed.dst)) == ("10.244.1.5", "10.244.2.5")
    assert allowed.verdict.ingress.selected_by == ("allow-web", "deny-db")
    assert allowed.verdict.ingress.allowed_by == ("allow-web",)
    assert "ingress at db2: selected by allow-web, deny-db; allowed by allow-web" in (
        cli.render_check(allowed)
    )
    # Denied: another port, another protocol, a source without the label.
    for src, port in (("web1", "80/tcp"), ("web1", "5432/UDP"), ("free1", "5432/tcp")):
        denied = cli.check(s, src, "db1", port)
        assert not denied.allowed and denied.verdict.ingress.allowed_by == ()
        assert cli.check_json(denied)["allowed"] is False
    # Open: nothing selects web1 or free1.
    opened = cli.check(s, "db1", "free1", "80/tcp")
    assert opened.allowed and not opened.verdict.ingress.isolated
    assert "open (no policy selects it for ingress)" in cli.render_check(opened)
    # Addresses work as well as names, of anyone; IPv6 on request.
    assert cli.check(s, "10.244.1.5", "10.244.2.5", "5432").allowed
    v6 = cli.check(s, "web1", "db1", "5432/tcp", version=6)
    assert (str(v6.src), str(v6.dst)) == ("fd00:10:244:1::5", "fd00:10:244:1::6")
    assert not cli.check(s, "203.0.113.10", "db1", "5432/tcp").allowed
    # The bridge address of db1's own host: never judged.
    own_host = cli.check(s, "10.244.1.1", "db1", "80/tcp")
    assert own_host.allowed and own_host.note is not None and "own host" in own_host.note
    assert not cli.check(s, "10.244.2.1", "db1", "80/tcp").allowed  # another host's bridge


async def test_check_refuses_what_it_cannot_resolve(cluster: Cluster) -> None:
    await cluster.endpoint(2, "c-dup", "free1", 9)  # a second "free1"
    s = await state(cluster)
    with pytest.raises(cli.Refused, match="names 2 endpoints"):
        cli.check(s, "free1", "db1", "80/tcp")
    # By key it is one of them.
    assert cli.check(s, endpoint_key(OWN, H2, "c-dup"), "db1", "80/tcp").allowed
    with pytest.raises(cli.Refused, match=r"not used: .*host 10\.244\.3\.0-24 has no lease"):
        cli.check(s, "ghost", "db1", "80/tcp")
    with pytest.raises(cli.Refused, match="no address and no usable endpoint"):
        cli.check(s, "nobody", "db1", "80/tcp")
    for port in ("80/icmp", "http/tcp", "0/tcp", "70000/udp"):
        with pytest.raises(cli.Refused, match=r"PORT/PROTO|protocol"):
            cli.check(s, "web1", "db1", port)
    with pytest.raises(cli.Refused, match="no address of one family"):
        cli.check(s, "10.244.1.5", "fd00:10:244:1::6", "80/tcp")
    assert cli.check(s, "db1", "web1", "80/tcp").allowed  # positive control


# --- endpoints ---------------------------------------------------------------------------


async def test_endpoints_lists_usable_and_rejected_with_reasons(cluster: Cluster) -> None:
    await cluster.endpoint(2, "c-other", "other2", 6)  # usable
    await cluster.endpoint(2, "c-out", "outside", 5)  # db2's address: both claimants go
    rows = cli.endpoint_rows(await state(cluster))
    names = [e["name"] for e in rows["endpoints"]]
    assert names == ["db1", "free1", "web1", "other2"]
    rejected = {r["name"]: r["reason"] for r in rows["rejected"]}
    assert "has no lease" in rejected["ghost"]
    assert "also claimed" in rejected["outside"] and "also claimed" in rejected["db2"]
    text = cli.render_endpoint_rows(rows)
    assert "app=web" in text and "not used (3)" in text


async def test_values_nested_too_deeply_are_rejected_not_raised(cluster: Cluster) -> None:
    """Registrations and status keys are written by hosts: a value of a few
    KB of brackets made `endpoints`, `endpoint label` and `policy wait`
    fail with a RecursionError traceback."""
    deep = b"[" * 5000
    key = endpoint_key(OWN, H1, "c-deep")
    await cluster.store.put_bound(key, deep, cluster.leases[H1])
    rows = cli.endpoint_rows(await state(cluster))
    (reason,) = [r["reason"] for r in rows["rejected"] if r["key"] == key]
    assert reason.startswith("value is not valid JSON")
    assert "web1" in [e["name"] for e in rows["endpoints"]]  # the rest is listed
    with pytest.raises(EndpointError, match="nested too deeply"):
        await cli.label_endpoint(cluster.store, OWN, key, LabelChanges({"x": "y"}))
    # A host's status key nested too deeply counts as no revision enforced.
    _, revision = await cli.apply_policy(cluster.store, OWN, DENY_DB.encode())
    await cluster.status(H1, revision)
    await cluster.store.put_bound(cli.status_prefix(OWN) + H2, deep, cluster.leases[H2])
    found, _ = await cli.wait_enforced(cluster.store, PREFIX, OWN, revision, within=0.2)
    assert not found.done and [h.host for h in found.behind] == [H2]


# --- label -------------------------------------------------------------------------------


async def test_label_changes_labels_in_place_and_keeps_the_lease(cluster: Cluster) -> None:
    store = cluster.store
    key = endpoint_key(OWN, H1, "c-web1")
    done = await cli.label_endpoint(store, OWN, "web1", parse_label_changes(["tier=front"]))
    assert done.changed and done.labels == {"app": "web", "tier": "front"}
    value, revision, lease_id = store.values[key]
    assert revision == done.revision and lease_id == cluster.leases[H1]
    assert json.loads(value)["labels"] == {"app": "web", "tier": "front"}
    assert json.loads(value)["addresses"] == ["10.244.1.5", "fd00:10:244:1::5"]
    # Removing, by id this time; then a change that changes nothing writes nothing.
    done = await cli.label_endpoint(store, OWN, "c-web1", parse_label_changes(["app-"]))
    assert done.labels == {"tier": "front"}
    before = store.revision
    same = await cli.label_endpoint(store, OWN, key, parse_label_changes(["tier=front"]))
    assert not same.changed and store.revision == before
    # The key still goes with its host's lease.
    await store.expire(cluster.leases[H1])
    assert key not in store.values


async def test_label_refuses_an_ambiguous_name_and_a_missing_endpoint(cluster: Cluster) -> None:
    await cluster.endpoint(2, "c-dup", "web1", 9)
    changes = parse_label_changes(["x=y"])
    with pytest.raises(EndpointError, match=r"names 2 endpoints .*give the key"):
        await cli.label_endpoint(cluster.store, OWN, "web1", changes)
    with pytest.raises(EndpointError, match="no endpoint is named"):
        await cli.label_endpoint(cluster.store, OWN, "nobody", changes)
    # A rejected endpoint (its host has no lease) can be labelled all the same.
    done = await cli.label_endpoint(cluster.store, OWN, "ghost", changes)
    assert done.labels == {"app": "web", "x": "y"}
    with pytest.raises(EndpointError, match="label value"):
        parse_label_changes(["x=two words"])


async def test_label_retries_after_a_concurrent_change(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = cluster.store
    key = endpoint_key(OWN, H1, "c-db1")
    real = store.replace_bound
    raced: list[int] = []

    async def racing(k: str, value: bytes, mod_revision: int) -> bool:
        if not raced:  # another writer (the host republishing, say) first
            raced.append(mod_revision)
            current = json.loads(store.values[k][0])
            current["labels"]["owner"] = "ops"
            await store.put_bound(k, json.dumps(current).encode(), store.values[k][2])
        return await real(k, value, mod_revision)

    monkeypatch.setattr(store, "replace_bound", racing)
    done = await cli.label_endpoint(store, OWN, "db1", LabelChanges({"tier": "data"}))
    assert raced and done.labels == {"app": "db", "owner": "ops", "tier": "data"}
    assert json.loads(store.values[key][0])["labels"] == done.labels


# --- wait -----------------------------------------------------------------------------------


async def test_wait_returns_once_every_live_host_reports_the_revision(cluster: Cluster) -> None:
    store = cluster.store
    _, revision = await cli.apply_policy(store, OWN, DENY_DB.encode())
    await cluster.status(H1, revision - 1)
    await cluster.status(H2, revision - 1)
    # A third host with a lease and no status: named, not waited for.
    await cluster.host(3)

    async def hosts_catch_up() -> None:
        await asyncio.sleep(0.05)
        await cluster.status(H1, revision)
        await asyncio.sleep(0.05)
        await cluster.status(H2, revision + 3)

    catching = asyncio.create_task(hosts_catch_up())
    found, seconds = await cli.wait_enforced(store, PREFIX, OWN, revision, within=10)
    await catching
    assert found.done and 0.09 < seconds < 1.0  # woken by the watch, not a reread
    assert [(h.host, h.revision) for h in found.live] == [(H1, revision), (H2, revision + 3)]
    assert found.without_status == (H3,)
    assert "in force on 2 of 2 live host(s)" in cli.render_progress(found, seconds, 10)
    assert await cli.newest_revision(store, OWN) == revision


async def test_wait_times_out_naming_the_hosts_behind(cluster: Cluster) -> None:
    store = cluster.store
    _, revision = await cli.apply_policy(store, OWN, DENY_DB.encode())
    await cluster.status(H1, revision)
    await cluster.status(H2, revision - 1)
    found, seconds = await cli.wait_enforced(store, PREFIX, OWN, revision, within=0.3)
    assert not found.done and seconds >= 0.3
    assert [h.host for h in found.behind] == [H2]
    assert f"not in force on 1 of 2 live host(s): {H2}" in cli.render_progress(found, seconds, 0.3)
    # The host behind goes (its lease ends, its status with it): done.
    await store.expire(cluster.leases[H2])
    found, _ = await cli.wait_enforced(store, PREFIX, OWN, revision, within=5)
    assert found.done and [h.host for h in found.live] == [H1]


# --- the commands, as overlayctl runs them ---------------------------------------------------


@pytest.fixture
def shared(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """`overlayctl` against the cluster's FakeStore. Each command runs its
    own event loop; the store's condition belongs to one, so each
    connection gets a fresh one."""

    @asynccontextmanager
    async def connect(s: AgentConfig) -> AsyncIterator[FakeStore]:
        cluster.store._changed = asyncio.Condition()
        yield cluster.store

    monkeypatch.setattr(cli, "connect", connect)
    yield cluster


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = ctl.main([*args[:2], "--etcd-prefix", PREFIX, *args[2:]])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_commands_exit_statuses_and_output(
    shared: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DENY_DB.replace("podSelector", "podSelectr"))
    code, _, err = run(["policy", "apply", str(bad)], capsys)
    assert code == 2 and "spec.podSelectr: unknown field" in err
    good = tmp_path / "deny.yaml"
    good.write_text(DENY_DB)
    code, out, _ = run(["policy", "apply", str(good)], capsys)
    assert code == 0 and out.startswith("policy deny-db applied at revision ")
    code, out, _ = run(["policy", "list", "--json"], capsys)
    assert code == 0 and [r["name"] for r in json.loads(out)] == ["deny-db"]
    code, out, _ = run(["policy", "check", "web1", "db1", "80/tcp"], capsys)
    assert code == 1 and out.startswith("denied: 10.244.1.5 (web1 on h1)")
    code, out, _ = run(["policy", "check", "db1", "web1", "80/tcp", "--json"], capsys)
    assert code == 0 and json.loads(out)["allowed"] is True
    code, _, err = run(["policy", "check", "web1", "db1", "80/icmp"], capsys)
    assert code == 2 and "protocol" in err
    code, out, _ = run(["endpoints", "--json"], capsys)
    assert code == 0 and len(json.loads(out)["endpoints"]) == 4
    code, out, _ = run(["endpoint", "label", "free1", "app=web", "--json"], capsys)
    assert code == 0 and json.loads(out)["labels"] == {"app": "web"}
    code, _, err = run(["endpoint", "label", "free1", "app=two words"], capsys)
    assert code == 2 and "label value" in err
    code, out, _ = run(["policy", "show", "deny-db"], capsys)
    assert code == 0 and "name: deny-db" in out
    # No host publishes a status: nothing to wait for, said on stderr.
    code, out, err = run(["policy", "wait", "--timeout", "1"], capsys)
    assert code == 0 and "publish no status" in err
    code, out, _ = run(["policy", "delete", "deny-db", "--json"], capsys)
    assert code == 0 and json.loads(out)["deleted"] is True
    code, _, err = run(["policy", "delete", "deny-db"], capsys)
    assert code == 1 and "no policy 'deny-db'" in err


def test_wait_after_apply_times_out_with_exit_status_1(
    shared: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(shared.status(H1, 1))
    document = tmp_path / "deny.yaml"
    document.write_text(DENY_DB)
    code, out, _ = run(["policy", "apply", str(document), "--wait", "--timeout", "0.2"], capsys)
    assert code == 1 and "timed out after 0.2 s" in out and H1 in out
    asyncio.run(shared.status(H1, 10_000))
    code, out, _ = run(["policy", "wait", "--timeout", "5"], capsys)
    assert code == 0 and "in force on 1 of 1 live host(s)" in out
