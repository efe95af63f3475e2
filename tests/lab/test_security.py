"""The lab's security with a real etcd: mutual TLS (every other lab test runs
on it too, as it is the lab's default), etcd users and roles with `--rbac`,
daemons that refuse to start with the wrong certificate, and `--insecure`
still there for comparison.

The RBAC matrix is asked of etcd with etcdctl from inside the host's
namespace, over TLS with the host's (or root's) certificate: it checks the
roles the lab grants, independently of overlayd's own client. What overlayd
itself does under those roles is checked by running it (the daemons lease,
renew and converge; `overlayctl network set` is refused to a host).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from overlayd.lab import netns
from overlayd.lab.lab import PREFIX, Lab, LabSettings
from overlayd.lab.pki import issue, make_authority
from overlayd.nsexec import netns_argv
from tests.conftest import CONVERGE, SESSION_TAG, needs_root, wait_until
from tests.lab.fakes import lab_network
from tests.lab.probes import run_daemon_once

pytestmark = [needs_root, pytest.mark.lab]

TTL = 5  # the daemon accepts no less
# Keys in the fakes' range (tests/lab/fakes.py): no lab host leases them.
LEASE_KEY = f"{PREFIX}/subnets/10.244.250.0-24"
PEER_LEASE_KEY = f"{PREFIX}/subnets/10.244.251.0-24"
CONFIG_KEY = f"{PREFIX}/config"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(f"{SESSION_TAG}s")
    try:
        lab.up(2, config=lab_network(), settings=LabSettings(rbac=True, lease_ttl=TTL))
        yield lab
    finally:
        lab.down()


def etcdctl_as(lab: Lab, who: str, *args: str, host: int = 1) -> subprocess.CompletedProcess[str]:
    """etcdctl in host `host`'s namespace, dialling the members over TLS with
    `who`'s certificate (h1, h2 or root)."""
    settings = lab.etcd_settings(host, admin=who == "root")
    if who != "root":
        client = lab.pki.client(who)
        settings |= {"etcd-certfile": str(client.cert), "etcd-keyfile": str(client.key)}
    return subprocess.run(
        netns_argv(
            lab.host_ns(host),
            "etcdctl",
            "--endpoints",
            settings["etcd-endpoints"],
            "--cacert",
            settings["etcd-cafile"],
            "--cert",
            settings["etcd-certfile"],
            "--key",
            settings["etcd-keyfile"],
            "--command-timeout",
            "10s",
            *args,
        ),
        capture_output=True,
        text=True,
        timeout=CONVERGE,
        check=False,
    )


def allowed(proc: subprocess.CompletedProcess[str]) -> bool:
    """True if etcd did it; False only for a refusal by RBAC (anything else,
    a TLS or connection failure, fails the test instead of passing as 'no')."""
    if proc.returncode == 0:
        return True
    assert "permission denied" in proc.stderr, proc.stderr
    return False


def current_config(lab: Lab) -> str:
    value = lab.etcd(lambda s: s.get(CONFIG_KEY))[0]
    assert value is not None
    return value.decode()


# (who, etcdctl operation, key, allowed). A write of the config writes the
# config that is there already, so a wrong "yes" cannot break the lab.
MATRIX = [
    ("h1", "get", CONFIG_KEY, True),
    ("h1", "put", CONFIG_KEY, False),
    ("h1", "put", f"{PREFIX}/anything-but-subnets", False),
    ("h1", "put", LEASE_KEY, True),
    ("h1", "get", LEASE_KEY, True),
    ("h1", "del", LEASE_KEY, True),
    ("h1", "get", "/overlayd/status/h1", True),
    ("h1", "put", "/overlayd/status/h1", True),
    ("h1", "put", "/overlayd/policies/x", False),
    ("h1", "get", "/elsewhere", False),
    ("h1", "put", "/elsewhere", False),
    ("root", "put", CONFIG_KEY, True),
    ("root", "put", "/elsewhere", True),
    ("root", "del", "/elsewhere", True),
]


@pytest.mark.parametrize(
    ("who", "operation", "key", "expected"),
    MATRIX,
    ids=[f"{w}-{op}-{k}-{'allowed' if e else 'denied'}" for w, op, k, e in MATRIX],
)
def test_rbac_matrix(lab: Lab, who: str, operation: str, key: str, expected: bool) -> None:
    value = [current_config(lab)] if operation == "put" and key == CONFIG_KEY else []
    if operation == "put" and not value:
        value = ['{"written": "by the RBAC matrix test"}']
    assert allowed(etcdctl_as(lab, who, operation, key, *value)) is expected


def test_a_host_can_still_overwrite_a_peers_lease_flannels_keys_allow_no_better(
    lab: Lab,
) -> None:
    """The limitation the README states: a lease's key is its subnet, not its
    host, so etcd's prefix permissions cannot tell h2's lease from h1's."""
    try:
        assert allowed(etcdctl_as(lab, "h2", "put", PEER_LEASE_KEY, '{"by": "h2"}', host=2))
        assert allowed(etcdctl_as(lab, "h1", "put", PEER_LEASE_KEY, '{"by": "h1"}'))
        assert lab.etcd(lambda s: s.get(PEER_LEASE_KEY))[0] == b'{"by": "h1"}'
    finally:
        lab.etcd(lambda s: s.delete(PEER_LEASE_KEY))


def test_hosts_lease_renew_and_converge_with_their_certificates_alone(lab: Lab) -> None:
    """The positive control of the matrix: everything a daemon does (grant,
    create-if-absent, renew, watch, take its lease back after a restart)
    works with the host's role."""
    assert all(r.ok for r in lab.check(timeout=CONVERGE))
    leases = lab.leases()
    time.sleep(2 * TTL)  # leases outlive their TTL only if renewals go through
    assert lab.leases() == leases
    subnet = lab.subnet(1)
    lab.restart_daemon(1)
    assert lab.subnet(1) == subnet and lab.leases() == leases
    for host in lab.hosts():
        log = lab.daemon_log(host).read_text()
        assert "etcd_refused" not in log and "permission denied" not in log, log[-2000:]


def test_network_set_needs_the_admin_certificate(lab: Lab, tmp_path: Path) -> None:
    config = tmp_path / "network.json"
    config.write_text(current_config(lab))

    def network_set(*, admin: bool) -> subprocess.CompletedProcess[str]:
        # The lab's own `lab ctl [--admin]`, as a user types it.
        return subprocess.run(
            [sys.executable, "-m", "overlayd.cli.ctl", "lab", "ctl", "--name", lab.name]
            + (["--admin"] if admin else [])
            + ["h1", "--", "network", "set", str(config)],
            capture_output=True,
            text=True,
            timeout=CONVERGE,
            check=False,
        )

    refused = network_set(admin=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert (
        "overlayctl: etcd at ipv4:192.0.2.2:2379: permission denied for CN=h1"
        f" to write {CONFIG_KEY}" in refused.stderr
    )
    assert "Traceback" not in refused.stderr
    written = network_set(admin=True)
    assert written.returncode == 0, written.stderr
    assert f"wrote {CONFIG_KEY}" in written.stdout


def test_an_etcd_restart_with_rbac_on_keeps_the_driver_and_the_daemons_going(lab: Lab) -> None:
    """After a restart etcd has forgotten every auth token: the driver
    authenticates again as root; the daemons, known by certificate, need no
    token and resume their watches."""
    lab.stop_etcd()
    lab.start_etcd()  # waits for health, asked as root
    lease = json.dumps(
        {
            "PublicIP": "198.51.100.250",
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:02:50"},
        }
    )
    lab.etcd(lambda s: s.put(LEASE_KEY, lease))
    try:
        for host in lab.hosts():
            wait_until(
                partial(lambda h: "10.244.250.0/24" in netns.ip(lab.host_ns(h), "route"), host)
            )
    finally:
        lab.etcd(lambda s: s.delete(LEASE_KEY))


def test_a_certificate_refused_while_running_is_logged_once_and_retried_and_nothing_is_undone(
    lab: Lab,
) -> None:
    """h1's certificate files are replaced, while its daemon runs, by a
    certificate etcd does not trust: the daemon takes them up, is refused,
    says so once and keeps retrying; its kernel entries stay; h2 (the
    positive control) still follows etcd. With the good files back, h1
    catches up from where its watch stopped."""
    files = lab.pki.client("h1")
    saved = {files.key: files.key.read_bytes(), files.cert: files.cert.read_bytes()}
    rogue = issue(
        make_authority(lab.state_dir / "rogue-ca", "rogue CA"), lab.state_dir / "rogue", "h1"
    )
    log = lab.daemon_log(1)
    before = len(log.read_text())
    peer_route = str(lab.subnet(2))

    def written_since() -> str:
        return log.read_text()[before:]

    def replace(path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".swap")
        tmp.write_bytes(data)
        tmp.replace(path)  # as a certificate manager does: whole, in one step

    lease = json.dumps(
        {
            "PublicIP": "198.51.100.250",
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:02:50"},
        }
    )
    try:
        replace(files.key, rogue.key.read_bytes())  # key first, as the README advises
        replace(files.cert, rogue.cert.read_bytes())
        wait_until(lambda: "event=etcd_refused" in written_since())
        assert f"refused the client certificate etcd-certfile {files.cert}" in written_since()
        lab.etcd(lambda s: s.put(LEASE_KEY, lease))
        wait_until(lambda: "10.244.250.0/24" in netns.ip(lab.host_ns(2), "route"))
        h1_routes = netns.ip(lab.host_ns(1), "route")
        assert "10.244.250.0/24" not in h1_routes  # h1 cannot read etcd now
        assert peer_route in h1_routes  # and has undone nothing
    finally:
        for path, data in saved.items():
            replace(path, data)
    try:
        wait_until(lambda: "event=etcd_accepted" in written_since())
        wait_until(lambda: "10.244.250.0/24" in netns.ip(lab.host_ns(1), "route"))
        assert written_since().count("event=etcd_refused") == 1, written_since()[-3000:]
        assert all(r.ok for r in lab.check(timeout=CONVERGE))
    finally:
        lab.etcd(lambda s: s.delete(LEASE_KEY))


PEER_PROBE = """
import socket, ssl, sys
ca, cert, key, address = sys.argv[1:]
context = ssl.create_default_context(cafile=ca)
context.load_cert_chain(cert, key)
try:
    with socket.create_connection((address, 2380), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=address) as tls:
            tls.sendall(b"GET /version HTTP/1.0\\r\\n\\r\\n")
            print(tls.recv(4096).split(b"\\r\\n")[0].decode())
except OSError as exc:  # ssl.SSLError included: TLS 1.3 reports the refusal on read
    print("refused:", exc)
"""


def test_the_peer_port_speaks_only_to_members_not_to_hosts(lab: Lab) -> None:
    """The members' peer port is on the hosts' underlay: with the CA alone
    any host certificate would pass, so only the members' CN is let in. The
    member's own certificate is tried from the member's namespace: etcd also
    wants a client certificate's IP SANs to name the address it comes from."""
    member = lab.pki.member("etcd1")
    host = lab.pki.client("h1")

    def probe(ns: str, cert: Path, key: Path) -> str:
        argv = [sys.executable, "-c", PEER_PROBE, str(lab.pki.ca), str(cert), str(key)]
        return netns.in_ns(ns, *argv, "192.0.2.2").strip()

    member_ns = lab.etcd_members()[0].ns
    assert probe(member_ns, member.cert, member.key) == "HTTP/1.0 200 OK"
    assert probe(member_ns, host.cert, host.key).startswith("refused:")
    assert probe(lab.host_ns(1), host.cert, host.key).startswith("refused:")


def test_a_daemon_with_another_cas_certificate_refuses_to_start_naming_it(lab: Lab) -> None:
    other = make_authority(lab.state_dir / "other-ca", "someone else's CA")
    stranger = issue(other, lab.state_dir / "other-ca" / "h1", "h1")
    proc = run_daemon_once(
        lab,
        *("--etcd-certfile", str(stranger.cert), "--etcd-keyfile", str(stranger.key)),
        bridge="refusedbr",
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("overlayd: ") and f"etcd-certfile {stranger.cert}" in last, last
    assert "refusedbr" not in netns.ip(lab.host_ns(1), "link")


def test_a_daemon_without_a_certificate_refuses_to_start_naming_the_settings(lab: Lab) -> None:
    proc = run_daemon_once(lab, "--etcd-certfile", "", "--etcd-keyfile", "", bridge="refusedbr")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("overlayd: "), last
    assert "requires a client certificate: set etcd-certfile and etcd-keyfile" in last
    assert "refusedbr" not in netns.ip(lab.host_ns(1), "link")


def lab_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "overlayd.cli.ctl", "lab", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_lab_up_insecure_keeps_the_plain_lab_and_later_commands_know_it() -> None:
    name = f"{SESSION_TAG}i"
    try:
        up = lab_cli("up", "--name", name, "--hosts", "2", "--insecure", "--check")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "etcd: plain http, no client certificates (--insecure)" in up.stdout
        lab = Lab(name)  # a new handle: everything comes from the state dir
        assert lab.settings().tls is False
        assert lab.daemon_settings(1)["etcd-endpoints"] == "http://192.0.2.2:2379"
        assert "etcd-cafile" not in lab.daemon_settings(1)
        assert not lab.pki.directory.exists()
        leases = lab_cli("ctl", "--name", name, "h1", "--", "leases", "--json")
        assert leases.returncode == 0, leases.stderr
        assert len(json.loads(leases.stdout)) == 2
    finally:
        lab_cli("down", "--name", name)


def test_lab_up_refuses_rbac_without_tls() -> None:
    proc = lab_cli("up", "--name", f"{SESSION_TAG}x", "--insecure", "--rbac")
    assert proc.returncode == 1
    assert "--rbac needs TLS" in proc.stderr
    assert not [ns for ns in netns.list_namespaces() if ns.startswith(f"ovl-{SESSION_TAG}x-")]
