"""The kernel settings overlayd needs: IPv4 forwarding, ICMP redirects off on
the bridge, and in gwbridge mode bridge netfilter for each family the
cluster has (so the isolation rule sees bridged frames). A sysctl changes
without any event, so each check looks at it."""

from __future__ import annotations

from overlayd.daemon.managers import CheckedEachPeriod, PassContext


class SysctlManager(CheckedEachPeriod):
    name = "sysctls"

    async def check(self, context: PassContext) -> None:
        inputs = context.inputs
        context.remade_all("sysctl", await self._dataplane.ensure_forwarding(inputs.spec.bridge))
        if inputs.egress.mode == "gwbridge":
            families = inputs.egress.families
            context.remade_all("sysctl", await self._dataplane.ensure_bridge_netfilter(families))
