"""The kernel settings overlayd needs: IPv4 forwarding, ICMP redirects off on
the bridge, and in gwbridge mode bridge netfilter (so the isolation rule
sees bridged frames). Dual-stack adds IPv6 forwarding (and bridge netfilter
for IPv6); the signal is the device spec's IPv6 gateway, which the plan sets
exactly when this host holds an IPv6 subnet. Turning IPv6 off later leaves
forwarding on, as for IPv4: other software on the host may rely on it. A
sysctl changes without any event, so each check looks at it."""

from __future__ import annotations

from overlayd.daemon.managers import CheckedEachPeriod, PassContext


class SysctlManager(CheckedEachPeriod):
    name = "sysctls"

    async def check(self, context: PassContext) -> None:
        inputs = context.inputs
        spec = inputs.spec
        ipv6 = spec.gateway6 is not None
        context.remade_all(
            "sysctl",
            await self._dataplane.ensure_forwarding(spec.bridge, ipv6=ipv6, underlay=spec.underlay),
        )
        if inputs.egress.mode == "gwbridge":
            context.remade_all("sysctl", await self._dataplane.ensure_bridge_netfilter(ipv6=ipv6))
