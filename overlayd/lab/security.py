"""The lab's security: its own certificate authority, etcd over TLS with
client certificates, and (`lab up --rbac`) etcd users and roles.

Files, all under `<state dir>/pki/` (mode 0700, keys 0600):

    ca.pem, ca-key.pem        the lab's CA
    etcd1.pem, etcd2.pem, ... each member's certificate, for its client and
                              peer ports alike: CN etcd-member, IP SAN = its
                              underlay address
    h1.pem, h2.pem, ...       each host's client certificate, CN = the host's name
    root.pem                  the admin client certificate, CN = root
    root-password             etcd's root password (with --rbac only)

How each party reaches etcd, and why:

- the daemons (and `lab ctl`) dial `https://<member>:2379` with their own
  host certificate: mutual TLS, as on real hosts;
- the lab driver runs in the root namespace, which must get no address, so
  it cannot dial the members' underlay addresses; it uses the member's unix
  socket in the member's state dir. etcd 3.4 serves `unix://` listeners in
  plain text and ignores --client-cert-auth on them (it logs "Ignored client
  cert auth for this url"), and the store speaks no TLS over unix sockets
  anyway. The socket is guarded by the file system instead: the member's
  state dir is 0700 and the socket is root's, so only root on this machine
  (who can enter the member's namespace and read its keys anyway) reaches
  it. With RBAC on, a connection without a certificate has no user, so the
  driver authenticates as root with the password kept in `root-password`
  (0600); the password crosses only that socket;
- members talk to each other over TLS too (`https://` peer URLs, peer client
  certificates required, and only the CN `etcd-member` accepted): the peer
  port sits on the same underlay as the hosts, and a plain one would let any
  host speak raft to the members, around every permission checked on the
  client port. Host certificates come from the same CA, which is why the CN
  is checked too.

RBAC (`--rbac`), set up with etcdctl over the unix socket before the first
host starts: user root (password) with role root; one user per host, named
as its certificate's CN, with no password (etcd maps a verified client
certificate's CN to the user when authentication is on); all host users share
the role `overlayd-host`, because flannel's key schema gives every host the
same rights (see the README on what it cannot express):

    read       <prefix>/             the config and the peers' leases
    readwrite  <prefix>/subnets/     its own lease (create, renew, release)
    read       <overlayd prefix>/    the daemon's mirror watches it; the daemon
                                     writes nothing there (yet)
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from overlayd.config import DEFAULT_OVERLAYD_PREFIX
from overlayd.lab.netns import LabCommandError
from overlayd.lab.pki import Authority, Issued, issue, make_authority

ADMIN_USER = "root"
HOST_ROLE = "overlayd-host"
# Every member's certificate carries this CN; members accept peers only with it.
MEMBER_CN = "etcd-member"


@dataclass(frozen=True, slots=True)
class MemberTls:
    """The TLS files one etcd member runs with (server and peer alike)."""

    ca: Path
    cert: Path
    key: Path

    def flags(self) -> list[str]:
        return [
            "--cert-file",
            str(self.cert),
            "--key-file",
            str(self.key),
            "--trusted-ca-file",
            str(self.ca),
            "--client-cert-auth",
            "--peer-cert-file",
            str(self.cert),
            "--peer-key-file",
            str(self.key),
            "--peer-trusted-ca-file",
            str(self.ca),
            "--peer-client-cert-auth",
            "--peer-cert-allowed-cn",
            MEMBER_CN,
        ]


@dataclass(frozen=True, slots=True)
class LabPki:
    """The lab's certificates and secrets, in one directory."""

    directory: Path

    @property
    def authority(self) -> Authority:
        return Authority(self.directory)

    @property
    def ca(self) -> Path:
        return self.authority.cert

    @property
    def password_file(self) -> Path:
        return self.directory / "root-password"

    def _issued(self, stem: str) -> Issued:
        return Issued(self.directory / f"{stem}.pem", self.directory / f"{stem}-key.pem")

    def member(self, name: str) -> MemberTls:
        issued = self._issued(name)
        return MemberTls(self.ca, issued.cert, issued.key)

    def client(self, name: str) -> Issued:
        """The client certificate of host `name` (h1, ...) or of root."""
        return self._issued(name)

    def make(self, members: Sequence[tuple[str, IPv4Address]]) -> None:
        """The CA, each member's certificate and the admin's."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        authority = make_authority(self.directory, "overlayd lab CA")
        for name, address in members:
            # Only the underlay address: a member listens on nothing else
            # with TLS (its unix socket is plain), so 127.0.0.1 would be a
            # name nobody dials.
            issue(
                authority,
                self.directory / name,
                MEMBER_CN,
                ips=[address],
                server=True,
                client=True,  # members dial each other with it
            )
        issue(authority, self.directory / ADMIN_USER, ADMIN_USER)

    def ensure_client(self, name: str) -> Issued:
        """Host `name`'s certificate, issued the first time it is asked for
        (hosts join after `up` too); a re-added host keeps its certificate,
        as a rebooted machine keeps /etc."""
        issued = self.client(name)
        if not (issued.cert.exists() and issued.key.exists()):
            issue(self.authority, self.directory / name, name)
        return issued

    def new_password(self) -> str:
        password = secrets.token_urlsafe(24)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password)
        return password

    def password(self) -> str | None:
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            return None


def etcdctl_env(password: str | None) -> dict[str, str]:
    """etcdctl's credentials as variables: a password in argv is visible in ps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    if password is not None:
        env |= {"ETCDCTL_USER": ADMIN_USER, "ETCDCTL_PASSWORD": password}
    return env


def etcdctl(
    endpoint: str, *args: str, password: str | None = None, stdin: str | None = None
) -> str:
    """etcdctl (3.4) against `endpoint`, as root when a password is given."""
    proc = subprocess.run(
        ["etcdctl", "--endpoints", endpoint, "--command-timeout", "10s", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=etcdctl_env(password),
    )
    if proc.returncode != 0:
        raise LabCommandError(f"etcdctl {' '.join(args)}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def enable_rbac(
    endpoint: str, password: str, prefix: str, overlayd_prefix: str = DEFAULT_OVERLAYD_PREFIX
) -> None:
    """Root, the hosts' role, then authentication on (in this order: once it
    is on, only root may add users and roles)."""
    # --interactive=false: etcdctl reads the new password from stdin.
    etcdctl(endpoint, "user", "add", ADMIN_USER, "--interactive=false", stdin=password)
    etcdctl(endpoint, "role", "add", ADMIN_USER)
    etcdctl(endpoint, "user", "grant-role", ADMIN_USER, ADMIN_USER)
    etcdctl(endpoint, "role", "add", HOST_ROLE)
    for permission, key in host_permissions(prefix, overlayd_prefix):
        etcdctl(endpoint, "role", "grant-permission", HOST_ROLE, permission, key, "--prefix")
    etcdctl(endpoint, "auth", "enable")


def host_permissions(prefix: str, overlayd_prefix: str) -> list[tuple[str, str]]:
    """What the hosts' role may do: key prefixes (each ending in /, as the
    daemon lists and watches them) and etcdctl's permission names."""
    base, own = prefix.rstrip("/"), overlayd_prefix.rstrip("/")
    # A host writes its own endpoints (bound to its lease) and its status
    # key; policies are the operators' (the admin certificate) and only read.
    return [
        ("read", f"{base}/"),
        ("readwrite", f"{base}/subnets/"),
        ("read", f"{own}/"),
        ("readwrite", f"{own}/endpoints/"),
        ("readwrite", f"{own}/status/"),
    ]


def add_host_user(endpoint: str, password: str, name: str) -> None:
    """A user for host `name` (its certificate's CN) with the hosts' role;
    nothing if it is there already (a re-added host)."""
    users = etcdctl(endpoint, "user", "list", password=password).split()
    if name in users:
        return
    # No password: the host proves who it is with its certificate only.
    etcdctl(endpoint, "user", "add", name, "--no-password", password=password)
    etcdctl(endpoint, "user", "grant-role", name, HOST_ROLE, password=password)
