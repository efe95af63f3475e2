"""The network config follows flannel's schema, defaults and validation rules."""

from __future__ import annotations

import contextlib
import json
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlayd.config import parse_network_config, render_network_config
from overlayd.errors import ConfigError


def parse(**fields: object) -> object:
    return parse_network_config(json.dumps(fields))


def test_defaults_for_a_slash_16_match_flannel() -> None:
    cfg = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    assert cfg.subnet_len == 24
    assert cfg.subnet_min == IPv4Address("10.244.1.0")  # the first subnet is skipped
    assert cfg.subnet_max == IPv4Address("10.244.255.0")
    assert cfg.backend.vni == 1
    assert cfg.backend.port == 8472
    assert cfg.backend.mtu is None


def test_subnet_len_defaults_to_24_up_to_a_slash_22() -> None:
    assert parse_network_config('{"Network": "10.0.0.0/22"}').subnet_len == 24


def test_subnet_len_defaults_to_four_subnets_for_small_networks() -> None:
    cfg = parse_network_config('{"Network": "10.0.0.0/26"}')
    assert cfg.subnet_len == 28
    assert cfg.subnet_min == IPv4Address("10.0.0.16")
    assert cfg.subnet_max == IPv4Address("10.0.0.48")


def test_missing_backend_means_vxlan() -> None:
    assert parse_network_config('{"Network": "10.0.0.0/16"}').backend.type == "vxlan"


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({}, "Network", "required"),
        ({"Network": "10.0.0.0/33"}, "Network", "not an IPv4 network"),
        ({"Network": "10.0.0.1/16"}, "Network", "not an IPv4 network"),
        ({"Network": "10.0.0.0/29"}, "Network", "too small"),
        ({"Network": "10.0.0.0/16", "SubnetLen": 31}, "SubnetLen", "at most 30"),
        ({"Network": "10.0.0.0/16", "SubnetLen": 17}, "SubnetLen", "fewer than four"),
        ({"Network": "10.0.0.0/16", "SubnetLen": "24"}, "SubnetLen", "integer"),
        ({"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"}, "SubnetMin", "not in Network"),
        ({"Network": "10.0.0.0/16", "SubnetMax": "10.0.3.7"}, "SubnetMax", "boundary"),
        (
            {"Network": "10.0.0.0/16", "SubnetMin": "10.0.9.0", "SubnetMax": "10.0.2.0"},
            "SubnetMin",
            "above SubnetMax",
        ),
        ({"Network": "10.0.0.0/16", "Backend": {"Type": "udp"}}, "Backend.Type", "not supported"),
        ({"Network": "10.0.0.0/16", "Backend": {"VNI": 1 << 24}}, "Backend.VNI", "between"),
        ({"Network": "10.0.0.0/16", "Backend": {"VNI": True}}, "Backend.VNI", "integer"),
        ({"Network": "10.0.0.0/16", "Backend": {"Port": 70000}}, "Backend.Port", "between"),
        ({"Network": "10.0.0.0/16", "Backend": {"MTU": 100}}, "Backend.MTU", "between"),
        ({"Network": "10.0.0.0/16", "Backend": "vxlan"}, "Backend", "object"),
    ],
)
def test_invalid_config_is_refused_naming_the_field(
    fields: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_network_config(json.dumps(fields))
    assert caught.value.field == field
    assert words in str(caught.value)


def test_non_json_and_non_object_configs_are_refused() -> None:
    for text in ("{", "[1]", b"\xff", "[" * 5000):
        with pytest.raises(ConfigError) as caught:
            parse_network_config(text)
        assert caught.value.field == "config"


def test_render_parses_back_to_the_same_config() -> None:
    cfg = parse_network_config(
        '{"Network": "10.5.0.0/16", "SubnetLen": 26,'
        ' "Backend": {"VNI": 7, "Port": 4789, "MTU": 1400}}'
    )
    assert parse_network_config(render_network_config(cfg)) == cfg


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_any_json_value_parses_or_fails_with_config_error(value: object) -> None:
    with contextlib.suppress(ConfigError):
        parse_network_config(json.dumps(value))


@given(prefix=st.integers(8, 28), subnet_len=st.one_of(st.none(), st.integers(8, 30)))
def test_valid_configs_have_aligned_bounds_inside_the_network(
    prefix: int, subnet_len: int | None
) -> None:
    fields: dict[str, object] = {"Network": str(IPv4Network(("10.0.0.0", prefix), strict=False))}
    if subnet_len is not None:
        fields["SubnetLen"] = subnet_len
    try:
        cfg = parse_network_config(json.dumps(fields))
    except ConfigError:
        return
    size = 1 << (32 - cfg.subnet_len)
    assert cfg.subnet_min in cfg.network and cfg.subnet_max in cfg.network
    assert int(cfg.subnet_min) % size == 0 and int(cfg.subnet_max) % size == 0
    assert cfg.subnet_min <= cfg.subnet_max


def test_host_gw_and_direct_routing_are_read_and_checked() -> None:
    host_gw = parse_network_config('{"Network": "10.0.0.0/16", "Backend": {"Type": "host-gw"}}')
    assert host_gw.backend.type == "host-gw" and not host_gw.backend.direct_routing
    direct = parse_network_config(
        '{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}'
    )
    assert direct.backend.direct_routing
    assert parse_network_config(render_network_config(direct)) == direct
    for bad in ('{"Type": "host-gw", "DirectRouting": true}', '{"DirectRouting": "yes"}'):
        with pytest.raises(ConfigError) as caught:
            parse_network_config('{"Network": "10.0.0.0/16", "Backend": ' + bad + "}")
        assert caught.value.field == "Backend.DirectRouting"


# --- ServiceNetwork and IPv6ServiceNetwork (overlayd's own fields) -------------

DUAL = {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"}


def test_service_networks_are_read_and_render_back() -> None:
    cfg = parse_network_config(
        json.dumps(DUAL | {"ServiceNetwork": "10.96.0.0/16", "IPv6ServiceNetwork": "fd00:96::/112"})
    )
    assert cfg.service_network == IPv4Network("10.96.0.0/16")
    assert cfg.service_network6 == IPv6Network("fd00:96::/112")
    assert cfg.service_networks == (cfg.service_network, cfg.service_network6)
    assert parse_network_config(render_network_config(cfg)) == cfg
    # Without them: no services, and the rendered config does not invent them.
    plain = parse_network_config(json.dumps(DUAL))
    assert plain.service_networks == ()
    assert "ServiceNetwork" not in render_network_config(plain)
    assert parse_network_config(render_network_config(plain)) == plain


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"ServiceNetwork": 10}, "ServiceNetwork", "IPv4 CIDR"),
        ({"ServiceNetwork": ""}, "ServiceNetwork", "IPv4 CIDR"),
        ({"ServiceNetwork": "10.96.0.1/16"}, "ServiceNetwork", "not an IPv4 network"),
        ({"ServiceNetwork": "fd00:96::/112"}, "ServiceNetwork", "not an IPv4 network"),
        ({"ServiceNetwork": "10.96.0.0/29"}, "ServiceNetwork", "too small"),
        ({"ServiceNetwork": "10.244.128.0/20"}, "ServiceNetwork", "overlaps Network"),
        ({"ServiceNetwork": "10.0.0.0/8"}, "ServiceNetwork", "overlaps Network"),
        ({"ServiceNetwork": "224.0.0.0/16"}, "ServiceNetwork", "not a unicast"),
        ({"ServiceNetwork": "127.0.0.0/16"}, "ServiceNetwork", "not a unicast"),
        ({"IPv6ServiceNetwork": "10.96.0.0/16"}, "IPv6ServiceNetwork", "not an IPv6 network"),
        ({"IPv6ServiceNetwork": "fd00:96::/125"}, "IPv6ServiceNetwork", "too small"),
        ({"IPv6ServiceNetwork": "fd00:10:244:7::/64"}, "IPv6ServiceNetwork", "overlaps"),
        ({"IPv6ServiceNetwork": "ff00::/112"}, "IPv6ServiceNetwork", "not a unicast"),
    ],
)
def test_bad_service_networks_are_refused_naming_the_field(
    fields: dict[str, object], field: str, words: str
) -> None:
    # Positive control: the same config without the bad field is fine.
    parse_network_config(json.dumps(DUAL | {"ServiceNetwork": "10.96.0.0/16"}))
    with pytest.raises(ConfigError) as caught:
        parse_network_config(json.dumps(DUAL | fields))
    assert caught.value.field == field
    assert words in caught.value.reason


def test_ipv6_service_network_needs_ipv6_containers() -> None:
    ok = {"Network": "10.244.0.0/16", "ServiceNetwork": "10.96.0.0/28"}
    assert parse_network_config(json.dumps(ok)).service_network == IPv4Network("10.96.0.0/28")
    with pytest.raises(ConfigError) as caught:
        parse_network_config(json.dumps(ok | {"IPv6ServiceNetwork": "fd00:96::/112"}))
    assert caught.value.field == "IPv6ServiceNetwork" and "EnableIPv6" in caught.value.reason
