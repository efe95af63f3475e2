"""Data-plane I/O: devices through netlink (pyroute2), per-peer entries
through iproute2's batch mode, the nftables table, the iptables FORWARD
exception, and the few sysctls overlayd needs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from overlayd.dataplane import entries
from overlayd.dataplane.entries import ApplyResult
from overlayd.dataplane.iptables import ForwardAccept
from overlayd.dataplane.netlink import DriftMonitor, Netlink
from overlayd.dataplane.nft import NftTable
from overlayd.model import Change, DeviceSpec


@dataclass
class Dataplane:
    """The adapters for one network namespace (None: the current one)."""

    netlink: Netlink
    nft: NftTable
    forward: ForwardAccept
    monitor: DriftMonitor
    netns: str | None = None
    # Up to this many changes go through netlink; more through iproute2.
    netlink_max_changes: int = 64

    @classmethod
    def open(cls, netns: str | None = None) -> Dataplane:
        return cls(
            Netlink(netns), NftTable(netns), ForwardAccept(netns), DriftMonitor(netns), netns
        )

    async def close(self) -> None:
        await self.netlink.close()

    async def apply(self, changes: Sequence[Change], spec: DeviceSpec) -> ApplyResult:
        """A handful of changes (one peer joining) through netlink, in
        milliseconds; many (a cold start) through one iproute2 batch per
        tool, which encodes thousands of messages far faster than pyroute2."""
        if len(changes) <= self.netlink_max_changes:
            failed = await self.netlink.apply_entries(changes, spec)
            return ApplyResult(applied=len(changes), failed=tuple(failed))
        return await entries.apply_changes(changes, spec, netns=self.netns)
