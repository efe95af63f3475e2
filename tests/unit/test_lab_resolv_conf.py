"""The lab writes a by-hand container's resolv.conf from its CNI result's
dns, as a runtime that honours it does."""

from __future__ import annotations

import pytest

from overlayd.lab.containers import resolv_conf
from overlayd.lab.netns import LabCommandError, netns_etc


def test_a_cni_results_dns_becomes_resolv_conf_lines() -> None:
    dns = {
        "nameservers": ["10.244.7.1", "fd00:10:244:7::1"],
        "search": ["overlay.internal"],
        "options": ["ndots:2"],
    }
    assert resolv_conf(dns) == (
        "nameserver 10.244.7.1\nnameserver fd00:10:244:7::1\n"
        "search overlay.internal\noptions ndots:2\n"
    )
    assert resolv_conf({"nameservers": ["10.244.7.1"], "domain": "lab.example"}) == (
        "nameserver 10.244.7.1\ndomain lab.example\n"
    )


def test_no_nameserver_means_no_resolv_conf_of_its_own() -> None:
    nothing: list[object] = [
        None,
        {},
        [],
        {"search": ["overlay.internal"]},
        {"nameservers": "10.244.7.1"},
    ]
    for dns in nothing:
        assert resolv_conf(dns) is None
    assert resolv_conf({"nameservers": ["10.244.7.1"]}) == "nameserver 10.244.7.1\n"  # control


def test_only_a_namespace_name_has_an_etc_directory() -> None:
    assert str(netns_etc("ovt1c2")) == "/etc/netns/ovt1c2"
    for bad in ("", "..", "a/b", "/run/netns/x"):
        with pytest.raises(LabCommandError):
            netns_etc(bad)
