"""`python -m overlayd.lab.pki`, the entry point bootstrap.sh install-etcd and
the Vagrantfile make their certificates with."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from overlayd.lab.pki import main


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_a_server_certificate_names_its_addresses_and_serves_and_dials(tmp_path: Path) -> None:
    assert (
        main([str(tmp_path), "server", "etcd-server", "--ip", "192.0.2.2", "--ip", "127.0.0.1"])
        == 0
    )
    cert = load(tmp_path / "etcd-server.pem")
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [
        "192.0.2.2",
        "127.0.0.1",
    ]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.issuer == load(tmp_path / "ca.pem").subject
    assert (tmp_path / "etcd-server-key.pem").stat().st_mode & 0o777 == 0o600
    assert tmp_path.stat().st_mode & 0o777 == 0o700


def test_a_client_certificate_carries_the_cn_and_is_kept_when_run_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main([str(tmp_path), "client", "node2"])
    first = (tmp_path / "node2.pem").read_bytes()
    ca = (tmp_path / "ca.pem").read_bytes()
    main([str(tmp_path), "client", "node2"])
    assert (tmp_path / "node2.pem").read_bytes() == first
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert "kept client certificate" in capsys.readouterr().out
    cn = load(tmp_path / "node2.pem").subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn[0].value == "node2"


def test_a_ca_certificate_without_its_key_is_never_replaced(tmp_path: Path) -> None:
    main([str(tmp_path), "client", "root"])
    (tmp_path / "ca-key.pem").unlink()
    ca = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(SystemExit, match="without its key"):
        main([str(tmp_path), "client", "node3"])
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert not (tmp_path / "node3.pem").exists()


def test_a_server_certificate_for_other_addresses_is_made_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main([str(tmp_path), "server", "etcd-server", "--ip", "192.0.2.2"])
    main([str(tmp_path), "server", "etcd-server", "--ip", "192.0.2.2"])
    assert "kept server certificate" in capsys.readouterr().out  # same names: kept
    main([str(tmp_path), "server", "etcd-server", "--ip", "198.51.100.2"])
    assert "issued server certificate" in capsys.readouterr().out
    names = load(tmp_path / "etcd-server.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)] == ["198.51.100.2"]
