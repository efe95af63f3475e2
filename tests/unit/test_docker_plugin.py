"""The Docker plugin's request handling (plan/docker_plugin.py): every
request parsed and checked, every refusal a PluginError with Docker's error
shape, and the answers that depend on the egress mode."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import replace
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_network,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from overlayd.model import IPAddress
from overlayd.plan import docker_plugin as plan
from overlayd.plan.docker_plugin import Endpoint, HostView, PluginError, Records

if TYPE_CHECKING:
    from overlayd.surfaces.docker_plugin import CniPort

NET = "a" * 64
EP = "b" * 64
SUBNET = IPv4Network("10.244.3.0/24")


def view(egress: str = "masquerade") -> HostView:
    return HostView(
        subnet=SUBNET,
        cluster=IPv4Network("10.244.0.0/16"),
        bridge="ovl0",
        mtu=1450,
        egress=egress,
    )


def records() -> Records:
    found = Records()
    found.networks[NET] = SUBNET
    return found


def refused(call: Any, *args: Any) -> PluginError:
    with pytest.raises(PluginError) as info:
        call(*args)
    assert 400 <= info.value.status < 600
    assert set(info.value.body()) == {"Err"} and info.value.body()["Err"]
    return info.value


# --- bodies -----------------------------------------------------------------


def test_body_must_be_a_json_object() -> None:
    assert plan.parse_body(b'{"NetworkID": "x"}') == {"NetworkID": "x"}
    assert "not JSON" in refused(plan.parse_body, b"{nope").message
    assert "JSON object" in refused(plan.parse_body, b"[1]").message
    assert "nested too deeply" in refused(plan.parse_body, b"[" * 5000).message
    assert "no body" in refused(plan.parse_body, b"").message
    # Methods without arguments get `null` or nothing from Docker.
    assert plan.parse_body(b"null", empty_ok=True) == {}
    assert plan.parse_body(b"", empty_ok=True) == {}


def test_ids_must_look_like_docker_ids() -> None:
    assert plan.parse_network_id({"NetworkID": NET}) == NET
    assert "missing" in refused(plan.parse_network_id, {}).message
    assert "64 hex" in refused(plan.parse_network_id, {"NetworkID": "../../etc"}).message
    assert "string" in refused(plan.parse_network_id, {"NetworkID": 7}).message


# --- networks ------------------------------------------------------------------


def network_request(pool: str = str(SUBNET), **extra: Any) -> dict[str, Any]:
    return {
        "NetworkID": NET,
        "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "overlayd", "Pool": pool, "Gateway": "10.244.3.1/24"}],
        "IPv6Data": [],
        **extra,
    }


def test_create_network_takes_only_this_hosts_subnet() -> None:
    assert plan.create_network(network_request(), view()) == (NET, SUBNET, None)
    assert plan.create_network(network_request("0.0.0.0/0"), view()) == (NET, SUBNET, None)
    assert (
        "use --ipam-driver overlayd"
        in refused(plan.create_network, network_request("172.30.0.0/16"), view()).message
    )
    assert (
        "IPv4 only"
        in refused(
            plan.create_network, network_request(IPv6Data=[{"Pool": "fd00::/64"}]), view()
        ).message
    )
    assert (
        "exactly one pool"
        in refused(plan.create_network, {"NetworkID": NET, "IPv4Data": []}, view()).message
    )
    wrong_gw = network_request()
    wrong_gw["IPv4Data"][0]["Gateway"] = "10.244.3.9/24"
    assert "bridge's address" in refused(plan.create_network, wrong_gw, view()).message


# --- endpoints -----------------------------------------------------------------


def endpoint_request(address: str = "10.244.3.5/24", **iface: Any) -> dict[str, Any]:
    return {
        "NetworkID": NET,
        "EndpointID": EP,
        "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": "", **iface},
        "Options": {"com.docker.network.endpoint.exposedports": []},
    }


def test_create_endpoint_checks_network_address_and_mac() -> None:
    found = plan.create_endpoint(endpoint_request(), records(), view())
    assert found.address == IPv4Interface("10.244.3.5/24") and found.mac is None
    assert found.options == {"com.docker.network.endpoint.exposedports": []}

    error = refused(plan.create_endpoint, endpoint_request(), Records(), view())
    assert error.status == 404 and "not an overlayd network" in error.message
    assert (
        "not in the network's subnet"
        in refused(
            plan.create_endpoint, endpoint_request("10.99.0.5/24"), records(), view()
        ).message
    )
    assert (
        "not a MAC"
        in refused(
            plan.create_endpoint, endpoint_request(MacAddress="zz"), records(), view()
        ).message
    )
    assert (
        "--ipam-driver"
        in refused(
            plan.create_endpoint, {"NetworkID": NET, "EndpointID": EP}, records(), view()
        ).message
    )
    taken = records()
    taken.endpoints[EP] = Endpoint(NET, IPv4Interface("10.244.3.5/24"))
    assert (
        "exists already" in refused(plan.create_endpoint, endpoint_request(), taken, view()).message
    )
    with_mac = plan.create_endpoint(
        endpoint_request(MacAddress="02:42:0A:F4:03:05"), records(), view()
    )
    assert with_mac.mac == "02:42:0a:f4:03:05"


def test_join_needs_a_known_endpoint_and_a_sandbox_path() -> None:
    known = records()
    known.endpoints[EP] = Endpoint(NET, IPv4Interface("10.244.3.5/24"))
    request = {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/x"}
    assert plan.join(request, known).sandbox == "/var/run/docker/netns/x"
    assert refused(plan.join, request, records()).status == 404
    assert "not a path" in refused(plan.join, {**request, "SandboxKey": "x"}, known).message


def test_join_answer_follows_the_egress_mode() -> None:
    host_end, peer = plan.veth_names(EP)
    assert len(host_end) <= 15 and len(peer) <= 15 and host_end != peer
    for mode in ("masquerade", "none"):
        answer = plan.join_response(view(mode), EP)
        assert answer == {
            "InterfaceName": {"SrcName": peer, "DstPrefix": "eth"},
            "Gateway": "10.244.3.1",
        }
    answer = plan.join_response(view("gwbridge"), EP)
    # No gateway: libnetwork attaches docker_gwbridge for the default route;
    # the cluster stays reachable over the overlay.
    assert "Gateway" not in answer
    assert answer["StaticRoutes"] == [
        {"Destination": "10.244.0.0/16", "RouteType": 0, "NextHop": "10.244.3.1"}
    ]
    # With services, their VIPs are reached over the overlay too, not
    # masqueraded out of docker_gwbridge.
    with_services = replace(view("gwbridge"), service_networks=(IPv4Network("10.96.0.0/16"),))
    assert plan.join_response(with_services, EP)["StaticRoutes"] == [
        {"Destination": "10.244.0.0/16", "RouteType": 0, "NextHop": "10.244.3.1"},
        {"Destination": "10.96.0.0/16", "RouteType": 0, "NextHop": "10.244.3.1"},
    ]


def test_published_ports_become_portmap_mappings() -> None:
    options = {
        plan.PORTMAP_OPTION: [
            {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080},
            # Docker 20.10 publishes on :: as well: the overlay is IPv4.
            {"Proto": 6, "IP": "", "Port": 80, "HostIP": "::", "HostPort": 8080, "HostPortEnd": 0},
            {"Proto": 17, "Port": 53, "HostIP": "0.0.0.0", "HostPort": 5353, "HostPortEnd": 5353},
            {"Proto": 6, "Port": 22, "HostIP": "192.0.2.1", "HostPort": 2222, "HostPortEnd": 0},
        ]
    }
    _, found = plan.program_ports({"NetworkID": NET, "EndpointID": EP, "Options": options})
    assert found == [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp"},
        {"hostPort": 2222, "containerPort": 22, "protocol": "tcp", "hostIP": "192.0.2.1"},
    ]
    assert plan.port_mappings({}) == []
    for bad_binding, text in (
        ({"Proto": 6, "Port": 80, "HostPort": 0}, "explicit host port"),
        ({"Proto": 1, "Port": 80, "HostPort": 80}, "not tcp"),
        # Not a number: a refusal, never a TypeError (a 500).
        ({"Proto": [6], "Port": 80, "HostPort": 80}, "not tcp"),
        ({"Proto": True, "Port": 80, "HostPort": 80}, "not tcp"),
        ({"Proto": 6, "Port": 80, "HostPort": 70000}, "not a port"),
        ({"Proto": 6, "Port": 80, "HostPort": 80, "HostPortEnd": 90}, "ranges"),
        ({"Proto": 6, "Port": 80, "HostPort": 80, "HostIP": "nope"}, "not an address"),
    ):
        assert text in refused(plan.port_mappings, {plan.PORTMAP_OPTION: [bad_binding]}).message
    assert "list" in refused(plan.port_mappings, {plan.PORTMAP_OPTION: "8080"}).message


# --- IPAM ----------------------------------------------------------------------


def test_request_pool_is_always_the_hosts_subnet() -> None:
    answer = plan.request_pool({"AddressSpace": "overlayd", "Pool": "", "V6": False}, view())
    # Without --subnet: the placeholder that libnetwork does not check
    # against the host's routes (the subnet is routed on the bridge).
    assert answer == {"PoolID": "overlayd-10.244.3.0/24", "Pool": "0.0.0.0/0", "Data": {}}
    assert plan.request_pool({"Pool": "10.244.3.0/24"}, view())["Pool"] == "10.244.3.0/24"
    assert "IPv4 only" in refused(plan.request_pool, {"V6": True}, view()).message
    assert (
        "leave --subnet out" in refused(plan.request_pool, {"Pool": "10.1.0.0/16"}, view()).message
    )
    assert "--ip-range" in refused(plan.request_pool, {"SubPool": "10.244.3.0/28"}, view()).message
    assert "address space" in refused(plan.request_pool, {"AddressSpace": "x"}, view()).message


def test_request_address_gateway_range_and_pool() -> None:
    pool = view().pool_id
    gateway = plan.request_address(
        {"PoolID": pool, "Options": {"RequestAddressType": plan.GATEWAY_REQUEST}}, view()
    )
    assert gateway.gateway and gateway.address == IPv4Address("10.244.3.1")
    plain = plan.request_address({"PoolID": pool, "Address": ""}, view())
    assert not plain.gateway and plain.address is None
    # host-local has the lower half after the gateway: .2 to .127.
    wanted = plan.request_address({"PoolID": pool, "Address": "10.244.3.127"}, view())
    assert wanted.address == IPv4Address("10.244.3.127")
    assert (
        "outside this host's subnet"
        in refused(plan.request_address, {"PoolID": pool, "Address": "10.99.0.5"}, view()).message
    )
    assert (
        "outside host-local's range"
        in refused(
            plan.request_address, {"PoolID": pool, "Address": "10.244.3.200"}, view()
        ).message
    )
    assert refused(plan.request_address, {"PoolID": "overlayd-10.1.0.0/24"}, view()).status == 404
    assert (
        "not an IPv4"
        in refused(plan.request_address, {"PoolID": pool, "Address": "fd00::1"}, view()).message
    )
    assert (
        "the gateway must be"
        in refused(
            plan.request_address,
            {
                "PoolID": pool,
                "Address": "10.244.3.9",
                "Options": {"RequestAddressType": plan.GATEWAY_REQUEST},
            },
            view(),
        ).message
    )
    answer = plan.address_answer(IPv4Address("10.244.3.7"), SUBNET)
    assert answer == {"Address": "10.244.3.7/24", "Data": {}}


def test_release_address_and_pool() -> None:
    pool = view().pool_id
    held = records()
    assert plan.release_address(
        {"PoolID": pool, "Address": "10.244.3.7"}, view(), held
    ) == IPv4Address("10.244.3.7")
    assert (
        "outside"
        in refused(
            plan.release_address, {"PoolID": pool, "Address": "10.9.9.9"}, view(), held
        ).message
    )
    assert plan.release_pool({"PoolID": pool}) == pool
    assert refused(plan.release_pool, {"PoolID": "default/x"}).status == 404


def test_host_local_config_uses_the_lower_half() -> None:
    ipam = view().host_local_ipam("/var/lib/cni/overlay/ipam")
    assert ipam["type"] == "host-local" and ipam["dataDir"] == "/var/lib/cni/overlay/ipam"
    assert ipam["ranges"] == [
        [
            {
                "subnet": "10.244.3.0/24",
                "rangeStart": "10.244.3.2",
                "rangeEnd": "10.244.3.127",
                "gateway": "10.244.3.1",
            }
        ]
    ]


def test_records_round_trip_and_lookups() -> None:
    found = records()
    found.endpoints[EP] = Endpoint(
        NET, IPv4Interface("10.244.3.5/24"), "02:00:00:00:00:01", "/run/x", [{"hostPort": 1}]
    )
    found.addresses[IPv4Address("10.244.3.5")] = "docker-1"
    again = Records.from_json(json.loads(json.dumps(found.to_json())))
    assert again == found
    assert again.endpoint(NET, EP).address == IPv4Interface("10.244.3.5/24")
    assert refused(again.endpoint, NET, "c" * 64).status == 404
    assert refused(again.endpoint, "c" * 64, EP).status == 404
    with pytest.raises(ValueError):
        Records.from_json([])


# --- settings and the server's answers to bad requests -------------------------


def test_plugin_settings() -> None:
    from overlayd.config import build_agent_config
    from overlayd.errors import ConfigError

    default = build_agent_config(flags={}, env={})
    assert not default.docker_plugin
    assert str(default.docker_plugin_socket) == "/run/docker/plugins/overlayd.sock"
    assert str(default.cni_data_dir) == "/var/lib/cni/overlay"
    on = build_agent_config(
        flags={"docker-plugin": "on", "docker-plugin-socket": "/x/p.sock", "cni-data-dir": "/d"},
        env={},
    )
    assert on.docker_plugin and str(on.docker_plugin_socket) == "/x/p.sock"
    with pytest.raises(ConfigError, match="cni-data-dir"):
        build_agent_config(flags={"cni-data-dir": "relative"}, env={})
    with pytest.raises(ConfigError, match="docker-plugin"):
        build_agent_config(flags={"docker-plugin": "maybe"}, env={})


async def test_server_answers_bad_requests_with_err(tmp_path: Any) -> None:
    """The real aiohttp app; none of these requests reaches the kernel or
    host-local, each is refused with Docker's shape, and the server goes on."""
    from aiohttp.test_utils import TestClient, TestServer

    from overlayd.surfaces.docker_plugin import DockerPlugin, PluginSettings

    plugin = DockerPlugin(
        PluginSettings(tmp_path / "p.sock", tmp_path / "cni"),
        view=view,
        cni=FakeCni(),
        veths=FakeVeths(),
    )
    async with TestClient(TestServer(plugin.app())) as client:

        async def post(method: str, body: bytes) -> tuple[int, Any, str]:
            response = await client.post(f"/{method}", data=body)
            return response.status, await response.json(content_type=None), response.content_type

        status, answer, ctype = await post("Plugin.Activate", b"")
        assert status == 200 and answer == {"Implements": ["NetworkDriver", "IpamDriver"]}
        assert ctype == plan.CONTENT_TYPE
        cases = [
            ("NetworkDriver.CreateNetwork", b"{not json", 400, "not JSON"),
            (
                "NetworkDriver.Join",
                json.dumps({"NetworkID": NET, "EndpointID": EP}).encode(),
                404,
                "not an overlayd network",
            ),
            (
                "IpamDriver.RequestAddress",
                json.dumps({"PoolID": view().pool_id, "Address": "10.9.0.1"}).encode(),
                400,
                "outside this host's subnet",
            ),
            ("NetworkDriver.NoSuchMethod", b"{}", 404, "not a method"),
        ]
        for method, body, want_status, text in cases:
            status, answer, _ = await post(method, body)
            assert status == want_status and set(answer) == {"Err"} and text in answer["Err"]
        # Still serving, and a good request still works.
        status, answer, _ = await post(
            "NetworkDriver.CreateNetwork", json.dumps(network_request()).encode()
        )
        assert status == 200 and answer == {}
        assert plugin.records.networks == {NET: SUBNET}
        assert (tmp_path / "cni" / "docker-plugin" / "records.json").exists()


# --- the server's logic, with fakes for its two ports ---------------------------


class FakeCni:
    """host-local and portmap as the plugin sees them: host-local keeps an
    address -> container ID store; `fail` makes (plugin, command) fail;
    `hold` makes host-local ADD reserve and then wait (a slow plugin)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.store: dict[IPAddress, str] = {}
        self.confs: list[Any] = []
        self.fail: set[tuple[str, str]] = set()
        self.hold: asyncio.Event | None = None
        self.reserved = asyncio.Event()

    async def __call__(
        self, plugin: str, command: str, conf: Any, *, container_id: str, netns: str
    ) -> tuple[bool, Any, str]:
        self.calls.append((plugin, command, container_id))
        self.confs.append(conf)
        if (plugin, command) in self.fail:
            return False, {"msg": f"{plugin} {command} failed"}, ""
        if plugin == "host-local" and command == "ADD":
            # The first free address of the first range, of either family.
            first = conf["ipam"]["ranges"][0][0]
            subnet = ip_network(first["subnet"])
            start = ip_address(first.get("rangeStart", subnet.network_address + 2))
            address = next(start + n for n in range(120) if start + n not in self.store)
            self.store[address] = container_id
            self.reserved.set()
            if self.hold is not None:
                await self.hold.wait()
            return True, {"ips": [{"address": f"{address}/{subnet.prefixlen}"}]}, ""
        if plugin == "host-local" and command == "DEL":
            self.store = {a: c for a, c in self.store.items() if c != container_id}
        return True, None, ""


class FakeVeths:
    """Links in the host's namespace; `moved` takes a peer into a container."""

    def __init__(self) -> None:
        self.links: set[str] = {"ovl0"}
        self.ports: set[str] = set()
        self.peers: dict[str, str] = {}
        self.macs: dict[str, str | None] = {}  # peer -> the MAC it was made with

    async def exists(self, name: str) -> bool:
        return name in self.links

    async def add_pair(
        self, host: str, peer: str, *, bridge: str, mtu: int, mac: str | None
    ) -> None:
        assert host not in self.links, "add_pair never replaces a link"
        self.links |= {host, peer}
        self.ports.add(host)
        self.peers[host] = peer
        self.macs[peer] = mac

    async def delete(self, host: str) -> bool:
        if host not in self.links:
            return False
        self.links -= {host, self.peers.pop(host, "")}
        self.ports.discard(host)
        return True

    async def bridge_ports(self, bridge: str, prefix: str) -> list[str]:
        return sorted(p for p in self.ports if p.startswith(prefix))

    def moved(self, peer: str) -> None:
        self.links.discard(peer)


def make_plugin(
    tmp_path: Any,
    the_view: Any = view,
    cni: CniPort | None = None,
    veths: FakeVeths | None = None,
) -> Any:
    from overlayd.surfaces.docker_plugin import DockerPlugin, PluginSettings

    return DockerPlugin(
        PluginSettings(tmp_path / "p.sock", tmp_path / "cni"),
        view=the_view,
        cni=cni or FakeCni(),
        veths=veths or FakeVeths(),
    )


async def call(plugin: Any, method: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """One request through the plugin's real aiohttp app."""
    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(plugin.app())) as client:
        response = await client.post(f"/{method}", data=json.dumps(body).encode())
        return response.status, await response.json(content_type=None)


async def joined_endpoint(plugin: Any, sandbox: str = "/var/run/docker/netns/abc") -> None:
    """A network, an endpoint EP in it, joined to `sandbox`."""
    assert await call(plugin, "NetworkDriver.CreateNetwork", network_request()) == (200, {})
    status, _ = await call(plugin, "NetworkDriver.CreateEndpoint", endpoint_request())
    assert status == 200
    status, _ = await call(
        plugin, "NetworkDriver.Join", {"NetworkID": NET, "EndpointID": EP, "SandboxKey": sandbox}
    )
    assert status == 200


@pytest.mark.parametrize(
    "damage", ['{"networks": []}', '{"endpoints": {"x": 1}}', "[]", "{nope", "a directory"]
)
async def test_damaged_records_never_stop_the_plugin(tmp_path: Any, damage: str) -> None:
    plugin = make_plugin(tmp_path)
    path = plugin.settings.records_file
    # Positive control: good records are read back.
    await plugin.start()
    assert await call(plugin, "NetworkDriver.CreateNetwork", network_request()) == (200, {})
    again = make_plugin(tmp_path)
    await again.start()
    assert again.records.networks == {NET: SUBNET}
    # Damaged twice: the plugin starts empty each time and keeps both files.
    for _ in range(2):
        path.unlink(missing_ok=True)
        if damage == "a directory":
            path.mkdir()
        else:
            path.write_text(damage)
        damaged = make_plugin(tmp_path)
        await damaged.start()
        assert damaged.records == Records()
    kept = sorted(path.parent.glob("records.json.damaged-*"))
    assert len(kept) == 2
    # And it works on: the next save writes a good file.
    assert await call(damaged, "NetworkDriver.CreateNetwork", network_request()) == (200, {})
    assert json.loads(path.read_text())["networks"] == {NET: str(SUBNET)}


async def test_failed_unplug_still_deletes_endpoint_and_veth(tmp_path: Any) -> None:
    cni, veths = FakeCni(), FakeVeths()
    plugin = make_plugin(tmp_path, cni=cni, veths=veths)
    await plugin.start()
    await joined_endpoint(plugin)
    ports = {plan.PORTMAP_OPTION: [{"Proto": 6, "Port": 80, "HostPort": 8080}]}
    status, _ = await call(
        plugin,
        "NetworkDriver.ProgramExternalConnectivity",
        {"NetworkID": NET, "EndpointID": EP, "Options": ports},
    )
    assert status == 200 and plugin.records.endpoints[EP].ports
    host, _ = plan.veth_names(EP)
    assert host in veths.links
    cni.fail.add(("portmap", "DEL"))
    ids = {"NetworkID": NET, "EndpointID": EP}
    assert await call(plugin, "NetworkDriver.DeleteEndpoint", ids) == (200, {})
    assert EP not in plugin.records.endpoints
    assert host not in veths.links
    assert ("portmap", "DEL", EP) in cni.calls
    # Nothing blocks the network's deletion now.
    assert await call(plugin, "NetworkDriver.DeleteNetwork", {"NetworkID": NET}) == (200, {})


async def test_join_never_takes_a_live_interface(tmp_path: Any) -> None:
    veths = FakeVeths()
    plugin = make_plugin(tmp_path, veths=veths)
    await plugin.start()
    await joined_endpoint(plugin, "/run/docker/netns/one")
    host, peer = plan.veth_names(EP)
    veths.moved(peer)  # Docker moved it into the container
    join = {"NetworkID": NET, "EndpointID": EP}
    # Joined to another sandbox: refused, the container keeps its interface.
    status, answer = await call(
        plugin, "NetworkDriver.Join", {**join, "SandboxKey": "/run/docker/netns/two"}
    )
    assert status == 409 and "joined" in answer["Err"]
    # The same sandbox again, but the peer is in the container: refused too.
    status, answer = await call(
        plugin, "NetworkDriver.Join", {**join, "SandboxKey": "/run/docker/netns/one"}
    )
    assert status == 409 and "in use" in answer["Err"]
    assert host in veths.links
    # An endpoint whose ID shares the first 12 hex digits: its veth name is taken.
    twin = EP[:12] + "c" * 52
    status, _ = await call(
        plugin,
        "NetworkDriver.CreateEndpoint",
        {**endpoint_request("10.244.3.6/24"), "EndpointID": twin},
    )
    assert status == 200
    status, answer = await call(
        plugin,
        "NetworkDriver.Join",
        {"NetworkID": NET, "EndpointID": twin, "SandboxKey": "/run/docker/netns/three"},
    )
    assert status == 409 and "same veth name" in answer["Err"]
    assert host in veths.links
    # Positive control: after Leave, a Join makes a fresh pair.
    assert await call(plugin, "NetworkDriver.Leave", join) == (200, {})
    assert host not in veths.links
    status, _ = await call(
        plugin, "NetworkDriver.Join", {**join, "SandboxKey": "/run/docker/netns/two"}
    )
    assert status == 200 and {host, peer} <= veths.links


async def test_an_unjoined_twin_leaves_the_joined_endpoints_veth_alone(tmp_path: Any) -> None:
    veths = FakeVeths()
    plugin = make_plugin(tmp_path, veths=veths)
    await plugin.start()
    await joined_endpoint(plugin)
    host, peer = plan.veth_names(EP)
    veths.moved(peer)
    twin = EP[:12] + "c" * 52  # the same veth name, never joined
    status, _ = await call(
        plugin,
        "NetworkDriver.CreateEndpoint",
        {**endpoint_request("10.244.3.6/24"), "EndpointID": twin},
    )
    assert status == 200
    ids = {"NetworkID": NET, "EndpointID": twin}
    assert await call(plugin, "NetworkDriver.DeleteEndpoint", ids) == (200, {})
    assert host in veths.links and twin not in plugin.records.endpoints
    # Positive control: the joined endpoint's own Leave deletes it.
    assert await call(plugin, "NetworkDriver.Leave", {**ids, "EndpointID": EP}) == (200, {})
    assert host not in veths.links


@pytest.mark.parametrize("loss", ["missing", "damaged"])
async def test_lost_records_adopt_running_containers_instead_of_cutting_them_off(
    tmp_path: Any, loss: str, caplog: pytest.LogCaptureFixture
) -> None:
    cni, veths = FakeCni(), FakeVeths()
    plugin = make_plugin(tmp_path, cni=cni, veths=veths)
    await plugin.start()
    await joined_endpoint(plugin)
    status, answer = await call(plugin, "IpamDriver.RequestAddress", {"PoolID": view().pool_id})
    assert status == 200
    address = IPv4Interface(answer["Address"]).ip
    held_by = plugin.records.addresses[address]
    host, peer = plan.veth_names(EP)
    veths.moved(peer)  # a running container's eth0
    # host-local's own file for the reservation, as the real plugin writes it.
    store = plugin.settings.host_local_store
    store.mkdir(parents=True, exist_ok=True)
    (store / str(address)).write_text(f"{held_by}\r\neth0")
    path = plugin.settings.records_file
    path.unlink()
    if loss == "damaged":
        path.write_text("{nope")
    again = make_plugin(tmp_path, cni=cni, veths=veths)
    with caplog.at_level("ERROR"):
        await again.start()
    assert "docker_plugin_records_lost" in caplog.text
    # Nothing was taken from the running container.
    assert host in veths.links
    assert ("host-local", "DEL", held_by) not in cni.calls
    assert again.records.addresses == {address: held_by}
    assert host in again.records.adopted_veths
    # Kept across another restart, now that the records are whole again.
    again = make_plugin(tmp_path, cni=cni, veths=veths)
    await again.start()
    assert host in veths.links and again.records.addresses == {address: held_by}
    # When Docker lets the container go, both are released.
    ids = {"NetworkID": NET, "EndpointID": EP}
    assert await call(again, "NetworkDriver.Leave", ids) == (200, {})
    assert host not in veths.links and not again.records.adopted_veths
    # The network itself was lost with the records: Docker logs this and
    # removes the endpoint all the same.
    status, _ = await call(again, "NetworkDriver.DeleteEndpoint", ids)
    assert status == 404
    release = {"PoolID": view().pool_id, "Address": str(address)}
    assert await call(again, "IpamDriver.ReleaseAddress", release) == (200, {})
    assert ("host-local", "DEL", held_by) in cni.calls and not again.records.addresses


async def test_a_failed_release_is_finished_at_the_next_start(tmp_path: Any) -> None:
    cni = FakeCni()
    plugin = make_plugin(tmp_path, cni=cni)
    await plugin.start()
    status, answer = await call(plugin, "IpamDriver.RequestAddress", {"PoolID": view().pool_id})
    assert status == 200
    address = IPv4Interface(answer["Address"]).ip
    held_by = plugin.records.addresses[address]
    store = plugin.settings.host_local_store
    store.mkdir(parents=True, exist_ok=True)
    (store / str(address)).write_text(f"{held_by}\r\neth0")
    cni.fail.add(("host-local", "DEL"))
    release = {"PoolID": view().pool_id, "Address": str(address)}
    # Docker never asks twice: the answer is OK and the record goes.
    assert await call(plugin, "IpamDriver.ReleaseAddress", release) == (200, {})
    assert address not in plugin.records.addresses
    assert address in cni.store  # still reserved
    cni.fail.clear()
    await make_plugin(tmp_path, cni=cni).start()
    assert address not in cni.store


async def test_join_replaces_a_pair_never_handed_over(tmp_path: Any) -> None:
    veths = FakeVeths()
    plugin = make_plugin(tmp_path, veths=veths)
    await plugin.start()
    await joined_endpoint(plugin)  # both ends still in the host's namespace
    host, peer = plan.veth_names(EP)
    status, _ = await call(
        plugin,
        "NetworkDriver.Join",
        {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/abc"},
    )
    assert status == 200 and {host, peer} <= veths.links


async def test_address_released_after_a_lease_change(tmp_path: Any) -> None:
    cni = FakeCni()
    current = {"view": view()}
    plugin = make_plugin(tmp_path, lambda: current["view"], cni=cni)
    await plugin.start()
    old_pool = view().pool_id
    status, answer = await call(plugin, "IpamDriver.RequestAddress", {"PoolID": old_pool})
    assert status == 200
    address = IPv4Interface(answer["Address"]).ip
    held_by = plugin.records.addresses[address]
    # The host's lease moves to another subnet.
    moved = HostView(
        subnet=IPv4Network("10.244.9.0/24"),
        cluster=IPv4Network("10.244.0.0/16"),
        bridge="ovl0",
        mtu=1450,
        egress="masquerade",
    )
    current["view"] = moved
    # An address we never took, in the old pool: still 404 (not this pool).
    status, _ = await call(
        plugin, "IpamDriver.ReleaseAddress", {"PoolID": old_pool, "Address": "10.244.3.99"}
    )
    assert status == 404
    # Ours: released whatever the pool is now.
    status, _ = await call(
        plugin, "IpamDriver.ReleaseAddress", {"PoolID": old_pool, "Address": str(address)}
    )
    assert status == 200
    assert ("host-local", "DEL", held_by) in cni.calls
    assert address not in plugin.records.addresses and not cni.store


async def test_start_releases_reservations_no_record_holds(tmp_path: Any) -> None:
    cni = FakeCni()
    plugin = make_plugin(tmp_path, cni=cni)
    store = plugin.settings.host_local_store
    store.mkdir(parents=True)
    plugin.records.addresses[IPv4Address("10.244.3.11")] = "docker-held"
    plugin._save()
    for name, content in {
        "10.244.3.10": "docker-lost\r\neth0",  # ours, no record: released
        "10.244.3.11": "docker-held\r\neth0",  # ours, recorded: kept
        "10.244.3.12": "5d2c0ffee\r\neth0",  # a podman container's: not ours
        "lock": "",
        "last_reserved_ip.0": "10.244.3.12",
    }.items():
        (store / name).write_text(content)
    await plugin.start()
    dels = [c for c in cni.calls if c[:2] == ("host-local", "DEL")]
    assert dels == [("host-local", "DEL", "docker-lost")]
    assert plugin.records.addresses == {IPv4Address("10.244.3.11"): "docker-held"}


async def test_cancelled_address_request_frees_the_reservation(tmp_path: Any) -> None:
    cni = FakeCni()
    plugin = make_plugin(tmp_path, cni=cni)
    await plugin.start()
    cni.hold = asyncio.Event()
    task = asyncio.create_task(plugin._request_address({"PoolID": view().pool_id}))
    await asyncio.wait_for(cni.reserved.wait(), 5)
    assert len(cni.store) == 1
    (held_by,) = cni.store.values()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ("host-local", "DEL", held_by) in cni.calls
    assert not cni.store and not plugin.records.addresses
    # Positive control: a request that is not cancelled keeps its address.
    cni.hold.set()
    answer = await plugin._request_address({"PoolID": view().pool_id})
    assert IPv4Interface(answer["Address"]).ip in plugin.records.addresses
    assert len(cni.store) == 1


async def test_run_plugin_kills_the_child_when_cancelled(tmp_path: Any) -> None:
    from overlayd.nsexec import run_plugin

    script = tmp_path / "slow"
    script.write_text('#!/bin/sh\necho $$ > "$PIDFILE"\ncat >/dev/null\nexec sleep 60\n')
    script.chmod(0o755)
    pidfile = tmp_path / "pid"
    env = {"PATH": "/usr/bin:/bin", "PIDFILE": str(pidfile)}
    task = asyncio.create_task(run_plugin([str(script)], {"cniVersion": "1.0.0"}, env))
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.02)
    pid = int(pidfile.read_text())
    alive = Path(f"/proc/{pid}")
    assert alive.exists()  # noqa: ASYNC240 (a test's one look)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive.exists()  # noqa: ASYNC240 (killed and reaped)
    # Positive control: a plugin that answers is heard.
    quick = tmp_path / "quick"
    quick.write_text("#!/bin/sh\ncat >/dev/null\necho '{\"ips\": []}'\n")
    quick.chmod(0o755)
    assert await run_plugin([str(quick)], {}, env) == (True, {"ips": []}, '{"ips": []}')


async def test_refusals_of_aiohttp_have_dockers_shape(tmp_path: Any) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    plugin = make_plugin(tmp_path)
    await plugin.start()
    async with TestClient(TestServer(plugin.app())) as client:
        huge = b'{"NetworkID": "' + b"a" * (2 << 20) + b'"}'
        for response, status in (
            (await client.post("/NetworkDriver.CreateNetwork", data=huge), 413),
            (await client.get("/Plugin.Activate"), 405),
            (await client.post("/Plugin/Activate", data=b"{}"), 404),
        ):
            assert response.status == status
            assert response.content_type == plan.CONTENT_TYPE
            answer = await response.json(content_type=None)
            assert set(answer) == {"Err"} and answer["Err"]
        # Positive control: a good request in the same app.
        response = await client.post("/Plugin.Activate", data=b"")
        assert response.status == 200


def test_no_new_addresses_while_the_subnet_changes() -> None:
    moving = HostView(
        subnet=SUBNET,
        cluster=IPv4Network("10.244.0.0/16"),
        bridge="ovl0",
        mtu=1450,
        egress="masquerade",
        settled=False,
    )
    pool = {"PoolID": moving.pool_id}
    assert refused(plan.request_address, pool, moving).status == 503
    assert refused(plan.request_pool, {}, moving).status == 503
    # The gateway is the bridge's, not allocated: still answered.
    gateway = {**pool, "Options": {"RequestAddressType": plan.GATEWAY_REQUEST}}
    assert plan.request_address(gateway, moving).gateway
    # Positive control: settled, the same request is served.
    assert not plan.request_address(pool, view()).gateway


async def test_start_repairs_the_plugins_veths(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    veths = FakeVeths()
    plugin = make_plugin(tmp_path, veths=veths)
    await plugin.start()
    await joined_endpoint(plugin)
    host, _ = plan.veth_names(EP)
    # A stale port of an endpoint overlayd has no record of (removed while
    # it was down), and the recorded endpoint's veth deleted by hand.
    stale = plan.HOST_VETH_PREFIX + "dead00000000"
    veths.links.add(stale)
    veths.ports.add(stale)
    await veths.delete(host)
    again = make_plugin(tmp_path, veths=veths)
    with caplog.at_level("ERROR"):
        await again.start()
    assert stale not in veths.links
    assert EP in again.records.endpoints  # kept, reported
    assert "docker_veth_missing" in caplog.text
    # Positive control: a recorded endpoint's veth is left alone.
    plugin2 = make_plugin(tmp_path / "b", veths=veths)
    await plugin2.start()
    await joined_endpoint(plugin2)
    await make_plugin(tmp_path / "b", veths=veths).start()
    assert host in veths.links


async def test_run_outlives_an_unusable_socket_path(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = make_plugin(tmp_path)
    socket_path = plugin.settings.socket
    (socket_path / "x").mkdir(parents=True)  # a non-empty directory where the socket goes
    with caplog.at_level("ERROR"):
        task = asyncio.create_task(plugin.run())
        for _ in range(100):
            if "docker_plugin_failed" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert "docker_plugin_failed" in caplog.text
        assert not task.done()
        # Positive control: once the path is usable, the retry serves.
        (socket_path / "x").rmdir()
        socket_path.rmdir()
        for _ in range(300):
            if socket_path.is_socket():
                break
            await asyncio.sleep(0.02)
        assert socket_path.is_socket()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not socket_path.exists()


# --- dual-stack ------------------------------------------------------------------

SUBNET6 = IPv6Network("fd00:10:244:3::/64")


def view6(egress: str = "masquerade", **changes: Any) -> HostView:
    dual = {"subnet6": SUBNET6, "cluster6": IPv6Network("fd00:10:244::/48")}
    return dataclasses.replace(view(egress), **(dual | changes))


def records6() -> Records:
    found = records()
    found.networks6[NET] = SUBNET6
    return found


def network_request6(pool6: str = str(SUBNET6), gateway6: str = "fd00:10:244:3::1/64") -> Any:
    return network_request(
        IPv6Data=[{"AddressSpace": "overlayd", "Pool": pool6, "Gateway": gateway6}]
    )


def test_dual_stack_create_network_takes_this_hosts_ipv6_subnet_too() -> None:
    assert plan.create_network(network_request6(), view6()) == (NET, SUBNET, SUBNET6)
    # Without --ipv6 a network on a dual-stack host is IPv4 only.
    assert plan.create_network(network_request(), view6()) == (NET, SUBNET, None)
    for request, text in (
        (network_request6("fd00:10:244:9::/64"), "not this host's subnet fd00:10:244:3::/64"),
        (network_request6("10.244.3.0/24"), "not an IPv6 network"),
        (network_request6(gateway6="fd00:10:244:3::9/64"), "bridge's address"),
        (network_request6(gateway6="10.244.3.1/24"), "not an IPv6 address"),
        (network_request(IPv6Data=[{"Pool": str(SUBNET6)}] * 2), "exactly one pool"),
    ):
        assert text in refused(plan.create_network, request, view6()).message
    # A host without an IPv6 subnet refuses --ipv6.
    assert "leave --ipv6 out" in refused(plan.create_network, network_request6(), view()).message


def test_dual_stack_endpoints_carry_both_addresses() -> None:
    request = endpoint_request(AddressIPv6="fd00:10:244:3::5/64")
    found = plan.create_endpoint(request, records6(), view6())
    assert found.address == IPv4Interface("10.244.3.5/24")
    assert found.address6 == IPv6Interface("fd00:10:244:3::5/64")
    # Positive control above; each of these is refused.
    assert (
        "AddressIPv6 is missing"
        in refused(plan.create_endpoint, endpoint_request(), records6(), view6()).message
    )
    assert (
        "not in the network's subnet"
        in refused(
            plan.create_endpoint,
            endpoint_request(AddressIPv6="fd00:10:244:9::5/64"),
            records6(),
            view6(),
        ).message
    )
    assert "IPv4 only" in refused(plan.create_endpoint, request, records(), view6()).message
    moved = view6(subnet6=IPv6Network("fd00:10:244:9::/64"))
    assert refused(plan.create_endpoint, request, records6(), moved).status == 409
    # An IPv4-only network on a dual-stack host: one address, as before.
    assert plan.create_endpoint(endpoint_request(), records(), view6()).address6 is None


def test_dual_stack_join_answers_for_both_families_per_egress_mode() -> None:
    _, peer = plan.veth_names(EP)
    for mode in ("masquerade", "none"):
        assert plan.join_response(view6(mode), EP, ipv6=True) == {
            "InterfaceName": {"SrcName": peer, "DstPrefix": "eth"},
            "Gateway": "10.244.3.1",
            "GatewayIPv6": "fd00:10:244:3::1",
        }
    answer = plan.join_response(view6("gwbridge"), EP, ipv6=True)
    assert "Gateway" not in answer and "GatewayIPv6" not in answer
    assert answer["StaticRoutes"] == [
        {"Destination": "10.244.0.0/16", "RouteType": 0, "NextHop": "10.244.3.1"},
        {"Destination": "fd00:10:244::/48", "RouteType": 0, "NextHop": "fd00:10:244:3::1"},
    ]
    # An endpoint without an IPv6 address (a network without --ipv6) gets IPv4 only.
    assert plan.join_response(view6("gwbridge"), EP) == plan.join_response(view("gwbridge"), EP)
    assert plan.join_response(view6(), EP) == plan.join_response(view(), EP)


def test_dual_stack_ipam_hands_out_ipv6_from_the_lower_half() -> None:
    answer = plan.request_pool({"AddressSpace": "overlayd", "Pool": "", "V6": True}, view6())
    # Shown as it is: libnetwork checks only IPv4 pools against the routes.
    assert answer == {"PoolID": "overlayd-fd00:10:244:3::/64", "Pool": str(SUBNET6), "Data": {}}
    assert view6().pool_id6 == answer["PoolID"]
    assert plan.request_pool({"V6": True, "Pool": str(SUBNET6)}, view6())["Pool"] == str(SUBNET6)
    assert (
        "not this host's subnet"
        in refused(plan.request_pool, {"V6": True, "Pool": "fd00:1::/64"}, view6()).message
    )
    assert plan.request_pool({"V6": False}, view6())["PoolID"] == "overlayd-10.244.3.0/24"
    pool = answer["PoolID"]
    gateway = plan.request_address(
        {"PoolID": pool, "Options": {"RequestAddressType": plan.GATEWAY_REQUEST}}, view6()
    )
    assert gateway.gateway and gateway.address == IPv6Address("fd00:10:244:3::1")
    plain = plan.request_address({"PoolID": pool}, view6())
    assert plain.subnet == SUBNET6 and plain.address is None
    last = "fd00:10:244:3:ffff:ffff:ffff:ffff"  # host-local has the upper half
    assert plan.request_address({"PoolID": pool, "Address": last}, view6()).address == (
        IPv6Address(last)
    )
    for address, text in (
        ("fd00:10:244:3::5", "outside host-local's range"),  # Docker's half
        ("fd00:10:244:9::5", "outside this host's subnet"),
        ("10.244.3.5", "not an IPv6 address"),
    ):
        assert (
            text
            in refused(plan.request_address, {"PoolID": pool, "Address": address}, view6()).message
        )
    assert plan.address_answer(IPv6Address("fd00:10:244:3::7"), SUBNET6) == {
        "Address": "fd00:10:244:3::7/64",
        "Data": {},
    }
    held = records6()
    released = plan.release_address({"PoolID": pool, "Address": "fd00:10:244:3::7"}, view6(), held)
    assert released == IPv6Address("fd00:10:244:3::7")
    assert refused(plan.request_address, {"PoolID": pool}, view()).status == 404  # no v6 here
    ipam = view6().host_local_ipam("/d", [SUBNET6])
    assert ipam["ranges"] == [
        [
            {
                "subnet": str(SUBNET6),
                "rangeStart": "fd00:10:244:3:8000::",
                "rangeEnd": last,
                "gateway": "fd00:10:244:3::1",
            }
        ]
    ]


def test_dual_stack_records_round_trip_and_old_records_still_read() -> None:
    found = records6()
    found.endpoints[EP] = Endpoint(
        NET, IPv4Interface("10.244.3.5/24"), address6=IPv6Interface("fd00:10:244:3::5/64")
    )
    found.addresses[IPv6Address("fd00:10:244:3::5")] = "docker-6"
    found.addresses[IPv4Address("10.244.3.5")] = "docker-4"
    again = Records.from_json(json.loads(json.dumps(found.to_json())))
    assert again == found
    assert again.network6(NET) == SUBNET6
    # A records file from before dual-stack: no networks6, no address6.
    old = {
        "networks": {NET: str(SUBNET)},
        "endpoints": {EP: {"network_id": NET, "address": "10.244.3.5/24"}},
        "addresses": {"10.244.3.5": "docker-4"},
    }
    before = Records.from_json(old)
    assert before.network6(NET) is None and before.endpoints[EP].address6 is None
    with pytest.raises(ValueError):
        Records.from_json({**old, "networks6": []})


async def test_dual_stack_docker_flow_through_the_server(tmp_path: Any) -> None:
    """Docker's calls for a --ipv6 network and one container, in its order."""
    cni = FakeCni()
    plugin = make_plugin(tmp_path, view6, cni=cni)
    await plugin.start()
    pools = {}
    for v6 in (False, True):
        status, answer = await call(plugin, "IpamDriver.RequestPool", {"Pool": "", "V6": v6})
        assert status == 200
        pools[v6] = answer["PoolID"]
        # libnetwork asks each pool for its gateway: the bridge's address of that family.
        gateway = {
            "PoolID": answer["PoolID"],
            "Options": {"RequestAddressType": plan.GATEWAY_REQUEST},
        }
        status, answer = await call(plugin, "IpamDriver.RequestAddress", gateway)
        assert (status, answer["Address"]) == (
            200,
            "fd00:10:244:3::1/64" if v6 else "10.244.3.1/24",
        )
    assert await call(plugin, "NetworkDriver.CreateNetwork", network_request6()) == (200, {})
    addresses = {}
    for v6, pool in pools.items():
        status, answer = await call(plugin, "IpamDriver.RequestAddress", {"PoolID": pool})
        assert status == 200
        addresses[v6] = answer["Address"]
        # host-local got this family's range alone: one address per request.
        assert len(cni.confs[-1]["ipam"]["ranges"]) == 1
    assert addresses == {False: "10.244.3.2/24", True: "fd00:10:244:3:8000::/64"}
    assert set(plugin.records.addresses) == {
        IPv4Address("10.244.3.2"),
        IPv6Address("fd00:10:244:3:8000::"),
    }
    request = endpoint_request(addresses[False], AddressIPv6=addresses[True])
    assert await call(plugin, "NetworkDriver.CreateEndpoint", request) == (
        200,
        {"Interface": {}},
    )
    ids = {"NetworkID": NET, "EndpointID": EP}
    status, answer = await call(
        plugin, "NetworkDriver.Join", {**ids, "SandboxKey": "/var/run/docker/netns/x"}
    )
    assert status == 200 and answer["GatewayIPv6"] == "fd00:10:244:3::1"
    status, info = await call(plugin, "NetworkDriver.EndpointOperInfo", ids)
    assert info["Value"]["address6"] == "fd00:10:244:3:8000::/64"
    ports = {plan.PORTMAP_OPTION: [{"Proto": 6, "Port": 80, "HostPort": 8080}]}
    status, _ = await call(
        plugin, "NetworkDriver.ProgramExternalConnectivity", {**ids, "Options": ports}
    )
    assert status == 200
    portmap = [c for c in cni.confs if c.get("type") == "portmap"][-1]
    assert [ip["address"] for ip in portmap["prevResult"]["ips"]] == [
        "10.244.3.2/24",
        "fd00:10:244:3:8000::/64",
    ]
    # Both released by their container IDs; the records survive a restart meanwhile.
    again = make_plugin(tmp_path, view6, cni=cni)
    await again.start()
    assert again.records == plugin.records
    for v6, pool in pools.items():
        address = addresses[v6].split("/")[0]
        release = {"PoolID": pool, "Address": address}
        assert await call(again, "IpamDriver.ReleaseAddress", release) == (200, {})
    assert not cni.store and not again.records.addresses


REAL_HOST_LOCAL = Path("/usr/lib/cni/host-local")


@pytest.mark.skipif(not REAL_HOST_LOCAL.exists(), reason="needs containernetworking-plugins")
async def test_real_host_local_keeps_one_store_for_overlay_cni_and_the_plugin_in_both_families(
    tmp_path: Path,
) -> None:
    """The real host-local: an overlay-cni container (dual-stack) and the
    plugin's requests of each family draw from one store, never the same
    address; the plugin's IPv6 reservations are found, released and
    repaired like its IPv4 ones."""
    from overlayd.cli.cni import delegate_configs
    from overlayd.nsexec import CniRunner
    from overlayd.surfaces.docker_plugin import HOST_NETNS

    runner = CniRunner()
    plugin = make_plugin(tmp_path, view6, cni=runner)
    await plugin.start()
    (tmp_path / "subnet.env").write_text(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd00:10:244::/48\nFLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\n"
        "FLANNEL_MTU=1450\nOVERLAYD_EGRESS=masquerade\n"
    )
    conf = {
        "cniVersion": "1.0.0",
        "name": "podman",
        "type": "overlay-cni",
        "subnetFile": str(tmp_path / "subnet.env"),
        "dataDir": str(tmp_path / "cni"),  # the plugin's cni_data_dir
    }
    ((_, bridge),) = delegate_configs(conf, "eth0")
    ipam = {"cniVersion": "1.0.0", "name": bridge["name"], "ipam": bridge["ipam"]}
    ok, result, raw = await runner("host-local", "ADD", ipam, container_id="pod1", netns=HOST_NETNS)
    assert ok, raw
    assert [ip["address"] for ip in result["ips"]] == ["10.244.3.2/24", "fd00:10:244:3:8000::/64"]

    v4 = await plugin._request_address({"PoolID": view6().pool_id})
    v6 = await plugin._request_address({"PoolID": view6().pool_id6})
    assert (v4["Address"], v6["Address"]) == ("10.244.3.3/24", "fd00:10:244:3:8000::1/64")
    store = plugin.settings.host_local_store
    assert {"10.244.3.2", "fd00:10:244:3:8000::", "10.244.3.3", "fd00:10:244:3:8000::1"} <= {
        p.name for p in store.iterdir()
    }
    found = plugin._reservations()
    assert found[IPv6Address("fd00:10:244:3:8000::")] == "pod1"
    assert found[IPv6Address("fd00:10:244:3:8000::1")].startswith(plan.CONTAINER_ID_PREFIX)

    # A released IPv6 address leaves the store; the podman container's stays.
    release = {"PoolID": view6().pool_id6, "Address": "fd00:10:244:3:8000::1"}
    assert await plugin._release_address(release) == {}
    names = {p.name for p in store.iterdir()}
    assert "fd00:10:244:3:8000::1" not in names and "fd00:10:244:3:8000::" in names
    assert "10.244.3.3" in names  # positive control: the plugin's IPv4 one is kept

    # An IPv6 reservation of the plugin's that no record holds is released
    # at the next start, as an IPv4 one would be.
    v6 = await plugin._request_address({"PoolID": view6().pool_id6})
    lost = IPv6Address(v6["Address"].split("/")[0])
    plugin.records.addresses.pop(lost)
    plugin._save()
    await make_plugin(tmp_path, view6, cni=runner).start()
    names = {p.name for p in store.iterdir()}
    assert str(lost) not in names and {"10.244.3.3", "fd00:10:244:3:8000::"} <= names


# --- endpoints for network policy ------------------------------------------------------


class FakeRegistry:
    """The daemon's endpoint registry as the plugin calls it; `refuse`
    makes register raise, as the registry does for a bad request or when
    no pass puts the endpoint in force in time."""

    def __init__(self) -> None:
        self.registered: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.refuse: str | None = None

    async def register(self, request: Any) -> dict[str, Any]:
        self.calls.append(("register", request["id"]))
        if self.refuse is not None:
            from overlayd.errors import EndpointError

            raise EndpointError(self.refuse)
        self.registered[request["id"]] = dict(request)
        return {"key": f"/overlayd/endpoints/h/{request['id']}", "revision": 7}

    async def unregister(self, request: Any) -> dict[str, Any]:
        self.calls.append(("unregister", request["id"]))
        existed = self.registered.pop(request["id"], None) is not None
        return {"existed": existed}


def registering_plugin(tmp_path: Any, registry: FakeRegistry, veths: FakeVeths) -> Any:
    from overlayd.surfaces.docker_plugin import DockerPlugin, PluginSettings

    return DockerPlugin(
        PluginSettings(tmp_path / "p.sock", tmp_path / "cni"),
        view=view,
        cni=FakeCni(),
        veths=veths,
        register=registry.register,
        unregister=registry.unregister,
    )


def test_driver_options_name_and_label_the_endpoint() -> None:
    options = {
        "com.docker.network.portmap": [],
        "overlayd.name": "web-1",
        "overlayd.label.app": "web",
        "overlayd.label.app.kubernetes.io/part-of": "shop",
    }
    assert plan.endpoint_identity(options) == (
        "web-1",
        {"app": "web", "app.kubernetes.io/part-of": "shop"},
    )
    assert plan.endpoint_identity({"com.docker.network.portmap": []}) == (None, {})
    # Refused, naming the option: a bad label never registers an
    # endpoint that its policies would not select.
    for bad_options, named in (
        ({"overlayd.label.app": "no spaces"}, "overlayd.label.app"),
        ({"overlayd.label.-x": "y"}, "overlayd.label.-x"),
        ({"overlayd.label.app": 5}, "overlayd.label.app"),
        ({"overlayd.name": ""}, "overlayd.name"),
        ({"overlayd.name": "a\nb"}, "overlayd.name"),
    ):
        error = refused(plan.endpoint_identity, bad_options)
        assert error.status == 400 and named in error.message
    # Through CreateEndpoint: refused there, before Join.
    request = endpoint_request()
    request["Options"] = {"overlayd.label.app": "no spaces"}
    refused(plan.create_endpoint, request, records(), view())
    request["Options"] = {"overlayd.label.app": "web", "overlayd.name": "web-1"}
    created = plan.create_endpoint(request, records(), view())
    assert (created.name, created.labels) == ("web-1", {"app": "web"})


async def test_join_registers_and_leave_unregisters(tmp_path: Any) -> None:
    registry, veths = FakeRegistry(), FakeVeths()
    plugin = registering_plugin(tmp_path, registry, veths)
    await plugin.start()
    assert await call(plugin, "NetworkDriver.CreateNetwork", network_request()) == (200, {})
    request = endpoint_request()
    request["Options"] = {"overlayd.label.app": "web", "overlayd.name": "web-1"}
    assert (await call(plugin, "NetworkDriver.CreateEndpoint", request))[0] == 200
    assert registry.registered == {}  # CreateEndpoint alone registers nothing
    join = {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/abc"}
    assert (await call(plugin, "NetworkDriver.Join", join))[0] == 200
    # Docker gave no MAC: the plugin picks one (from the ID), makes the
    # container's interface with it and registers it (link-local policy).
    mac = plan.endpoint_mac(EP)
    assert registry.registered[EP] == {
        "id": EP,
        "name": "web-1",
        "addresses": ["10.244.3.5"],
        "labels": {"app": "web"},
        "macs": [mac],
    }
    assert veths.macs[plan.veth_names(EP)[1]] == mac
    assert int(mac.split(":")[0], 16) & 3 == 2  # locally administered, unicast
    # The name and labels survive a restart of the plugin (the records).
    again = registering_plugin(tmp_path, registry, veths)
    await again.start()
    assert again.records.endpoints[EP].labels == {"app": "web"}
    ids = {"NetworkID": NET, "EndpointID": EP}
    assert await call(again, "NetworkDriver.Leave", ids) == (200, {})
    assert registry.registered == {}
    assert await call(again, "NetworkDriver.DeleteEndpoint", ids) == (200, {})
    assert registry.calls[-1] == ("unregister", EP)  # twice is no error


async def test_join_registers_the_mac_docker_gave(tmp_path: Any) -> None:
    registry, veths = FakeRegistry(), FakeVeths()
    plugin = registering_plugin(tmp_path, registry, veths)
    await plugin.start()
    assert await call(plugin, "NetworkDriver.CreateNetwork", network_request()) == (200, {})
    request = endpoint_request(MacAddress="02:42:0A:F4:03:05")
    assert (await call(plugin, "NetworkDriver.CreateEndpoint", request))[0] == 200
    join = {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/abc"}
    assert (await call(plugin, "NetworkDriver.Join", join))[0] == 200
    assert registry.registered[EP]["macs"] == ["02:42:0a:f4:03:05"]
    assert veths.macs[plan.veth_names(EP)[1]] == "02:42:0a:f4:03:05"


async def test_a_refused_registration_fails_the_join_and_takes_the_veth_away(
    tmp_path: Any,
) -> None:
    registry, veths = FakeRegistry(), FakeVeths()
    plugin = registering_plugin(tmp_path, registry, veths)
    await plugin.start()
    assert await call(plugin, "NetworkDriver.CreateNetwork", network_request()) == (200, {})
    assert (await call(plugin, "NetworkDriver.CreateEndpoint", endpoint_request()))[0] == 200
    join = {"NetworkID": NET, "EndpointID": EP, "SandboxKey": "/var/run/docker/netns/abc"}
    registry.refuse = "no pass put it in force within 10 s"
    status, answer = await call(plugin, "NetworkDriver.Join", join)
    assert status == 500 and "no pass put it in force" in answer["Err"]
    host, peer = plan.veth_names(EP)
    assert host not in veths.links and peer not in veths.links
    assert plugin.records.endpoints[EP].sandbox is None
    # A registration that timed out may be in etcd: it was taken back.
    assert registry.calls[-1] == ("unregister", EP)
    # Positive control: the same Join once the registry accepts; the name
    # defaults to the endpoint ID's first 12 digits.
    registry.refuse = None
    assert (await call(plugin, "NetworkDriver.Join", join))[0] == 200
    assert host in veths.links
    assert registry.registered[EP]["name"] == EP[:12]
