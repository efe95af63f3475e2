"""A lab container's own resolv.conf: commands run in the namespace with
`ip netns exec` see it as /etc/resolv.conf, and it goes with the namespace."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlayd.lab import netns as lab_netns
from tests.conftest import needs_root, unique_name

pytestmark = [needs_root, pytest.mark.root]


def test_ip_netns_exec_shows_the_namespaces_resolv_conf_and_delete_removes_it() -> None:
    ns = unique_name("r")
    lab_netns.add_namespace(ns)
    try:
        text = "nameserver 10.244.7.1\nsearch overlay.internal\noptions ndots:2\n"
        lab_netns.write_resolv_conf(ns, text)
        assert lab_netns.in_ns(ns, "cat", "/etc/resolv.conf") == text
        # Control: the machine's own resolv.conf, outside the namespace, is untouched.
        assert Path("/etc/resolv.conf").read_text() != text
    finally:
        lab_netns.delete_namespace(ns)
    assert not lab_netns.netns_etc(ns).exists()
