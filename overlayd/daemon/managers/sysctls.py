"""The kernel settings overlayd needs: IPv4 forwarding, ICMP redirects off on
the bridge, and in gwbridge mode bridge netfilter (so the isolation rule
sees bridged frames). A sysctl changes without any event, so each check
looks at it."""

from __future__ import annotations

from overlayd.daemon.managers import Level, PassContext
from overlayd.dataplane import DataplanePort
from overlayd.model import Observed


class SysctlManager:
    name = "sysctls"

    def __init__(self, dataplane: DataplanePort) -> None:
        self._dataplane = dataplane

    async def sync(self, context: PassContext) -> None:
        if context.level < Level.CHECK:
            return
        inputs = context.inputs
        context.remade_all("sysctl", await self._dataplane.ensure_forwarding(inputs.spec.bridge))
        if inputs.egress.mode == "gwbridge":
            context.remade_all("sysctl", await self._dataplane.ensure_bridge_netfilter())

    def expects(self, observed: Observed) -> bool:
        return False

    def forget(self) -> None:
        pass
