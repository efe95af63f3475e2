"""How to reach etcd and prove who we are: endpoints, TLS files, user and
password, as one value; and the TLS files read and checked before they are
handed to gRPC.

gRPC's own errors for a bad certificate are a line of OpenSSL codes that
names no file. Checking the files here first (present, PEM, not expired,
key belongs to certificate) turns the common mistakes into an error that
names the setting and the path, before any connection is tried.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from overlayd.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509

# `cryptography` is imported by the functions that read TLS files, not
# here: every daemon start imports this module, and the package took 25 ms
# of a start without TLS (python -X importtime).


@dataclass(frozen=True, slots=True)
class EtcdAccess:
    """Endpoints and credentials; `password_setting` names where the
    password came from, so that an error can point at it."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_setting: str = "etcd-password"

    @property
    def tls(self) -> bool:
        return any(urlsplit(e).scheme == "https" for e in self.endpoints)

    @property
    def credential_files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.cafile, self.certfile, self.keyfile) if p is not None)

    def public(self) -> dict[str, object]:
        """What status and diagnose may show: everything but the password."""
        return {
            "etcd_endpoints": list(self.endpoints),
            "etcd_cafile": str(self.cafile) if self.cafile else None,
            "etcd_certfile": str(self.certfile) if self.certfile else None,
            "etcd_keyfile": str(self.keyfile) if self.keyfile else None,
            "etcd_username": self.username,
        }


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The bytes gRPC gets, and what was learnt from them."""

    ca: bytes | None
    cert: bytes | None
    key: bytes | None
    cert_not_after: datetime.datetime | None
    cert_subject: str | None
    stamp: tuple[tuple[int, int, int], ...]  # (inode, size, mtime) per file


def file_stamp(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is rewritten or replaced; (0, 0, 0) if absent."""
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append((0, 0, 0))
        else:
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(setting, f"{path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(setting, f"{path} cannot be read: {exc.strerror}") from exc


def _certificates(data: bytes, path: Path, setting: str) -> list[x509.Certificate]:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(setting, f"{path} holds no PEM certificate") from exc
    return certs


def check_validity(
    cert: x509.Certificate, path: Path, setting: str, now: datetime.datetime
) -> None:
    if cert.not_valid_after_utc <= now:
        raise ConfigError(
            setting, f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    if cert.not_valid_before_utc > now:
        raise ConfigError(
            setting,
            f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC",
        )


def _usable(
    certs: list[x509.Certificate], path: Path, now: datetime.datetime
) -> list[x509.Certificate]:
    """The CAs of a bundle that are valid now. A bundle may hold an expired
    CA beside its successor (a CA rotation, or a system bundle): OpenSSL
    skips it, and so does this check; only a bundle with none left fails."""
    valid = [c for c in certs if c.not_valid_before_utc <= now < c.not_valid_after_utc]
    if not valid:
        check_validity(min(certs, key=lambda c: c.not_valid_after_utc), path, "etcd-cafile", now)
    return valid


def load_tls(access: EtcdAccess, now: datetime.datetime | None = None) -> TlsMaterial:
    """Read and check the TLS files; raises ConfigError naming the setting."""
    from cryptography.hazmat.primitives import serialization

    now = now or datetime.datetime.now(datetime.UTC)
    stamp = file_stamp(access.credential_files)
    ca = None
    if access.cafile is not None:
        ca = _read(access.cafile, "etcd-cafile")
        _usable(_certificates(ca, access.cafile, "etcd-cafile"), access.cafile, now)
    if access.certfile is None or access.keyfile is None:
        return TlsMaterial(ca, None, None, None, None, stamp)
    cert_bytes = _read(access.certfile, "etcd-certfile")
    leaf = _certificates(cert_bytes, access.certfile, "etcd-certfile")[0]
    check_validity(leaf, access.certfile, "etcd-certfile", now)
    key_bytes = _read(access.keyfile, "etcd-keyfile")
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except TypeError as exc:
        raise ConfigError(
            "etcd-keyfile", f"{access.keyfile} is encrypted; give an unencrypted key"
        ) from exc
    except ValueError as exc:
        raise ConfigError("etcd-keyfile", f"{access.keyfile} holds no PEM private key") from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ) != leaf.public_key().public_bytes(serialization.Encoding.DER, public):
        raise ConfigError(
            "etcd-keyfile",
            f"{access.keyfile} is not the key of the certificate in {access.certfile}",
        )
    return TlsMaterial(
        ca,
        cert_bytes,
        key_bytes,
        leaf.not_valid_after_utc,
        leaf.subject.rfc4514_string(),
        stamp,
    )


@dataclass(frozen=True, slots=True)
class CertificateFacts:
    """One certificate file's subject and expiry, for diagnose."""

    setting: str
    path: Path
    subject: str | None
    not_after: datetime.datetime | None
    problem: str | None


def certificate_facts(access: EtcdAccess) -> list[CertificateFacts]:
    """The CA and client certificates' expiry (problems reported, not raised)."""
    facts = []
    for setting, path in (("etcd-cafile", access.cafile), ("etcd-certfile", access.certfile)):
        if path is None:
            continue
        try:
            certs = _certificates(_read(path, setting), path, setting)
        except ConfigError as exc:
            facts.append(CertificateFacts(setting, path, None, None, exc.reason))
            continue
        now = datetime.datetime.now(datetime.UTC)
        # A bundle's expired CAs are not in use (see _usable); if none is
        # valid, the one that expired last says why.
        valid = [c for c in certs if now < c.not_valid_after_utc]
        by_expiry = lambda c: c.not_valid_after_utc  # noqa: E731
        soonest = min(valid, key=by_expiry) if valid else max(certs, key=by_expiry)
        facts.append(
            CertificateFacts(
                setting, path, soonest.subject.rfc4514_string(), soonest.not_valid_after_utc, None
            )
        )
    return facts
