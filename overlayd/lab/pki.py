"""A small certificate authority for the lab, the tests and `bootstrap.sh
install-etcd`: a CA, server certificates with the IP SANs etcd is dialled
by, and client certificates whose CN etcd maps to a user.

Everything is done by the `cryptography` package (no hand-rolled crypto).
Keys are ECDSA P-256: quick to make, and accepted by etcd and gRPC. Files
are written PEM, keys with mode 0600.

`python -m overlayd.lab.pki DIR server|client NAME ...` is the entry point
`bootstrap.sh install-etcd` and the Vagrantfile use, so that no shell script
drives openssl by hand:

    python -m overlayd.lab.pki /etc/overlayd/pki server etcd-server --ip 192.0.2.2 --ip 127.0.0.1
    python -m overlayd.lab.pki /etc/overlayd/pki client node2

It makes the CA in DIR first if there is none, writes `DIR/<NAME>.pem` and
`DIR/<NAME>-key.pem`, and leaves a certificate that is already there alone
(so a provisioning step can run again); it prints the paths.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
CERT_DAYS = 365


@dataclass(frozen=True, slots=True)
class Issued:
    """Where a certificate and its key were written."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Authority:
    """A CA whose certificate and key live in `directory`."""

    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def key(self) -> Path:
        return self.directory / "ca-key.pem"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Written to a new file and renamed: a reader never sees half a key, and
    # a rotation replaces the file in one step (what cert managers do too).
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    tmp.replace(path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp.replace(path)


def make_authority(directory: Path, name: str = "overlayd lab CA") -> Authority:
    """A new self-signed CA in `directory` (kept if one is already there)."""
    authority = Authority(directory)
    if authority.cert.exists() and authority.key.exists():
        return authority
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(authority.key, key)
    _write_cert(authority.cert, cert)
    return authority


def issue(
    authority: Authority,
    path_stem: Path,
    common_name: str,
    *,
    ips: Sequence[IPv4Address | IPv6Address | str] = (),
    dns_names: Sequence[str] = (),
    server: bool = False,
    client: bool = True,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A key and a certificate signed by `authority`, written to
    `<path_stem>.pem` and `<path_stem>-key.pem`. `not_before`/`not_after`
    exist so that tests can make certificates that are already expired."""
    ca_key = serialization.load_pem_private_key(authority.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(authority.cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    names: list[x509.GeneralName] = [x509.IPAddress(ip_address(str(ip))) for ip in ips]
    names += [x509.DNSName(name) for name in dns_names]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    issued = Issued(
        cert=path_stem.with_name(path_stem.name + ".pem"),
        key=path_stem.with_name(path_stem.name + "-key.pem"),
    )
    # Key first: a reader that sees the new certificate finds its key too.
    _write_key(issued.key, key)
    _write_cert(issued.cert, cert)
    return issued


@dataclass(frozen=True, slots=True)
class _Names:
    common_name: str
    ips: frozenset[str]
    dns: frozenset[str]


def _names(path: Path) -> _Names | None:
    """The CN and subject alternative names of the certificate in `path`."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        ips: frozenset[str] = frozenset()
        dns: frozenset[str] = frozenset()
    else:
        ips = frozenset(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))
        dns = frozenset(sans.get_values_for_type(x509.DNSName))
    return _Names(str(cns[0].value) if cns else "", ips, dns)


def _authority_for_issuing(directory: Path) -> Authority:
    """The CA in `directory`, made if there is none. A CA certificate without
    its key (copied in to verify, not to sign) is never replaced: that would
    silently cut off everyone who trusts the old one."""
    authority = Authority(directory)
    if authority.cert.exists() and not authority.key.exists():
        raise SystemExit(
            f"pki: {authority.cert} is there without its key {authority.key}:"
            " cannot issue (make the certificate where the CA key is)"
        )
    return make_authority(directory)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m overlayd.lab.pki",
        description="A CA in DIR (made if absent) and a server or client certificate"
        " DIR/NAME.pem with its key DIR/NAME-key.pem (kept if already there).",
    )
    parser.add_argument("directory", type=Path, metavar="DIR")
    parser.add_argument("kind", choices=("server", "client"))
    parser.add_argument("name", metavar="NAME", help="file stem and common name (CN)")
    parser.add_argument("--cn", help="common name, if not NAME (etcd maps a client's CN to a user)")
    parser.add_argument(
        "--ip", action="append", default=[], help="IP subject alternative name (repeatable)"
    )
    parser.add_argument(
        "--dns", action="append", default=[], help="DNS subject alternative name (repeatable)"
    )
    args = parser.parse_args(argv)
    if "/" in args.name or args.name in ("", ".", "..", "ca"):
        parser.error(f"NAME {args.name!r}: a plain file stem, not 'ca'")
    stem = args.directory / args.name
    issued = Issued(stem.with_name(stem.name + ".pem"), stem.with_name(stem.name + "-key.pem"))
    wanted = _Names(args.cn or args.name, frozenset(args.ip), frozenset(args.dns))
    if issued.cert.exists() and issued.key.exists() and _names(issued.cert) == wanted:
        state = "kept"
    else:
        # Missing, or made for other names (an etcd moved to a new address):
        # a certificate that does not name the address dialled is refused.
        authority = _authority_for_issuing(args.directory)
        server = args.kind == "server"
        # A server certificate is also a client one: etcd members dial each
        # other with it when peer URLs use TLS.
        issued = issue(
            authority,
            stem,
            args.cn or args.name,
            ips=args.ip,
            dns_names=args.dns,
            server=server,
            client=True,
        )
        state = "issued"
    os.chmod(args.directory, 0o700)
    print(
        f"{state} {args.kind} certificate {issued.cert} (key {issued.key});"
        f" CA {Authority(args.directory).cert}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
