"""Run a lab test once per address family: `@FAMILIES` parametrizes a test
with `family` (IPV4, IPV6), named ipv4/ipv6 in test ids. The tests' labs are
dual-stack (tests/lab/fakes.py), so both runs share one lab."""

from __future__ import annotations

import pytest

from overlayd.model import IPV4, IPV6

FAMILIES = pytest.mark.parametrize(
    "family", [pytest.param(IPV4, id="ipv4"), pytest.param(IPV6, id="ipv6")]
)
