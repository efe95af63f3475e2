"""Dataplane managers, one per kind of kernel object, in the shape of Calico
Felix's (`vxlan_mgr`, `route_mgr`): each owns exactly its objects, computes
what they must be from the pass's inputs with a pure function (plan/),
reads or believes what they are, and applies the difference.

The loop runs them in a fixed order (`daemon.loop.standard_managers`): the
network policy first (it names no device, and its transaction runs while
the others work), devices before the sysctls that name them, both before
the rules that use them, and all of those before the per-peer entries that
hang off the devices. What must be
in place before a peer's entries and gone only after them (the VXLAN
allow-list) is two managers sharing one state, one on each side of the
entries. A new capability (IPv6 entries, policy sets, service maps) is a
new manager here, not a branch in the loop.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from overlayd.dataplane import DataplanePort
from overlayd.model import Change, DeviceSpec, Lease, NetworkConfig, Observed
from overlayd.plan.cluster import ClusterPlan
from overlayd.plan.egress import EgressSpec
from overlayd.plan.host import HostFacts
from overlayd.plan.selection import Selected
from overlayd.plan.vxlan_filter import ElementChanges, FilterSpec

if TYPE_CHECKING:
    from overlayd.daemon.managers.peers import QueuedEntries


class Level(enum.IntEnum):
    """How much a pass checks, cheapest first.

    LIGHT  after an etcd event: entries diffed against what we believe the
           kernel holds; nothing else is looked at.
    CHECK  every resync period: devices, sysctls and rules are compared with
           the kernel too (some of them send no netlink event when changed);
           entries are still diffed against belief, which netlink events keep
           honest.
    FULL   at start, after a failure, after an event nobody can attribute, or
           every full-resync period: everything is read back from the kernel.
    """

    LIGHT = 0
    CHECK = 1
    FULL = 2


class PassInputs(HostFacts, Protocol):
    """What a pass reads, once, at its start: the host's facts, and where
    and what the leases are."""

    @property
    def etcd_prefix(self) -> str: ...

    # The raw lease keys and values (the mirror's live collection).
    raw_leases: Mapping[str, bytes]

    # overlayd's own prefix and its endpoints, policies and services (live
    # collections).
    @property
    def own_prefix(self) -> str: ...

    raw_endpoints: Mapping[str, bytes]
    raw_policies: Mapping[str, bytes]
    raw_services: Mapping[str, bytes]

    @property
    def revision(self) -> int:
        """The etcd revision of the newest policy or endpoint change the
        inputs reflect (what a host's status key says it enforces)."""
        ...


@dataclass(frozen=True, slots=True)
class Inputs:
    """A snapshot of `PassInputs`, so that every manager in one pass sees the
    same host even if the config or the lease changes meanwhile. The leases
    are the mirror's live collection, read without awaiting in between."""

    config: NetworkConfig
    own: Lease
    spec: DeviceSpec
    egress: EgressSpec
    etcd_prefix: str
    raw_leases: Mapping[str, bytes]
    own_prefix: str
    raw_endpoints: Mapping[str, bytes]
    raw_policies: Mapping[str, bytes]
    raw_services: Mapping[str, bytes]
    revision: int

    @classmethod
    def of(cls, source: PassInputs) -> Inputs:
        return cls(
            source.config,
            source.own,
            source.spec,
            source.egress,
            source.etcd_prefix,
            source.raw_leases,
            source.own_prefix,
            source.raw_endpoints,
            source.raw_policies,
            source.raw_services,
            source.revision,
        )


@dataclass
class PassContext:
    """One pass: its inputs and level, and what the managers report back."""

    inputs: Inputs
    level: Level
    # Changes of kernel entries (for logs and metrics).
    changes: list[Change] = field(default_factory=list)
    # (kind, what): devices, sysctls and rules a manager had to (re)make.
    remade: list[tuple[str, str]] = field(default_factory=list)
    peers: int = 0
    peers6: int = 0
    # The leases selected and each family's plan (by version), made once per
    # pass by the first manager that needs them (managers.peers.PeerProjection),
    # so that all of them see the same peers.
    selected: Selected | None = None
    # VXLAN allow-list element changes queued for one nft run (FilterWrites).
    filter_writes: list[tuple[FilterSpec, ElementChanges]] = field(default_factory=list)
    planned: dict[int, ClusterPlan] = field(default_factory=dict)
    # Each family's entry changes, queued for one write of both (EntryWrites).
    entry_writes: list[QueuedEntries] = field(default_factory=list)

    def remade_all(self, kind: str, what: list[str]) -> None:
        self.remade += [(kind, item) for item in what]


class Manager(Protocol):
    """One kind of kernel object."""

    name: str

    async def sync(self, context: PassContext) -> None:
        """Make the kernel's objects of this kind match the inputs, as far as
        the pass's level asks; raise on any failure (the loop retries)."""
        ...

    def expects(self, observed: Observed) -> bool:
        """Whether a netlink event only confirms what this manager wrote."""
        ...

    def forget(self) -> None:
        """Believe nothing about the kernel: the next pass reads it back."""
        ...


class CheckedEachPeriod:
    """Base of the managers whose objects are few and cheap to compare with
    the kernel (devices, sysctls, rules): they keep no belief and look again
    on every check and full pass, and skip light passes."""

    name = ""

    def __init__(self, dataplane: DataplanePort) -> None:
        self._dataplane = dataplane

    async def sync(self, context: PassContext) -> None:
        if context.level >= Level.CHECK:
            await self.check(context)

    async def check(self, context: PassContext) -> None:
        raise NotImplementedError

    def expects(self, observed: Observed) -> bool:
        # An event about these objects is never just an echo: somebody else
        # changed them, or we did in a pass that looks again anyway.
        return False

    def forget(self) -> None:
        pass  # nothing believed
