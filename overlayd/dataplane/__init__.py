"""Data-plane I/O: devices through netlink (pyroute2), per-peer entries
through iproute2's batch mode, the nftables table, the iptables FORWARD
exception, and the few sysctls overlayd needs."""

from __future__ import annotations

from dataclasses import dataclass

from overlayd.dataplane.iptables import ForwardAccept
from overlayd.dataplane.netlink import DriftMonitor, Netlink
from overlayd.dataplane.nft import NftTable


@dataclass
class Dataplane:
    """The adapters for one network namespace (None: the current one)."""

    netlink: Netlink
    nft: NftTable
    forward: ForwardAccept
    monitor: DriftMonitor
    netns: str | None = None

    @classmethod
    def open(cls, netns: str | None = None) -> Dataplane:
        return cls(
            Netlink(netns), NftTable(netns), ForwardAccept(netns), DriftMonitor(netns), netns
        )

    async def close(self) -> None:
        await self.netlink.close()
