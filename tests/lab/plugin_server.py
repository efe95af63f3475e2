"""overlayd's Docker plugin server alone, for a host whose overlay a test
made by hand: the real server (surfaces/docker_plugin.py) with the real
host-local, portmap and veths, and a fixed HostView instead of the agent's
(which needs a running daemon). Run inside the host's network namespace:

    python -m tests.lab.plugin_server SOCKET CNI_DATA_DIR EGRESS \
        SUBNET CLUSTER [SUBNET6 CLUSTER6]
"""

from __future__ import annotations

import asyncio
import logging
import sys
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from overlayd.dataplane.veth import VethPairs
from overlayd.nsexec import CniRunner
from overlayd.plan.docker_plugin import HostView
from overlayd.surfaces.docker_plugin import DockerPlugin, PluginSettings


def main(argv: list[str]) -> None:
    socket, data_dir, egress, subnet, cluster, *v6 = argv
    view = HostView(
        subnet=IPv4Network(subnet),
        cluster=IPv4Network(cluster),
        bridge="ovl0",
        mtu=1450,
        egress=egress,
        subnet6=IPv6Network(v6[0]) if v6 else None,
        cluster6=IPv6Network(v6[1]) if v6 else None,
    )
    plugin = DockerPlugin(
        PluginSettings(socket=Path(socket), cni_data_dir=Path(data_dir)),
        view=lambda: view,
        cni=CniRunner(),
        veths=VethPairs(),
    )
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(plugin.serve())


if __name__ == "__main__":
    main(sys.argv[1:])
