"""Structured logs: the same message as key=value or as JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from overlayd.surfaces.logs import parse_fields, setup_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup_logging reconfigures the process's root logger; put it back, so
    that no later test depends on running before or after these."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {
        name: logging.getLogger(name).level for name in ("aetcd", "grpc", "aiomqtt", "asyncio")
    }
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, saved in quiet.items():
            logging.getLogger(name).setLevel(saved)


def test_fields_are_split_and_quoted_values_unquoted() -> None:
    fields = parse_fields("event=lease_skipped key=/a/b reason='has no \"PublicIP\"' n=3")
    assert fields == {
        "event": "lease_skipped",
        "key": "/a/b",
        "reason": 'has no "PublicIP"',
        "n": "3",
    }


def test_free_text_goes_to_msg() -> None:
    assert parse_fields("subnet taken meanwhile; choosing again") == {
        "msg": "subnet taken meanwhile; choosing again"
    }


def test_json_format_writes_one_object_per_line() -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    logging.getLogger("overlayd.test").info("event=ready subnet=%s peers=%d", "10.1.2.0/24", 2)
    logging.getLogger("overlayd.test").debug("event=pass")  # below the level
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "ready"
    assert record["subnet"] == "10.1.2.0/24"
    assert record["level"] == "info"
    assert record["logger"] == "overlayd.test"


def test_kv_format_prefixes_time_level_and_logger() -> None:
    stream = io.StringIO()
    setup_logging("info", "kv", stream)
    logging.getLogger("overlayd.test").warning("event=x a=1")
    line = stream.getvalue().strip()
    assert line.startswith("ts=")
    assert line.endswith("level=warning logger=overlayd.test event=x a=1")
