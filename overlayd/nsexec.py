"""Running programs on a host the way a container runtime does: inside a
named network namespace (`ip netns exec`), and CNI plugins with their config
on stdin and CNI_* in the environment; plus reading ping's summary.

Shared by overlay-cni (which calls the standard plugins), `overlayctl check`
(which attaches a probe and pings from it), the lab (which attaches its
containers and pings between them) and the daemon's Docker plugin (which
runs host-local and portmap through `CniRunner`, the asyncio twin of
`call_plugin`), so that none of them imports another's entry point.
Imports nothing of overlayd.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Where Debian's containernetworking-plugins and upstream's tarball put them.
STANDARD_PLUGIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")


def netns_argv(ns: str, *argv: str) -> list[str]:
    """The command line that runs `argv` inside the named namespace."""
    return ["ip", "netns", "exec", ns, *argv]


def ping_rtt_ms(output: str) -> float | None:
    """The average round trip in ms from ping's summary line
    ("rtt min/avg/max/mdev = 0.05/0.07/0.09/0.01 ms"); None when no reply
    came back and ping printed no such line."""
    for line in output.splitlines():
        if "min/avg/max" in line:
            return float(line.split("=")[1].split("/")[1])
    return None


def call_plugin(
    argv: Sequence[str], conf: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[bool, dict[str, Any] | None, str]:
    """Run a CNI plugin as a runtime does: config on stdin, CNI_* in the
    environment. Returns (succeeded, the parsed result or error, raw text)."""
    proc = subprocess.run(
        list(argv),
        input=json.dumps(conf).encode(),
        capture_output=True,
        env=dict(env),
        timeout=60,
        check=False,
    )
    return _outcome(proc.returncode, proc.stdout, proc.stderr)


def _outcome(code: int | None, stdout: bytes, stderr: bytes) -> tuple[bool, Any, str]:
    out = stdout.decode(errors="replace").strip()
    try:
        parsed = json.loads(out) if out else None
    except ValueError:
        parsed = None
    return code == 0, parsed, out or stderr.decode(errors="replace").strip()


async def run_plugin(
    argv: Sequence[str], conf: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[bool, Any, str]:
    """`call_plugin` for asyncio code. The plugin is killed and reaped when
    the caller is cancelled (or its asyncio.timeout expires), so no plugin
    runs on unseen after its caller gave up."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
    )
    try:
        out, err = await proc.communicate(json.dumps(conf).encode())
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())
        raise
    return _outcome(proc.returncode, out, err)


class CniRunner:
    """Runs a standard CNI plugin (host-local, portmap) by name, as a runtime
    does, from the first of `plugin_dirs` that has it. Answers
    (succeeded, the parsed result or error, raw text); a plugin that is not
    installed or outlives the timeout is a failure like any other."""

    def __init__(
        self, plugin_dirs: Sequence[str] = STANDARD_PLUGIN_DIRS, *, timeout: float = 30.0
    ) -> None:
        self.plugin_dirs = tuple(plugin_dirs)
        self.timeout = timeout

    def find(self, name: str) -> str | None:
        for directory in self.plugin_dirs:
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        return None

    async def __call__(
        self, plugin: str, command: str, conf: Mapping[str, Any], *, container_id: str, netns: str
    ) -> tuple[bool, Any, str]:
        path = self.find(plugin)
        if path is None:
            return False, None, f"the {plugin!r} CNI plugin is not in {', '.join(self.plugin_dirs)}"
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": ":".join(self.plugin_dirs),
        }
        try:
            async with asyncio.timeout(self.timeout):
                return await run_plugin([path], conf, env)
        except TimeoutError:
            return False, None, f"{plugin} {command} took longer than {self.timeout:g} s"


def runtime_env(
    command: str, netns_name: str, cni_path: str, base: Mapping[str, str]
) -> dict[str, str]:
    """The variables a runtime sets for a container whose network namespace
    is the named one in /run/netns (and whose ID is that name)."""
    return {
        **base,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": netns_name,
        "CNI_NETNS": f"/run/netns/{netns_name}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": cni_path,
    }
