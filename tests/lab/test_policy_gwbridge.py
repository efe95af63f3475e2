"""Network policy in gwbridge egress mode (overlayd's default), in a lab of
two hosts with Podman containers registered by overlay-cni.

In this mode a container's traffic to the outside world leaves by its
second interface, eth1 on the gwbridge, from eth1's address, and is
masqueraded only after the forward hook; overlay-cni registers eth1's
addresses with the endpoint so that egress policy judges that way out
too, for IPv4 and IPv6. And overlay-cni registers eth0's MAC, by which
IPv6 link-local traffic between containers of one host is judged.

The same containers and servers as tests/lab/test_policy.py (its helpers
are used here), in a lab of its own:

    h1: web1 app=web   db1 app=db   free1 (no labels)
    h2: web2 app=web   db2 app=db   job2 (no labels)
    outside: 203.0.113.10, 2001:db8:ffff::10 (the ipBlock's), and the same
             server as 192.0.2.1, 2001:db8::1 (outside it)
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from ipaddress import ip_address
from typing import Any

import pytest

from overlayd.lab import echo, netns
from overlayd.lab.lab import Lab, LabSettings
from overlayd.lab.topology import OUTSIDE_SERVER, OUTSIDE_SERVER6
from tests.conftest import SESSION_TAG, needs_root
from tests.lab.fakes import lab_network
from tests.lab.policy_site import WAIT, WAIT_TIMEOUT, Site, both, expect, k8s, policy_sets
from tests.lab.test_policy import fill_site

pytestmark = [needs_root, pytest.mark.lab]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    lab = Lab(f"{SESSION_TAG}q")
    built: Site | None = None
    try:
        lab.up(
            2,
            config=lab_network(),
            settings=LabSettings(egress="gwbridge", containers_per_host=0),
        )
        built = Site(lab, dir=tmp_path_factory.mktemp("gwbridge-policies"))
        fill_site(built)
        yield built
    finally:
        if built is not None:
            built.close()
        lab.down()


@pytest.fixture
def clean(site: Site) -> Iterator[Site]:
    site.delete_all()
    try:
        yield site
    finally:
        site.delete_all()


def in_container(site: Site, name: str, *argv: str) -> str:
    done = subprocess.run(
        netns.nsenter_argv(site.boxes[name].netns, *argv),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def addresses(site: Site, name: str, ifname: str) -> list[dict[str, Any]]:
    (link,) = json.loads(in_container(site, name, "ip", "-j", "addr", "show", "dev", ifname))
    found: list[dict[str, Any]] = link["addr_info"]
    return found


def test_egress_to_an_ip_block_holds_on_the_gwbridge_way_out(clean: Site) -> None:
    site = clean
    # The way out is eth1, for both families (what this test is about).
    for name in ("web1", "web2"):
        for target in (str(OUTSIDE_SERVER), str(OUTSIDE_SERVER6)):
            (route,) = json.loads(in_container(site, name, "ip", "-j", "route", "get", target))
            assert route["dev"] == "eth1", route
    # Before any policy web reaches both of the outside server's addresses.
    expect(site, both("web1", "router", 80, True) + both("web2", "router", 80, True))
    site.apply(
        "web-out",
        k8s(
            "web-out",
            {
                "podSelector": {"matchLabels": {"app": "web"}},
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [
                            {
                                "ipBlock": {
                                    "cidr": "203.0.113.0/24",
                                    "except": ["203.0.113.128/25"],
                                }
                            },
                            {
                                "ipBlock": {
                                    "cidr": "2001:db8:ffff::/48",
                                    "except": ["2001:db8:ffff:8000::/49"],
                                }
                            },
                        ],
                        "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "UDP", "port": 80}],
                    }
                ],
            },
        ),
    )
    # web1's gwbridge addresses are in host 1's sets of app=web.
    gwbridge = {
        ip_address(a["local"]) for a in addresses(site, "web1", "eth1") if a["scope"] == "global"
    }
    assert len(gwbridge) == 2  # an IPv4 and an IPv6 address
    web_sets = [found for name, found in policy_sets(site.lab, 1).items() if "app_web" in name]
    assert gwbridge <= set().union(*web_sets)
    expect(
        site,
        # Into the block, on one host and the other: out by eth1 and allowed.
        both("web1", "outside", 80, True)
        + both("web2", "outside", 80, True)
        # The same server outside the block, and the block on another port.
        + both("web1", "router", 80, False)
        + both("web2", "router", 80, False)
        + both("web1", "outside", 5432, False)
        # Other containers are outside the block too (by eth0, as ever).
        + both("web1", "db1", 80, False)
        + both("web2", "db1", 80, False)
        # Unselected: db and free go anywhere, and reach web.
        + both("db1", "router", 80, True)
        + both("db2", "outside", 5432, True)
        + both("free1", "web2", 80, True),
    )
    # Deleted (and waited for): out by the gwbridge anywhere again.
    site.ctl("policy", "delete", "web-out", "--wait", "--timeout", WAIT_TIMEOUT)
    expect(site, both("web1", "router", 80, True) + both("web2", "router", 80, True))


def link_local(site: Site, name: str) -> str:
    found = [a["local"] for a in addresses(site, name, "eth0") if a["scope"] == "link"]
    assert found, f"{name} has no link-local address"
    return f"{found[0]}%eth0"


def answers(site: Site, src: str, dst: str, port: int = 80) -> list[str | None]:
    """TCP and UDP from src to dst's link-local address."""
    target = link_local(site, dst)
    return echo.probe_from(
        site.boxes[src].netns, WAIT, [("tcp", target, port), ("udp", target, port)]
    )


def test_link_local_traffic_to_an_isolated_container_is_refused(clean: Site) -> None:
    """overlay-cni registered each container's eth0 MAC: link-local TCP and
    UDP to db1, isolated for ingress, is refused; to free1, not isolated,
    it passes, and db1 reaches web1 by link-local (its egress is open)."""
    site = clean
    mine = link_local(site, "web1").split("%")[0]
    assert answers(site, "web1", "db1") == [mine, mine]  # before: anyone by link-local
    site.apply("db-closed", k8s("db-closed", {"podSelector": {"matchLabels": {"app": "db"}}}))
    assert answers(site, "web1", "db1") == [None, None]
    assert answers(site, "web1", "free1") == [mine, mine]
    db = link_local(site, "db1").split("%")[0]
    assert answers(site, "db1", "web1") == [db, db]
    # The global addresses, as ever (neighbour discovery works for db1).
    expect(site, both("web1", "db1", 80, False) + both("db1", "web1", 80, True))
