"""The control socket: how `overlayctl status` and `peers` ask the running
daemon what it has done, and how overlay-cni registers a container as an
endpoint. A Unix stream socket, mode 0600 in a 0700 directory, so only root
can use it; one JSON request line (`{"command": ..., "args": {...}}`), one
JSON answer line (`{"result": ...}` or `{"error": ...}`; a request that
is not JSON, too long or malformed is answered with an error naming what
is wrong, like a refused one). Changes to the
cluster go through etcd, where every host sees them; the only writes made
here are a host's own endpoints, which the daemon writes because they are
bound to the etcd lease it holds."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from overlayd.errors import OverlaydError

log = logging.getLogger(__name__)

# A registration carries labels: room for a few hundred of them.
MAX_REQUEST_BYTES = 65536
ASK_TIMEOUT_SECONDS = 15.0  # a registration waits up to 10 s for its pass
# Called with the request's arguments; may return an awaitable.
Handler = Callable[[Mapping[str, Any]], Any]


class DaemonUnreachable(OverlaydError):
    pass


class DaemonRefused(DaemonUnreachable):
    """The daemon answered with an error: a bad request, or one it could
    not carry out (a subclass of DaemonUnreachable, because either way the
    caller has no answer)."""


@contextlib.asynccontextmanager
async def serve_control(path: Path, handlers: dict[str, Handler]) -> AsyncIterator[None]:
    """Listen on `path` while the context is open."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)  # noqa: ASYNC240 (instant, local)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await _reply(reader, handlers)
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError) as exc:
            # No request line within the timeout, the client gone, or a
            # result that is not JSON (a handler's bug): nobody to answer.
            log.debug("event=control_request_failed error=%r", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    old_umask = os.umask(0o177)  # the socket is created 0600, never briefly wider
    try:
        server = await asyncio.start_unix_server(answer, path=str(path), limit=MAX_REQUEST_BYTES)
    finally:
        os.umask(old_umask)
    try:
        yield
    finally:
        server.close()
        path.unlink(missing_ok=True)  # noqa: ASYNC240


async def _reply(reader: asyncio.StreamReader, handlers: Mapping[str, Handler]) -> dict[str, Any]:
    """The answer to one request line: the handler's result, or an error
    that names what is wrong with the request (every request gets one, so
    that a client never waits for an answer that will not come)."""
    try:
        line = await asyncio.wait_for(reader.readline(), timeout=5)
    except ValueError:  # the reader's limit: no newline within MAX_REQUEST_BYTES
        return _refused(f"request longer than {MAX_REQUEST_BYTES} bytes")
    try:
        request = json.loads(line or b"{}")
    except RecursionError:
        return _refused("request is not JSON this server reads: nested too deeply")
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        return _refused(f"request is not JSON: {exc}")
    if not isinstance(request, dict):
        return _refused('request: must be a JSON object {"command": ..., "args": {...}}')
    command = request.get("command")
    args = request.get("args", {})
    handler = handlers.get(command) if isinstance(command, str) else None
    if handler is None:
        return _refused(f"unknown command {command!r} (known: {sorted(handlers)})")
    if not isinstance(args, dict):
        return _refused("args: must be an object")
    try:
        result = handler(args)
        if inspect.isawaitable(result):
            result = await result
    except OverlaydError as exc:  # a refused request, said as such
        return _refused(str(exc))
    except Exception:  # a handler's bug: answered, logged, survived
        log.exception("event=control_handler_failed command=%s", command)
        return {"error": f"{command} failed inside overlayd (see its log)"}
    return {"result": result}


def _refused(reason: str) -> dict[str, Any]:
    # One line per refusal: why a container failed to start, for whoever reads the log.
    log.info("event=control_request_refused reason=%r", reason)
    return {"error": reason}


async def ask(path: Path, command: str, args: Mapping[str, Any] | None = None) -> Any:
    """One request to the daemon's control socket."""
    request: dict[str, Any] = {"command": command}
    if args is not None:
        request["args"] = dict(args)
    try:
        async with asyncio.timeout(ASK_TIMEOUT_SECONDS):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(json.dumps(request).encode() + b"\n")
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
        raise DaemonRefused(f"overlayd refused {command!r}: {reply['error']}")
    return reply.get("result")
