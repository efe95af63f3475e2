"""Endpoint registrations are untrusted: every bad one is rejected with its
reason, never used, and two endpoints claiming one address are both
rejected. A registration's gwbridge addresses and MAC are used by its own
host alone. Labels from people and engines follow Kubernetes' syntax."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlayd.errors import EndpointError
from overlayd.plan import endpoints
from overlayd.plan.endpoints import (
    MAX_ENDPOINT_BYTES,
    EndpointCache,
    LabelChanges,
    endpoint_key,
    endpoints_prefix,
    host_endpoints_prefix,
    host_id,
    labels_from_cni,
    parse_endpoint,
    parse_endpoint_key,
    parse_label_changes,
    parse_labels,
    render_endpoint,
    select_endpoints,
    without_label_args,
)
from overlayd.plan.policy_model import Endpoint, HostSubnets, MacAddress

PREFIX = "/overlayd"
HOST = "10.244.1.0-24"
OTHER = "10.244.2.0-24"
HOSTS = {
    HOST: HostSubnets(IPv4Network("10.244.1.0/24"), IPv6Network("fd00:10:244:1::/64")),
    OTHER: HostSubnets(IPv4Network("10.244.2.0/24")),
}
DROP = object()


def value(**changes: object) -> bytes:
    raw: dict[str, object] = {
        "name": "web-1",
        "host": HOST,
        "hostname": "node-1",
        "addresses": ["10.244.1.5", "fd00:10:244:1::5"],
        "labels": {"app": "web", "example.com/tier": "front"},
        "registered": 1_700_000_000.5,
    }
    raw.update(changes)
    return json.dumps({k: v for k, v in raw.items() if v is not DROP}).encode()


def key(ident: str = "c0ffee", host: str = HOST) -> str:
    return endpoint_key(PREFIX, host, ident)


def test_keys() -> None:
    assert host_id(IPv4Network("10.244.1.0/24")) == HOST
    assert endpoints_prefix("/overlayd/") == "/overlayd/endpoints/"
    assert host_endpoints_prefix(PREFIX, HOST) == "/overlayd/endpoints/10.244.1.0-24/"
    assert key("abc_1.2-3") == "/overlayd/endpoints/10.244.1.0-24/abc_1.2-3"
    assert parse_endpoint_key(key("abc"), PREFIX) == (HOST, "abc")
    assert parse_endpoint_key(key("x" * 128), PREFIX) == (HOST, "x" * 128)


@pytest.mark.parametrize(
    "bad",
    [
        "/overlayd/policies/x",
        "/overlayd/endpoints/10.244.1.0-24",
        "/overlayd/endpoints/10.244.1.0-24/",
        "/overlayd/endpoints/10.244.1.0-24/a/b",
        "/overlayd/endpoints/10.244.1.1-24/a",
        "/overlayd/endpoints/10.244.1.0-99/a",
        "/overlayd/endpoints/node1/a",
        "/overlayd/endpoints/10.244.1.0-24/" + "x" * 129,
        "/overlayd/endpoints/10.244.1.0-24/a b",
    ],
)
def test_bad_keys(bad: str) -> None:
    with pytest.raises(EndpointError):
        parse_endpoint_key(bad, PREFIX)
    with pytest.raises(EndpointError):
        parse_endpoint(bad, value(), PREFIX, HOSTS)
    parse_endpoint_key(key(), PREFIX)  # positive control


def test_endpoint_key_refuses_what_it_could_not_read_back() -> None:
    with pytest.raises(EndpointError, match="id"):
        endpoint_key(PREFIX, HOST, "a/b")
    with pytest.raises(EndpointError, match="host"):
        endpoint_key(PREFIX, "10.244.1.0/24", "a")


def test_parse_a_registration() -> None:
    found = parse_endpoint(key(), value(), PREFIX, HOSTS)
    assert found == Endpoint(
        key=key(),
        id="c0ffee",
        host=HOST,
        name="web-1",
        addresses=(ip_address("10.244.1.5"), ip_address("fd00:10:244:1::5")),
        labels={"app": "web", "example.com/tier": "front"},
        registered=1_700_000_000.5,
        hostname="node-1",
    )
    assert parse_endpoint(key(), render_endpoint(found), PREFIX, HOSTS) == found
    # IPv6 first, unknown fields (a newer writer's), no hostname, no labels
    other = value(
        addresses=["fd00:10:244:1::9", "10.244.1.9"], future={"x": 1}, hostname=DROP, labels=DROP
    )
    parsed = parse_endpoint(key(), other, PREFIX, HOSTS)
    assert [str(x) for x in parsed.addresses] == ["10.244.1.9", "fd00:10:244:1::9"]
    assert parsed.labels == {} and parsed.hostname == ""


LABEL_KEYS = st.sampled_from(["app", "a", "example.com/tier", "k8s.pod.namespace", "A-b_c.D9"])
LABEL_VALUES = st.sampled_from(["", "web", "X.y_z-0", "9" * 63])


@given(
    st.dictionaries(LABEL_KEYS, LABEL_VALUES, max_size=5),
    st.integers(2, 254),
    st.text(st.characters(categories=["L", "N", "P"], include_characters=" "), max_size=40),
    st.floats(0, 4e9),
)
def test_render_parse_round_trip(
    labels: dict[str, str], last: int, name: str, registered: float
) -> None:
    endpoint = Endpoint(
        key=key(),
        id="c0ffee",
        host=HOST,
        name=name,
        addresses=(ip_address(f"10.244.1.{last}"),),
        labels=labels,
        registered=registered,
    )
    assert parse_endpoint(key(), render_endpoint(endpoint), PREFIX, HOSTS) == endpoint


@given(
    st.one_of(
        st.text(st.sampled_from("0123456789.:"), max_size=20),
        st.integers(0, 2**32 - 1).map(lambda i: str(ip_address(i))),
        st.lists(st.integers(0, 300), min_size=4, max_size=4).map(
            lambda octets: ".".join(f"{o:0{1 + o % 3}d}" for o in octets)  # some leading zeros
        ),
        st.text(max_size=20),
    )
)
def test_an_address_reads_as_ipaddress_reads_it(text: str) -> None:
    """The registrations' fast IPv4 reader accepts and refuses exactly
    what ipaddress.ip_address does, leading zeros and non-ASCII digits
    included, and gives the same address."""
    try:
        wanted: object = ip_address(text)
    except ValueError:
        wanted = ValueError
    try:
        got: object = endpoints._ip(text)
    except ValueError:
        got = ValueError
    assert got == wanted and type(got) is type(wanted)


@given(
    st.one_of(
        st.just(value()),
        st.binary(max_size=12),
        st.sampled_from(["utf-8", "utf-16", "utf-16-le", "utf-32-be", "utf-8-sig"]).map(
            lambda codec: value().decode().encode(codec)
        ),
    )
)
def test_a_value_decodes_as_json_loads_decodes_it(raw: bytes) -> None:
    """The registrations' JSON fast path (UTF-8 decoded up front) reads the
    same data, and refuses the same values, as json.loads given the bytes
    (which detects UTF-16 and UTF-32 too)."""
    try:
        wanted: object = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        wanted = ValueError
    try:
        got: object = json.loads(endpoints._utf8(raw))
    except (ValueError, UnicodeDecodeError):
        got = ValueError
    assert repr(got) == repr(wanted)  # repr: NaN is a value json reads, unequal to itself


BAD_VALUES: list[tuple[str, bytes, str]] = [
    ("too-big", value(labels={f"k{i}": "v" * 60 for i in range(200)}), "bytes, more than 8192"),
    ("not-json", b"{name: x}", "not valid JSON"),
    ("not-utf8", b'{"name": "\xff"}', "not valid JSON"),
    ("not-object", b"[1]", "not a JSON object"),
    ("host-differs", value(host=OTHER), "differs from the key's"),
    ("no-host", value(host=DROP), "differs from the key's"),
    ("no-name", value(name=DROP), "name: null is not a string"),
    ("name-type", value(name=7), "name: 7 is not a string"),
    ("name-long", value(name="x" * 254), "longer than 253"),
    ("name-control", value(name="web\n1"), "unprintable"),
    ("hostname-type", value(hostname=["x"]), "hostname:"),
    ("no-addresses", value(addresses=DROP), "addresses: null"),
    ("empty-addresses", value(addresses=[]), "one or two addresses"),
    (
        "three-addresses",
        value(addresses=["10.244.1.5", "10.244.1.6", "fd00:10:244:1::5"]),
        "one or two",
    ),
    ("address-type", value(addresses=[5]), "addresses[0]: 5 is not a string"),
    ("not-an-address", value(addresses=["10.244.1.300"]), "not an IP address"),
    (
        "outside-subnet",
        value(addresses=["10.244.2.5"]),
        "10.244.2.5 is outside host 10.244.1.0-24's subnets",
    ),
    (
        "outside-v6",
        value(addresses=["10.244.1.5", "fd00:10:244:2::5"]),
        "addresses[1]: fd00:10:244:2::5 is outside",
    ),
    ("same-family", value(addresses=["10.244.1.5", "10.244.1.6"]), "two IPv4 addresses"),
    ("gateway", value(addresses=["10.244.1.1"]), "gateway"),
    ("network", value(addresses=["10.244.1.0"]), "network, gateway or broadcast"),
    ("broadcast", value(addresses=["10.244.1.255"]), "broadcast"),
    ("v6-gateway", value(addresses=["fd00:10:244:1::1"]), "gateway"),
    ("labels-type", value(labels=["app=web"]), "labels: not an object"),
    ("label-key", value(labels={"a b": "x"}), "labels: label key"),
    ("label-value", value(labels={"app": "a" * 64}), "labels: label value"),
    ("label-value-type", value(labels={"app": 1}), "quote it"),
    ("registered-negative", value(registered=-1), "registered:"),
    ("registered-nan", value(registered=float("nan")), "registered:"),
    ("registered-bool", value(registered=True), "registered:"),
    ("registered-text", value(registered="yesterday"), "registered:"),
]


@pytest.mark.parametrize(
    ("raw", "reason"), [pytest.param(raw, reason, id=name) for name, raw, reason in BAD_VALUES]
)
def test_bad_values_are_refused_with_their_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(EndpointError) as caught:
        parse_endpoint(key(), raw, PREFIX, HOSTS)
    assert reason in str(caught.value), str(caught.value)
    parse_endpoint(key(), value(), PREFIX, HOSTS)  # positive control


def test_unknown_host_and_ipv6_without_a_lease() -> None:
    unknown = key(host="10.244.9.0-24")
    with pytest.raises(EndpointError, match=r"host 10\.244\.9\.0-24 has no lease"):
        parse_endpoint(
            unknown, value(host="10.244.9.0-24", addresses=["10.244.9.5"]), PREFIX, HOSTS
        )
    # OTHER has no IPv6 subnet: an IPv6 address cannot be inside it.
    other = value(host=OTHER, addresses=["10.244.2.5", "fd00:10:244:2::5"])
    with pytest.raises(
        EndpointError, match=r"outside host 10\.244\.2\.0-24's subnets \(10\.244\.2\.0/24\)"
    ):
        parse_endpoint(key(host=OTHER), other, PREFIX, HOSTS)
    assert parse_endpoint(
        key(host=OTHER), value(host=OTHER, addresses=["10.244.2.5"]), PREFIX, HOSTS
    )


def test_render_refuses_an_oversized_value() -> None:
    endpoint = parse_endpoint(key(), value(), PREFIX, HOSTS)
    big = replace(endpoint, labels={f"k{i}": "v" * 60 for i in range(200)})
    with pytest.raises(EndpointError, match=f"more than {MAX_ENDPOINT_BYTES}"):
        render_endpoint(big)
    assert len(render_endpoint(endpoint)) < 300


# --- what only the endpoint's own host uses ----------------------------------------

GWBRIDGE = (IPv4Network("172.18.0.0/16"), IPv6Network("fd4a:4eae:8d08::/64"))
# HOST read by itself (its gwbridge's subnets known), OTHER by HOST.
OWN = {
    HOST: replace(HOSTS[HOST], own=True, gwbridge=GWBRIDGE),
    OTHER: HOSTS[OTHER],
}
EXTRAS = {
    "gwbridge_addresses": ["fd4a:4eae:8d08::5", "172.18.0.5"],
    "macs": ["0A:58:0A:F4:01:05", "0a:58:ac:12:00:05"],
}


def test_the_own_host_reads_gwbridge_addresses_and_mac_and_others_drop_them() -> None:
    mine = parse_endpoint(key(), value(**EXTRAS), PREFIX, OWN)
    assert mine.gwbridge_addresses == (ip_address("172.18.0.5"), ip_address("fd4a:4eae:8d08::5"))
    assert mine.macs == (MacAddress.parse("0a:58:0a:f4:01:05"), MacAddress(0x0A58AC120005))
    assert [str(m) for m in mine.macs] == ["0a:58:0a:f4:01:05", "0a:58:ac:12:00:05"]
    # Written back as read; a registration without them reads as before.
    assert parse_endpoint(key(), render_endpoint(mine), PREFIX, OWN) == mine
    plain = parse_endpoint(key(), value(), PREFIX, OWN)
    assert b"macs" not in render_endpoint(plain) and b"gwbridge" not in render_endpoint(plain)
    # Another host reads the same value without them: every host's gwbridge
    # has the same subnet, and a MAC names a port of one bridge only.
    theirs = parse_endpoint(key(), value(**EXTRAS), PREFIX, HOSTS)
    assert theirs.gwbridge_addresses == () and theirs.macs == ()
    assert replace(mine, gwbridge_addresses=(), macs=()) == theirs


def test_a_gwbridge_address_outside_the_gwbridge_is_left_out_not_refused() -> None:
    """A container that kept its address after the gwbridge's subnet (or the
    egress mode) changed can send nothing from it; its registration keeps
    its overlay addresses, and so its policies."""
    stale = parse_endpoint(
        key(), value(gwbridge_addresses=["172.19.0.5", "fd4a:4eae:8d08::5"]), PREFIX, OWN
    )
    assert stale.gwbridge_addresses == (ip_address("fd4a:4eae:8d08::5"),)
    assert stale.addresses  # still an endpoint
    masquerade = {HOST: replace(HOSTS[HOST], own=True)}  # no gwbridge at all
    assert parse_endpoint(key(), value(**EXTRAS), PREFIX, masquerade).gwbridge_addresses == ()


BAD_EXTRAS: list[tuple[str, dict[str, object], str]] = [
    ("gw-type", {"gwbridge_addresses": "172.18.0.5"}, "not a list of up to two"),
    ("gw-three", {"gwbridge_addresses": ["172.18.0.5"] * 3}, "not a list of up to two"),
    ("gw-not-address", {"gwbridge_addresses": ["172.18.0.500"]}, "not an IP address"),
    ("gw-number", {"gwbridge_addresses": [5]}, "gwbridge_addresses[0]: 5 is not an IP"),
    ("gw-same-family", {"gwbridge_addresses": ["172.18.0.5", "172.18.0.6"]}, "two IPv4"),
    ("gw-gateway", {"gwbridge_addresses": ["172.18.0.1"]}, "gateway"),
    ("gw-v6-gateway", {"gwbridge_addresses": ["fd4a:4eae:8d08::1"]}, "gateway"),
    ("macs-type", {"macs": "0a:58:0a:f4:01:05"}, "not a list of up to two MAC"),
    ("macs-three", {"macs": ["0a:58:0a:f4:01:05"] * 3}, "not a list of up to two MAC"),
    ("mac-type", {"macs": [5]}, "macs[0]: 5 is not a string"),
    ("mac-form", {"macs": ["0a:58:0a:f4:01"]}, "not a MAC address"),
    ("mac-group", {"macs": ["01:00:5e:00:00:01"]}, "not a unicast"),
    ("mac-zero", {"macs": ["00:00:00:00:00:00"]}, "not a unicast"),
    ("mac-twice", {"macs": ["0a:58:0a:f4:01:05", "0A:58:0A:F4:01:05"]}, "given twice"),
]


@pytest.mark.parametrize(
    ("extra", "reason"), [pytest.param(e, r, id=name) for name, e, r in BAD_EXTRAS]
)
def test_bad_gwbridge_addresses_and_macs_are_refused(extra: dict[str, object], reason: str) -> None:
    with pytest.raises(EndpointError) as caught:
        parse_endpoint(key(), value(**extra), PREFIX, OWN)
    assert reason in str(caught.value), str(caught.value)
    parse_endpoint(key(), value(**EXTRAS), PREFIX, OWN)  # positive control


def test_two_endpoints_of_this_host_claiming_one_gwbridge_address_or_mac_are_rejected() -> None:
    raw = {
        key("a"): value(addresses=["10.244.1.5"], gwbridge_addresses=["172.18.0.5"]),
        key("b"): value(addresses=["10.244.1.6"], gwbridge_addresses=["172.18.0.5"]),
        key("c"): value(addresses=["10.244.1.7"], macs=["0a:58:0a:f4:01:07"]),
        key("d"): value(addresses=["10.244.1.8"], macs=["0a:58:0a:f4:01:07"]),
        key("e"): value(addresses=["10.244.1.9"], gwbridge_addresses=["172.18.0.9"]),
        # Another host's gwbridge has the same subnet: its addresses are no clash.
        key("f", OTHER): value(
            host=OTHER, addresses=["10.244.2.5"], gwbridge_addresses=["172.18.0.9"]
        ),
    }
    selection = select_endpoints(raw, PREFIX, OWN)
    assert [e.id for e in selection.endpoints] == ["e", "f"]
    assert "address 172.18.0.5 is also claimed by" in selection.rejected[key("a")]
    assert "address 0a:58:0a:f4:01:07 is also claimed by" in selection.rejected[key("c")]
    assert set(selection.rejected) == {key("a"), key("b"), key("c"), key("d")}


# --- selection -------------------------------------------------------------------


def test_select_rejects_bad_ones_and_both_claimants_of_an_address() -> None:
    raw = {
        key("good"): value(addresses=["10.244.1.5"]),
        key("twin-a"): value(addresses=["10.244.1.6", "fd00:10:244:1::6"]),
        key("twin-b"): value(addresses=["fd00:10:244:1::6"]),
        key("outside"): value(addresses=["10.244.2.5"]),
        key("elsewhere", OTHER): value(host=OTHER, addresses=["10.244.2.5"]),
        key("orphan", "10.244.9.0-24"): value(host="10.244.9.0-24", addresses=["10.244.9.5"]),
        "/overlayd/endpoints/garbage": b"{}",
        "/overlayd/policies/not-an-endpoint": b"{}",
    }
    selection = select_endpoints(raw, PREFIX, HOSTS)
    assert [e.id for e in selection.endpoints] == ["good", "elsewhere"]
    assert set(selection.rejected) == {
        key("twin-a"),
        key("twin-b"),
        key("outside"),
        key("orphan", "10.244.9.0-24"),
        "/overlayd/endpoints/garbage",
    }
    assert selection.rejected[key("twin-a")] == (
        f"address fd00:10:244:1::6 is also claimed by {key('twin-b')} (neither is used)"
    )
    assert key("twin-a") in selection.rejected[key("twin-b")]
    assert "outside" in selection.rejected[key("outside")]
    assert "no lease" in selection.rejected[key("orphan", "10.244.9.0-24")]
    # Without the twin, its partner is used again.
    del raw[key("twin-b")]
    assert key("twin-a") in [e.key for e in select_endpoints(raw, PREFIX, HOSTS).endpoints]


def test_select_cache_reuses_unchanged_values_and_follows_lease_changes() -> None:
    cache: EndpointCache = {}
    raw = {key(f"c{i}"): value(addresses=[f"10.244.1.{2 + 2 * i}"]) for i in range(5)}
    first = select_endpoints(raw, PREFIX, HOSTS, cache)
    again = select_endpoints(dict(raw), PREFIX, dict(HOSTS), cache)
    assert all(x is y for x, y in zip(first.endpoints, again.endpoints, strict=True))
    # An equal but new HostSubnets (a new pass) keeps the parsed values.
    renewed = {HOST: HostSubnets(IPv4Network("10.244.1.0/24"), IPv6Network("fd00:10:244:1::/64"))}
    assert select_endpoints(raw, PREFIX, renewed, cache).endpoints[0] is first.endpoints[0]
    # The host's lease moves: every endpoint on it is checked again.
    moved = {HOST: HostSubnets(IPv4Network("10.244.1.0/29"))}
    after = select_endpoints(raw, PREFIX, moved, cache)
    assert [e.id for e in after.endpoints] == ["c0", "c1", "c2"]  # .2, .4 and .6
    assert "outside" in after.rejected[key("c3")] and "outside" in after.rejected[key("c4")]
    # The lease gone: nothing on that host is used.
    assert select_endpoints(raw, PREFIX, {}, cache).endpoints == ()
    # A changed value is parsed again; a removed key leaves the cache.
    raw[key("c0")] = value(addresses=["10.244.1.200"], labels={"app": "db"})
    del raw[key("c1")]
    last = select_endpoints(raw, PREFIX, HOSTS, cache)
    assert last.endpoints[0].labels == {"app": "db"} and set(cache) == set(raw)


def test_select_ten_thousand_endpoints() -> None:
    """O(n), with the cache making a pass over unchanged values cheap
    (generous bounds: a shared CPU; measured figures in the report)."""
    hosts = {
        host_id(IPv4Network(f"10.{h}.0.0/16")): HostSubnets(IPv4Network(f"10.{h}.0.0/16"))
        for h in range(10)
    }
    raw = {}
    for i in range(10_000):
        h, n = i % 10, i // 10 + 2
        host = f"10.{h}.0.0-16"
        raw[endpoint_key(PREFIX, host, f"c{i}")] = json.dumps(
            {
                "name": f"c{i}",
                "host": host,
                "addresses": [f"10.{h}.{n // 256}.{n % 256}"],
                "labels": {"app": f"a{i % 50}", "tier": "x"},
                "registered": 1.0,
            }
        ).encode()
    cache: EndpointCache = {}
    started = time.perf_counter()
    cold = select_endpoints(raw, PREFIX, hosts, cache)
    middle = time.perf_counter()
    warm = select_endpoints(raw, PREFIX, hosts, cache)
    done = time.perf_counter()
    assert len(cold.endpoints) == len(warm.endpoints) == 10_000 and not cold.rejected
    assert middle - started < 5.0 and done - middle < 1.0, (middle - started, done - middle)


# --- labels from people ------------------------------------------------------------


def test_label_changes() -> None:
    changes = parse_label_changes(["app=web", "tier=", "example.com/old-"])
    assert changes == LabelChanges({"app": "web", "tier": ""}, frozenset({"example.com/old"}))
    assert changes.apply({"app": "db", "example.com/old": "x", "keep": "y"}) == {
        "app": "web",
        "tier": "",
        "keep": "y",
    }


@pytest.mark.parametrize(
    ("items", "reason"),
    [
        (["app"], "write key=value"),
        (["=web"], "label key"),
        (["app=web app"], "label value"),
        (["app=" + "x" * 64], "longer than 63"),
        (["bad key=x"], "label key"),
        (["-"], "label key"),
        (["app=a", "app=b"], "given twice"),
        (["app=a", "app-"], "given twice"),
    ],
)
def test_bad_label_arguments(items: list[str], reason: str) -> None:
    with pytest.raises(EndpointError, match=reason):
        parse_label_changes(items)
    assert parse_label_changes(["app=a"]).set == {"app": "a"}  # positive control


def test_parse_labels_refuses_removals() -> None:
    with pytest.raises(EndpointError, match="app-"):
        parse_labels(["app-"])
    with pytest.raises(EndpointError, match="label value"):
        parse_labels(["c=d=e"])  # '=' is no label character
    assert parse_labels(["a=b", "c="]) == {"a": "b", "c": ""}


# --- labels from CNI ---------------------------------------------------------------


def test_labels_from_cni_sources_and_precedence() -> None:
    config = {
        "cniVersion": "1.0.0",
        "type": "overlay-cni",
        "args": {
            "labels": {"app": "from-args", "tier": "web"},
            "cni": {"labels": [{"key": "team", "value": "blue"}, {"key": "app", "value": "cni"}]},
        },
        "runtimeConfig": {"labels": [{"key": "app", "value": "runtime"}]},
    }
    cni_args = (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-7d4;"
        "K8S_POD_INFRA_CONTAINER_ID=abc;IP=10.0.0.5"
    )
    assert labels_from_cni(config, cni_args) == {
        "app": "runtime",
        "tier": "web",
        "team": "blue",
        "k8s.pod.namespace": "prod",
        "k8s.pod.name": "web-7d4",
    }
    assert labels_from_cni(None, None) == {}
    assert labels_from_cni({"args": {"cni": {"ips": ["10.0.0.5"]}}}, "IgnoreUnknown=1") == {}
    # A pod name longer than a label value may be is left out, not fatal.
    long_name = "x" * 100
    assert labels_from_cni(None, f"K8S_POD_NAMESPACE=a;K8S_POD_NAME={long_name}") == {
        "k8s.pod.namespace": "a"
    }


@pytest.mark.parametrize(
    ("config", "cni_args", "reason"),
    [
        ({"args": {"labels": {"a b": "x"}}}, None, r"args\.labels: label key"),
        ({"args": {"labels": "app=web"}}, None, r"args\.labels: not an object or a list"),
        ({"args": {"cni": {"labels": [{"key": "app"}]}}}, None, r"args\.cni\.labels\[0\]"),
        ({"args": {"cni": {"labels": [{"key": "app", "value": 1}]}}}, None, "quote it"),
        (
            {"args": {"cni": {"labels": [{"key": "a", "value": "x"}, {"key": "a", "value": "y"}]}}},
            None,
            "given twice",
        ),
        (
            {"runtimeConfig": {"labels": {"app": "we b"}}},
            None,
            r"runtimeConfig\.labels: label value",
        ),
        (None, "K8S_POD_NAMESPACE=Prod Space", "CNI_ARGS K8S_POD_NAMESPACE"),
        (None, "OVERLAYD_LABEL_app=we b", 'CNI_ARGS "OVERLAYD_LABEL_app": label value'),
        (None, "OVERLAYD_LABEL_=x", 'CNI_ARGS "OVERLAYD_LABEL_": label key'),
        (None, "OVERLAYD_LABEL_app", "no value"),
    ],
)
def test_bad_cni_labels(config: dict[str, Any] | None, cni_args: str | None, reason: str) -> None:
    with pytest.raises(EndpointError, match=reason):
        labels_from_cni(config, cni_args)
    assert labels_from_cni({"args": {"labels": {"app": "x"}}}, None) == {"app": "x"}


def test_overlayd_label_keys_in_cni_args_label_one_container() -> None:
    """What Podman passes on from its own CNI_ARGS variable: one label per
    key, winning over every other source; the delegates get CNI_ARGS
    without them."""
    config = {"args": {"labels": {"app": "from-config", "team": "a"}}}
    cni_args = (
        "IgnoreUnknown=1;K8S_POD_NAME=exp2;OVERLAYD_LABEL_app=db;"
        "OVERLAYD_LABEL_app.kubernetes.io/part-of=shop;OVERLAYD_LABEL_k8s.pod.name=x"
    )
    assert labels_from_cni(config, cni_args) == {
        "app": "db",
        "team": "a",
        "app.kubernetes.io/part-of": "shop",
        "k8s.pod.name": "x",
    }
    assert without_label_args(cni_args) == "IgnoreUnknown=1;K8S_POD_NAME=exp2"
    assert without_label_args("") == ""
    assert without_label_args("IgnoreUnknown=1") == "IgnoreUnknown=1"
