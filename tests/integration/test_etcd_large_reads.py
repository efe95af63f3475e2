"""A prefix larger than gRPC's default 4 MiB message is read whole: the
daemon lists its prefix in one range, and a cluster of 10,000 services
with 20,000 endpoints is 6.8 MB (found by `lab svcbench --cold`: the
daemon could not start)."""

from __future__ import annotations

from overlayd.store.etcd import EtcdStore

VALUE_BYTES = 10_000
KEYS = 600  # 6 MB in all: over 4 MiB


async def test_a_prefix_over_four_mebibytes_is_read_whole(etcd_endpoint: str, prefix: str) -> None:
    items = [(f"{prefix}/big/{i:04d}", f"{i:04d}" + "x" * (VALUE_BYTES - 4)) for i in range(KEYS)]
    async with EtcdStore([etcd_endpoint]) as store:
        for start in range(0, KEYS, 100):
            await store.put_many(items[start : start + 100])
        values, _ = await store.get_prefix(f"{prefix}/big/")
        with_revisions, _ = await store.get_prefix_revisions(f"{prefix}/big/")
    assert sum(len(v) for v in values.values()) == KEYS * VALUE_BYTES > 4 * 2**20
    assert values == {key: value.encode() for key, value in items}
    assert set(with_revisions) == set(values)
