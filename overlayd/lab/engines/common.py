"""What both lab engines share: the constants, EngineError, the command
runner (run_command), a container as an engine reports it
(EngineContainer, parse_inspect), `-p` specs (parse_publish), and the
Engine base class that Podman (podman.py) and Docker (docker.py) fill in.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, ClassVar

from overlayd.lab.hosts import HostFiles
from overlayd.lab.netns import LabCommandError

IMAGE = "localhost/overlayd-busybox"
ULIMITS = ("nofile=1024:1024", "nproc=1024:1024")
DOCKER = "/usr/bin/docker"  # /usr/local/bin/docker may be an unrelated client
DOCKER_FLAVOURS = ("docker-opts", "plain")
ENGINE_KINDS = ("podman", "docker")
NETWORK = "overlay"  # the CNI network (conflist) name Podman's containers join
ENGINE_WAIT_SECONDS = 60.0
NETNS_RECORD = "netns-entries"  # Podman's /run/netns entries, under its state dir


class EngineError(LabCommandError):
    pass


def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 120,
    stdin: bytes | None = None,
) -> str:
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        input=stdin,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
        # Engines leave relative paths alone, but a cwd inside a state dir
        # that is being removed would break them.
        cwd="/",
    )
    out = proc.stdout.decode(errors="replace")
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip() or out.strip()
        raise EngineError(f"{shlex.join(argv)}: exit {proc.returncode}: {err}")
    return out


# --- containers -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineContainer:
    """A running engine container, as the engine reports it."""

    engine: str
    host: int
    name: str
    id: str
    pid: int
    # address per network name, as the engine reports them
    addresses: dict[str, IPv4Address] = field(default_factory=dict)

    @property
    def address(self) -> IPv4Address | None:
        """The overlay address: the CNI network's for Podman, else the first."""
        if NETWORK in self.addresses:
            return self.addresses[NETWORK]
        return next(iter(self.addresses.values()), None)

    @property
    def netns_path(self) -> str:
        """The container's network namespace, for `nsenter --net=`."""
        return f"/proc/{self.pid}/ns/net"

    @property
    def title(self) -> str:
        return f"h{self.host}/{self.engine}/{self.name}"


def parse_inspect(engine: str, host: int, raw: Mapping[str, Any]) -> EngineContainer:
    """One container from `podman inspect` / `docker inspect` JSON."""
    networks = (raw.get("NetworkSettings") or {}).get("Networks") or {}
    addresses = {
        name: IPv4Address(info["IPAddress"])
        for name, info in sorted(networks.items())
        if info and info.get("IPAddress")
    }
    return EngineContainer(
        engine=engine,
        host=host,
        name=str(raw.get("Name", "")).lstrip("/"),
        id=str(raw["Id"]),
        pid=int((raw.get("State") or {}).get("Pid") or 0),
        addresses=addresses,
    )


def parse_publish(spec: str) -> tuple[int, int]:
    """`-p HOST:CONTAINER` (TCP) as two ports; anything else is refused."""
    host, sep, container = spec.partition(":")
    if not sep or not host.isdigit() or not container.isdigit():
        raise EngineError(f"-p {spec!r}: give HOSTPORT:CONTAINERPORT")
    ports = int(host), int(container)
    if not all(0 < p < 65536 for p in ports):
        raise EngineError(f"-p {spec!r}: ports are 1..65535")
    return ports


# --- engines ---------------------------------------------------------------------


class Engine:
    """What both engines offer; `host`, `ns` and `files` name the lab host."""

    kind: ClassVar[str]

    def __init__(self, host: int, ns: str, files: HostFiles, image_tar: Path) -> None:
        self.host, self.ns, self.files, self.image_tar = host, ns, files, image_tar
        self.dir = files.root / self.kind

    # subclasses --------------------------------------------------------------
    def argv(self, *args: str) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    def start(self) -> float:
        raise NotImplementedError

    def running(self) -> bool:
        raise NotImplementedError

    def teardown(self) -> None:
        raise NotImplementedError

    # shared ------------------------------------------------------------------
    def cli(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """The engine's command line with this host's state, its output;
        `env`: more variables for it (Podman passes CNI_ARGS on to CNI)."""
        return run_command(
            self.argv(*args),
            env={**self.env(), **(env or {})},
            check=check,
            timeout=timeout,
            stdin=stdin,
        )

    def ensure_started(self) -> float:
        """Start the engine unless it runs; the seconds that took (0 if it ran)."""
        return 0.0 if self.running() else self.start()

    def run_args(self, publish: Sequence[str]) -> list[str]:
        args = []
        for spec in publish:
            parse_publish(spec)
            args += ["-p", spec]
        return args

    def run(
        self,
        name: str | None,
        command: Sequence[str],
        *,
        publish: Sequence[str] = (),
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> EngineContainer:
        """A detached container of the busybox image running `command`
        (named by the engine when `name` is None)."""
        self.ensure_started()
        naming = ["--name", name] if name else []
        out = self.cli(
            "run", "-d", *naming, *self.run_args(publish), *extra, IMAGE, *command, env=env
        )
        return self.inspect(name or out.strip().splitlines()[-1])

    def inspect(self, name: str) -> EngineContainer:
        raw = json.loads(self.cli("inspect", "--type", "container", name))
        return parse_inspect(self.kind, self.host, raw[0])

    def containers(self) -> list[EngineContainer]:
        """The running containers (none when the engine is not running)."""
        if not self.running():
            return []
        ids = self.cli("ps", "-q", "--no-trunc", check=False).split()
        if not ids:
            return []
        raw = json.loads(self.cli("inspect", "--type", "container", *ids, check=False) or "[]")
        return [parse_inspect(self.kind, self.host, r) for r in raw]

    def exec(self, name: str, *argv: str, check: bool = True, timeout: float = 60) -> str:
        return self.cli("exec", name, *argv, check=check, timeout=timeout)

    def remove(self, name: str) -> None:
        self.cli("rm", "-f", *self.rm_flags, name, check=False)

    # Podman's `rm -f` stops with SIGTERM and waits 10 s (a shell or sleep
    # as PID 1 ignores it); Docker's kills at once.
    rm_flags: ClassVar[tuple[str, ...]] = ()

    def http_get(self, name: str, url: str, *, timeout: int = 5) -> str | None:
        """The body `url` gives a client in container `name`; None if it fails.
        (busybox-static 1.35's `wget -T` segfaults: the applet `timeout` bounds it.)"""
        out = subprocess.run(
            self.argv("exec", name, "timeout", str(timeout), "wget", "-qO-", url),
            capture_output=True,
            env={**os.environ, **self.env()},
            timeout=timeout + 60,
            check=False,
        )
        return out.stdout.decode(errors="replace") if out.returncode == 0 else None
