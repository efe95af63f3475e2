"""The reconcile loop over the managers, with a fake dataplane that records
every call: the fixed order, what each level of pass looks at, retry after
a failure, and telling our own netlink echoes from drift."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path
from typing import Any

import pytest

from overlayd.config import parse_network_config
from overlayd.daemon.leasing import own_lease
from overlayd.daemon.loop import Knowledge, PassResult, Reconciler, standard_managers
from overlayd.daemon.managers import Level
from overlayd.dataplane.entries import ApplyResult
from overlayd.dataplane.nft import NftError
from overlayd.model import (
    IPV4,
    IPV6,
    Change,
    DeviceSpec,
    EntrySet,
    Family,
    IPAddress,
    IPNetwork,
    Lease,
    LinkFacts,
    Observed,
    Op,
    Route,
    Underlay,
    kind_of,
)
from overlayd.plan.egress import EgressSpec
from overlayd.plan.host import host_plan
from overlayd.plan.leases import lease_key, render_lease, subnet_key
from overlayd.plan.vxlan_filter import ElementChanges, FilterSpec
from overlayd.surfaces.telemetry import Telemetry

PREFIX = "/coreos.com/network"
CONFIG = parse_network_config('{"Network": "10.244.0.0/16"}')
UNDERLAY = Underlay("eth0", 2, 1500, IPv4Address("192.0.2.11"))
OWN = Lease(IPv4Network("10.244.1.0/24"), UNDERLAY.address, 1, "02:00:00:00:00:01")
PEER = Lease(IPv4Network("10.244.2.0/24"), IPv4Address("192.0.2.12"), 1, "02:00:00:00:00:02")
GWBRIDGE = EgressSpec(
    "gwbridge", CONFIG.network, "ovl0", "ovl_gwbridge", IPv4Network("172.18.0.0/16")
)


class FakeDataplane:
    """Holds entries in a dict and records the order of calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.policy_statements: list[list[str]] = []  # one list per policy transaction
        self.service_statements: list[list[str]] = []  # one list per services transaction
        self.kernel: EntrySet = EntrySet()
        self.kernel6: EntrySet = EntrySet()  # the IPv6 entries
        self.filter_batches: list[int] = []  # element writes per allow-list nft run
        self.fail_next_apply = False
        # The allow-list sets by IP version; None: absent.
        self.sets: dict[int, set[IPAddress] | None] = {4: None, 6: None}

    @property
    def allowed(self) -> set[IPAddress] | None:
        return self.sets[4]

    @allowed.setter
    def allowed(self, value: set[IPAddress] | None) -> None:
        self.sets[4] = value

    @staticmethod
    def _v(version: int) -> str:
        return "" if version == 4 else f" v{version}"  # the IPv4 calls keep their names

    async def ensure_devices(self, spec: DeviceSpec) -> list[str]:
        self.calls.append("devices")
        return []

    async def apply_policy(self, statements: Sequence[str]) -> None:
        self.calls.append("policy")
        self.policy_statements.append(list(statements))

    async def policy_listing(self) -> Mapping[str, Any] | None:
        return None

    async def policy_counters(self) -> str | None:
        return None

    async def apply_services(self, statements: Sequence[str]) -> None:
        self.calls.append("services")
        self.service_statements.append(list(statements))

    async def services_listing(self) -> Mapping[str, Any] | None:
        return None

    async def ensure_gwbridge(
        self, name: str, gateway: IPv4Interface, mac: str, *, gateway6: IPv6Interface | None = None
    ) -> list[str]:
        self.calls.append("gwbridge" if gateway6 is None else f"gwbridge {gateway6}")
        return []

    async def connected_networks(self, ifindex: int, family: Family = IPV4) -> list[IPNetwork]:
        if family is IPV6:
            return [IPv6Network("2001:db8::/64")]
        return [IPv4Network("192.0.2.0/24")]

    async def ensure_forwarding(
        self, bridge: str, *, ipv6: bool = False, underlay: str = ""
    ) -> list[str]:
        self.calls.append("sysctl")
        return []

    async def ensure_bridge_netfilter(self, *, ipv6: bool = False) -> list[str]:
        self.calls.append("bridge-nf" + (self._v(6) if ipv6 else ""))
        return []

    async def ensure_egress_table(self, egress: EgressSpec) -> str | None:
        self.calls.append("nft")
        return None

    async def ensure_forward_accept(self, egress: EgressSpec) -> list[str]:
        self.calls.append("iptables")
        return []

    async def ensure_vxlan_filter(self, f: FilterSpec) -> str | None:
        v = f.family.version
        self.calls.append("filter" + self._v(v))
        if self.sets[v] is None:
            self.sets[v] = set()
            return "installed"
        return None

    async def remove_vxlan_filter(self, family: Family) -> str | None:
        self.calls.append("filter-remove" + self._v(family.version))
        removed, self.sets[family.version] = self.sets[family.version], None
        return None if removed is None else "removed"

    async def vxlan_filter_sources(self, f: FilterSpec) -> frozenset[IPAddress] | None:
        held = self.sets[f.family.version]
        self.calls.append("filter-read" + self._v(f.family.version))
        return None if held is None else frozenset(held)

    async def update_vxlan_filters(
        self, writes: Sequence[tuple[FilterSpec, ElementChanges]]
    ) -> None:
        self.filter_batches.append(len(writes))
        for f, changes in writes:
            await self.update_vxlan_filter(f, changes)

    async def update_vxlan_filter(self, f: FilterSpec, changes: ElementChanges) -> None:
        v = f.family.version
        held = self.sets[v]
        assert held is not None
        if changes.add:
            self.calls.append(f"allow {len(changes.add)}{self._v(v)}")
        if changes.delete:
            self.calls.append(f"disallow {len(changes.delete)}{self._v(v)}")
        held |= set(changes.add)
        held -= set(changes.delete)

    async def read_entries(self, spec: DeviceSpec, family: Family = IPV4) -> EntrySet:
        if family is IPV6:
            self.calls.append("read6")
            return self.kernel6
        self.calls.append("read")
        return self.kernel

    async def apply(
        self, changes: Sequence[Change], spec: DeviceSpec, family: Family = IPV4
    ) -> ApplyResult:
        if family is IPV6:
            self.calls.append(f"apply6 {len(changes)}")
            self.kernel6 = _applied(self.kernel6, changes)
            return ApplyResult(len(changes), ())
        self.calls.append(f"apply {len(changes)}")
        if self.fail_next_apply:
            self.fail_next_apply = False
            return ApplyResult(len(changes), ("RTNETLINK answers: No such device",))
        self.kernel = _applied(self.kernel, changes)
        return ApplyResult(len(changes), ())


def _applied(kernel: EntrySet, changes: Sequence[Change]) -> EntrySet:
    held = {(kind_of(e).name, kind_of(e).key(e)): e for e in kernel.all()}
    for change in changes:
        key = (kind_of(change.entry).name, kind_of(change.entry).key(change.entry))
        if change.op is Op.REPLACE:
            held[key] = change.entry
        else:
            held.pop(key, None)
    return EntrySet.of(held.values())


def knowledge(*peers: Lease, egress: EgressSpec = GWBRIDGE) -> Knowledge:
    host = host_plan(CONFIG, OWN, UNDERLAY, bridge="ovl0", egress=egress)
    return Knowledge(
        config=CONFIG,
        own=OWN,
        spec=host.spec,
        egress=host.egress,
        etcd_prefix=PREFIX,
        raw_leases={subnet_key(PREFIX, p.subnet): render_lease(p).encode() for p in (OWN, *peers)},
    )


async def test_a_full_pass_runs_the_managers_in_order_and_programs_the_peer() -> None:
    dataplane = FakeDataplane()
    loop = Reconciler(knowledge(PEER), dataplane)
    result = await loop.reconcile_once()
    assert result.ok and result.changes == 4 and result.peers == 1
    # No IPv6 here: the IPv6 allow-list only makes sure it has nothing in the kernel.
    assert dataplane.calls == [
        # No policy, no service: a full pass makes sure neither table is
        # left; the policy's first, written while the devices, sysctls,
        # egress rules and allow-lists are made sure of.
        "policy",
        "devices", "gwbridge", "sysctl", "bridge-nf", "nft", "iptables",
        "filter", "filter-read", "filter-remove v6", "services",
        # The allow-list's elements are written after both families' admits,
        # and after the policy is in force.
        "allow 1", "read",
        # The IPv6 manager looks for stale IPv6 entries even without IPv6;
        # both families' changes are written once both have planned.
        "read6", "apply 4",
    ]  # fmt: skip
    assert len(dataplane.kernel) == 4
    assert dataplane.allowed == {PEER.public_ip}


async def test_light_and_check_passes_use_belief_and_only_full_passes_read_the_kernel() -> None:
    dataplane = FakeDataplane()
    inputs = knowledge()
    loop = Reconciler(inputs, dataplane)
    assert (await loop.reconcile_once()).ok
    dataplane.calls.clear()
    inputs.raw_leases = knowledge(PEER).raw_leases
    assert (await loop.reconcile_once(level=Level.LIGHT)).changes == 4
    # No devices, no rules, no dump: one set element, then the entries.
    assert dataplane.calls == ["allow 1", "apply 4"]
    dataplane.calls.clear()
    assert (await loop.reconcile_once(level=Level.CHECK)).changes == 0
    assert "read" not in dataplane.calls and "devices" in dataplane.calls
    dataplane.calls.clear()
    # Positive control: a full pass does read, and repairs what went missing.
    dataplane.kernel = EntrySet()
    assert (await loop.reconcile_once(level=Level.FULL)).changes == 4
    assert "read" in dataplane.calls


async def test_a_failed_pass_is_retried_in_full_until_it_succeeds() -> None:
    dataplane = FakeDataplane()
    dataplane.fail_next_apply = True
    loop = Reconciler(knowledge(PEER), dataplane)
    results: list[bool] = []
    done = asyncio.Event()

    def on_pass(result: object) -> None:
        ok = bool(getattr(result, "ok", False))
        results.append(ok)
        if ok:
            done.set()

    loop.on_pass = on_pass
    task = asyncio.create_task(loop.run())
    loop.mark_dirty()
    try:
        async with asyncio.timeout(30):
            await done.wait()
    finally:
        task.cancel()
    assert results[:2] == [False, True]
    assert dataplane.calls.count("read") == 2  # the retry re-read the kernel
    assert len(dataplane.kernel) == 4


async def test_our_own_echo_is_not_drift_but_a_strange_entry_is() -> None:
    dataplane = FakeDataplane()
    loop = Reconciler(knowledge(PEER), dataplane)
    await loop.reconcile_once()
    ours = Route(PEER.subnet, PEER.subnet.network_address)
    loop.note_drift(Observed(True, ours, "route"))
    assert loop.drift_events == 0
    loop.note_drift(Observed(True, Route(PEER.subnet, IPv4Address("192.0.2.99")), "route"))
    loop.note_drift(Observed(False, None, "link ovl0"))
    assert loop.drift_events == 2


async def test_a_link_event_that_shows_a_device_as_made_is_an_echo_and_any_other_is_drift() -> None:
    dataplane = FakeDataplane()
    inputs = knowledge(PEER)
    loop = Reconciler(inputs, dataplane)
    spec = inputs.spec
    vtep_as_made = LinkFacts(spec.vtep, spec.vtep_mac, spec.mtu, spec.bridge, True)
    # Before any pass nothing was made: every event is drift.
    loop.note_drift(Observed(True, None, "link", link=vtep_as_made))
    assert loop.drift_events == 1
    await loop.reconcile_once()
    loop.note_drift(Observed(True, None, "link", link=vtep_as_made))
    assert loop.drift_events == 1
    for changed in (
        replace(vtep_as_made, mtu=1400),
        replace(vtep_as_made, master=None),
        replace(vtep_as_made, up=False),
        replace(vtep_as_made, mac="02:00:00:00:00:99"),
    ):
        loop.note_drift(Observed(True, None, "link", link=changed))
    loop.note_drift(Observed(False, None, f"link {spec.vtep}"))
    assert loop.drift_events == 6


async def test_somebody_elses_entry_in_place_of_ours_is_drift_and_elsewhere_is_not() -> None:
    dataplane = FakeDataplane()
    loop = Reconciler(knowledge(PEER), dataplane)
    await loop.reconcile_once()
    elsewhere = Route(IPv4Network("198.51.100.0/24"), IPv4Address("192.0.2.1"))
    loop.note_drift(Observed(True, elsewhere, "route", foreign=True))
    assert loop.drift_events == 0
    # `ip route replace` of our peer route with another protocol.
    in_our_place = Route(PEER.subnet, IPv4Address("192.0.2.1"))
    loop.note_drift(Observed(True, in_our_place, "route", foreign=True))
    assert loop.drift_events == 1


async def test_a_device_made_again_on_a_check_makes_the_pass_read_the_entries_back() -> None:
    dataplane = FakeDataplane()
    loop = Reconciler(knowledge(PEER), dataplane)
    await loop.reconcile_once()
    dataplane.calls.clear()
    assert (await loop.reconcile_once(level=Level.CHECK)).level is Level.CHECK
    assert "read" not in dataplane.calls
    # The VTEP was deleted by hand: its entries went with it.
    dataplane.kernel = EntrySet()
    remade = ["created ovl.1"]

    async def devices_remade(spec: DeviceSpec) -> list[str]:
        return remade

    dataplane.ensure_devices = devices_remade  # type: ignore[method-assign]
    result = await loop.reconcile_once(level=Level.CHECK)
    assert result.level is Level.FULL and result.changes == 4
    assert len(dataplane.kernel) == 4


FAR = Lease(IPv4Network("10.244.3.0/24"), IPv4Address("203.0.113.5"), 1, "02:00:00:00:00:03")


async def test_a_peer_is_allowed_before_its_entries_and_disallowed_after_them() -> None:
    dataplane = FakeDataplane()
    inputs = knowledge()
    loop = Reconciler(inputs, dataplane)
    assert (await loop.reconcile_once()).ok
    dataplane.calls.clear()
    inputs.raw_leases = knowledge(PEER).raw_leases
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert dataplane.calls == ["allow 1", "apply 4"]
    dataplane.calls.clear()
    inputs.raw_leases = knowledge().raw_leases
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert dataplane.calls == ["apply 4", "disallow 1"]
    assert dataplane.allowed == set() and len(dataplane.kernel) == 0
    assert loop.telemetry.vxlan_allowed == 0


async def test_with_direct_routing_only_the_tunnelled_peers_are_allowed() -> None:
    config = parse_network_config(
        '{"Network": "10.244.0.0/16", "Backend": {"DirectRouting": true}}'
    )
    host = host_plan(config, OWN, UNDERLAY, bridge="ovl0", egress=GWBRIDGE)
    inputs = Knowledge(config, OWN, host.spec, host.egress, PREFIX, knowledge(PEER, FAR).raw_leases)
    dataplane = FakeDataplane()  # its underlay is 192.0.2.0/24: PEER is on the link
    assert (await Reconciler(inputs, dataplane).reconcile_once()).ok
    assert dataplane.allowed == {FAR.public_ip}


async def test_host_gw_or_the_setting_off_installs_no_filter_and_removes_an_old_one() -> None:
    config = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')
    own = replace(OWN, backend_type="host-gw")
    host = host_plan(config, own, UNDERLAY, bridge="ovl0", egress=GWBRIDGE)
    host_gw = Knowledge(config, own, host.spec, host.egress, PREFIX, {})
    for inputs, enabled in ((host_gw, True), (knowledge(PEER), False)):
        dataplane = FakeDataplane()
        dataplane.allowed = {IPv4Address("192.0.2.99")}  # left by an earlier run
        telemetry = Telemetry()
        managers = standard_managers(dataplane, telemetry, vxlan_filter=enabled)
        loop = Reconciler(inputs, dataplane, telemetry, managers=managers)
        assert (await loop.reconcile_once()).ok
        assert dataplane.allowed is None
        assert "filter" not in dataplane.calls and "filter-remove" in dataplane.calls
        assert telemetry.vxlan_allowed is None and telemetry.vxlan_filter_problem is None


async def test_rules_that_cannot_be_installed_are_reported_and_the_overlay_still_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dataplane = FakeDataplane()
    refusal = "nft refused the ruleset: Error: Could not process rule: No such file or directory"

    async def refuse(f: FilterSpec) -> str | None:
        raise NftError(refusal)

    dataplane.ensure_vxlan_filter = refuse  # type: ignore[method-assign]
    telemetry = Telemetry()
    telemetry.lease_acquired(OWN, "/k", 60)
    telemetry.subnet_file_written = True
    loop = Reconciler(knowledge(PEER), dataplane, telemetry)
    with caplog.at_level(logging.ERROR):
        for level in (Level.FULL, Level.CHECK):
            result = await loop.reconcile_once(level=level)
            assert result.ok and len(dataplane.kernel) == 4  # the entries are there
    assert telemetry.ready() == (False, f"VXLAN filter not installed: {refusal}")
    assert sum("event=vxlan_filter_failed" in r.message for r in caplog.records) == 1
    # Control: once nft accepts the rules, the host is ready and filtered.
    del dataplane.ensure_vxlan_filter
    assert (await loop.reconcile_once(level=Level.CHECK)).ok
    assert telemetry.ready() == (True, "ok")
    assert dataplane.allowed == {PEER.public_ip}


async def test_while_the_rules_cannot_be_rewritten_the_old_set_still_admits_new_peers() -> None:
    """Rules written earlier stay in the kernel when a rewrite is refused:
    they drop VXLAN from anyone outside the set, so the set must go on
    following the peers, or a new peer would be cut off."""
    dataplane = FakeDataplane()
    telemetry = Telemetry()
    telemetry.lease_acquired(OWN, "/k", 60)
    telemetry.subnet_file_written = True
    inputs = knowledge(PEER)
    loop = Reconciler(inputs, dataplane, telemetry)
    assert (await loop.reconcile_once()).ok
    assert dataplane.allowed == {PEER.public_ip}  # installed, with the first peer

    async def refuse(f: FilterSpec) -> str | None:
        raise NftError("nft refused the ruleset: Error: Could not process rule")

    dataplane.ensure_vxlan_filter = refuse  # type: ignore[method-assign]
    newcomer = Lease(
        IPv4Network("10.244.3.0/24"), IPv4Address("192.0.2.13"), 1, "02:00:00:00:00:03"
    )
    inputs.raw_leases = knowledge(newcomer).raw_leases  # PEER leaves, newcomer joins
    assert (await loop.reconcile_once(level=Level.CHECK)).ok
    assert dataplane.allowed == {newcomer.public_ip}
    ready, why = telemetry.ready()
    assert not ready and "nft refused the ruleset" in why  # and it says what is wrong


async def test_a_failed_element_write_fails_the_pass_before_any_entry_is_written() -> None:
    dataplane = FakeDataplane()

    async def refuse(f: FilterSpec, changes: ElementChanges) -> None:
        raise NftError("nft refused the ruleset: Error: No such file or directory")

    dataplane.update_vxlan_filter = refuse  # type: ignore[method-assign]
    result = await Reconciler(knowledge(PEER), dataplane).reconcile_once()
    assert not result.ok
    assert not any(call.startswith("apply") for call in dataplane.calls)
    assert len(dataplane.kernel) == 0


async def test_a_check_puts_back_an_element_deleted_by_hand_and_removes_a_stranger() -> None:
    dataplane = FakeDataplane()
    telemetry = Telemetry()
    loop = Reconciler(knowledge(PEER), dataplane, telemetry)
    assert (await loop.reconcile_once()).ok
    assert dataplane.allowed is not None
    dataplane.allowed.discard(PEER.public_ip)
    dataplane.allowed.add(IPv4Address("192.0.2.99"))
    dataplane.calls.clear()
    # A light pass believes; nftables sends no event.
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert dataplane.calls == []
    assert (await loop.reconcile_once(level=Level.CHECK)).ok
    assert dataplane.allowed == {PEER.public_ip}
    assert "allow 1" in dataplane.calls and "disallow 1" in dataplane.calls
    assert telemetry.drift_repairs["nftables"] == 1


async def test_the_docker_plugin_sees_the_programmed_subnet_not_the_planned_one() -> None:
    from overlayd.daemon.agent import Agent

    dataplane = FakeDataplane()
    inputs = knowledge(PEER)
    loop = Reconciler(inputs, dataplane)
    assert loop.programmed is None
    assert (await loop.reconcile_once()).ok
    view = Agent._plugin_view(inputs, loop)
    assert view.subnet == OWN.subnet and view.settled  # positive control
    # A new lease is planned; its pass fails: the bridge still has the old subnet.
    inputs.own = replace(OWN, subnet=IPv4Network("10.244.7.0/24"))
    dataplane.kernel = EntrySet()  # so that the pass has entries to apply
    dataplane.fail_next_apply = True
    assert not (await loop.reconcile_once()).ok
    view = Agent._plugin_view(inputs, loop)
    assert view.subnet == OWN.subnet and not view.settled
    # Programmed now: the plugin moves on.
    assert (await loop.reconcile_once()).ok
    view = Agent._plugin_view(inputs, loop)
    assert view.subnet == IPv4Network("10.244.7.0/24") and view.settled


async def test_the_subnet_file_names_a_new_lease_only_after_the_pass_that_programmed_it(
    tmp_path: Path,
) -> None:
    from overlayd.surfaces.subnetfile import SubnetFileWriter, read_subnet

    dataplane = FakeDataplane()
    inputs = knowledge(PEER)
    loop = Reconciler(inputs, dataplane)
    path = tmp_path / "subnet.env"
    writer = SubnetFileWriter(path)

    def after_pass(outcome: PassResult) -> None:  # as the agent wires it
        if outcome.ok and loop.programmed is not None:
            writer.programmed(loop.programmed)

    loop.on_pass = after_pass
    assert (await loop.reconcile_once()).ok
    assert read_subnet(path) == OWN.subnet  # positive control
    # A new lease is planned; its pass fails: the file keeps the old subnet.
    moved = IPv4Network("10.244.7.0/24")
    inputs.own = replace(OWN, subnet=moved)
    dataplane.kernel = EntrySet()
    dataplane.fail_next_apply = True
    assert not (await loop.reconcile_once()).ok
    assert read_subnet(path) == OWN.subnet
    # Programmed now: the file moves on, written once.
    assert (await loop.reconcile_once()).ok
    assert read_subnet(path) == moved
    stamp = path.stat().st_mtime_ns
    assert not writer.programmed(loop.programmed or inputs)  # unchanged: not rewritten
    assert path.stat().st_mtime_ns == stamp


def test_a_failed_subnet_file_write_is_done_whole_by_the_next_pass(tmp_path: Path) -> None:
    from overlayd.surfaces.subnetfile import SubnetFileWriter, read_subnet

    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")  # a file where the directory should be
    writer = SubnetFileWriter(blocked / "subnet.env")
    facts = knowledge(PEER)
    with pytest.raises(OSError):
        writer.programmed(facts)
    blocked.unlink()
    assert writer.programmed(facts)
    assert read_subnet(blocked / "subnet.env") == OWN.subnet


# --- dual-stack: the IPv6 allow-list and the gwbridge's IPv6 side -------------

CONFIG6 = parse_network_config(
    '{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/48"}'
)
UNDERLAY6 = replace(UNDERLAY, address6=IPv6Address("2001:db8::11"))
GW6 = IPv6Network("fd4a:4eae:8d08::/64")


def dual_lease(n: int, *, v6: bool = True) -> Lease:
    return own_lease(
        CONFIG6,
        IPv4Network(f"10.244.{n}.0/24"),
        IPv4Address(f"192.0.2.{10 + n}"),
        IPv6Network(f"fd00:10:244:{n}::/64") if v6 else None,
        IPv6Address(f"2001:db8::{10 + n}") if v6 else None,
    )


OWN6, PEER6, OLD = dual_lease(1), dual_lease(2), dual_lease(4, v6=False)


def dual_stack(*peers: Lease) -> Knowledge:
    """A dual-stack host in gwbridge mode, planned as the agent plans it."""
    egress = replace(GWBRIDGE, gwbridge_subnet6=GW6)
    host = host_plan(CONFIG6, OWN6, UNDERLAY6, bridge="ovl0", egress=egress)
    assert host.spec.vtep6 and host.egress.cluster6 is not None
    return Knowledge(
        CONFIG6,
        OWN6,
        host.spec,
        host.egress,
        PREFIX,
        {lease_key(PREFIX, lease): render_lease(lease).encode() for lease in (OWN6, *peers)},
    )


async def test_each_family_allows_its_own_peer_addresses_around_the_entries() -> None:
    dataplane = FakeDataplane()
    telemetry = Telemetry()
    inputs = dual_stack(PEER6, OLD)  # OLD has no IPv6: it is allowed over IPv4 only
    loop = Reconciler(inputs, dataplane, telemetry)
    assert (await loop.reconcile_once()).ok
    assert dataplane.sets == {
        4: {PEER6.public_ip, OLD.public_ip},
        6: {IPv6Address("2001:db8::12")},
    }
    assert telemetry.vxlan_allowed == 3
    calls = dataplane.calls
    assert calls[:5] == [
        "policy",
        "devices",
        "gwbridge fd4a:4eae:8d08::1/64",
        "sysctl",
        "bridge-nf v6",
    ]
    assert calls.index("allow 1 v6") < calls.index("read") < calls.index("apply 8")
    assert calls.index("allow 1 v6") < calls.index("apply6 4")
    # The peer leaves: both of its addresses go, after its entries.
    dataplane.calls.clear()
    inputs.raw_leases = dual_stack(OLD).raw_leases
    assert (await loop.reconcile_once(level=Level.LIGHT)).ok
    assert dataplane.calls == ["apply 4", "apply6 4", "disallow 1", "disallow 1 v6"]
    assert dataplane.sets == {4: {OLD.public_ip}, 6: set()}
    assert telemetry.vxlan_allowed == 1


async def test_an_ipv6_filter_that_fails_is_named_and_the_ipv4_one_still_works() -> None:
    dataplane = FakeDataplane()
    telemetry = Telemetry()
    telemetry.lease_acquired(OWN, "/k", 60)
    telemetry.subnet_file_written = True
    install = dataplane.ensure_vxlan_filter

    async def refuse_v6(f: FilterSpec) -> str | None:
        if f.family.version == 6:
            raise NftError("nft refused the ruleset: no ip6 support")
        return await install(f)

    dataplane.ensure_vxlan_filter = refuse_v6  # type: ignore[method-assign]
    loop = Reconciler(dual_stack(PEER6), dataplane, telemetry)
    assert (await loop.reconcile_once()).ok
    assert telemetry.ready() == (
        False,
        "VXLAN filter not installed: IPv6: nft refused the ruleset: no ip6 support",
    )
    assert dataplane.sets == {4: {PEER6.public_ip}, 6: None}
    # Control: once nft accepts it, both families are filtered and the host is ready.
    dataplane.ensure_vxlan_filter = install  # type: ignore[method-assign]
    assert (await loop.reconcile_once(level=Level.CHECK)).ok
    assert telemetry.ready() == (True, "ok")
    assert dataplane.sets[6] == {IPv6Address("2001:db8::12")}


async def test_the_docker_plugin_sees_the_programmed_ipv6_subnet_too() -> None:
    from overlayd.daemon.agent import Agent

    inputs = dual_stack(PEER6)
    loop = Reconciler(inputs, FakeDataplane())
    assert (await loop.reconcile_once()).ok
    view = Agent._plugin_view(inputs, loop)
    assert (view.subnet6, view.cluster6) == (OWN6.ipv6_subnet, IPv6Network("fd00:10:244::/48"))
    assert view.settled  # positive control
    # Only the IPv6 half of the lease moves: unsettled until a pass programs it.
    inputs.own = replace(OWN6, ipv6_subnet=IPv6Network("fd00:10:244:7::/64"))
    view = Agent._plugin_view(inputs, loop)
    assert view.subnet6 == OWN6.ipv6_subnet and not view.settled
    assert (await loop.reconcile_once()).ok
    view = Agent._plugin_view(inputs, loop)
    assert view.subnet6 == IPv6Network("fd00:10:244:7::/64") and view.settled
    # An IPv4-only host: no IPv6 in the view.
    inputs = knowledge(PEER)
    loop = Reconciler(inputs, FakeDataplane())
    assert (await loop.reconcile_once()).ok
    view = Agent._plugin_view(inputs, loop)
    assert (view.subnet6, view.cluster6) == (None, None)


async def test_a_lease_value_nested_too_deeply_is_skipped_and_the_pass_goes_on() -> None:
    """A few KB of brackets under the subnets prefix made json.loads raise
    RecursionError in every pass of every daemon: nothing was programmed
    any more (peers, policy, and so every container registration) until
    someone deleted the key."""
    dataplane = FakeDataplane()
    inputs = knowledge(PEER)
    deep = {subnet_key(PREFIX, IPv4Network("10.244.9.0/24")): b"[" * 3000}
    inputs.raw_leases = {**inputs.raw_leases, **deep}
    result = await Reconciler(inputs, dataplane).reconcile_once()
    assert result.ok and result.peers == 1, result.error
    assert dataplane.allowed == {PEER.public_ip}  # the good peer is programmed
