"""The kept libnftables context (dataplane/libnft.py) on the real kernel:
it writes into the namespace it was given and nowhere else, a refused
script changes nothing and says why as `nft -f` would, and a change made
meanwhile by someone else is seen, never hidden by the context's cache."""

from __future__ import annotations

import pytest

from overlayd.dataplane.libnft import NftSession
from overlayd.dataplane.nft import NftError
from overlayd.lab import netns as lab_netns
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.root]

TABLE = "inet overlayd_libnft_test"


def _listing(ns: str) -> str:
    return lab_netns.in_ns(ns, "nft", "list", "ruleset")


async def test_a_session_writes_into_its_namespace_only(netns: str) -> None:
    session = NftSession(netns)
    try:
        await session.apply(f"add table {TABLE}\nadd chain {TABLE} c\nadd rule {TABLE} c accept")
        assert "chain c {" in _listing(netns)
        here = lab_netns.sh(["nft", "list", "tables"])
        assert "overlayd_libnft_test" not in here
    finally:
        await session.close()


async def test_a_refused_script_changes_nothing_and_names_the_cause(netns: str) -> None:
    session = NftSession(netns)
    try:
        await session.apply(f"add table {TABLE}\nadd chain {TABLE} c")
        before = _listing(netns)
        with pytest.raises(NftError, match=r"nft refused the ruleset: .*No such file or directory"):
            # The first statement is good; the transaction is all or nothing.
            await session.apply(f"add chain {TABLE} d\nadd rule {TABLE} nosuchchain accept")
        assert _listing(netns) == before
        # Positive control: the same context goes on working after a refusal.
        await session.apply(f"add chain {TABLE} d")
        assert "chain d {" in _listing(netns)
    finally:
        await session.close()


async def test_changes_by_others_between_writes_are_seen(netns: str) -> None:
    session = NftSession(netns)
    try:
        await session.apply(f"add table {TABLE}\nadd chain {TABLE} mine")
        # Someone else deletes our chain and makes another one.
        lab_netns.in_ns(netns, "nft", "delete", "chain", *TABLE.split(), "mine")
        lab_netns.in_ns(netns, "nft", "add", "chain", *TABLE.split(), "theirs")
        # A cached view would still see `mine` and miss `theirs`.
        with pytest.raises(NftError, match="mine"):
            await session.apply(f"add rule {TABLE} mine accept")
        await session.apply(f"add rule {TABLE} theirs accept")
        assert "accept" in _listing(netns).split("chain theirs {")[1]
    finally:
        await session.close()
