"""The control socket: how `overlayctl status` and `peers` ask the running
daemon what it has done. A Unix stream socket, mode 0600 in a 0700
directory, so only root can use it; one JSON request line, one JSON answer
line. Read-only by design: changes go through etcd, where every host sees
them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from overlayd.errors import OverlaydError

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096
ASK_TIMEOUT_SECONDS = 5.0
Handler = Callable[[], Any]


class DaemonUnreachable(OverlaydError):
    pass


@contextlib.asynccontextmanager
async def serve_control(path: Path, handlers: dict[str, Handler]) -> AsyncIterator[None]:
    """Listen on `path` while the context is open."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)  # noqa: ASYNC240 (instant, local)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            request = json.loads(line[:MAX_REQUEST_BYTES] or b"{}")
            command = request.get("command") if isinstance(request, dict) else None
            handler = handlers.get(command) if isinstance(command, str) else None
            if handler is None:
                reply: Any = {"error": f"unknown command {command!r} (known: {sorted(handlers)})"}
            else:
                reply = {"result": handler()}
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError) as exc:
            log.debug("event=control_request_failed error=%r", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    old_umask = os.umask(0o177)  # the socket is created 0600, never briefly wider
    try:
        server = await asyncio.start_unix_server(answer, path=str(path))
    finally:
        os.umask(old_umask)
    try:
        yield
    finally:
        server.close()
        path.unlink(missing_ok=True)  # noqa: ASYNC240


async def ask(path: Path, command: str) -> Any:
    """One request to the daemon's control socket."""
    try:
        async with asyncio.timeout(ASK_TIMEOUT_SECONDS):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(json.dumps({"command": command}).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
            writer.close()
    except FileNotFoundError as exc:
        raise DaemonUnreachable(f"{path} does not exist: is overlayd running?") from exc
    except PermissionError as exc:
        raise DaemonUnreachable(f"{path}: permission denied (the socket is root's)") from exc
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise DaemonUnreachable(f"overlayd does not answer on {path}: {exc!r}") from exc
    reply = json.loads(line or b"{}")
    if "error" in reply:
        raise DaemonUnreachable(f"overlayd refused {command!r}: {reply['error']}")
    return reply.get("result")
