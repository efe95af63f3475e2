"""The egress rules: overlayd's own nftables table, replaced whole in one
transaction, and its chain in iptables' FORWARD where one exists (see
dataplane/iptables.py for why). The nft adapter keeps what it last wrote,
so a check that finds the table as written changes nothing."""

from __future__ import annotations

from overlayd.daemon.managers import CheckedEachPeriod, PassContext


class EgressManager(CheckedEachPeriod):
    name = "egress"

    async def check(self, context: PassContext) -> None:
        egress = context.inputs.egress
        done = await self._dataplane.ensure_egress_table(egress)
        if done is not None:
            context.remade.append(("nftables", f"{done} (egress {egress.mode})"))
        context.remade_all("iptables", await self._dataplane.ensure_forward_accept(egress))
