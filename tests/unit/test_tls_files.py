"""The etcd TLS files are checked before any connection, with the setting
and the file named; a CA bundle may carry an expired CA beside a valid one."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from overlayd.errors import ConfigError
from overlayd.lab.pki import issue, make_authority
from overlayd.store.access import EtcdAccess, certificate_facts, load_tls

NOW = datetime.datetime.now(datetime.UTC)


def expired_ca(directory: Path) -> Path:
    """A CA certificate that expired yesterday."""
    authority = make_authority(directory, "old CA")
    old = issue(
        authority,
        directory / "old-ca",
        "old CA",
        not_before=NOW - datetime.timedelta(days=400),
        not_after=NOW - datetime.timedelta(days=1),
    )
    return old.cert


def test_a_bundle_with_an_expired_ca_beside_a_valid_one_is_accepted(tmp_path: Path) -> None:
    current = make_authority(tmp_path / "new", "new CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(expired_ca(tmp_path / "old").read_bytes() + current.cert.read_bytes())
    access = EtcdAccess(endpoints=("https://192.0.2.2:2379",), cafile=bundle)
    assert load_tls(access).ca == bundle.read_bytes()
    [facts] = certificate_facts(access)
    assert facts.subject == "CN=new CA" and facts.problem is None  # the one in use


def test_a_bundle_of_expired_cas_only_is_refused_naming_etcd_cafile(tmp_path: Path) -> None:
    stale = expired_ca(tmp_path / "old")
    access = EtcdAccess(endpoints=("https://192.0.2.2:2379",), cafile=stale)
    with pytest.raises(ConfigError, match="expired on") as refused:
        load_tls(access)
    assert refused.value.field == "etcd-cafile" and str(stale) in str(refused.value)


def test_a_file_that_is_no_certificate_is_refused_naming_its_setting(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM certificate") as refused:
        load_tls(EtcdAccess(endpoints=("https://192.0.2.2:2379",), cafile=junk))
    assert refused.value.field == "etcd-cafile"
    good = make_authority(tmp_path / "ca")  # the positive control
    assert load_tls(EtcdAccess(endpoints=("https://192.0.2.2:2379",), cafile=good.cert)).ca
