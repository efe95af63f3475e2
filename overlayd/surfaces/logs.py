"""Structured logs: one event per line, as key=value pairs or JSON.

Every message in overlayd is written as `event=NAME key=value ...`, with
free text values quoted by `%r`. The key=value formatter prefixes time,
level and logger; the JSON formatter splits the same message into fields,
so that one logging call serves both formats and call sites stay plain
`logging` calls (no structured-logging dependency needed for this).
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

# key=value, where value is a quoted Python repr or a run of non-spaces.
_PAIR = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S*)""")


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def parse_fields(message: str) -> dict[str, Any]:
    """The key=value pairs of a message; text outside them goes to `msg`."""
    fields: dict[str, Any] = {}
    rest: list[str] = []
    position = 0
    for match in _PAIR.finditer(message):
        if message[position : match.start()].strip():
            rest.append(message[position : match.start()].strip())
        key, value = match.group(1), match.group(2)
        if value[:1] in ("'", '"'):
            with contextlib.suppress(ValueError, SyntaxError):
                value = ast.literal_eval(value)
        fields[key] = value
        position = match.end()
    if message[position:].strip():
        rest.append(message[position:].strip())
    if rest:
        fields["msg"] = " ".join(rest)
    return fields


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"ts={_timestamp(record)} level={record.levelname.lower()}"
            f" logger={record.name} {record.getMessage()}"
        )
        if record.exc_info:
            line += " traceback=" + repr(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields.update(parse_fields(record.getMessage()))
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        return json.dumps(fields, default=str)


def setup_logging(level: str, fmt: str, stream: TextIO = sys.stderr) -> None:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries' chatter (gRPC reconnects, MQTT client internals) is not ours.
    for noisy in ("aetcd", "grpc", "aiomqtt", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
