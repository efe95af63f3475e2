"""Hairpin mode on the container's bridge port, set by the real attach code
paths: the Docker plugin's veth pairs (dataplane/veth.VethPairs) and
overlay-cni (through the bridge plugin's hairpinMode, checked in
test_cni_dual_stack.py). Services need it: a container reaching its own
service through a VIP is DNATed to itself inside the bridge when bridge
netfilter is on, and the bridge sends the frame back out its own port
only in hairpin mode (test_service_kernel.py shows the connection time
out without it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from overlayd.lab import netns as lab_netns
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.root]

# VethPairs in the namespace it is run in, as the daemon runs it in its own.
ADD_PAIR = """
import asyncio, sys
from overlayd.dataplane.veth import VethPairs
asyncio.run(VethPairs().add_pair(sys.argv[1], sys.argv[2], bridge="ovl0", mtu=1450, mac=None))
"""


def hairpin(ns: str, dev: str) -> bool:
    """The bridge port's hairpin flag, as `ip -d -j link show` reads it back."""
    (link,) = json.loads(lab_netns.ip(ns, "-d", "-j", "link", "show", "dev", dev))
    port = link["linkinfo"]["info_slave_data"]
    assert link["linkinfo"]["info_slave_kind"] == "bridge", link
    return bool(port["hairpin"])


def test_the_docker_plugins_veth_is_a_hairpin_port_of_the_overlay_bridge(netns: str) -> None:
    lab_netns.ip(netns, "link", "add", "ovl0", "type", "bridge")
    lab_netns.ip(netns, "link", "set", "ovl0", "up")
    subprocess.run(
        lab_netns.enter_argv(netns, sys.executable, "-c", ADD_PAIR, "ovdtest1", "ovctest1"),
        check=True,
    )
    assert hairpin(netns, "ovdtest1")
    shown = json.loads(lab_netns.ip(netns, "-j", "link", "show", "dev", "ovdtest1"))[0]
    assert shown["master"] == "ovl0" and "UP" in shown["flags"] and shown["mtu"] == 1450
    # Control: a port put on the bridge without it reads as off.
    lab_netns.ip(netns, "link", "add", "plain", "type", "veth", "peer", "name", "plainp")
    lab_netns.ip(netns, "link", "set", "plain", "master", "ovl0")
    assert not hairpin(netns, "plain")
