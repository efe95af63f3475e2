"""The Docker plugin's request handling (plan/docker_plugin.py): every
request parsed and checked, every refusal a PluginError with Docker's error
shape, and the answers that depend on the egress mode."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import pytest

from overlayd.plan import docker_plugin as plan
from overlayd.plan.docker_plugin import Endpoint, HostView, PluginError, Records

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
    assert plan.create_network(network_request(), view()) == (NET, SUBNET)
    assert plan.create_network(network_request("0.0.0.0/0"), view()) == (NET, SUBNET)
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
    assert plan.release_address({"PoolID": pool, "Address": "10.244.3.7"}, view()) == IPv4Address(
        "10.244.3.7"
    )
    assert (
        "outside"
        in refused(plan.release_address, {"PoolID": pool, "Address": "10.9.9.9"}, view()).message
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

    plugin = DockerPlugin(PluginSettings(tmp_path / "p.sock", tmp_path / "cni"), view=view)
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
