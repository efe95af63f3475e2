"""`overlayctl service` against a real etcd: the commands run as a user runs
them (a process, the daemon's settings as flags); VIPs are claimed by real
etcd transactions, so concurrent creators never share one; a taken VIP or
node port is refused naming its holder; a deletion frees them; a stored
value no host can use is skipped by `list` with a warning."""

from __future__ import annotations

import asyncio
import json
from ipaddress import ip_address, ip_network

from overlayd.model import IPNetwork
from overlayd.plan.endpoints import endpoint_key, render_endpoint
from overlayd.plan.leases import config_key
from overlayd.plan.policy_model import Endpoint
from overlayd.plan.service import parse_service, service_key, services_prefix, stored_services
from overlayd.store.etcd import EtcdStore
from overlayd.store.services import create_service
from tests.integration.test_policy_cli_etcd import a_host, overlayctl, own_prefix

CONFIG = '{"Network": "10.244.0.0/16", "ServiceNetwork": "10.96.0.0/24"}'
NETS: tuple[IPNetwork, ...] = (ip_network("10.96.0.0/24"),)

WEB = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
"""


async def test_create_list_show_delete_through_the_command(etcd_endpoint: str, prefix: str) -> None:
    own = own_prefix()
    async with EtcdStore([etcd_endpoint]) as store:
        await store.put(config_key(prefix), CONFIG)
        host, lease_id = await a_host(store, prefix, 6)
        for n, app in ((5, "web"), (6, "web"), (7, "db")):
            endpoint = Endpoint(
                key=endpoint_key(own, host, f"c{n}"),
                id=f"c{n}",
                host=host,
                name=f"{app}-{n}",
                addresses=(ip_address(f"10.244.6.{n}"),),
                labels={"app": app},
            )
            await store.put_bound(endpoint.key, render_endpoint(endpoint), lease_id)
    refused = overlayctl(
        etcd_endpoint, prefix, own, "service", "create", "-", stdin=WEB.replace("30080", "80")
    )
    assert refused.returncode == 2 and "spec.ports[0].nodePort" in refused.stderr
    assert "30000-32767" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    created = overlayctl(etcd_endpoint, prefix, own, "service", "create", "-", "--json", stdin=WEB)
    assert created.returncode == 0, created.stderr
    written = json.loads(created.stdout)
    vip = ip_address(written["vips"][0])
    assert vip in NETS[0] and vip not in (NETS[0].network_address, NETS[0].broadcast_address)
    async with EtcdStore([etcd_endpoint]) as store:
        everything, _ = await store.get_prefix(own + "/")
    assert sorted(everything) == sorted(
        [
            service_key(own, "web"),
            f"{own}/vips/{vip}",
            f"{own}/nodeports/tcp/30080",
            *(k for k in everything if k.startswith(f"{own}/endpoints/")),
        ]
    )
    assert parse_service(everything[service_key(own, "web")], service_networks=NETS).vips == (vip,)

    listed = overlayctl(etcd_endpoint, prefix, own, "service", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["services"]
    assert [(r["name"], r["vips"], r["backends"]) for r in rows] == [("web", [str(vip)], 2)]
    table = overlayctl(etcd_endpoint, prefix, own, "service", "list")
    assert "80/TCP->8080,node 30080" in table.stdout and "app=web" in table.stdout
    shown = overlayctl(etcd_endpoint, prefix, own, "service", "show", "web")
    assert shown.returncode == 0, shown.stderr
    assert f"- {vip}" in shown.stdout and "web-5" in shown.stdout and "db-7" not in shown.stdout

    deleted = overlayctl(etcd_endpoint, prefix, own, "service", "delete", "web", "--json")
    assert deleted.returncode == 0 and json.loads(deleted.stdout)["deleted"] is True
    async with EtcdStore([etcd_endpoint]) as store:
        left, _ = await store.get_prefix(own + "/")
    assert not any(
        k.startswith((f"{own}/services/", f"{own}/vips/", f"{own}/nodeports/")) for k in left
    )
    again = overlayctl(etcd_endpoint, prefix, own, "service", "delete", "web")
    assert again.returncode == 1 and "no service 'web'" in again.stderr
    # The freed VIP and node port can be taken again, explicitly.
    reuse = WEB.replace("type: NodePort", f"type: NodePort\n  clusterIP: {vip}")
    assert (
        overlayctl(etcd_endpoint, prefix, own, "service", "create", "-", stdin=reuse).returncode
        == 0
    )


async def test_without_a_service_network_create_says_so(etcd_endpoint: str, prefix: str) -> None:
    own = own_prefix()
    async with EtcdStore([etcd_endpoint]) as store:
        await store.put(config_key(prefix), '{"Network": "10.244.0.0/16"}')
    refused = overlayctl(etcd_endpoint, prefix, own, "service", "create", "-", stdin=WEB)
    assert refused.returncode == 2
    assert "the network config has no ServiceNetwork" in refused.stderr
    # Positive control: with one, the same definition is created.
    async with EtcdStore([etcd_endpoint]) as store:
        await store.put(config_key(prefix), CONFIG)
    assert (
        overlayctl(etcd_endpoint, prefix, own, "service", "create", "-", stdin=WEB).returncode == 0
    )


async def test_taken_vips_and_node_ports_are_refused_naming_the_holder(
    etcd_endpoint: str, prefix: str
) -> None:
    own = own_prefix()
    async with EtcdStore([etcd_endpoint]) as store:
        await store.put(config_key(prefix), CONFIG)
    first = WEB.replace("type: NodePort", "type: NodePort\n  clusterIP: 10.96.0.10")
    assert (
        overlayctl(etcd_endpoint, prefix, own, "service", "create", "-", stdin=first).returncode
        == 0
    )
    same_vip = first.replace("name: web", "name: api").replace("30080", "30081")
    refused = overlayctl(etcd_endpoint, prefix, own, "service", "create", "-", stdin=same_vip)
    assert refused.returncode == 2
    assert "VIP 10.96.0.10 is taken by service 'web'" in refused.stderr
    same_port = WEB.replace("name: web", "name: api")
    refused = overlayctl(etcd_endpoint, prefix, own, "service", "create", "-", stdin=same_port)
    assert refused.returncode == 2
    assert "nodePort 30080/TCP is taken by service 'web'" in refused.stderr
    # Positive control: api with its own VIP and node port.
    fine = same_vip.replace("10.96.0.10", "10.96.0.11")
    assert (
        overlayctl(etcd_endpoint, prefix, own, "service", "create", "-", stdin=fine).returncode == 0
    )
    async with EtcdStore([etcd_endpoint]) as store:
        raw, _ = await store.get_prefix(services_prefix(own))
    assert sorted(raw) == [service_key(own, "api"), service_key(own, "web")]


async def test_twenty_concurrent_creators_get_twenty_distinct_vips(
    etcd_endpoint: str, prefix: str
) -> None:
    own = own_prefix()
    small: tuple[IPNetwork, ...] = (ip_network("10.96.0.0/27"),)  # 30 VIPs: races are likely

    async def one(n: int) -> str:
        # One connection each, as separate overlayctl processes would have.
        async with EtcdStore([etcd_endpoint]) as store:
            document = {
                "name": f"s{n}",
                "selector": {"matchLabels": {"app": "x"}},
                "ports": [{"port": 80}],
            }
            service = parse_service(document, service_networks=small)
            return str((await create_service(store, own, service, small)).service.vips[0])

    vips = await asyncio.gather(*(one(n) for n in range(20)))
    assert len(set(vips)) == 20
    assert all(ip_address(v) in small[0] for v in vips)
    async with EtcdStore([etcd_endpoint]) as store:
        raw, _ = await store.get_prefix(own + "/")
    found = stored_services(raw, own, small)
    assert len(found.services) == 20 and not found.rejected
    assert sorted(k for k in raw if "/vips/" in k) == sorted(f"{own}/vips/{v}" for v in vips)


async def test_list_skips_a_malformed_stored_value_with_a_warning(
    etcd_endpoint: str, prefix: str
) -> None:
    own = own_prefix()
    async with EtcdStore([etcd_endpoint]) as store:
        await store.put(config_key(prefix), CONFIG)
        await store.put(service_key(own, "bad"), "{not json")
        await store.put(
            service_key(own, "outside"),
            json.dumps(
                {
                    "name": "outside",
                    "selector": {"matchLabels": {"a": "b"}},
                    "ports": [{"port": 1}],
                    "vips": ["10.97.0.1"],
                }
            ),
        )
    assert (
        overlayctl(etcd_endpoint, prefix, own, "service", "create", "-", stdin=WEB).returncode == 0
    )
    listed = overlayctl(etcd_endpoint, prefix, own, "service", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["name"] for r in json.loads(listed.stdout)["services"]] == ["web"]
    warnings = listed.stderr.strip().splitlines()
    assert len(warnings) == 2
    assert f"warning: {service_key(own, 'bad')} is not used by any host" in warnings[0]
    assert "outside the service network" in warnings[1]
    shown = overlayctl(etcd_endpoint, prefix, own, "service", "show", "bad")
    assert shown.returncode == 1 and "NOT USED" in shown.stdout


async def test_list_and_show_name_an_ipv6_vip_the_network_no_longer_serves(
    etcd_endpoint: str, prefix: str
) -> None:
    """A dual-stack service stored earlier, in a network config that has no
    IPv6ServiceNetwork now: listed and shown with its IPv4 VIP, which every
    host serves, and a warning naming the IPv6 one, which none does."""
    own = own_prefix()
    async with EtcdStore([etcd_endpoint]) as store:
        await store.put(config_key(prefix), CONFIG)
        await store.put(
            service_key(own, "dual"),
            json.dumps(
                {
                    "name": "dual",
                    "selector": {"matchLabels": {"a": "b"}},
                    "ports": [{"port": 1}],
                    "vips": ["10.96.0.5", "fd00:10:96::5"],
                }
            ),
        )
    listed = overlayctl(etcd_endpoint, prefix, own, "service", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(r["name"], r["vips"]) for r in json.loads(listed.stdout)["services"]] == [
        ("dual", ["10.96.0.5"])
    ]
    assert listed.stderr.strip().splitlines() == [
        f"warning: {service_key(own, 'dual')} is served without a VIP:"
        " fd00:10:96::5 is IPv6, and the network config has no IPv6ServiceNetwork"
    ]
    shown = overlayctl(etcd_endpoint, prefix, own, "service", "show", "dual")
    assert shown.returncode == 0, shown.stderr
    assert "# served without a VIP: fd00:10:96::5 is IPv6" in shown.stdout
