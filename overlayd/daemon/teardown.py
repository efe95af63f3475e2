"""`overlayd --teardown`: remove everything the daemon creates on this
host, and nothing else: its devices (the bridge, the gwbridge and both
VTEPs, `ovl.<VNI>` and `ovl-v6.<VNI>`, and with them the routes and entries
of both families), its nftables tables and iptables chains, its subnet file,
and its lease in etcd. The data plane goes even when etcd cannot be
reached; only the lease release needs it."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Network, IPv6Network

from overlayd.config import AgentConfig
from overlayd.dataplane import Dataplane
from overlayd.errors import LeaseError
from overlayd.plan.leases import parse_lease, subnet_key
from overlayd.store.base import Store, StoreUnavailable
from overlayd.surfaces.subnetfile import read_subnet, read_subnet6

TEARDOWN_ETCD_SECONDS = 10.0


async def teardown(settings: AgentConfig, store: Store, dataplane: Dataplane) -> list[str]:
    """What was removed, one line each."""
    s = settings
    done: list[str] = []
    names = [s.bridge, s.gwbridge, *await dataplane.netlink.vtep_names()]
    for name in names:
        if await dataplane.netlink.delete_link(name):
            done.append(f"deleted {name}")
    done += [f"deleted nftables table {table}" for table in await dataplane.nft.delete()]
    done += await dataplane.forward.remove()
    subnet, subnet6 = read_subnet(s.subnet_file), read_subnet6(s.subnet_file)
    if s.subnet_file.exists():
        s.subnet_file.unlink()
        done.append(f"removed {s.subnet_file}")
    if subnet is not None:
        try:
            async with asyncio.timeout(TEARDOWN_ETCD_SECONDS):
                if await _release(settings, store, dataplane, subnet, subnet6):
                    done.append(f"released lease {subnet_key(s.etcd_prefix, subnet, subnet6)}")
        except (TimeoutError, StoreUnavailable):
            done.append(f"could not reach etcd: the lease of {subnet} expires by its TTL")
    return done


async def _release(
    settings: AgentConfig,
    store: Store,
    dataplane: Dataplane,
    subnet: IPv4Network,
    subnet6: IPv6Network | None,
) -> bool:
    """Delete our lease, only if it is still ours: after an expiry the
    subnet may belong to another host."""
    key = subnet_key(settings.etcd_prefix, subnet, subnet6)
    value, _ = await store.get(key)
    underlay = await dataplane.netlink.find_underlay(settings.iface, settings.public_ip)
    try:
        ours = value is not None and parse_lease(subnet, value).public_ip == underlay.address
    except LeaseError:
        ours = False
    return ours and await store.delete(key)
