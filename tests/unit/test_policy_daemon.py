"""The daemon's side of network policy, with a fake data plane and a fake
etcd: which passes write what to the policy table, how bad documents are
skipped, how a registration waits for its pass, and how a host in gwbridge
mode judges its own containers' gwbridge addresses and MACs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from ipaddress import IPv4Network, ip_address
from pathlib import Path

import pytest

from overlayd.daemon.endpoints import EndpointRegistry
from overlayd.daemon.loop import Knowledge, Reconciler
from overlayd.daemon.managers import Level
from overlayd.errors import EndpointError, OverlaydError
from overlayd.model import IPV4, DeviceSpec, EntrySet, Family, Lease
from overlayd.plan.endpoints import endpoint_key, host_id, render_endpoint
from overlayd.plan.policy import parse_policy, policy_key, render_policy
from overlayd.plan.policy_model import Direction, Endpoint
from overlayd.plan.policy_rules import TABLE, counter_name
from tests.unit.fake_store import FakeStore
from tests.unit.test_loop import GWBRIDGE, OWN, PEER, FakeDataplane, knowledge

OWN_PREFIX = "/overlayd"
DENY_WEB = parse_policy(
    {"name": "deny-web", "selector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}
)


def endpoint(name: str, address: str, host_lease: Lease = OWN, **labels: str) -> Endpoint:
    subnet = host_lease.subnet
    host = host_id(subnet)
    return Endpoint(
        key=endpoint_key(OWN_PREFIX, host, name),
        id=name,
        host=host,
        name=name,
        addresses=(ip_address(address),),
        labels=labels,
        registered=1.0,
    )


def with_policy(inputs: Knowledge, *endpoints: Endpoint, policies: tuple[str, ...] = ()) -> None:
    inputs.raw_endpoints = {e.key: render_endpoint(e) for e in endpoints}
    inputs.raw_policies = {
        policy_key(OWN_PREFIX, json.loads(doc)["name"]): doc.encode() for doc in policies
    }


async def test_policies_and_endpoints_become_one_table_and_an_endpoint_only_set_elements() -> None:
    dataplane = FakeDataplane()
    inputs = knowledge(PEER)
    web = endpoint("web", "10.244.1.5", app="web")
    with_policy(inputs, web, policies=(render_policy(DENY_WEB),))
    loop = Reconciler(inputs, dataplane)
    assert (await loop.reconcile_once()).ok
    created = dataplane.policy_statements[-1]
    assert created[:2] == [f"table inet {TABLE}", f"delete table inet {TABLE}"]
    assert any("10.244.1.5" in line for line in created)
    # A second container with the label, on the peer: a light pass writes
    # set elements only, no rule.
    dataplane.policy_statements.clear()
    other = endpoint("web2", "10.244.2.9", PEER, app="web")
    with_policy(inputs, web, other, policies=(render_policy(DENY_WEB),))
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    [statements] = dataplane.policy_statements
    assert statements and all(line.startswith("add element") for line in statements)
    assert all("10.244.2.9" in line for line in statements)
    # Nothing changed: nothing written.
    dataplane.policy_statements.clear()
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert dataplane.policy_statements == []


async def test_bad_documents_and_registrations_are_skipped_with_one_warning_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dataplane = FakeDataplane()
    inputs = knowledge(PEER)
    good = endpoint("web", "10.244.1.5", app="web")
    stray = endpoint("stray", "10.244.9.5")  # not in its host's subnet
    orphan = endpoint("orphan", "10.244.9.5", replace(PEER, subnet=IPv4Network("10.244.9.0/24")))
    inputs.raw_endpoints = {
        good.key: render_endpoint(good),
        stray.key: render_endpoint(stray),
        orphan.key: render_endpoint(orphan),  # a host without a lease
        endpoint_key(OWN_PREFIX, host_id(OWN.subnet), "junk"): b"{not json",
    }
    inputs.raw_policies = {
        policy_key(OWN_PREFIX, "deny-web"): render_policy(DENY_WEB).encode(),
        policy_key(OWN_PREFIX, "broken"): b'{"name": "broken", "selector": {}, "ingres": []}',
    }
    loop = Reconciler(inputs, dataplane)
    with caplog.at_level(logging.WARNING):
        assert (await loop.reconcile_once()).ok
        assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    skipped = [r.getMessage() for r in caplog.records if "policy_input_skipped" in r.getMessage()]
    assert len(skipped) == 4  # once each, not once per pass
    assert any("ingres" in line for line in skipped)
    assert any("stray" in line and "outside" in line for line in skipped)
    assert any("orphan" in line and "10.244.9.0-24" in line for line in skipped)
    # The good ones are in force (the positive control).
    assert any("10.244.1.5" in line for line in dataplane.policy_statements[0])
    assert loop.telemetry.policy == {"policies": 1, "endpoints": 1, "revision": 0}


class ReadCounting(Mapping[str, bytes]):
    """Registrations that count how often they are read through."""

    def __init__(self, values: dict[str, bytes]) -> None:
        self._values = values
        self.reads = 0

    def __getitem__(self, key: str) -> bytes:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        self.reads += 1
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


async def test_a_full_pass_without_policies_reads_no_registration() -> None:
    """No policy, no table, whatever the endpoints: a cold start with 10,000
    registrations and no policy must not parse them. Once a policy exists
    they are read, and a bad one is told of (the positive control)."""
    dataplane = FakeDataplane()
    inputs = knowledge(PEER)
    web = endpoint("web", "10.244.1.5", app="web")
    junk = endpoint_key(OWN_PREFIX, host_id(OWN.subnet), "junk")
    raw = ReadCounting({web.key: render_endpoint(web), junk: b"{not json"})
    inputs.raw_endpoints = raw
    loop = Reconciler(inputs, dataplane)
    assert (await loop.reconcile_once()).ok  # full
    assert raw.reads == 0
    assert dataplane.policy_statements == [[f"table inet {TABLE}", f"delete table inet {TABLE}"]]
    assert loop.telemetry.policy == {"policies": 0, "endpoints": 2, "revision": 0}
    inputs.raw_policies = {policy_key(OWN_PREFIX, "deny-web"): render_policy(DENY_WEB).encode()}
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert raw.reads == 1
    assert any("10.244.1.5" in line for line in dataplane.policy_statements[-1])
    assert loop.telemetry.policy == {"policies": 1, "endpoints": 1, "revision": 0}


async def test_removing_the_last_policy_removes_the_table() -> None:
    dataplane = FakeDataplane()
    inputs = knowledge()
    web = endpoint("web", "10.244.1.5", app="web")
    with_policy(inputs, web, policies=(render_policy(DENY_WEB),))
    loop = Reconciler(inputs, dataplane)
    assert (await loop.reconcile_once()).ok
    dataplane.policy_statements.clear()
    with_policy(inputs, web)
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert dataplane.policy_statements == [[f"delete table inet {TABLE}"]]


async def test_in_gwbridge_mode_this_hosts_gwbridge_addresses_and_macs_join_the_sets(
    tmp_path: Path,
) -> None:
    """The registry keeps what overlay-cni sends of eth1 and eth0's MAC; the
    manager puts them in the sets and judges the gwbridge's subnet. A peer's
    registration naming the same gwbridge address (every host's gwbridge has
    the same subnet) is not used for it (the negative control)."""
    store, dataplane = FakeStore(), FakeDataplane()
    registry = EndpointRegistry(
        store,
        own_prefix=OWN_PREFIX,
        state_dir=tmp_path,
        own=lambda: OWN,
        lease_id=lambda: 101,
        enforcer=FakeEnforcer(),
        egress=lambda: GWBRIDGE,
    )
    request = {
        "id": "c1",
        "addresses": ["10.244.1.5"],
        "labels": {"app": "web"},
        "gwbridge_addresses": ["172.18.0.5"],
        "macs": ["0a:58:0a:f4:01:05"],
    }
    key = (await registry.register(request))["key"]
    written = json.loads(store.values[key][0])
    assert written["gwbridge_addresses"] == ["172.18.0.5"] and written["macs"] == [
        "0a:58:0a:f4:01:05"
    ]
    remote = replace(endpoint("r1", "10.244.2.5", PEER, app="web"), registered=2.0)
    remote_value = json.loads(render_endpoint(remote))
    remote_value.update(gwbridge_addresses=["172.18.0.7"], macs=["0a:58:0a:f4:02:05"])
    inputs = knowledge(PEER)
    inputs.raw_endpoints = {
        key: store.values[key][0],
        remote.key: json.dumps(remote_value).encode(),
    }
    inputs.raw_policies = {policy_key(OWN_PREFIX, "deny-web"): render_policy(DENY_WEB).encode()}
    loop = Reconciler(inputs, dataplane)
    assert (await loop.reconcile_once()).ok
    made = "\n".join(dataplane.policy_statements[-1])
    assert "{ 10.244.1.5, 10.244.2.5, 172.18.0.5 }" in made  # ours and the peer's overlay address
    assert "172.18.0.7" not in made and "0a:58:0a:f4:02:05" not in made
    assert "{ 0a:58:0a:f4:01:05 }" in made
    assert "ip daddr != { 10.244.1.0/24, 172.18.0.0/16 } accept" in made
    # Without a gwbridge (masquerade mode) the same registration's gwbridge
    # address is left out, and so is the gwbridge's subnet.
    masquerade = knowledge(PEER, egress=replace(GWBRIDGE, mode="masquerade"))
    masquerade.raw_endpoints, masquerade.raw_policies = inputs.raw_endpoints, inputs.raw_policies
    other = FakeDataplane()
    assert (await Reconciler(masquerade, other).reconcile_once()).ok
    plain = "\n".join(other.policy_statements[-1])
    assert "172.18." not in plain and "{ 0a:58:0a:f4:01:05 }" in plain


class FakeEnforcer:
    def __init__(self) -> None:
        self.asked: list[int] = []
        self.hang = False

    async def wait_enforced(self, revision: int) -> None:
        self.asked.append(revision)
        if self.hang:
            await asyncio.Event().wait()


async def test_a_registration_is_written_bound_to_the_lease_kept_on_disk_and_waited_for(
    tmp_path: Path,
) -> None:
    store = FakeStore()
    enforcer = FakeEnforcer()
    registry = EndpointRegistry(
        store,
        own_prefix=OWN_PREFIX,
        state_dir=tmp_path / "endpoints",
        own=lambda: OWN,
        lease_id=lambda: 101,
        enforcer=enforcer,
        hostname="h1",
    )
    answer = await registry.register(
        {"id": "c1", "name": "web", "addresses": ["10.244.1.5"], "labels": {"app": "web"}}
    )
    key = endpoint_key(OWN_PREFIX, host_id(OWN.subnet), "c1")
    assert answer["key"] == key and enforcer.asked == [answer["revision"]]
    value, _, lease = store.values[key]
    assert lease == 101 and json.loads(value)["labels"] == {"app": "web"}
    assert (tmp_path / "endpoints" / "c1.json").exists()
    # The lease went (its keys with it); a new one: republished, with the
    # labels an operator set in etcd meanwhile.
    registry.etcd_changed(key, value.replace(b'"web"}', b'"api"}'))
    await store.expire(101)
    assert key not in store.values
    registry._lease_id = lambda: 202
    assert await registry.republish() == 1
    value, _, lease = store.values[key]
    assert lease == 202 and json.loads(value)["labels"] == {"app": "api"}
    # DEL: gone from etcd and disk.
    assert (await registry.unregister({"id": "c1"}))["existed"] is True
    assert key not in store.values and not (tmp_path / "endpoints" / "c1.json").exists()


async def test_bad_values_under_our_endpoints_in_etcd_never_reach_the_files(
    tmp_path: Path,
) -> None:
    """Labels an operator sets in etcd are copied to the registration's
    file, but only valid ones of a valid key of ours. Before, a value with
    bad labels was copied too (the next republish then refused the file
    and dropped the container's registration), a key `<host>/x/c1` passed
    its labels to c1's file, and a key whose id starts with a dot raised
    inside the mirror's subscriber."""
    store = FakeStore()
    registry = EndpointRegistry(
        store,
        own_prefix=OWN_PREFIX,
        state_dir=tmp_path,
        own=lambda: OWN,
        lease_id=lambda: 101,
        enforcer=FakeEnforcer(),
        hostname="h1",
    )
    await registry.register(
        {"id": "c1", "name": "web", "addresses": ["10.244.1.5"], "labels": {"app": "web"}}
    )
    key = endpoint_key(OWN_PREFIX, host_id(OWN.subnet), "c1")
    good, _, _ = store.values[key]
    ours = f"{OWN_PREFIX}/endpoints/{host_id(OWN.subnet)}/"
    registry.etcd_changed(key, good.replace(b'{"app":"web"}', b'{"bad key!":"x"}'))
    registry.etcd_changed(key, good.replace(b'{"app":"web"}', b'["app"]'))
    registry.etcd_changed(key, b"[" * 100_000)
    registry.etcd_changed(key, b"\xff not json")
    registry.etcd_changed(ours + "x/c1", good.replace(b'"web"}', b'"db"}'))
    registry.etcd_changed(ours + ".c1", good.replace(b'"web"}', b'"db"}'))
    registry.etcd_changed(ours + "..", good)
    assert json.loads((tmp_path / "c1.json").read_bytes())["labels"] == {"app": "web"}
    # The lease went; a new one: c1 comes back as it was registered.
    await store.expire(101)
    registry._lease_id = lambda: 202
    assert await registry.republish() == 1
    assert json.loads(store.values[key][0])["labels"] == {"app": "web"}
    # Positive control: a valid change of labels is kept.
    registry.etcd_changed(key, good.replace(b'"web"}', b'"api"}'))
    assert json.loads((tmp_path / "c1.json").read_bytes())["labels"] == {"app": "api"}


async def test_a_registration_outside_the_hosts_subnet_or_never_enforced_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FakeStore()
    enforcer = FakeEnforcer()
    registry = EndpointRegistry(
        store,
        own_prefix=OWN_PREFIX,
        state_dir=tmp_path,
        own=lambda: OWN,
        lease_id=lambda: 101,
        enforcer=enforcer,
    )
    with pytest.raises(EndpointError, match=r"10\.244\.2\.5"):
        await registry.register({"id": "c1", "addresses": ["10.244.2.5"]})
    with pytest.raises(EndpointError, match="label"):
        await registry.register({"id": "c1", "addresses": ["10.244.1.5"], "labels": {"a b": "c"}})
    assert store.values == {}  # nothing written for a refusal
    monkeypatch.setattr("overlayd.daemon.endpoints.ENFORCE_TIMEOUT_SECONDS", 0.05)
    enforcer.hang = True
    with pytest.raises(OverlaydError, match="no pass put it in force"):
        await registry.register({"id": "c2", "addresses": ["10.244.1.6"]})
    enforcer.hang = False
    assert (await registry.register({"id": "c3", "addresses": ["10.244.1.7"]}))["revision"] > 0


async def test_the_loop_tells_who_waits_when_their_revision_is_in_force() -> None:
    inputs = knowledge()
    inputs.revision = 5
    loop = Reconciler(inputs, FakeDataplane())
    waiting = asyncio.create_task(loop.wait_enforced(7))
    assert (await loop.reconcile_once()).ok  # revision 5: not yet
    await asyncio.sleep(0)
    assert not waiting.done()
    inputs.revision = 8
    assert (await loop.reconcile_once()).ok
    await asyncio.wait_for(waiting, 1)
    assert loop.enforced_revision == 8
    await asyncio.wait_for(loop.wait_enforced(3), 1)  # already in force


class SlowPolicyDataplane(FakeDataplane):
    """nft taking its time over the policy transaction, as with a whole
    table of thousands of elements; `refuse` makes it fail."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse = False
        self.fail_read = False  # reading the peers' entries fails, once

    async def read_entries(self, spec: DeviceSpec, family: Family = IPV4) -> EntrySet:
        if self.fail_read:
            self.fail_read = False
            raise OverlaydError("netlink dump interrupted")
        return await super().read_entries(spec, family)

    async def apply_policy(self, statements: Sequence[str]) -> None:
        self.calls.append("policy begins")
        await asyncio.sleep(0.05)
        if self.refuse:
            self.calls.append("policy refused")
            raise OverlaydError("nft refused the ruleset")
        await super().apply_policy(statements)


async def test_nft_runs_while_the_allow_list_is_planned_and_is_done_before_a_path_opens() -> None:
    dataplane = SlowPolicyDataplane()
    inputs = knowledge(PEER)
    with_policy(
        inputs, endpoint("web", "10.244.1.5", app="web"), policies=(render_policy(DENY_WEB),)
    )
    loop = Reconciler(inputs, dataplane)
    assert (await loop.reconcile_once()).ok
    calls = dataplane.calls
    # Overlap: the VXLAN allow-list is made sure of while nft runs.
    assert calls.index("policy begins") < calls.index("filter") < calls.index("policy")
    # No window: the allow-list's addition and the entries only once it is in force.
    assert calls.index("policy") < calls.index("allow 1") < calls.index("apply 4")
    assert dataplane.policy_statements[-1][:2] == [
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
    ]


async def test_a_refused_policy_transaction_fails_the_pass_before_any_path_opens() -> None:
    dataplane = SlowPolicyDataplane()
    dataplane.refuse = True
    inputs = knowledge(PEER)
    with_policy(
        inputs, endpoint("web", "10.244.1.5", app="web"), policies=(render_policy(DENY_WEB),)
    )
    loop = Reconciler(inputs, dataplane)
    assert not (await loop.reconcile_once()).ok
    assert "policy refused" in dataplane.calls
    assert "allow 1" not in dataplane.calls and "apply 4" not in dataplane.calls
    # Positive control: once nft takes it, the next (full) pass writes the
    # whole table and then the peer.
    dataplane.refuse = False
    dataplane.calls.clear()
    assert (await loop.reconcile_once()).ok
    assert dataplane.calls.index("policy") < dataplane.calls.index("apply 4")
    assert dataplane.policy_statements[-1][:2] == [
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
    ]


async def test_a_pass_failing_while_nft_runs_lets_it_finish_before_the_next_writes() -> None:
    dataplane = SlowPolicyDataplane()
    dataplane.fail_read = True  # a failure while the policy transaction runs
    inputs = knowledge(PEER)
    with_policy(
        inputs, endpoint("web", "10.244.1.5", app="web"), policies=(render_policy(DENY_WEB),)
    )
    loop = Reconciler(inputs, dataplane)
    first = await loop.reconcile_once()
    second = await loop.reconcile_once()
    assert not first.ok and second.ok
    assert dataplane.calls.count("apply 4") == 1  # no path opened by the failed pass
    # Each transaction ended before the next began: never two at once, so
    # an older table never lands after a newer one.
    begins = [i for i, call in enumerate(dataplane.calls) if call == "policy begins"]
    ends = [i for i, call in enumerate(dataplane.calls) if call == "policy"]
    assert len(begins) == len(ends) == 2 and begins[0] < ends[0] < begins[1] < ends[1]


class CountedDataplane(FakeDataplane):
    """The old table's counters as nft lists them, and who asked."""

    def __init__(self, packets: int) -> None:
        super().__init__()
        self.packets = packets
        self.unreadable = False

    async def policy_counters(self) -> str | None:
        self.calls.append("counters")
        if self.unreadable:
            raise OSError("nft: no such file")
        name = counter_name("deny-web", Direction.INGRESS, "deny")
        counter = {"family": "inet", "table": TABLE, "name": name, "packets": self.packets}
        return json.dumps({"nftables": [{"counter": {**counter, "bytes": 60 * self.packets}}]})


async def test_a_table_made_afresh_keeps_the_old_tables_counts_and_a_light_pass_reads_none() -> (
    None
):
    dataplane = CountedDataplane(packets=7)
    inputs = knowledge(PEER)
    web = endpoint("web", "10.244.1.5", app="web")
    with_policy(inputs, web, policies=(render_policy(DENY_WEB),))
    loop = Reconciler(inputs, dataplane)
    assert (await loop.reconcile_once()).ok  # the first pass: a table may be left from before
    deny = counter_name("deny-web", Direction.INGRESS, "deny")
    made = dataplane.policy_statements[-1]
    assert f"add counter inet {TABLE} {deny} {{ packets 7 bytes 420 }}" in made
    assert dataplane.calls.index("counters") < dataplane.calls.index("policy")
    # A light pass changes the table in place: no listing, nothing carried.
    dataplane.calls.clear()
    with_policy(
        inputs, web, endpoint("web2", "10.244.1.6", app="web"), policies=(render_policy(DENY_WEB),)
    )
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert "counters" not in dataplane.calls and "policy" in dataplane.calls
    # A full pass (drift) carries what the table holds now; a listing that
    # cannot be read costs the counts, not the pass.
    dataplane.packets = 9
    assert (await loop.reconcile_once()).ok
    assert (
        f"add counter inet {TABLE} {deny} {{ packets 9 bytes 540 }}"
        in (dataplane.policy_statements[-1])
    )
    dataplane.unreadable = True
    assert (await loop.reconcile_once()).ok
    assert f"add counter inet {TABLE} {deny}" in dataplane.policy_statements[-1]
