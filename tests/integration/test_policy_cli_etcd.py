"""`overlayctl policy` and `endpoint label` against a real etcd: the
commands run as a user runs them (a process, the daemon's settings as
flags), writing and reading what a daemon reads; an endpoint relabelled in
place keeps its etcd lease, and goes when the lease does; `policy wait`
is woken by a real watch."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from ipaddress import IPv4Address, IPv4Network, ip_address

from overlayd.cli import policy as cli
from overlayd.model import Lease
from overlayd.plan.endpoints import endpoint_key, host_id, render_endpoint
from overlayd.plan.leases import config_key, lease_key, render_lease
from overlayd.plan.policy import parse_policy, policy_key
from overlayd.plan.policy_model import Endpoint
from overlayd.store.etcd import EtcdStore

DOCUMENT = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-web}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432}]
"""


def overlayctl(
    endpoint: str, prefix: str, own: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`overlayctl COMMAND [SUBCOMMAND] --settings... REST`: the settings
    flags belong to the last (sub)command."""
    words = 1 if args[0] == "endpoints" else 2
    command, rest = list(args[:words]), list(args[words:])
    flags = ["--etcd-endpoints", endpoint, "--etcd-prefix", prefix, "--overlayd-prefix", own]
    return subprocess.run(
        [sys.executable, "-m", "overlayd.cli.ctl", *command, *flags, *rest],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def own_prefix() -> str:
    return f"/o{uuid.uuid4().hex[:8]}"


async def a_host(store: EtcdStore, prefix: str, n: int, ttl: int = 30) -> tuple[str, int]:
    lease = Lease(
        IPv4Network(f"10.244.{n}.0/24"), IPv4Address(f"192.0.2.{n}"), 1, f"aa:0{n}:00:00:00:01"
    )
    lease_id = await store.grant(ttl)
    assert await store.create(lease_key(prefix, lease), render_lease(lease), lease_id)
    return host_id(lease.subnet), lease_id


async def test_apply_list_show_delete_through_the_command(etcd_endpoint: str, prefix: str) -> None:
    own = own_prefix()
    async with EtcdStore([etcd_endpoint]) as store:
        await store.put(config_key(prefix), '{"Network": "10.244.0.0/16"}')
    refused = overlayctl(
        etcd_endpoint, prefix, own, "policy", "apply", "-", stdin=DOCUMENT.replace("port:", "prt:")
    )
    assert refused.returncode == 2 and "spec.ingress[0].ports[0].prt" in refused.stderr
    applied = overlayctl(
        etcd_endpoint, prefix, own, "policy", "apply", "-", "--json", stdin=DOCUMENT
    )
    assert applied.returncode == 0, applied.stderr
    written = json.loads(applied.stdout)
    async with EtcdStore([etcd_endpoint]) as store:
        found = await store.get_with_revision(policy_key(own, "allow-web"))
        # Nothing else was written under our prefix by the refused one.
        everything, _ = await store.get_prefix_revisions(own + "/")
    assert found is not None and found[1] == written["revision"]
    assert list(everything) == [policy_key(own, "allow-web")]
    # What etcd holds is the canonical form, which reads back as the same policy.
    assert parse_policy(found[0]) == parse_policy(DOCUMENT)
    listed = overlayctl(etcd_endpoint, prefix, own, "policy", "list", "--json")
    assert [r["name"] for r in json.loads(listed.stdout)] == ["allow-web"]
    shown = overlayctl(etcd_endpoint, prefix, own, "policy", "show", "allow-web")
    assert "port: 5432" in shown.stdout and "protocol: TCP" in shown.stdout
    deleted = overlayctl(etcd_endpoint, prefix, own, "policy", "delete", "allow-web", "--json")
    revision = json.loads(deleted.stdout)["revision"]
    assert revision > written["revision"]
    again = overlayctl(etcd_endpoint, prefix, own, "policy", "delete", "allow-web")
    assert again.returncode == 1 and "no policy" in again.stderr
    async with EtcdStore([etcd_endpoint]) as store:
        assert await store.get_with_revision(policy_key(own, "allow-web")) is None
        _, now = await store.get(config_key(prefix))
    assert now >= revision


async def test_label_keeps_the_endpoints_lease(etcd_endpoint: str, prefix: str) -> None:
    own = own_prefix()
    async with EtcdStore([etcd_endpoint]) as store:
        await store.put(config_key(prefix), '{"Network": "10.244.0.0/16"}')
        host, lease_id = await a_host(store, prefix, 4)
        endpoint = Endpoint(
            key=endpoint_key(own, host, "c1"),
            id="c1",
            host=host,
            name="web-1",
            addresses=(ip_address("10.244.4.5"),),
            labels={"app": "web"},
            hostname="h4",
        )
        await store.put_bound(endpoint.key, render_endpoint(endpoint), lease_id)
        labelled = overlayctl(
            etcd_endpoint, prefix, own, "endpoint", "label", "web-1", "tier=front", "app-"
        )
        assert labelled.returncode == 0, labelled.stderr
        value, revision, lease = await store.get_with_lease(endpoint.key) or (b"", 0, 0)
        assert lease == lease_id and f"at revision {revision}" in labelled.stdout
        assert json.loads(value)["labels"] == {"tier": "front"}
        listed = overlayctl(etcd_endpoint, prefix, own, "endpoints", "--json")
        assert json.loads(listed.stdout)["endpoints"][0]["labels"] == {"tier": "front"}
        # The key goes with the host's lease, relabelled or not.
        await store.revoke(lease_id)
        assert await store.get_with_lease(endpoint.key) is None
    gone = overlayctl(etcd_endpoint, prefix, own, "endpoint", "label", "web-1", "a=b")
    assert gone.returncode == 1 and "no endpoint is named" in gone.stderr


async def test_wait_is_woken_by_a_status_write(etcd_endpoint: str, prefix: str) -> None:
    own = own_prefix()
    async with EtcdStore([etcd_endpoint]) as store:
        host, lease_id = await a_host(store, prefix, 5)
        status_key = cli.status_prefix(own) + host
        await store.put_bound(status_key, b'{"revision": 1}', lease_id)
        revision = await store.put_revision(policy_key(own, "p"), '{"name": "p", "selector": {}}')
        assert await cli.newest_revision(store, own) == revision

        async def enforce_later() -> None:
            await asyncio.sleep(0.2)
            await store.put_bound(status_key, json.dumps({"revision": revision}).encode(), lease_id)

        later = asyncio.create_task(enforce_later())
        found, seconds = await cli.wait_enforced(store, prefix, own, revision, within=10)
        await later
        assert found.done and 0.2 <= seconds < 0.9
        # Timing out: a revision nobody has reached.
        found, seconds = await cli.wait_enforced(store, prefix, own, revision + 100, within=0.3)
        assert not found.done and found.behind[0].host == host
        assert await store.delete_revision(policy_key(own, "p")) is not None
        assert await store.delete_revision(policy_key(own, "p")) is None
