"""Agent settings: flags beat the environment, which beats the TOML file."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from overlayd.cli.daemon import load_settings
from overlayd.config import build_agent_config, read_toml
from overlayd.errors import ConfigError


def test_defaults_follow_flannel() -> None:
    cfg = build_agent_config(flags={}, env={})
    assert cfg.etcd_prefix == "/coreos.com/network"
    assert cfg.subnet_file == Path("/run/flannel/subnet.env")
    assert cfg.bridge == "ovl0"


def test_flags_override_environment_which_overrides_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "overlayd.toml"
    toml.write_text('bridge = "filebr"\nlease-ttl = 10\netcd-prefix = "/file"\n')
    cfg = build_agent_config(
        flags={"bridge": "flagbr"},
        file=read_toml(toml),
        env={"OVERLAYD_BRIDGE": "envbr", "OVERLAYD_LEASE_TTL": "20"},
    )
    assert cfg.bridge == "flagbr"
    assert cfg.lease_ttl == 20
    assert cfg.etcd_prefix == "/file"


def test_the_daemon_command_line_reads_the_config_file(tmp_path: Path) -> None:
    toml = tmp_path / "overlayd.toml"
    toml.write_text('etcd-endpoints = ["http://192.0.2.2:2379", "http://192.0.2.3:2379"]\n')
    cfg = load_settings(["--config", str(toml), "--public-ip", "192.0.2.11", "--iface", "eth0"])
    assert cfg.etcd_endpoints == ("http://192.0.2.2:2379", "http://192.0.2.3:2379")
    assert cfg.public_ip == IPv4Address("192.0.2.11")
    assert cfg.iface == "eth0"


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        ({"etcd-endpoints": "ftp://x:1"}, "etcd-endpoints"),
        ({"etcd-endpoints": "http://192.0.2.1:1,https://192.0.2.2:1"}, "etcd-endpoints"),
        ({"etcd-cafile": "/ca.pem"}, "etcd-cafile"),
        ({"etcd-endpoints": "https://x:1", "etcd-certfile": "/c.pem"}, "etcd-keyfile"),
        ({"etcd-endpoints": "https://x:1", "etcd-keyfile": "/k.pem"}, "etcd-certfile"),
        ({"etcd-username": "u"}, "etcd-password"),
        ({"etcd-password": "p"}, "etcd-username"),
        (
            {"etcd-username": "u", "etcd-password": "p", "etcd-password-file": "/p"},
            "etcd-password-file",
        ),
        ({"etcd-username": "u", "etcd-password-file": "/nonexistent/pw"}, "etcd-password-file"),
        ({"etcd-endpoints": "http://nohost"}, "etcd-endpoints"),
        ({"public-ip": "127.0.0.1"}, "public-ip"),
        ({"public-ip": "not-an-ip"}, "public-ip"),
        ({"bridge": "a-name-that-is-far-too-long"}, "bridge"),
        ({"lease-ttl": "0"}, "lease-ttl"),
        ({"resync-seconds": "-1"}, "resync-seconds"),
        ({"etcd-prefix": "no/leading/slash"}, "etcd-prefix"),
        ({"log-level": "chatty"}, "log-level"),
        ({"vxlan-filter": "maybe"}, "vxlan-filter"),
        ({"dns": "yes"}, "dns"),
        ({"dns-domain": "not a domain"}, "dns-domain"),
        ({"dns-domain": "-bad.internal"}, "dns-domain"),
        # What the responder's records would refuse at start (a crash, not
        # a refusal, before): the reverse tree, and no room for tasks.<service>.
        ({"dns-domain": "overlay.in-addr.arpa"}, "dns-domain"),
        ({"dns-domain": ".".join(["a" * 60, "b" * 60, "c" * 60, "internal"])}, "dns-domain"),
        ({"dns-upstreams": "192.0.2.53,nameserver"}, "dns-upstreams"),
        ({"dns-upstreams": "0.0.0.0"}, "dns-upstreams"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(flags: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_agent_config(flags=flags, env={})
    assert caught.value.field == field


def test_unknown_or_broken_toml_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("brige = 'typo'\n")
    with pytest.raises(ConfigError) as caught:
        read_toml(bad)
    assert caught.value.field == "brige"
    bad.write_text("bridge = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(bad)


def test_the_example_config_is_valid() -> None:
    example = Path(__file__).parents[2] / "config" / "overlayd.toml"
    cfg = build_agent_config(flags={}, file=read_toml(example), env={})
    assert cfg.etcd_endpoints


def test_etcd_credentials_are_read_with_the_password_from_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    cfg = build_agent_config(
        flags={
            "etcd-endpoints": "https://192.0.2.2:2379,https://192.0.2.3:2379",
            "etcd-cafile": "/etc/overlayd/ca.pem",
            "etcd-certfile": "/etc/overlayd/h1.pem",
            "etcd-keyfile": "/etc/overlayd/h1-key.pem",
            "etcd-username": "h1",
            "etcd-password-file": str(secret),
        },
        env={},
    )
    access = cfg.etcd
    assert access.tls and access.password == "s3cret"
    assert access.password_setting == "etcd-password-file"
    assert access.certfile == Path("/etc/overlayd/h1.pem")
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(access.public())


def test_etcd_tls_files_come_from_the_environment_too() -> None:
    cfg = build_agent_config(
        flags={},
        env={
            "OVERLAYD_ETCD_ENDPOINTS": "https://192.0.2.2:2379",
            "OVERLAYD_ETCD_CAFILE": "/ca.pem",
        },
    )
    assert cfg.etcd.cafile == Path("/ca.pem") and cfg.etcd.certfile is None


def test_the_vxlan_filter_is_on_unless_a_flag_variable_or_file_says_off(tmp_path: Path) -> None:
    assert build_agent_config(flags={}, env={}).vxlan_filter is True
    assert build_agent_config(flags={"vxlan-filter": "off"}, env={}).vxlan_filter is False
    assert build_agent_config(flags={}, env={"OVERLAYD_VXLAN_FILTER": "off"}).vxlan_filter is False
    toml = tmp_path / "o.toml"
    toml.write_text('vxlan-filter = "off"\n')
    assert build_agent_config(flags={}, file=read_toml(toml), env={}).vxlan_filter is False
    toml.write_text("vxlan-filter = false\n")
    assert build_agent_config(flags={}, file=read_toml(toml), env={}).vxlan_filter is False
    # Flags win: on, although the file and the environment say off.
    on = build_agent_config(
        flags={"vxlan-filter": "on"},
        file=read_toml(toml),
        env={"OVERLAYD_VXLAN_FILTER": "off"},
    )
    assert on.vxlan_filter is True
    assert load_settings(["--vxlan-filter", "off"]).vxlan_filter is False


def test_dns_is_on_under_overlay_internal_forwarding_to_resolv_conf_unless_told() -> None:
    default = build_agent_config(flags={}, env={})
    assert default.dns and default.dns_domain == "overlay.internal"
    assert default.dns_upstreams is None  # the host's /etc/resolv.conf
    told = build_agent_config(
        flags={"dns-domain": "Cluster.Example.", "dns-upstreams": "192.0.2.53, 2001:db8::53"},
        env={"OVERLAYD_DNS": "off"},
    )
    assert not told.dns and told.dns_domain == "cluster.example"
    # The longest domain the records take is accepted (control for the refusals).
    longest = ".".join(["a" * 60, "b" * 60, "c" * 58])
    assert build_agent_config(flags={"dns-domain": longest}, env={}).dns_domain == longest
    assert [str(a) for a in told.dns_upstreams or ()] == ["192.0.2.53", "2001:db8::53"]
    # Empty: forward nothing (the lab's choice).
    assert build_agent_config(flags={"dns-upstreams": ""}, env={}).dns_upstreams == ()
